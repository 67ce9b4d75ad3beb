"""Every ```python runnable block of docs/ and README.md runs, in order per file, on the tiny test model."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUNNABLE = re.compile(r"^```python runnable\n(.*?)^```\n(?:\n?```text output\n(.*?)^```)?", flags=re.S | re.M)


def runnable_blocks(path: Path) -> list[str]:
    return [code for code, _ in RUNNABLE.findall(path.read_text())]


def documented_outputs(path: Path) -> list[str | None]:
    """The ```text output block shown right after each runnable block (None where the doc shows none)."""
    return [output or None for _, output in RUNNABLE.findall(path.read_text())]


def test_some_docs_are_runnable():
    assert sum(len(runnable_blocks(p)) for p in DOC_FILES) >= 5


@pytest.mark.parametrize("path", [p for p in DOC_FILES if runnable_blocks(p)], ids=lambda p: p.name)
def test_runnable_blocks_execute(path, tiny_assets, tiny_task_examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_dir, adapter_dirs = tiny_assets
    namespace = {"base_dir": base_dir, "adapter_dirs": dict(adapter_dirs), "task_examples": tiny_task_examples}
    for index, (block, expected) in enumerate(zip(runnable_blocks(path), documented_outputs(path), strict=True)):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(block, f"{path.name}[block {index}]", "exec"), namespace)
        except Exception as error:  # name the block so a broken doc is easy to find
            raise AssertionError(f"{path.name} block {index} raised {error!r}:\n{block}") from error
        if expected is not None:  # what the doc says the block prints is what it prints
            assert printed.getvalue() == expected, f"{path.name} block {index} printed something else"
        if "print(" in block:
            assert printed.getvalue().strip(), f"{path.name} block {index} should print"


def test_documented_outputs_are_checked():
    """The output check above is not vacuous: the quickstart shows outputs for some of its blocks."""
    assert sum(o is not None for o in documented_outputs(ROOT / "docs" / "quickstart.md")) >= 2


def test_api_reference_matches_the_docstrings():
    """docs/api.md is generated from the code; regenerate it with `python scripts/gen_api_docs.py`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "api.md").read_text() == module.render()
