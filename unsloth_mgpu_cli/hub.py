"""The Hugging Face hub as seen from this machine: can a download work at all?

On a host that cannot resolve the hub's name (a cluster's compute node, an air-gapped box) every hub request
fails, but only after the hub client's retries: about 50 s for an uncached model, 25 s for a dataset, and 75 s
just to load the tokenizer of a model that *is* in the cache (it asks the hub for files the model lacks). Since
no download can work there, the commands that load models work offline from the start (`work_offline_if_
unreachable`), and what is not in the cache is refused at once, naming the recipe key (see data.py).

Nothing here imports huggingface_hub: its offline switch is read when it is imported, so this runs first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

# Set by `work_offline_if_unreachable` to the host name that did not resolve: the errors for what is not in the
# cache then say why the run is offline (the user did not ask for it).
UNRESOLVED = "MGPU_HUB_UNRESOLVED"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_host(env: Mapping[str, str]) -> str:
    """The hub's host name: HF_ENDPOINT's, else huggingface.co."""
    from urllib.parse import urlparse

    return urlparse(env.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_host_resolves(env: Mapping[str, str], timeout: float = 2.0) -> bool | None:
    """Whether the hub's host name resolves, within `timeout` seconds (None: no answer in time)."""
    import socket
    import threading

    host = hub_host(env)
    answer: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=look_up, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    return answer[0] if answer else None


def _truthy(value: str | None) -> bool:
    """An environment switch as huggingface_hub reads it (1, ON, YES, TRUE)."""
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline(env: Mapping[str, str], datasets: bool = False) -> bool:
    """Whether hub downloads are switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE; for `datasets`, also
    HF_DATASETS_OFFLINE)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *(("HF_DATASETS_OFFLINE",) if datasets else ()))
    return any(_truthy(env.get(name)) for name in names)


def unreachable_hub(env: Mapping[str, str]) -> str | None:
    """The hub's host name when downloads are on and it does not resolve here, else None. Behind a proxy the name
    need not resolve here: None then."""
    if offline(env) or any(env.get(name) for name in PROXY_VARIABLES):
        return None
    return hub_host(env) if hub_host_resolves(env) is False else None


def unreachable_because(env: Mapping[str, str]) -> str | None:
    """The host name that cannot be reached, when that is why hub ids cannot load: one this process found
    (`work_offline_if_unreachable`) or finds now."""
    return env.get(UNRESOLVED) or unreachable_hub(env)


def names_a_hub_id(names: Iterable[str | None]) -> bool:
    """Whether any of these model names or dataset paths would load from the hub: not a builtin, not on disk."""
    return any(n and not n.startswith("builtin:") and not Path(n).expanduser().exists() for n in names)


def work_offline_if_unreachable(
    names: Iterable[str | None] | None, env: MutableMapping[str, str] | None = None
) -> str | None:
    """When one of `names` (model names, dataset paths; None: not known, as for a hook-mode script) is a hub id,
    downloads are on and the hub's name does not resolve: switch downloads off for this process and the workers it
    starts (they inherit the environment), and say so on stderr. Returns the host name, or None."""
    env = os.environ if env is None else env
    if any(env.get(name) for name in OFFLINE_VARIABLES):  # the user's own choice, either way
        return None
    if names is not None and not names_a_hub_id(names):
        return None
    host = unreachable_hub(env)
    if host is None:
        return None
    for name in OFFLINE_VARIABLES:
        env[name] = "1"
    env[UNRESOLVED] = host
    print(
        f"hub: {host} does not resolve from this machine: models and datasets load from the Hugging Face cache "
        "only (HF_HUB_OFFLINE=1; set it yourself to skip this check)",
        file=sys.stderr,
    )
    return host
