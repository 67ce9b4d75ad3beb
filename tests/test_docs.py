"""Every ```python runnable block of docs/ and README.md runs, in order per file, on the tiny test model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUNNABLE = re.compile(r"^```python runnable\n(.*?)^```", flags=re.S | re.M)


def runnable_blocks(path: Path) -> list[str]:
    return RUNNABLE.findall(path.read_text())


def test_some_docs_are_runnable():
    assert sum(len(runnable_blocks(p)) for p in DOC_FILES) >= 5


@pytest.mark.parametrize("path", [p for p in DOC_FILES if runnable_blocks(p)], ids=lambda p: p.name)
def test_runnable_blocks_execute(path, tiny_assets, tiny_task_examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_dir, adapter_dirs = tiny_assets
    namespace = {"base_dir": base_dir, "adapter_dirs": dict(adapter_dirs), "task_examples": tiny_task_examples}
    for index, block in enumerate(runnable_blocks(path)):
        try:
            exec(compile(block, f"{path.name}[block {index}]", "exec"), namespace)
        except Exception as error:  # name the block so a broken doc is easy to find
            raise AssertionError(f"{path.name} block {index} raised {error!r}:\n{block}") from error


def test_api_reference_matches_the_docstrings():
    """docs/api.md is generated from the code; regenerate it with `python scripts/gen_api_docs.py`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "api.md").read_text() == module.render()
