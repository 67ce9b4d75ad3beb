"""The benchmark pipeline on the tiny model: every method, JSON per cell, resume, table and plots."""

from __future__ import annotations

import json

import pytest

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
    assert (tmp_path / "b_anytime_k2.png").stat().st_size > 0
    for r in data["results"]:  # every D2C cell has its any-time curve, from 0 passes to the cell's total
        if r["method"].startswith("d2c"):
            assert r["anytime"][0][0] == 0 and r["anytime"][-1][0] == r["forward_passes"]
            assert r["anytime"][-1][1] == pytest.approx(r["fewshot_loss"])
    printed = capsys.readouterr().out
    assert printed.startswith("| method | K | storage |") and "| d2c | 2 | 33.3% |" in printed

    # A resumed run keeps the finished cells (same timings) instead of recomputing them.
    assert main([*argv, "--resume"]) == 0
    again = json.loads(json_path.read_text())
    assert [r["seconds"] for r in again["results"]] == [r["seconds"] for r in data["results"]]
    assert format_table(again) == format_table(data)


def _cell(method, k, seed, score, fewshot=None, anytime=None):
    return {
        "method": method,
        "num_clusters": k,
        "seed": seed,
        "storage_fraction": k / 16,
        "heldout_score": score,
        "heldout_loss": 1.0,
        "fewshot_loss": fewshot,
        "seconds": 1.0,
        **({"anytime": anytime} if anytime else {}),
    }


class TestReport:
    def test_paired_difference_uses_the_best_baseline_and_a_t_interval(self):
        from peft_d2c.embedded.benchmark_report import paired_differences, t_interval

        results = [_cell("random", 2, s, 0.5 + 0.01 * s, 1.0) for s in range(3)]
        results += [_cell("kmeans", 2, s, 0.4, 1.1) for s in range(3)]
        results += [_cell("d2c", 2, s, 0.5 + 0.01 * s + d, 0.9) for s, d in enumerate([0.02, 0.04, 0.03])]
        (row,) = paired_differences({"model": "m", "results": results})
        assert row["baseline"] == "random" and row["wins"] == 3 and row["n"] == 3
        assert row["diff"] == pytest.approx(0.03) and row["fewshot_diff"] == pytest.approx(-0.1)
        # t(0.975, df=2) = 4.303, std of (0.02, 0.04, 0.03) = 0.01
        assert (row["low"], row["high"]) == pytest.approx((0.03 - 4.303 * 0.01 / 3**0.5, 0.03 + 4.303 * 0.01 / 3**0.5))
        assert t_interval([0.5]) == (0.5, 0.5, 0.5)

    def test_anytime_rows_carry_the_final_loss_of_a_finished_run(self):
        from peft_d2c.embedded.benchmark_report import anytime_rows, value_at

        curve = [[0, 1.0], [30, 0.8], [60, 0.7]]
        assert [value_at(curve, b) for b in (0, 29, 30, 100)] == [1.0, 1.0, 0.8, 0.7]
        results = [
            _cell("d2c", 2, 0, 0.5, anytime=curve),
            _cell("d2c [long]", 2, 0, 0.5, anytime=[[0, 1.0], [200, 0.5]]),
        ]
        rows = {r["method"]: r for r in anytime_rows({"model": "m", "results": results}, budgets=[0, 50, 100, 200])}
        assert rows["d2c"]["budgets"] == [0, 50, 60, 100, 200] and rows["d2c"]["losses"][-1] == 0.7
        assert rows["d2c [long]"]["losses"] == [1.0, 1.0, 1.0, 0.5]


def test_search_options_add_the_exact_paper_mode_next_to_d2c():
    from peft_d2c.cli.benchmark import parse_variant
    from peft_d2c.embedded.benchmark import PAPER_SEARCH, cluster_methods

    assert "d2c (paper)" not in dict(cluster_methods())
    methods = dict(
        cluster_methods({"search": "partition", "restarts": 2}, dict([parse_variant("v: num_iterations=30")]))
    )
    assert methods["d2c"]["search"] == "partition" and methods["d2c"]["restarts"] == 2
    assert {k: methods["d2c (paper)"][k] for k in PAPER_SEARCH} == PAPER_SEARCH
    assert methods["d2c [v]"]["num_iterations"] == 30 and methods["d2c [v]"]["search"] == "paper"
