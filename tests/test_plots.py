"""Plots of a run, a sweep and the benchmark: real PNG files written next to the results and linked from RUN.md."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("matplotlib")

from peft_d2c import D2CMergeConfig, merge_adapters_d2c  # noqa: E402
from peft_d2c.evaluation.heldout import loss_matrix  # noqa: E402
from peft_d2c.evaluation.plots import plot_loss_history, plot_run, plot_sweep  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def test_plot_run_writes_history_membership_and_heatmap(tmp_path, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    config = D2CMergeConfig(num_clusters=2, num_iterations=5, show_progress=False)
    result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
    examples = {t: tiny_task_examples[t] for t in result.routing}
    matrix = loss_matrix(tiny_peft_model, tiny_tokenizer, examples, result.merged_adapter_names)
    written = plot_run(result, tmp_path, loss_matrix=matrix)
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["cluster_membership.png", "loss_heatmap.png", "loss_history.png"]
    assert all(_is_png(p) for p in written)


def test_loss_history_without_moves_still_draws(tmp_path):
    assert _is_png(plot_loss_history([], str(tmp_path / "empty.png")))


def test_plot_sweep_writes_a_png(tmp_path):
    sweep = {
        "metric": "few-shot loss",
        "higher_is_better": False,
        "num_adapters": 3,
        "points": [{"k": k, "storage_fraction": k / 3, "score": 2.0 / k} for k in (1, 2, 3)],
    }
    assert _is_png(plot_sweep(sweep, str(tmp_path / "sweep.png")))


def test_merge_command_links_its_plots_from_the_run_readme(tmp_path, tiny_assets, capsys):
    import json

    import yaml

    from peft_d2c import testing as tiny
    from peft_d2c.cli import main

    base_dir, adapter_dirs = tiny_assets
    data = {}
    for family in ("copy", "reverse", "sort"):
        path = tmp_path / f"{family}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in tiny.make_examples(family, 10, seed=7)))
        data[family] = {"path": str(path)}
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "base_model": base_dir,
                "adapters": [adapter_dirs[f] for f in data],
                "data": {"tasks": data},
                "d2c": {"num_clusters": 2, "num_iterations": 4},
                "output": str(tmp_path / "out"),
            }
        )
    )
    assert main(["merge", str(run), "--quiet"]) == 0
    readme = (tmp_path / "out" / "RUN.md").read_text()
    for name in ("loss_history.png", "cluster_membership.png", "loss_heatmap.png"):
        assert f"]({name})" in readme and _is_png(str(tmp_path / "out" / name))
