"""Everything about processes and the process group lives here: launching workers through PyTorch's
elastic launcher (the machinery behind `torchrun`), rendezvous, `init_process_group`, collectives,
gradient synchronisation, cross-rank consistency checks and teardown.

The rest of the engine receives a `DistInfo` and never reads RANK/MASTER_ADDR itself (hook mode asks
`external_launch` here; `mgpu doctor --probe`'s worker is its own small script, `probe.py`). World size 1 is
not a special case: the same code runs with one process (every collective returns at once for a world of one).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import NodesNeverMet, Problem, RanksDisagree, TrainingFailed, UserError, reported_user_error


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on this host, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    device_type: str = "cpu"  # "cuda" or "cpu"
    restart_count: int = 0  # how often the elastic agent restarted the workers (0: first attempt)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cuda", 0) if self.device_type == "cuda" else torch.device("cpu")

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"


def external_launch(env: Any = None) -> DistInfo | None:
    """This process's place when a launcher started it (torchrun, or any that sets RANK and WORLD_SIZE, as hook
    mode accepts); None otherwise. Reads the variables only: no group is joined."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return get_dist_info("cpu", env)
    return None


def get_dist_info(device_type: str = "cpu", env: Any = None) -> DistInfo:
    """Read the launcher's environment (`env`, default os.environ); world size 1 when not launched."""
    env = os.environ if env is None else env
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
        device_type=device_type,
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------------
# Nodes: where nnodes / node_rank / the rendezvous endpoint come from (flags, recipe, torchrun, SLURM)
# ------------------------------------------------------------------------------------------------------

DEFAULT_RDZV_PORT = 29400  # torchrun's default c10d rendezvous port


@dataclass(frozen=True)
class NodeSetup:
    """How this host takes part in a run, and where each value came from.

    Attributes:
        nnodes: number of hosts.
        node_rank: this host's index among them.
        rdzv_endpoint: HOST:PORT of the rendezvous (None on one host: loopback is used).
        sources: for each of the three values, what set it: a flag (`--nnodes`), a recipe key
            (`distributed.nnodes`), an environment variable (`SLURM_NODEID`) or `default`.
        under_torchrun: this process is already a worker started by torchrun (or another elastic agent):
            train in place instead of launching workers.
        rank: global rank given by torchrun (under_torchrun only).
        local_world_size: workers on this host given by torchrun (under_torchrun only).
        world_size: workers in all given by torchrun (under_torchrun only).
    """

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    under_torchrun: bool = False
    rank: int = 0
    local_world_size: int = 1
    world_size: int = 1

    def describe(self) -> str:
        """One line for the console, e.g. `node 1 of 2, rendezvous gpu01:29400 (from SLURM_JOB_NODELIST)`."""
        text = f"node {self.node_rank} of {self.nnodes}"
        if self.rdzv_endpoint:
            text += f", rendezvous {self.rdzv_endpoint}"
        origins = sorted({v for v in self.sources.values() if v != "default"})
        return text + (f" (from {', '.join(origins)})" if origins else "")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list, e.g. `gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1.

    A fallback for `scontrol show hostnames` (zero padding kept; several bracket groups multiply out).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    parts.append(cur)
    return [p for p in (x.strip() for x in parts) if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out: list[str] = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.strip().partition("-")
        if hi and lo.isdigit() and hi.isdigit():
            numbers = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            numbers = [lo]
        for n in numbers:
            out.extend(_expand_one(head + n + tail))
    return out


def first_slurm_host(nodelist: str, scontrol: str | None = None) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` when available, else our parser."""
    scontrol = scontrol if scontrol is not None else shutil.which("scontrol")
    if scontrol:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
            )
            lines = proc.stdout.split()
            if lines:
                return lines[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(Problem("SLURM_JOB_NODELIST", f"cannot read a host from {nodelist!r}"), "invalid environment")
    return hosts[0]


def check_endpoint(endpoint: str, where: str) -> list[Problem]:
    """Problems with a HOST:PORT string ([v6::addr]:PORT accepted), naming `where`."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]", host):
        return [Problem(where, f"expected HOST:PORT (e.g. 10.0.0.1:29400), found {endpoint!r}")]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return [Problem(where, f"expected a port from 1 to 65535 after the host, found {endpoint!r}")]
    return []


def resolve_nodes(
    env: dict[str, str] | os._Environ[str],
    flags: dict[str, Any] | None = None,
    recipe: Any = None,
    scontrol: str | None = None,
) -> NodeSetup:
    """Decide nnodes / node_rank / rdzv_endpoint for this host, and record where each came from.

    Precedence: command-line flag > recipe key (only when the recipe sets it) > torchrun's environment >
    SLURM's (`srun mgpu train ...`) > MASTER_ADDR/MASTER_PORT (endpoint only) > default (one node).

    Args:
        env: the environment to read (os.environ, or a dict in tests).
        flags: `{"nnodes", "node_rank", "rdzv_endpoint"}` from the command line (None: not given).
        recipe: the recipe's `distributed` section (its explicitly set fields count).
        scontrol: path of `scontrol` (default: looked up on PATH); "" disables it.

    Raises:
        UserError: node_rank outside 0..nnodes-1, no or a malformed endpoint for several nodes, flags
            given to a process torchrun already started, or an srun with several tasks per node; each
            problem names the flag, key or variable that set the value.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if env.get("TORCHELASTIC_RUN_ID") and "RANK" in env:
        return _torchrun_placement(env, flags)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, flag in _NODE_FLAGS.items():
        if key in flags:
            values[key], sources[key] = flags[key], flag
    if recipe is not None:
        for key in _NODE_FLAGS:
            if key not in values and key in getattr(recipe, "model_fields_set", set()):
                values[key], sources[key] = getattr(recipe, key), f"distributed.{key}"
    problems = _from_slurm(env, values, sources, scontrol)
    if "rdzv_endpoint" not in values and env.get("MASTER_ADDR") and values.get("nnodes", 1) > 1:
        values["rdzv_endpoint"] = _master_endpoint(env)
        sources["rdzv_endpoint"] = "MASTER_ADDR/MASTER_PORT"
    for key, default in (("nnodes", 1), ("node_rank", 0), ("rdzv_endpoint", None)):
        if key not in values:
            values[key], sources[key] = default, "default"
    nnodes, node_rank, endpoint = int(values["nnodes"]), int(values["node_rank"]), values["rdzv_endpoint"]
    problems += _node_problems(nnodes, node_rank, endpoint, sources)
    if problems:
        raise UserError(problems, "invalid multi-node arguments")
    return NodeSetup(
        nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=endpoint if nnodes > 1 else None, sources=sources
    )


def _master_endpoint(env: dict[str, str] | os._Environ[str]) -> str:
    """MASTER_ADDR:MASTER_PORT, with torchrun's default port when MASTER_PORT is unset."""
    return f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT') or DEFAULT_RDZV_PORT}"


_NODE_FLAGS = {"nnodes": "--nnodes", "node_rank": "--node-rank", "rdzv_endpoint": "--rdzv-endpoint"}


