"""The benchmark pipeline on the tiny model: every method, JSON per cell, resume, table and plots."""

from __future__ import annotations

import json

from peft_d2c.cli import main
from peft_d2c.embedded.benchmark import CLUSTER_METHODS, REFERENCE_METHODS, format_table


def test_benchmark_tiny_writes_results_and_resumes(tmp_path, capsys):
    json_path, plot_path = tmp_path / "b.json", tmp_path / "b.png"
    argv = [
        "benchmark",
        "--model",
        "tiny",
        "--clusters",
        "2",
        "--seeds",
        "1",
        "--iterations",
        "4",
        "--quiet",
        "--json",
        str(json_path),
        "--plot",
        str(plot_path),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    data = json.loads(json_path.read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {*REFERENCE_METHODS, *(label for label, _ in CLUSTER_METHODS)}
    for r in data["results"]:
        assert {
            "method",
            "num_clusters",
            "storage_fraction",
            "seed",
            "heldout_score",
            "heldout_loss",
            "seconds",
        } <= set(r)
        assert 0.0 <= r["heldout_score"] <= 1.0 and r["heldout_loss"] > 0
    assert plot_path.stat().st_size > 0 and (tmp_path / "b_heatmap.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert printed.startswith("| method | K | storage |") and "| d2c | 2 | 33.3% |" in printed

    # A resumed run keeps the finished cells (same timings) instead of recomputing them.
    assert main([*argv, "--resume"]) == 0
    again = json.loads(json_path.read_text())
    assert [r["seconds"] for r in again["results"]] == [r["seconds"] for r in data["results"]]
    assert format_table(again) == format_table(data)
