"""The `peft-d2c` command, in-process through `main(argv)`."""

from __future__ import annotations

import json
import os

import pytest

from peft_d2c import D2CResult
from peft_d2c.cli import main


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One model/adapter cache for the module, so the tiny assets are built once."""
    return str(tmp_path_factory.mktemp("cache"))


def test_run_quick_prints_and_saves_the_main_job(tmp_path, capsys, cache_dir):
    out = tmp_path / "out"
    status = main(["run", "--quick", "--quiet", "--output", str(out), "--cache-dir", cache_dir])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Clusters:" in printed and "| **average** |" in printed
    result = D2CResult.from_pretrained(out)
    assert len(result.clusters) == 2 and set(result.heldout_scores) == set(result.routing)
    heldout = json.loads((out / "heldout.json").read_text())
    assert set(heldout["columns"]) == {"zero-shot", "single-task LoRA", "merged (D2C)"}
    assert all(os.path.isfile(out / name / "adapter_model.safetensors") for name in result.merged_adapter_names)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--quick", "--clusters", "9"], "between 1 and the number of adapters"),
        (["run", "--quick", "--method", "best"], "`method` must be one of"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, cache_dir, argv, message):
    status = main([*argv, "--quiet", "--output", str(tmp_path / "o"), "--cache-dir", cache_dir])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-d2c: error:") and message in err and len(err.splitlines()) == 1