def _torchrun_placement(env: dict[str, str] | os._Environ[str], flags: dict[str, Any]) -> NodeSetup:
    """Already a worker of torchrun (or another elastic agent): it did the rendezvous; train in place. Node flags
    would contradict its placement: refused."""
    given = [_NODE_FLAGS[k] for k in flags]
    if given:
        raise UserError(
            Problem(
                "argument " + ", ".join(given),
                "this process was started by torchrun, which already placed it (RANK/WORLD_SIZE are set)",
                "drop these flags, or run mgpu train without torchrun",
            ),
            "invalid arguments",
        )
    local_ws = int(env.get("LOCAL_WORLD_SIZE", 1))
    world = int(env.get("WORLD_SIZE", 1))
    master = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" if env.get("MASTER_ADDR") and env.get("MASTER_PORT") else None
    return NodeSetup(
        nnodes=max(1, world // max(1, local_ws)),
        node_rank=int(env.get("GROUP_RANK", 0)),
        rdzv_endpoint=master,
        sources={
            "nnodes": "WORLD_SIZE/LOCAL_WORLD_SIZE",
            "node_rank": "GROUP_RANK",
            "rdzv_endpoint": "MASTER_ADDR/MASTER_PORT",
        },
        under_torchrun=True,
        rank=int(env["RANK"]),
        local_world_size=local_ws,
        world_size=world,
    )


def _from_slurm(
    env: dict[str, str] | os._Environ[str], values: dict[str, Any], sources: dict[str, str], scontrol: str | None
) -> list[Problem]:
    """Fill what flags and recipe left open from SLURM's variables (`srun mgpu train ...`): the node count and
    index, and node 0's address as the endpoint (MASTER_ADDR first, else the node list's first host). Returns
    the problems: several tasks per node, where mgpu starts each node's workers itself."""
    slurm_nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if not (slurm_nodes and "SLURM_NODEID" in env):
        return []
    problems = []
    if "nnodes" not in values:
        values["nnodes"], sources["nnodes"] = int(slurm_nodes), "SLURM_NNODES"
    if "node_rank" not in values:
        values["node_rank"], sources["node_rank"] = int(env["SLURM_NODEID"]), "SLURM_NODEID"
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks and tasks.isdigit() and int(tasks) > int(slurm_nodes) and sources["nnodes"] == "SLURM_NNODES":
        problems.append(
            Problem(
                "SLURM_NTASKS",
                f"{tasks} tasks on {slurm_nodes} nodes; mgpu starts the workers of a node itself",
                "run srun with --ntasks-per-node=1",
            )
        )
    if "rdzv_endpoint" not in values and values["nnodes"] > 1:
        if env.get("MASTER_ADDR"):
            values["rdzv_endpoint"] = _master_endpoint(env)
            sources["rdzv_endpoint"] = "MASTER_ADDR/MASTER_PORT"
        elif env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"):
            nodelist = env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
            host = first_slurm_host(nodelist, scontrol)
            values["rdzv_endpoint"] = f"{host}:{env.get('MASTER_PORT') or DEFAULT_RDZV_PORT}"
            sources["rdzv_endpoint"] = "SLURM_JOB_NODELIST"
    return problems


def _node_problems(nnodes: int, node_rank: int, endpoint: str | None, sources: dict[str, str]) -> list[Problem]:
    """What is wrong with the resolved values, each named by what set it (a flag, recipe key or variable)."""

    def where(key: str) -> str:  # flags are labelled as every command's arguments are ("argument --x")
        return f"argument {sources[key]}" if sources[key].startswith("--") else sources[key]

    problems = []
    if nnodes < 1:
        problems.append(Problem(where("nnodes"), f"expected at least 1 node, found {nnodes}"))
    elif not 0 <= node_rank < nnodes:
        problems.append(
            Problem(
                where("node_rank"),
                f"expected 0..{nnodes - 1} (nnodes={nnodes} from {sources['nnodes']}), found {node_rank}",
            )
        )
    if nnodes > 1 and not endpoint:
        problems.append(
            Problem(
                "argument --rdzv-endpoint",
                f"{nnodes} nodes need HOST:PORT of node 0's rendezvous",
                "pass --rdzv-endpoint HOST:PORT (the same on every node), or set distributed.rdzv_endpoint",
            )
        )
    elif endpoint:
        problems += check_endpoint(str(endpoint), where("rdzv_endpoint"))
    return problems


def run_in_place(entry: Callable[..., Any], args: Sequence[Any], setup: NodeSetup, device_type: str) -> dict[int, Any]:
    """Under torchrun: this process is already one worker; run `entry(*args)` here (no second launch)."""
    os.environ["MGPU_DEVICE_TYPE"] = device_type
    os.environ.pop(LAUNCHER_PID, None)  # the parent is torchrun's agent, whatever an outer environment said
    return {setup.rank: entry(*args)}


# ------------------------------------------------------------------------------------------------------
# Launching (parent side; never initialises CUDA)
# ------------------------------------------------------------------------------------------------------


@dataclass
class LaunchSpec:
    """How to start this node's workers: their number and device, the nodes and rendezvous, logs and stop file."""

    nproc_per_node: int
    device_type: str
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    log_dir: Path | None = None
    run_id: str | None = None
    stop_file: Path | None = None  # set: the first Ctrl-C/SIGTERM asks workers to checkpoint and stop (see launch)
    join_timeout_s: int = 600  # several nodes: how long the first waits for the others at the rendezvous (torch's)


def endpoint_host(endpoint: str) -> str:
    """The host of a checked HOST:PORT endpoint, without an IPv6 address's brackets."""
    return endpoint.rpartition(":")[0].strip("[]")


def wait_for_rendezvous_host(endpoint: str, timeout_s: float, node_rank: int, poll_s: float = 1.0) -> None:
    """A node other than node 0 waits here, in Python, until node 0's rendezvous accepts connections.

    torch's client gave up after two 60 s connection timeouts (a C++ stack dump and a traceback, exit 1), though a
    node may start first and wait up to the join timeout; and a Ctrl-C then took as long. Here a Ctrl-C is a
    KeyboardInterrupt at once (nothing ran: exit 130), and the timeout is the recipe's.

    Raises:
        TrainingFailed: node 0 did not answer within `timeout_s`.
    """
    address = (endpoint_host(endpoint), int(endpoint.rpartition(":")[2]))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(address, timeout=min(poll_s * 2, 5.0)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TrainingFailed(
                    f"node {node_rank}: node 0's rendezvous at {endpoint} did not answer within {timeout_s:.0f} s "
                    f"({exc.strerror or exc})",
                    f"start node 0 (--node-rank 0) with the same command and --rdzv-endpoint {endpoint}; check that "
                    "this host reaches it (firewall, host name); nodes that start far apart need a longer "
                    "distributed.join_timeout_seconds",
                ) from None
        time.sleep(poll_s)


def build_launch_config(spec: LaunchSpec) -> Any:
    """The elastic agent's `LaunchConfig` for `spec`: single-node runs rendezvous on loopback only."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    if spec.nnodes == 1:
        endpoint = f"127.0.0.1:{free_port()}"
        local_addr = "127.0.0.1"
    else:
        # Node 0 hosts the c10d store on the endpoint (is_host below); the others connect to it. The rendezvous
        # numbers the nodes itself (sorted by host name), so global rank 0 may sit on any node: output.dir
        # must be a folder every node reaches. A loopback endpoint means "all nodes on this host" (tests).
        endpoint = spec.rdzv_endpoint or ""
        host = endpoint_host(endpoint)
        local_addr = "127.0.0.1" if host in ("localhost", "::1") or host.startswith("127.") else None
    # On one host (a loopback endpoint), torch's c10d stores would still listen on every interface: ours bind
    # to loopback (LOOPBACK_RDZV below). Several hosts need the real interfaces: torch's own backend.
    backend = LOOPBACK_RDZV if local_addr == "127.0.0.1" else "c10d"
    if backend == LOOPBACK_RDZV:
        register_loopback_rendezvous()
    log_dir = spec.log_dir
    if spec.node_rank > 0 and log_dir is not None:
        # Only node 0 touches output.dir before the run; the other nodes keep their worker logs locally.
        log_dir = Path(tempfile.mkdtemp(prefix=f"mgpu-node{spec.node_rank}-logs-"))
    # Workers other than local rank 0 write their stdout/stderr to files: one readable console.
    redirects = {i: Std.ALL for i in range(1, spec.nproc_per_node)}
    logs = DefaultLogsSpecs(log_dir=str(log_dir) if log_dir else None, redirects=redirects, tee=Std.NONE)
    config = LaunchConfig(
        min_nodes=spec.nnodes,
        max_nodes=spec.nnodes,
        nproc_per_node=spec.nproc_per_node,
        # Every node must name the same run to meet at the rendezvous; the endpoint already isolates runs.
        run_id=spec.run_id or (uuid.uuid4().hex[:12] if spec.nnodes == 1 else "mgpu"),
        role="mgpu",
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs=(
            {"is_host": spec.node_rank == 0, "rank": spec.node_rank, "join_timeout": spec.join_timeout_s}
            if spec.nnodes > 1
            else {}
        ),
        max_restarts=spec.max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
        logs_specs=logs,
        local_addr=local_addr,
    )
    config.node_logs = log_dir if log_dir is not spec.log_dir else None  # the temporary folder made above
    return config


LOOPBACK_RDZV = "mgpu-c10d-loopback"
USER_THREADS = "MGPU_USER_THREADS"  # OMP_NUM_THREADS as the user gave it to `mgpu train`: the workers keep it
_OMP_OURS = "MGPU_OMP_SET_BY_LAUNCH"  # the OMP_NUM_THREADS an earlier launch of this process set (not the user's)


def register_loopback_rendezvous() -> None:
    """Register torch's c10d rendezvous with its two TCP stores (the rendezvous store, and the one the workers
    bootstrap from) listening on loopback only: torch's TCPStore listens on every interface whatever host it is
    given, which would leave an unauthenticated store open to the network for a single-host run."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry

    registry.register(LOOPBACK_RDZV, _loopback_rendezvous_handler)


def _loopback_rendezvous_handler(params: Any) -> Any:
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    class Backend(C10dRendezvousBackend):
        @property
        def name(self) -> str:
            return LOOPBACK_RDZV  # the registry checks that the handler's backend is the one asked for

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_RDZV_PORT)
    timeout = timedelta(seconds=params.get_as_int("read_timeout", 60) or 60)
    if params.get_as_bool("is_host", True):  # one node: this process hosts the store
        store = _loopback_store(port, timeout)
    else:
        store = dist.TCPStore(host, port, is_master=False, multi_tenant=True, timeout=timeout)
    handler = create_handler(store, Backend(store, params.run_id), params)
    if hasattr(handler, "_create_tcp_store_server"):  # the store the workers bootstrap from (torch >= 2.5)
        handler._create_tcp_store_server = lambda _addr, port: _loopback_store(port, timeout)
    return handler


