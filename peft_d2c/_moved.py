"""Import paths of the flat layout (peft-d2c 0.1), kept working after the modules moved into stage folders.

`import peft_d2c.merging` gives the module `peft_d2c.engine.merging` itself (the same object, so monkeypatching and
`isinstance` behave exactly as with the new path), and `python -m peft_d2c.benchmark` still runs the benchmark
command. New code should use the new paths (docs/architecture.md has the map). Imports nothing of the package at
import time: each old path loads its new module on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import CodeType, ModuleType

# old path -> new path. Old paths that are now packages (`data`, `evaluation`, `embedded`, `hub`, `cli`) need no
# entry: their `__init__` re-exports what the old module offered.
MOVED_MODULES = {
    "peft_d2c.search": "peft_d2c.engine.search",
    "peft_d2c.scoring": "peft_d2c.engine.scoring",
    "peft_d2c.merging": "peft_d2c.engine.merging",
    "peft_d2c.budget": "peft_d2c.engine.budget",
    "peft_d2c.checkpoint": "peft_d2c.engine.checkpoint",
    "peft_d2c.distributed": "peft_d2c.engine.distributed",
    "peft_d2c.data_spec": "peft_d2c.data.spec",
    "peft_d2c.hub_adapters": "peft_d2c.hub.adapters",
    "peft_d2c.hub_cards": "peft_d2c.hub.cards",
    "peft_d2c.heldout": "peft_d2c.evaluation.heldout",
    "peft_d2c.sweep": "peft_d2c.evaluation.sweep",
    "peft_d2c.estimate": "peft_d2c.evaluation.estimate",
    "peft_d2c.plots": "peft_d2c.evaluation.plots",
    "peft_d2c.benchmark": "peft_d2c.embedded.benchmark",
    "peft_d2c.mainjob": "peft_d2c.embedded.mainjob",
    "peft_d2c.run_config": "peft_d2c.cli.run_config",
    "peft_d2c.cli_commands": "peft_d2c.cli.commands",
}
# What `python -m <old path>` runs, for old modules that were also commands.
MOVED_COMMANDS = {"peft_d2c.benchmark": "benchmark"}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: `create_module` returned the new module, already imported."""

    def get_code(self, fullname: str) -> CodeType | None:
        """What `python -m <old path>` runs: the CLI subcommand the module was, or nothing."""
        command = MOVED_COMMANDS.get(self.old)
        if command is None:
            return compile("", self.old, "exec")
        source = f"import sys\nfrom peft_d2c.cli.main import main\nsys.exit(main([{command!r}, *sys.argv[1:]]))\n"
        return compile(source, self.old, "exec")


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(fullname, MOVED_MODULES[fullname]))


def install() -> None:
    """Make the old paths importable (idempotent; `peft_d2c/__init__.py` calls it)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
