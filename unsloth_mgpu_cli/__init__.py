"""unsloth-mgpu: fine-tune LLMs with Unsloth on every GPU you have, from one YAML recipe.

The command line is `mgpu` (see `mgpu --help`). Importing this package is cheap: the Python API
(`enable_multi_gpu`, `MultiGPUTrainer`, ...) is loaded on first use (module `__getattr__`), so neither
torch nor Unsloth is imported until a name that needs it is touched.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_API = {
    "enable_multi_gpu": "hooks",
    "disable_multi_gpu": "hooks",
    "get_config": "hooks",
    "is_main_process": "hooks",
    "dist_info": "hooks",
    "worker_report": "hooks",
    "AggregationMethod": "hooks",
    "MultiGPUConfig": "hooks",
    "MultiGPUTrainer": "direct",
    "MemoryManager": "memory_manager",
    "ConfigManager": "configgen",
    "DeviceManager": "devices",
    "GPUInfo": "devices",
    # what the API raises, to catch by name
    "UserError": "errors",
    "OutOfMemoryRisk": "memory_manager",
    "ConsistencyError": "distributed",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