def _loopback_store(port: int, timeout: timedelta) -> Any:
    """A TCPStore server listening on 127.0.0.1:port (0: a free port) only."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(2048)
        port = int(sock.getsockname()[1])
    except OSError:
        sock.close()
        raise
    # the store owns the listening socket from here on (detach: Python must not close it)
    return dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
                         timeout=timeout)  # fmt: skip


def launch(entry: Callable[..., Any], args: Sequence[Any], spec: LaunchSpec) -> dict[int, Any]:
    """Start `entry(*args)` in `nproc_per_node` fresh processes per node; return rank -> return value.

    Uses `torch.distributed.launcher.api.elastic_launch` with the c10d rendezvous, as `torchrun` does.
    Single-node runs rendezvous on loopback. When a worker fails the agent stops the others; the
    failing rank and its error are raised as `TrainingFailed`.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = build_launch_config(spec)
    worker_threads_env(os.environ, spec)
    os.environ["MGPU_DEVICE_TYPE"] = spec.device_type
    nccl_on_loopback(os.environ, spec)
    # A worker ended at once (a second Ctrl-C, the teardown after another rank failed) cannot release the
    # semaphores of its torch.compile worker pool; the resource tracker that the spawn start method shares with
    # the parent then warns "There appear to be 1 leaked semaphore objects" at exit (seen on CUDA). It cleans
    # them up itself: hide that one warning (the tracker reads PYTHONWARNINGS when it starts).
    quiet = "ignore:resource_tracker:UserWarning"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers' parent: how they tell it died before they asked
    if os.environ.get("MGPU_DEBUG") != "1":
        # The agent logs every worker traceback at ERROR; we report the failing rank ourselves. It and torch's
        # spawn also warn as they stop the workers ("Received 2 death signal", "Terminating process N via signal
        # SIGTERM"): noise next to our own message. Each elastic module's logger has its own level (LOGLEVEL), so
        # setting the parent's is not enough.
        for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    if spec.stop_file is not None:
        # The agent turns SIGINT/SIGTERM into killing the workers at once (SignalException -> _shutdown), which
        # would lose everything since the last checkpoint. We take those two signals ourselves instead.
        config.signals_to_handle = "SIGHUP,SIGQUIT"
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    if spec.nnodes > 1 and spec.node_rank > 0 and spec.rdzv_endpoint:
        wait_for_rendezvous_host(spec.rdzv_endpoint, spec.join_timeout_s, spec.node_rank)
    starts = _WORKER_STARTS[0]
    with _graceful_stop(spec.stop_file), _counting_worker_starts():
        try:
            results = elastic_launch(config, entry)(*args)
            # a node's local worker logs are of no use once its workers finished well (a folder per run was left)
            if config.node_logs is not None:
                shutil.rmtree(config.node_logs, ignore_errors=True)
            return results
        except ChildFailedError as exc:
            user_error = _reported_user_error(exc)
            if user_error is not None:  # bad input that only the workers could see (nodes' recipes that differ)
                raise user_error from None
            raise TrainingFailed(*_describe_failure(exc, spec.log_dir, spec.nproc_per_node, spec.node_rank)) from None
        except RendezvousError as exc:  # the nodes never met, or node 0's store went away during the run
            started = _WORKER_STARTS[0] > starts
            error = TrainingFailed if started else NodesNeverMet
            raise error(*_describe_rendezvous_failure(exc, spec, started)) from None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or spec.nnodes == 1:
                raise
            # a second node 0 on the host of the first (or another program) took the rendezvous port since the
            # check before tokenising (check_rendezvous_port)
            raise UserError(
                Problem(
                    f"rendezvous endpoint {spec.rdzv_endpoint}",
                    f"its port is already in use on this host ({exc.strerror}); node 0 hosts the rendezvous there",
                    "if another node 0 of this run holds it, start each node with its own --node-rank (0.."
                    f"{spec.nnodes - 1}); otherwise choose a free port (`ss -ltnp` names the program holding it)",
                ),
                "invalid arguments",
            ) from None
        except json.JSONDecodeError as exc:
            # torch reads each failed worker's error.json; a full disk leaves it empty and torch's parser raises
            raise TrainingFailed(*_describe_unreadable_failure(exc, spec)) from None


def _reported_user_error(exc: Any) -> UserError | None:
    """The UserError a failed worker raised (the earliest such), if any did: bad input is the cause whenever it is
    there, the other ranks' errors its consequences."""
    for _, failure in sorted(exc.failures.items(), key=lambda kv: kv[1].timestamp):
        found = reported_user_error(_failure_message(failure)[0])
        if found is not None:
            return found
    return None


def _describe_unreadable_failure(exc: BaseException, spec: LaunchSpec) -> tuple[str, str]:
    where = spec.log_dir or Path.cwd()
    free = None
    with contextlib.suppress(OSError):
        probe = next((p for p in (where, *where.parents) if p.exists()), where)
        free = shutil.disk_usage(probe).free
    full = free is not None and free < 64 * 2**20
    message = (
        "a worker failed, and its error report could not be read (an empty error file: "
        f"{type(exc).__name__}: {exc})"
        + (f"; the disk of {where} is full ({free / 2**20:.1f} MB free)" if full else "")
    )
    hint = (
        "free disk space there, then continue with --resume auto: checkpoints are written atomically, so the "
        f"newest complete one is intact; the workers' logs are in {where}"
    )
    return message, hint


def worker_threads_env(env: Any, spec: LaunchSpec) -> None:
    """A thread count the user chose (OMP_NUM_THREADS) is each worker's (USER_THREADS, read by setup_worker); else
    workers x threads <= cores. One that an earlier launch of this process set is not the user's."""
    omp = env.get("OMP_NUM_THREADS", "").strip()
    env.pop(USER_THREADS, None)
    if omp.isdigit() and int(omp) > 0 and omp != env.get(_OMP_OURS):
        env[USER_THREADS] = omp
    elif spec.device_type == "cpu":
        env["OMP_NUM_THREADS"] = env[_OMP_OURS] = str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node))


def nccl_on_loopback(env: Any, spec: LaunchSpec) -> None:
    """One host: NCCL's bootstrap sockets on loopback too (NCCL_SOCKET_IFNAME=lo), unless the user chose an
    interface. By default NCCL listens on the host's first network interface (seen on the H200 machine, session
    13); between GPUs of one host its data goes over NVLink, PCIe or shared memory, never those sockets."""
    if spec.nnodes == 1 and spec.device_type == "cuda":
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")


def _describe_rendezvous_failure(exc: BaseException, spec: LaunchSpec, started: bool = False) -> tuple[str, str]:
    what = str(exc).strip() or f"not all {spec.nnodes} nodes joined within {spec.join_timeout_s} s"
    if started and spec.node_rank > 0:
        # the nodes had met and trained: node 0, which hosts the rendezvous store, ended or became unreachable
        return (
            f"node {spec.node_rank}: lost node 0's rendezvous at {spec.rdzv_endpoint} during the run "
            f"({type(exc).__name__}: {what}); node 0 stopped or cannot be reached, and this node's workers were "
            "stopped",
            "node 0's console (or its log) says why it stopped; once it is fixed, start every node again",
        )
    if started:
        return (
            f"node 0: the rendezvous at {spec.rdzv_endpoint} failed during the run ({type(exc).__name__}: {what})",
            "another node stopped or cannot be reached: its console says why; then start every node again",
        )
    message = (
        f"node {spec.node_rank}: the rendezvous at {spec.rdzv_endpoint} failed ({type(exc).__name__}: {what}); "
        "no worker started"
    )
    hint = (
        f"start the same command on all {spec.nnodes} nodes (--node-rank 0 to {spec.nnodes - 1}) within "
        f"{spec.join_timeout_s} s of each other (distributed.join_timeout_seconds), with the same --rdzv-endpoint; "
        "node 0 must reach its own host:port "
        "and the others must reach it through the firewall (docs/multi-node.md, 'Network requirements')"
    )
    return message, hint


