"""unsloth-mgpu: fine-tune LLMs with Unsloth on every GPU you have, from one YAML recipe.

The command line is `mgpu` (see `mgpu --help`). Importing this package is cheap: the Python API
(`enable_multi_gpu`, `MultiGPUTrainer`, ...) is loaded on first use.
"""

__version__ = "0.1.0"
