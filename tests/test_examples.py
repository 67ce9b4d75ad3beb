"""The scripts of `examples/` run as a user runs them: real subprocesses on a workspace of real files.

The tiny-model workspace (six synthetic tasks) exercises the one-line PEFT workflow and online addition; the YAML
CLI example runs on the real SmolLM2-135M with the four tasks `examples/merge.yaml` names (marked `slow`; it reuses
the adapter cache of the end-to-end test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peft_d2c import D2CResult
from peft_d2c.cli import main as cli_main

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def run_example(script: str, *args: str, cwd: str, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("examples")
    out = run_example("make_workspace.py", "ws", "--tiny", cwd=str(root), env={"PEFT_D2C_CACHE": str(root / "cache")})
    assert "6 adapters" in out
    return str(root / "ws")


def test_workspace_layout(tiny_workspace):
    tasks = sorted(os.listdir(os.path.join(tiny_workspace, "adapters")))
    assert len(tasks) == 6
    assert os.path.isfile(os.path.join(tiny_workspace, "base", "config.json"))
    for task in tasks:
        assert os.path.isfile(os.path.join(tiny_workspace, "adapters", task, "adapter_model.safetensors"))
        with open(os.path.join(tiny_workspace, "data", task, "fewshot.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 10 and all(set(row) == {"prompt", "completion"} for row in rows)


def test_peft_workflow_example(tiny_workspace, tmp_path):
    out = run_example(
        "peft_workflow.py", tiny_workspace, "-k", "2", "-t", "8", "--output", "merged", cwd=str(tmp_path)
    )
    result = D2CResult.from_pretrained(tmp_path / "merged")
    assert len(result.clusters) == 2 and sorted(result.routing) == sorted(os.listdir(f"{tiny_workspace}/adapters"))
    for task, name in result.routing.items():
        assert f"[{task} -> {name}]" in out  # every task was served by its merged adapter
        assert os.path.isfile(tmp_path / "merged" / name / "adapter_model.safetensors")


def test_online_addition_example(tiny_workspace, tmp_path):
    out = run_example(
        "online_addition.py", tiny_workspace, "--new-task", "sort", "-t", "6", "--output", "online", cwd=str(tmp_path)
    )
    result = D2CResult.from_pretrained(tmp_path / "online")
    assert "sort" in result.routing and sum(len(c) for c in result.clusters) == 6
    joined = next(
        name for name, members in zip(result.merged_adapter_names, result.clusters, strict=True) if "sort" in members
    )
    assert f"'sort' joins {joined}" in out and result.routing["sort"] == joined


@pytest.mark.slow
def test_yaml_cli_example_on_smollm2(tmp_path, monkeypatch, capsys):
    with open(os.path.join(EXAMPLES, "merge.yaml"), encoding="utf-8") as f:
        tasks = [line.split("/")[-1].strip() for line in f if line.strip().startswith("- example_workspace/adapters/")]
    run_example("make_workspace.py", "example_workspace", "--tasks", *tasks, cwd=str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["merge", os.path.join(EXAMPLES, "merge.yaml"), "--iterations", "4", "--quiet"]) == 0
    result = D2CResult.from_pretrained("d2c_yaml_output")
    assert sorted(result.routing) == sorted(tasks) and len(result.clusters) == 2
    assert os.path.isfile("d2c_yaml_output/d2c_run.yaml")
    assert cli_main(["evaluate", "d2c_yaml_output", "--data", os.path.join(EXAMPLES, "heldout.yaml"), "--quiet"]) == 0
    with open("d2c_yaml_output/heldout.json", encoding="utf-8") as f:
        heldout = json.load(f)
    assert "plural" in json.dumps(heldout)
    assert capsys.readouterr().out.strip()