@contextlib.contextmanager
def _graceful_stop(stop_file: Path | None) -> Any:
    """Parent side of a graceful stop while the agent runs the workers.

    First SIGINT/SIGTERM: create `stop_file` (workers also catch the signal themselves when it reaches the whole
    process group, as Ctrl-C and SLURM do; the file covers a signal sent to this process alone, e.g. `docker stop`)
    and keep supervising while they finish the step and write a checkpoint. A second one: hand it to the agent,
    which stops the workers (SIGTERM, then SIGKILL) and raises; no process is left behind either way.
    """
    import threading

    if stop_file is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    from torch.distributed.elastic.multiprocessing.api import SignalException

    stop_file = Path(stop_file)
    with contextlib.suppress(OSError):
        stop_file.unlink()
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1 and not _workers_started():
            # e.g. node 0 waiting at the rendezvous for the others: no step to finish, nothing to save
            raise SignalException(f"{_BEFORE_WORKERS} {signal.Signals(signum).name}", sigval=signal.Signals(signum))
        if len(received) == 1:
            with contextlib.suppress(OSError):
                stop_file.write_text(signal.Signals(signum).name)
            sys.stderr.write(
                f"\n{signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
                "(press Ctrl-C again to stop at once, losing the steps since the last checkpoint)\n"
            )
            return
        with contextlib.suppress(OSError):  # the workers take the agent's SIGTERM that follows as "stop now"
            stop_file.write_text(STOP_NOW)
        raise SignalException(f"second {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _workers_start_with_stops_held():
            yield
    except TrainingFailed as exc:
        if not received:
            raise
        from .errors import Interrupted

        if len(received) == 1:
            # one signal, and a worker died of it: one still starting up (Python's own Ctrl-C handler is in place
            # until the worker's is, while it imports torch), so no step of this session had begun
            raise Interrupted(
                f"stopped: a worker ended on the first signal, before its own handler was in place (while it "
                f"was still starting) ({exc}); --resume auto continues from the newest checkpoint"
            ) from None
        # a worker given a second Ctrl-C raises KeyboardInterrupt before the agent hears of our second signal
        raise Interrupted(
            f"stopped at once on a second signal ({exc}); --resume auto continues from the newest checkpoint"
        ) from None
    except SignalException as exc:
        from .errors import Interrupted

        if str(exc).startswith(_BEFORE_WORKERS):
            from .errors import InterruptedBeforeStart

            raise InterruptedBeforeStart(
                f"stopped on {exc.sigval.name} before any worker had started (while this node waited for the "
                "others at the rendezvous, or was starting them): no step ran, nothing to save"
            ) from None
        raise Interrupted(
            f"stopped at once on a second {exc.sigval.name}: the workers were ended, and any steps after the newest "
            "checkpoint are lost; --resume auto continues from that checkpoint"
        ) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        with contextlib.suppress(OSError):
            stop_file.unlink()


@contextlib.contextmanager
def _workers_start_with_stops_held() -> Any:
    """While the launch runs, the workers start with SIGINT and SIGTERM blocked (a thread's signal mask survives fork
    and exec), and each unblocks them once its StopSignal handlers are in place: a signal in between waits, pending,
    and then arrives as a stop request. Before, a Ctrl-C while a worker imported torch (unpickling its entry point,
    before any of our code ran) killed it with a KeyboardInterrupt traceback on the console.

    The elastic agent starts the workers through `torch.multiprocessing.start_processes`, wrapped here; the mask is
    this thread's for that call only, and a signal to this process meanwhile is delivered when it ends."""
    import torch.multiprocessing as tmp

    start = getattr(tmp, "start_processes", None)
    if start is None:  # another torch layout: the workers start as before
        yield
        return

    def start_processes(*args: Any, **kwargs: Any) -> Any:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return start(*args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    tmp.start_processes = start_processes
    try:
        yield
    finally:
        tmp.start_processes = start


@contextlib.contextmanager
def _counting_worker_starts() -> Any:
    """Count in `_WORKER_STARTS` each start of this node's workers by the elastic agent (a rendezvous that fails
    after one met other nodes and trained, not before)."""
    import torch.multiprocessing as tmp

    start = getattr(tmp, "start_processes", None)
    if start is None:
        yield
        return

    def start_processes(*args: Any, **kwargs: Any) -> Any:
        _WORKER_STARTS[0] += 1
        return start(*args, **kwargs)

    tmp.start_processes = start_processes
    try:
        yield
    finally:
        tmp.start_processes = start


_WORKER_STARTS = [0]
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_BEFORE_WORKERS = "before any worker started:"
# The stop file's text after a second signal to the launcher alone (`kill PID` twice, `docker stop`): the agent's
# SIGTERM that follows means "stop now", where after the first it means "finish the step" (StopSignal's watcher)
STOP_NOW = "now"


def _workers_started() -> bool:
    """Whether the elastic agent has started this node's workers: children of this process run by
    multiprocessing's spawn (`spawn_main`; not its resource tracker, which `datasets` may have started)."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if any("spawn_main" in part for part in child.cmdline()):
                return True
    return False


class StopSignal:
    """Worker side of a graceful stop: remembers SIGINT/SIGTERM (or the parent's stop file) until a step boundary.

    A second signal raises KeyboardInterrupt, so a worker that cannot reach a step boundary can still be stopped.
    """

    def __init__(self, stop_file: str | None = None):
        import threading

        self.stop_file = Path(stop_file) if stop_file else None
        self.count = 0
        self.parent_died = False  # PARENT_DIED arrived: the launcher is gone (see _worker_main)
        self.done = False  # the worker's work is over (set by _worker_main): a second signal just ends it
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)
            signal.signal(PARENT_DIED, self._parent_died)
            if self.stop_file is not None and os.environ.get(LAUNCHER_PID):
                self._watch_for_teardown()
            # held by the launcher while this worker started (_workers_start_with_stops_held): one that came
            # meanwhile is delivered now, to the handler above
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _watch_for_teardown(self) -> None:
        """Exit at once when the launcher, not a person, sends SIGTERM (another rank failed), or on a second signal.

        A person's stop reaches the launcher too (Ctrl-C is SIGINT; SIGTERM to the process group, as SLURM and
        systemd send it), and the launcher then writes the stop file. When a worker fails, the launcher's agent
        SIGTERMs the others and only SIGKILLs them 30 s later (torch.multiprocessing), while a rank waiting on a
        collective never reaches the step boundary where the stop is honoured: 30 s of dead time before the error
        showed. A signal reaches this thread through the wakeup fd even while the main thread is stuck in C++ (a
        collective, a GPU sync), where the Python handler cannot run. Nothing is lost: the run has failed, the
        other ranks' collectives cannot complete, and checkpoints are written atomically.
        """
        import threading

        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch() -> None:
            seen = 0  # SIGINT/SIGTERM, counted here: the Python handler may not run while the main thread is in C++
            while True:
                try:
                    got = os.read(read_fd, 16)
                except OSError:
                    return
                stops = sum(1 for b in got if b in (signal.SIGINT, signal.SIGTERM))
                if not stops:
                    continue
                seen += stops
                if seen > 1:
                    # a second signal means at once: the handler's KeyboardInterrupt, or this if the main thread
                    # cannot take it (stuck in a collective). The launcher says so; rank 0's stderr is the console.
                    time.sleep(TEARDOWN_GRACE_S)
                    os._exit(130)
                if self._stop_now():
                    # A second signal reached the launcher alone (`kill -INT PID` twice): its agent then sends the
                    # workers the signal it got, SIGINT or SIGTERM. A SIGINT was taken for a person's first Ctrl-C,
                    # and a worker done with its last checkpoint waited 30 s for the agent's SIGKILL.
                    sys.stderr.write("stopped at once: a second signal reached the launcher\n")
                    sys.stderr.flush()
                    os._exit(130)
                if signal.SIGTERM not in got:
                    continue  # Ctrl-C: a person's stop
                deadline = time.monotonic() + TEARDOWN_GRACE_S
                while not self.stop_file.exists():  # the file: a person's stop (finish the step, checkpoint)
                    if time.monotonic() > deadline:
                        sys.stderr.write("stopped by the launcher: another rank failed (its error is the run's)\n")
                        sys.stderr.flush()
                        os._exit(128 + signal.SIGTERM)
                    time.sleep(0.1)

        threading.Thread(target=watch, name="mgpu-teardown", daemon=True).start()

    def _stop_now(self) -> bool:
        try:
            return self.stop_file is not None and self.stop_file.read_text().strip() == STOP_NOW
        except OSError:
            return False

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            if self.done:  # raised in an exit handler (torch's own), it would print "Exception ignored in atexit"
                os._exit(130)
            raise KeyboardInterrupt

    def _parent_died(self, signum: int, frame: Any) -> None:
        # The kernel may send it more than once (seen: twice within 0.1 s): a stop request that never escalates.
        self.count = max(self.count, 1)
        # Remembered: the dying launcher can still be this process's parent for a moment after the signal, so
        # asking getppid() once the checkpoint is written may not show it (and the worker then waited forever).
        self.parent_died = True

    def requested(self, check_file: bool = False) -> bool:
        """A signal arrived, or (when `check_file`, on one rank only: it is a file-system call) the stop file exists."""
        return self.count > 0 or (check_file and self.stop_file is not None and self.stop_file.exists())


TEARDOWN_GRACE_S = 3.0  # a SIGTERM with no stop file after this long came from the agent tearing the run down
PARENT_DIED = signal.SIGUSR1  # what a worker gets when its launcher dies (see die_with_parent, StopSignal)
LAUNCHER_PID = "MGPU_LAUNCHER_PID"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` (SIGTERM by default) to this process when its parent dies; elsewhere a no-op.

    For workers (with PARENT_DIED) when their launcher is killed outright (SIGKILL, the host's OOM killer), and for
    anything a test or a script starts that should not run on as an orphan: it survives exec, so it also serves
    as a `preexec_fn`.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)


def check_rendezvous_host(endpoint: str, where: str | None = None) -> None:
    """Every node: the endpoint's host name must resolve. Else node 0 listened on every interface for a name
    nobody could reach, and both nodes gave up after two minutes of C++ warnings and stack dumps.

    Raises:
        UserError: the host name does not resolve here.
    """
    host = endpoint_host(endpoint)
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        raise UserError(
            Problem(
                where or "distributed.rdzv_endpoint",
                f"the host name {host!r} does not resolve on this machine ({getattr(exc, 'strerror', None) or exc})",
                "give node 0's host name or IP address as the other nodes reach it (e.g. --rdzv-endpoint "
                "10.0.0.1:29400; under SLURM, the first host of the job's node list)",
            ),
            "invalid arguments",
        ) from None


def check_rendezvous_port(endpoint: str, where: str | None = None) -> str | None:
    """Node 0 hosts the rendezvous on `endpoint`: fail early, for people, when its port is taken.

    Returns a warning when the endpoint's host is not an address of this machine: this node hosts a rendezvous
    that the others, connecting to that host, never reach (two nodes started as node 0), unless the address is
    translated on the way (NAT, a floating IP), which is why it is not refused.

    Raises:
        UserError: the port is in use on this host.
    """
    where = where or "distributed.rdzv_endpoint"

    check_rendezvous_host(endpoint, where)
    host, port = endpoint_host(endpoint), endpoint.rpartition(":")[2]
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, int(port)))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                Problem(
                    where,
                    f"port {port} on {host} is already in use; node 0 hosts the rendezvous there",
                    "choose a free port (e.g. --rdzv-endpoint HOST:29400) or stop the program holding it (`ss -ltnp`)",
                ),
                "invalid arguments",
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            return (
                f"node 0 hosts the rendezvous, and {host} (from {where}) is not an address of this machine: unless "
                "it reaches this one through address translation, the other nodes meet elsewhere. On any node but "
                "node 0, pass its own --node-rank (1..nnodes-1)"
            )
        # other errors: the rendezvous reports its own problems
    return None


# ------------------------------------------------------------------------------------------------------
# Hang watchdog: collectives time out after distributed.timeout_seconds (gloo and NCCL raise)
# ------------------------------------------------------------------------------------------------------

SETUP_TIMEOUT_S = 1800  # model loading may differ by minutes between ranks; the loop's watchdog starts after


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than distributed.timeout_seconds: another rank hung or died."""


def set_collective_timeout(seconds: int) -> None:
    """Use `seconds` as the timeout of every later collective of the default process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    td = timedelta(seconds=seconds)
    if hasattr(dist, "set_timeout"):  # torch >= 2.12
        dist.set_timeout(td)
        return
    # Older torch (the GPU image has 2.11): set it on the default group's backends; where a backend cannot, its
    # collectives keep the (longer) setup timeout, so a hang is still caught, only later.
    group = dist.distributed_c10d._get_default_group()
    for device in ("cuda", "cpu"):
        with contextlib.suppress(Exception):
            group._get_backend(__import__("torch").device(device))._set_default_timeout(td)


def is_collective_timeout(exc: BaseException) -> bool:
    """A process-group timeout (gloo: "Timed out waiting", NCCL watchdog: "Watchdog caught collective")."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Timed out" in text or "timed out" in text or "Watchdog" in text)


def describe_timeout(info: DistInfo, seconds: int, step: int) -> str:
    """One line for people: which rank noticed, where, the setting, and what to do."""
    return (
        f"hang watchdog: rank {info.rank} waited more than {seconds} s for the other ranks at step {step} "
        f"(distributed.timeout_seconds={seconds}); a rank stopped making progress. If steps are legitimately "
        "that slow, raise distributed.timeout_seconds"
    )


def _describe_failure(exc: Any, log_dir: Path | None, nproc: int = 0, node_rank: int = 0) -> tuple[str, str]:
    """Turn the elastic agent's failure report into 'rank N failed: <its error>' plus details.

    The rank named is the first to fail, except that a rank whose collective lost its peer is only a symptom of
    another's end: a rank that failed otherwise is named before it. (Timestamps are whole seconds: a rank killed by
    a signal and the rank whose collective it broke often share one, and rank order then named the wrong one.)"""
    failures = [(rank, f, *_failure_reason(f)) for rank, f in exc.failures.items()]
    if not failures:
        return "a worker failed", str(exc)
    failures.sort(key=lambda x: (any(lost in x[2] for lost in _PEER_LOST), x[1].timestamp, x[0]))
    rank, _, reason, trace = failures[0]
    details = []
    if "hang watchdog" in reason and nproc:
        # Ranks that reported the timeout were waiting; those of this node that did not were the hung ones.
        local = range(node_rank * nproc, (node_rank + 1) * nproc)
        hung = [r for r in local if r not in exc.failures]
        if hung:
            reason += f"; rank(s) {', '.join(map(str, hung))} did not reach the collective (hung)"
    if any(lost in reason for lost in _PEER_LOST):
        details.append(
            "a collective lost its connection to another rank: that rank's process ended (or its node became "
            "unreachable) first, and its own console or log says why"
            + (f" (node 0's, if it ended: this is node {node_rank})" if node_rank > 0 else "")
        )
    others = [
        f"rank {r}: {'exit code ' + str(f.exitcode) if f.exitcode >= 0 else f.signal_name()}"
        for r, f, *_ in failures[1:]
    ]
    if others:
        details.append("also stopped: " + ", ".join(others))
    if trace and log_dir is not None:
        with contextlib.suppress(OSError):
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / f"rank{rank}-traceback.txt").write_text(trace)
            details.append(f"traceback of rank {rank}: {Path(log_dir) / f'rank{rank}-traceback.txt'}")
    if trace and os.environ.get("MGPU_DEBUG") == "1":
        details.append(trace)
    if log_dir:
        details.append(f"worker logs: {log_dir}")
    return f"rank {rank} failed: {reason}", "\n".join(details)


