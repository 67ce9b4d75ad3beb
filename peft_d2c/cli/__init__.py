"""The `peft-d2c` command: the entry point and the run/benchmark subcommands (`main`), the other subcommands
(`commands`, `benchmark`) and the YAML run config (`run_config`). The top of the import graph: may import
everything; only this package prints.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
