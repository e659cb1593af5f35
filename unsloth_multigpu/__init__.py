"""Compatibility name for the unsloth-mgpu Python API: `import unsloth_multigpu` is `import unsloth_mgpu_cli`.

    import unsloth_multigpu
    unsloth_multigpu.enable_multi_gpu(num_gpus=2, batch_size_per_gpu=2, gradient_aggregation="mean")

Every public name is forwarded lazily, so this import stays as cheap as the real package's.
"""

from __future__ import annotations

from typing import Any

import unsloth_mgpu_cli as _impl

__version__ = _impl.__version__
__all__ = list(_impl.__all__)


def __getattr__(name: str) -> Any:
    if name in _impl._API:
        return getattr(_impl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_impl._API))