def _failure_message(failure: Any) -> tuple[str, str]:
    """One failed worker's error (`<type>: <message>`, as @record's error file keeps it) and Python traceback."""
    raw = failure.message
    if not isinstance(raw, dict) and isinstance(failure.error_file_data, dict):
        raw = failure.error_file_data.get("message", raw)
    if isinstance(raw, dict):  # the error file written by @record: {"message", "extraInfo": {"py_callstack"}}
        return str(raw.get("message", "")).strip(), str(raw.get("extraInfo", {}).get("py_callstack", ""))
    return str(raw or "").strip(), ""


def _failure_reason(failure: Any) -> tuple[str, str]:
    """One failed worker's reason (its error's last line, or how it ended) and its Python traceback, if any."""
    message, trace = _failure_message(failure)
    if failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()}", trace
    if message and message != "<NONE>" and "To enable traceback" not in message:
        return _last_error_line(message), trace
    return f"exited with code {failure.exitcode} without a Python error (crashed or os._exit)", trace


# How gloo and NCCL report a peer that went away mid-collective
_PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "remote process exited or there was a network error",
)


def _last_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith((" ", "\t")) and ("Error" in ln or "Exception" in ln or ":" in ln):
            return ln.strip()
    return lines[-1].strip() if lines else ""


