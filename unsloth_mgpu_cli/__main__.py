"""`python -m unsloth_mgpu_cli ...` runs the `mgpu` command line."""

from .cli import main

main()