# ------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------


def cores_per_worker(local_workers: int) -> int:
    """This host's usable cores divided among its workers (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))


def worker_cores(local_rank: int, local_workers: int, allowed: set[int] | list[int]) -> list[int] | None:
    """The cores this worker keeps: its own contiguous slice of the cores allowed (None: leave as is).

    Each rank launches its GPU kernels from one host thread; without a slice, the workers' threads (torch's
    pools, NCCL's, the compile pools) share every core. On 2 x H200 rank 1's micro-batches ran 12% slower than
    rank 0's in 24 of 25 steps with all cores shared, and as fast with own cores (session 4).
    """
    cores = sorted(allowed)
    k = len(cores) // max(1, local_workers)
    if local_workers <= 1 or k < 1:
        return None
    return cores[local_rank * k : (local_rank + 1) * k]


#: The caching allocator's setting in every CUDA worker unless PYTORCH_CUDA_ALLOC_CONF is set (set it empty for
#: torch's own default). Balanced batches bring a new (rows, width) shape in most steps, and fixed-size segments
#: fragment: the 1B held 51.5 GB for 17.2 GB of live tensors by step 50. With expandable segments it held 17.5 GB
#: at the same speed (1 x H200, session 8: 71,421 vs 70,883 tokens/s). torchtitan sets the same.
CUDA_ALLOC_CONF = "expandable_segments:True"


def cuda_allocator_defaults(env: dict[str, str] | Any) -> None:
    """Set the CUDA caching allocator's options in `env` unless the user set PYTORCH_CUDA_ALLOC_CONF (even empty)."""
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def show_only_own_gpu(env: dict[str, str] | os._Environ[str], local_rank: int, local_world_size: int) -> str:
    """Hide every GPU but this worker's, which it then sees as cuda:0; must run before anything touches CUDA.

    The worker's GPU is entry `local_rank` of the host's CUDA_VISIBLE_DEVICES (all GPUs when unset), kept in
    MGPU_VISIBLE_DEVICES for the worker's own children. Training workers and `mgpu doctor --probe`'s workers both
    go through here, so the probe measures the set-up training uses. Returns the GPU's id as the host names it.
    """
    visible = env.get("MGPU_VISIBLE_DEVICES") or env.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(local_world_size)]
    env["MGPU_VISIBLE_DEVICES"] = ",".join(devices)
    env["CUDA_VISIBLE_DEVICES"] = devices[local_rank]
    return devices[local_rank]


def setup_worker(timeout_seconds: int = 1800) -> DistInfo:
    """Pin this worker to its device and join the process group (NCCL on CUDA, gloo on CPU).

    Must run before anything touches CUDA: each worker sees only its own GPU, as cuda:0.
    """
    device_type = os.environ.get("MGPU_DEVICE_TYPE", "cpu")
    info = get_dist_info(device_type)
    # Run last at exit (registered before Unsloth's handlers): Python's exit would scan the millions of objects
    # Unsloth, transformers and torch made for cycles, 1.5 s of one core per worker on CPU; frozen, they are left
    # to the OS.
    atexit.register(gc.freeze)
    if device_type == "cuda":
        show_only_own_gpu(os.environ, info.local_rank, info.local_world_size)
        cuda_allocator_defaults(os.environ)
    share = int(os.environ.get(USER_THREADS) or 0) or cores_per_worker(info.local_world_size)
    # Opt-in (MGPU_CPU_AFFINITY=1): on 2 x H200 it closed rank 1's gap on the 1B (+5% tokens/s) but the 8B's
    # 2-GPU run was 18% slower with it (1-GPU runs unchanged), so the default leaves the cores shared.
    if os.environ.get("MGPU_CPU_AFFINITY", "0") == "1" and hasattr(os, "sched_setaffinity"):
        mine = worker_cores(info.local_rank, info.local_world_size, os.sched_getaffinity(0))
        if mine:
            os.sched_setaffinity(0, mine)  # threads started from here on (torch's pools included) inherit it
    # torch.compile's kernel compilation uses a pool of min(32, cores) processes per worker: N workers compiling
    # their first step at once would oversubscribe the host N times over (read when torch._inductor is imported).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(share))
    import torch
    import torch.distributed as dist

    # Workers x threads <= cores: oversubscribed intra-op threads slow every rank (and a step waits for the slowest).
    torch.set_num_threads(share)
    if device_type == "cuda":
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": info.backend, "timeout": timedelta(seconds=timeout_seconds)}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", 0)
        if info.restart_count > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After an elastic restart the agent's store still holds the dead attempt's gloo/NCCL addresses under
            # the same keys; a new rank could read a stale one ("connectFullMesh ... Connection refused").
            # A prefix per attempt keeps the attempts apart.
            base = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                info.world_size,
                is_master=False,
                timeout=timedelta(seconds=timeout_seconds),
            )
            kwargs.update(
                store=dist.PrefixStore(f"mgpu/attempt_{info.restart_count}", base),
                rank=info.rank,
                world_size=info.world_size,
            )
        dist.init_process_group(**kwargs)
    return info


def teardown() -> None:
    """Leave the process group, if this process joined one (errors while leaving are ignored)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (on CUDA, on this rank's device)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if info.device_type == "cuda":
            dist.barrier(device_ids=[0])
        else:
            dist.barrier()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Sum a few scalars over all ranks (float64, one collective)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=info.device)
    if dist.is_initialized() and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(t: Any, info: DistInfo) -> Any:
    """In-place SUM of a small device tensor over all ranks (no host sync)."""
    import torch.distributed as dist

    if dist.is_initialized() and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_tensor(t: Any, info: DistInfo) -> Any:
    """[world_size, *t.shape]: every rank's copy of a small device tensor (one collective, no host sync)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return t[None]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return torch.stack(out)


def check_ranks_agree(values: dict[str, Any], info: DistInfo, what: str, hint: str, by_node: bool = False) -> None:
    """Raise RanksDisagree (a UserError) naming each key whose value differs from rank 0's (`values`: JSON-able,
    nested). `by_node`: the values are a node's (its workers share them), named by node rather than by rank."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return
    text = json.dumps(values, sort_keys=True, default=str).encode()
    sizes = [int(s[0]) for s in all_gather_floats([float(len(text))], info)]
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    buf[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    gathered = all_gather_tensor(buf.to(info.device), info).cpu()
    texts = [bytes(row[:n].tolist()).decode() for row, n in zip(gathered, sizes, strict=True)]
    if len(set(texts)) == 1:
        return

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        """{"a": {"b": 1}} -> {"a.b": 1}"""
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}.{key}" if prefix else key).items()}

    ref = flat(json.loads(texts[0]))
    step = info.local_world_size if by_node else 1  # the elastic agent numbers a node's workers consecutively
    unit = "node" if by_node else "rank"
    diffs = []
    for rank in range(step, info.world_size, step):
        theirs = flat(json.loads(texts[rank]))
        diffs += [
            f"{key}: {ref.get(key)!r} on {unit} 0, {theirs.get(key)!r} on {unit} {rank // step}"
            for key in sorted(set(ref) | set(theirs))
            if ref.get(key) != theirs.get(key)
        ]
    if diffs:  # (by_node: workers of one node that differ among themselves are not this check's to name)
        raise RanksDisagree(what, diffs, hint)


def all_gather_floats(values: Sequence[float], info: DistInfo) -> list[list[float]]:
    """Every rank's list of floats (same length on all ranks)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=info.device)
    if not dist.is_initialized() or info.world_size == 1:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` for a world of one)."""
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj`, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device_type == "cuda" else None)
    return box[0]


def broadcast_parameters(params: Sequence[Any], info: DistInfo, src: int = 0) -> None:
    """Make every rank's `params` equal to rank `src`'s (flattened, one collective per bucket)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return
    with torch.no_grad():
        for bucket in _buckets(params, 64 * 2**20):
            # staged on this rank's device: under fsdp a model may still sit in host memory (NCCL needs GPU tensors)
            flat = torch.cat([p.detach().reshape(-1) for p in bucket]).to(info.device)
            dist.broadcast(flat, src=src)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p))
                offset += n


FLAT_ALIGN = 256  # elements: bitsandbytes' 8-bit optimizer block, and beyond any kernel's alignment


def _buckets(params: Sequence[Any], bucket_bytes: float) -> list[list[Any]]:
    buckets: list[list[Any]] = [[]]
    size = 0
    for p in params:
        nbytes = p.numel() * 4
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return [b for b in buckets if b]


class GradientSynchronizer:
    """Combine the trainable parameters' gradients across ranks, in fp32 buckets.

    The caller scales each rank's loss so that after a SUM all-reduce the result means what the
    aggregation says:
      - ``weighted``: losses scaled by 1/(global loss tokens) -> SUM is exactly the gradient of the global
        token-mean loss, the same as one process over the whole global batch;
      - ``mean``: per-rank token-mean losses, SUM / world size;
      - ``sum``: per-rank token-mean losses, SUM;
      - ``median``: per-rank token-mean losses, coordinate-wise median over ranks (all-gather).
    """

    def __init__(
        self,
        params: Sequence[Any],
        info: DistInfo,
        aggregation: str,
        bucket_size_mb: float = 25.0,
        grad_views: bool = False,
        param_views: bool = False,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.info = info
        self.aggregation = aggregation
        self.buckets = _buckets(self.params, bucket_size_mb * 2**20)
        # per bucket: its flat fp32 gradient buffer and the parameters' gradient views into it, or None (copy path)
        self.flats: list[Any] = [None] * len(self.buckets)
        self.views: list[list[Any] | None] = [None] * len(self.buckets)
        # per view bucket: where each parameter starts in the flat buffers, and (param_views) the flat fp32 buffer
        # that the parameters themselves are views of, laid out like the gradients
        self.offsets: list[list[int] | None] = [None] * len(self.buckets)
        self.param_flats: list[Any] = [None] * len(self.buckets)
        if grad_views or param_views:
            self._install_views(param_views)

    def _install_views(self, param_views: bool = False) -> None:
        """Make every fp32 gradient a view into one flat fp32 buffer per bucket (DDP's gradient_as_bucket_view).

        Backward then accumulates straight into the buffers that are all-reduced: no gather/scatter copies, and
        zeroing, the finiteness check and clipping are one kernel per bucket instead of one per parameter. The
        owner must zero gradients with `zero_grad()`, never `optimizer.zero_grad(set_to_none=True)`, which would
        drop the views. Buckets holding a non-fp32 parameter keep the copy path.

        With `param_views` the parameters become views of a second flat buffer with the same layout, so that an
        optimizer can update a whole bucket in one kernel (`optim.adamw_8bit_class`). Each parameter starts at a
        multiple of `FLAT_ALIGN` elements; the gaps belong to no parameter, and their gradients stay zero.
        """
        import torch

        for i, bucket in enumerate(self.buckets):
            if any(p.dtype != torch.float32 for p in bucket):
                continue
            offsets, total = [], 0
            for p in bucket:
                offsets.append(total)
                total += -(-p.numel() // FLAT_ALIGN) * FLAT_ALIGN
            flat = torch.zeros(total, dtype=torch.float32, device=bucket[0].device)
            if param_views:
                weights = torch.zeros_like(flat)
                with torch.no_grad():
                    for p, offset in zip(bucket, offsets, strict=True):
                        view = weights[offset : offset + p.numel()].view_as(p)
                        view.copy_(p)
                        p.data = view
                self.param_flats[i] = weights
            views = []
            for p, offset in zip(bucket, offsets, strict=True):
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                views.append(p.grad)
            self.flats[i], self.views[i], self.offsets[i] = flat, views, offsets

    def flat_buckets(self) -> list[tuple[Any, Any, list[tuple[Any, int]]]]:
        """(flat weights, flat gradients, [(parameter, offset)]) of each bucket whose parameters are views."""
        return [
            (w, g, list(zip(b, o, strict=True)))
            for w, g, b, o in zip(self.param_flats, self.flats, self.buckets, self.offsets, strict=True)
            if w is not None
        ]

    @property
    def uses_views(self) -> bool:
        return bool(self.flats) and all(f is not None for f in self.flats)

    def zero_grad(self) -> None:
        """Zero the gradients: the flat buffers of view buckets, `None` for the others (and under fsdp).

        A model can mix both (Unsloth's bf16 full fine-tuning keeps the norms in fp32: their buckets get views,
        the bf16 weights' buckets copy), so the view buckets must never go through `optimizer.zero_grad(
        set_to_none=True)`: that drops the views, and the next backward's fresh gradients would never be
        all-reduced (the replicas drift).
        """
        for bucket, flat in zip(self.buckets, self.flats, strict=True):
            if flat is not None:
                flat.zero_()
            else:
                for p in bucket:
                    p.grad = None

    def _reattach_views(self, i: int) -> None:
        """Make bucket i's gradients its views again, keeping any gradient that replaced a view.

        Someone else may have reset `p.grad` (`model.zero_grad()`, a library calling `optimizer.zero_grad()`):
        autograd then accumulates into a new tensor that the all-reduce of the flat buffer would miss.
        """
        for p, view in zip(self.buckets[i], self.views[i], strict=True):
            if p.grad is view:
                continue
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view

    def local_loss_denominator(self, local_tokens: int, global_tokens: int) -> int:
        """Tokens each rank divides its summed token losses by, for this aggregation."""
        return max(1, global_tokens if self.aggregation == "weighted" else local_tokens)

    def synchronize(self) -> None:
        import torch
        import torch.distributed as dist

        world = self.info.world_size
        if not dist.is_initialized() or world == 1:
            return  # the mean, sum or median of one rank is itself
        for i, bucket in enumerate(self.buckets):
            view = self.flats[i]
            if view is not None:
                self._reattach_views(i)
                flat = view
            else:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
                flat = torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads])
            if self.aggregation == "median":
                gathered = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(gathered, flat)
                flat.copy_(reduce_median(torch.stack(gathered)))
            else:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                if self.aggregation == "mean":
                    flat.div_(world)
            if view is not None:
                continue  # the gradients are views of `flat`: already in place
            offset = 0
            for p in bucket:
                n = p.numel()
                chunk = flat[offset : offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n

    def grads_finite(self) -> Any:
        """A 0-d bool device tensor: every gradient is finite (no host sync)."""
        import torch

        if self.uses_views:
            return torch.stack([torch.isfinite(f).all() for f in self.flats]).all()
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.params[0].device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()

    def clip_grad_norm(self, max_norm: float | None) -> Any:
        """Global gradient norm as a device tensor (synchronised grads: the same on every rank); clips to
        `max_norm` when set."""
        import torch

        if not self.uses_views:
            grads = [p for p in self.params if p.grad is not None]
            if not grads:
                return torch.zeros(())
            if max_norm is None:
                return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in grads])))
            return torch.nn.utils.clip_grad_norm_(grads, max_norm)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f) for f in self.flats]))
        if max_norm is not None:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for f in self.flats:
                f.mul_(coef)
        return norm


def reduce_median(stacked: Any) -> Any:
    """Coordinate-wise median over dim 0; with an even count, the mean of the two middle values."""
    import torch

    n = stacked.shape[0]
    ordered, _ = torch.sort(stacked, dim=0)
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _param_sums(params: Sequence[Any], device: Any = "cpu") -> Any:
    """[N, 2] float64 device tensor: per parameter its plain sum and its position-weighted L1 norm.

    Accumulated in float64 inside the reductions (no float64 copy of an 8B model's weights) and read back
    with one host sync, not one per parameter.
    """
    import torch

    with torch.no_grad():
        rows = [
            torch.stack(
                [
                    p.detach().sum(dtype=torch.float64),
                    torch.linalg.vector_norm(p.detach(), ord=1, dtype=torch.float64) * (1.0 + (i % 97) * 1e-3),
                ]
            )
            for i, p in enumerate(params)
        ]
    return torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.float64, device=device)


def parameters_checksum(params: Sequence[Any]) -> list[float]:
    """Two float64 fingerprints of the parameters: plain sum and a position-weighted sum of magnitudes."""
    return _param_sums(params).sum(dim=0).tolist() if params else [0.0, 0.0]


class ConsistencyError(RuntimeError):
    """Ranks hold different trainable weights: the data-parallel invariant is broken."""


def _check_finite_weights(
    per_param: list[list[float]], params: Sequence[Any], names: Sequence[str] | None, step: int
) -> None:
    """Raise on every rank when a weight checksum is NaN or infinite: weights that diverged (NaN is not equal to
    itself, so the comparison would call it drift between the replicas)."""
    broken = sorted({i // 2 for sums in per_param for i, v in enumerate(sums) if not math.isfinite(v)})
    if not broken:
        return
    ranks = [r for r, sums in enumerate(per_param) if not all(math.isfinite(v) for v in sums)]
    label = ", ".join(names[i] if names else f"tensor {i}" for i in broken[:4])
    more = f" and {len(broken) - 4} more" if len(broken) > 4 else ""
    raise ConsistencyError(
        f"trainable weights are not finite (NaN or infinite) at step {step} on ranks {ranks}: {len(broken)} of "
        f"{len(params)} tensors, {label}{more}. The weights diverged or were loaded so; lower the learning rate, "
        "set a gradient clip (max_grad_norm), or check the model's weights"
    )


def check_consistency(
    params: Sequence[Any], info: DistInfo, step: int, rtol: float = 1e-6, names: Sequence[str] | None = None
) -> None:
    """Compare weight checksums across ranks; raise on every rank if any differs, naming the tensors that do."""
    # staged on this rank's device: under fsdp the weights are checked while still in host memory (NCCL needs GPU
    # tensors)
    per_param = all_gather_tensor(_param_sums(params, info.device).reshape(-1).to(info.device), info).tolist()
    totals = [[sum(s[0::2]), sum(s[1::2])] for s in per_param]
    _check_finite_weights(per_param, params, names, step)
    ref = totals[0]
    bad = []
    for r, s in enumerate(totals):
        for a, b in zip(s, ref, strict=True):
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9):
                bad.append(r)
                break
    if bad:
        differing = [
            i
            for i in range(len(params))
            if any(
                not math.isclose(per_param[r][2 * i + k], per_param[0][2 * i + k], rel_tol=rtol, abs_tol=1e-9)
                for r in bad
                for k in (0, 1)
            )
        ]
        label = [
            f"{names[i] if names else f'tensor {i}'} ({str(params[i].dtype).replace('torch.', '')})"
            for i in differing[:4]
        ]
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ConsistencyError(
            f"trainable weights differ across ranks at step {step}: ranks {bad} disagree with rank 0 on "
            f"{len(differing)} of {len(params)} tensors: {', '.join(label)}{more} "
            f"(checksums {[round(s[0], 6) for s in totals]}). The replicas have drifted; this indicates a "
            "non-deterministic kernel, a hardware fault, or a rank that skipped an update."
        )


# ------------------------------------------------------------------------------------------------------
# Sharded mode (distributed.strategy: fsdp): PyTorch FSDP2 owns parameters, gradients and their reduction
# ------------------------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a (PEFT-wrapped) causal LM: the largest `ModuleList` named `...layers`."""
    import torch

    found = [m for n, m in model.named_modules() if n.split(".")[-1] == "layers" and isinstance(m, torch.nn.ModuleList)]
    if not found:
        raise RuntimeError(
            f"distributed.strategy fsdp: found no decoder layers (a ModuleList named `layers`) in "
            f"{type(model).__name__}; this architecture cannot be sharded per layer yet"
        )
    return list(max(found, key=len))


def shard_model(model: Any, info: DistInfo, aggregation: str) -> int:
    """`fully_shard` each decoder layer, then the root (FSDP2); returns the number of FSDP units.

    Each layer becomes one all-gather (forward and backward) and one reduce-scatter (backward); the root unit
    holds the rest (embeddings, final norm, lm_head). Parameters on the CPU are moved to this rank's device
    as they are sharded, so a model loaded on the host never needs a full replica on the GPU.

    FSDP2 averages gradients over ranks by default. The engine scales each rank's loss exactly as for
    `GradientSynchronizer` (which SUMs), so the reduction is set to a SUM (`force_sum_reduction_for_comms`,
    which also avoids ReduceOp.AVG/PREMUL_SUM that gloo lacks) followed by a division by `world_size` for
    `mean` and by 1 for `weighted`/`sum`: the reduced gradient shards equal the ddp path's gradients.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if aggregation == "median":  # the recipe refuses this; a direct caller gets a clear error too
        raise ValueError("median aggregation cannot be sharded: there is no per-rank gradient to take a median of")
    layers = decoder_layers(model)
    ignored: set[Any] = set()
    for unit in [*layers, model]:
        frozen = _place_subclass_params(unit, info.device)
        if info.world_size == 1:
            ignored.update(frozen)
        odd = _minority_dtype_modules(unit)
        if odd:  # e.g. fp32 norms in a bf16 layer: their own FSDP group, gathered and reduced in fp32
            fully_shard(odd, ignored_params=ignored or None)
        fully_shard(unit, ignored_params=ignored or None)
    factor = float(info.world_size) if aggregation == "mean" else 1.0
    units = 0
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(factor)
            units += 1
    return units


def _minority_dtype_modules(unit: Any) -> list[Any]:
    """The submodules of `unit` whose trainable parameters differ in dtype from the unit's largest share.

    FSDP2 gathers and reduces each group of parameters as one flat buffer, so it requires one dtype per group
    ("FSDP expects uniform original parameter dtype"). Unsloth's bf16 full fine-tuning keeps the norms in fp32
    (so that Adam's small updates are not rounded away): those modules become their own group. Submodules
    already sharded (the decoder layers, for the root) are left out.
    """
    from torch.distributed.fsdp import FSDPModule

    owned: list[tuple[Any, set[Any], int]] = []  # (module, dtypes of its own trainable params, their numel)

    def walk(module: Any) -> None:
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            owned.append((module, {p.dtype for p in params}, sum(p.numel() for p in params)))
        for child in module.children():
            if not isinstance(child, FSDPModule):
                walk(child)

    walk(unit)
    share: dict[Any, int] = {}
    for _, dtypes, n in owned:
        for d in dtypes:
            share[d] = share.get(d, 0) + n
    if len(share) <= 1:
        return []
    main = max(share, key=share.__getitem__)
    odd = []
    for module, dtypes, _ in owned:
        if main in dtypes and len(dtypes) == 1:
            continue
        if len(dtypes) == 1 and module is not unit:
            odd.append(module)
        else:
            raise RuntimeError(
                f"distributed.strategy fsdp: {type(module).__name__} holds trainable parameters of several dtypes "
                f"({', '.join(sorted(str(d) for d in dtypes))}); FSDP2 shards one dtype per group. "
                "Hint: set model.dtype float32, or use distributed.strategy ddp"
            )
    return odd


def _place_subclass_params(module: Any, device: Any) -> list[Any]:
    """Move the frozen tensor-subclass parameters of `module` (the NF4 weights of model.load_in_4bit) to `device`.

    Called per FSDP unit just before `fully_shard`, so the GPU holds one whole 4-bit layer at a time, never the
    4-bit replica. FSDP2 would move them itself, but as `nn.Parameter(t.to(device))`, which makes a frozen
    weight trainable. Returns the parameters found (on `device`).

    They are also what a world of one leaves out of FSDP2 (`ignored_params`): its world-of-one shortcut (torch
    2.14 `FSDPParamGroup.wait_for_unshard`) copies only the first all-gather input of a tensor subclass into
    the unsharded parameter, and an NF4 weight has three (codes, scalers, scales). With one worker there is
    nothing to shard.
    """
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    found = []
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.requires_grad or isinstance(p, DTensor) or not is_traceable_wrapper_subclass(p):
                continue
            if p.device != device:
                with torch.no_grad():
                    p = torch.nn.Parameter(p.to(device), requires_grad=False)
                setattr(sub, name, p)
            found.append(p)
    return found


def _local(t: Any) -> Any:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ShardedGradients(GradientSynchronizer):
    """The gradient side of `strategy: fsdp`, with the interface of `GradientSynchronizer`.

    FSDP2 reduce-scatters every layer's gradients during backward (see `shard_model`), so `synchronize`
    does nothing: all-reducing again would double count. Gradients are DTensor shards; the finiteness check
    looks at this rank's shard (the engine sums the flag over ranks) and clipping uses the global norm
    (`clip_grad_norm_` on DTensors reduces the shard norms across ranks).
    """

    def __init__(self, params: Sequence[Any], info: DistInfo, aggregation: str):
        super().__init__(params, info, aggregation, grad_views=False)

    def synchronize(self) -> None:
        return None  # FSDP2 reduce-scattered the gradients in backward

    def grads_finite(self) -> Any:
        import torch

        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.info.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()

    def clip_grad_norm(self, max_norm: float | None) -> Any:
        import torch

        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
        else:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def gather_full_tensors(named: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """{name: full CPU tensor} of (possibly sharded) tensors; a collective: every rank must call it."""
    out = {}
    for name, t in named:
        full = t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach()
        out[name] = full.to("cpu").contiguous()
    return out
