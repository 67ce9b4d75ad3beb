"""The benchmark pipeline on the tiny model: every method, JSON per cell, resume, table and plots."""

from __future__ import annotations

import argparse
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

    # Two cells of one key (say a validation cell pasted in) are refused, not reduced to one on the next write.
    again["results"].append({**again["results"][-1], "collection": "validation"})
    json_path.write_text(json.dumps(again))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "several cells of the same method, K, seed and merge" in capsys.readouterr().err
    assert json.loads(json_path.read_text()) == again  # the file is as it was


def _cell(method, k, seed, score, fewshot=None, anytime=None, whole=None):
    return {
        **({"heldout_whole_score": whole} if whole is not None else {}),
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
        assert row["whole_diff"] is None  # cells written before the whole-answer score: no column value

    def test_paired_difference_of_the_whole_answer_next_to_the_first_word(self):
        from peft_d2c.embedded.benchmark_report import format_table, paired_differences

        # the first word favours d2c by 0.10 on both seeds, the whole answer by 0.05 and -0.01
        results = [_cell("random", 2, s, 0.5, 1.0, whole=0.3) for s in range(2)]
        results += [_cell("d2c", 2, 0, 0.6, 0.9, whole=0.35), _cell("d2c", 2, 1, 0.6, 0.9, whole=0.29)]
        data = {"model": "m", "results": results}
        (row,) = paired_differences(data)
        assert row["diff"] == pytest.approx(0.10) and row["whole_diff"] == pytest.approx(0.02)
        half = 12.706 * 0.06 / 2**0.5 / 2**0.5  # t(0.975, 1) x std(0.05, -0.01) / sqrt(2)
        assert (row["whole_low"], row["whole_high"]) == pytest.approx((0.02 - half, 0.02 + half))
        line = next(x for x in format_table(data).splitlines() if x.startswith("| d2c | 2 | random"))
        assert line.endswith(f"| +2.0 [{100 * (0.02 - half):+.1f}, {100 * (0.02 + half):+.1f}] |")

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

    def test_paired_against_paper_pairs_the_same_seeds_and_counts_lower_losses(self):
        from peft_d2c.embedded.benchmark_report import format_table, paired_against_paper

        paper = {"method": "d2c", "search": "paper"}
        methods = {
            "d2c": {**paper, "search": "partition"},
            "d2c (paper)": paper,
            "d2c (kmeans_svd init)": {**paper, "search": "partition", "init": "kmeans_svd"},
        }
        results = []
        for seed, (ours, theirs) in enumerate([(0.50, 0.60), (0.55, 0.52), (0.40, 0.45), (0.30, 0.31)]):
            results.append({**_cell("d2c", 4, seed, 0.7, ours), "forward_passes": 200})
            results.append({**_cell("d2c (paper)", 4, seed, 0.6 + 0.01 * seed, theirs), "forward_passes": 80})
            results.append({**_cell("d2c (kmeans_svd init)", 4, seed, 0.7, 0.1), "forward_passes": 80})
        results.append({**_cell("d2c", 4, 9, 0.7, 0.0), "forward_passes": 200})  # no paper cell: not paired
        (row,) = paired_against_paper({"model": "m", "methods": methods, "iterations": None, "results": results})
        diffs = [-0.10, 0.03, -0.05, -0.01]  # ours minus the paper's, by hand
        mean = sum(diffs) / 4
        std = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5
        assert row["method"] == "d2c" and row["paper"] == "d2c (paper)" and row["n"] == 4 and row["lower"] == 3
        assert row["loss_diff"] == pytest.approx(mean)
        assert row["loss_high"] - row["loss_diff"] == pytest.approx(3.182 * std / 2)  # t(0.975, df=3), sqrt(4)
        assert row["pass_ratio"] == pytest.approx(2.5)
        assert row["em_diff"] == pytest.approx(0.7 - (0.6 + 0.015))
        assert row["heldout_diff"] == 0.0 and row["heldout_low"] == row["heldout_high"] == 0.0  # 1.0 in every cell
        table = format_table({"model": "m", "methods": methods, "iterations": None, "results": results})
        assert "| d2c | 4 | d2c (paper) | -0.032 [-0.121, +0.056] |" in table and "| 3 of 4 | 2.50x |" in table
        # Held-out losses paired by seed: ours 0.9, 1.0, 1.1, 1.2 against the paper's 1.0 -> +0.05 [-0.155, +0.255].
        for cell in results:
            if cell["method"] == "d2c" and cell["seed"] < 4:
                cell["heldout_loss"] = 0.9 + 0.1 * cell["seed"]
        (row,) = paired_against_paper({"model": "m", "methods": methods, "iterations": None, "results": results})
        half = 3.182 * (sum((d - 0.05) ** 2 for d in (-0.1, 0.0, 0.1, 0.2)) / 3) ** 0.5 / 2
        assert row["heldout_diff"] == pytest.approx(0.05) and row["heldout_high"] == pytest.approx(0.05 + half)
        # The default search (`search` left at None) is the paper's: it is what the others are paired against.
        default = {**methods, "d2c (paper)": {"method": "d2c"}}
        (row,) = paired_against_paper({"model": "m", "methods": default, "iterations": None, "results": results})
        assert row["paper"] == "d2c (paper)" and row["n"] == 4
        # A paper mode at another T than the run's is not the paper's algorithm of that run: nothing to pair with.
        other = {**methods, "d2c (paper)": {**paper, "num_iterations": 30}}
        assert paired_against_paper({"model": "m", "methods": other, "iterations": None, "results": results}) == []


def test_the_default_d2c_is_the_papers_search_and_other_options_add_it_beside():
    from peft_d2c.cli.benchmark import parse_variant
    from peft_d2c.embedded.benchmark import PAPER_SEARCH, cluster_methods

    default = dict(cluster_methods())  # the default D2C search is the paper's: no second copy of it
    assert "d2c (paper)" not in default and default["d2c"] == {"method": "d2c"}
    assert default["d2c (kmeans_svd init)"] == {"method": "d2c", "init": "kmeans_svd"}
    assert all(default[m] == {"method": m} for m in ("random", "kmeans", "kmeans_svd"))  # no search setting
    assert dict(cluster_methods(PAPER_SEARCH)) == {**default, "d2c": {"method": "d2c", "search": "paper"},
                                                   "d2c (kmeans_svd init)": {"method": "d2c", "init": "kmeans_svd",
                                                                             "search": "paper"}}  # fmt: skip
    methods = dict(
        cluster_methods({"search": "partition", "patience": 5}, dict([parse_variant("v: num_iterations=30")]))
    )
    assert methods["d2c"] == {"method": "d2c", "search": "partition", "patience": 5}
    assert methods["d2c (paper)"] == {"method": "d2c", "search": "paper"}  # the alias runs the paper's explicitly
    assert methods["d2c [v]"] == {"method": "d2c", "num_iterations": 30}  # over the defaults: the paper's search
    with pytest.raises(argparse.ArgumentTypeError, match="keys"):
        parse_variant("old: restarts=2")
    # a scoring setting goes into its group, and makes the method another search than the paper's
    from peft_d2c.embedded.benchmark_report import _is_paper

    name, cross_fit = parse_variant("cf2: cross_fit_folds=2 init=random")
    assert (name, cross_fit) == ("cf2", {"scoring": {"cross_fit_folds": 2}, "init": "random"})
    assert not _is_paper({"method": "d2c", **cross_fit}, None) and _is_paper({"method": "d2c", "init": "random"}, None)


def test_same_partition_is_evaluated_once_and_anytime_seeds_limit_the_recomputed_curves(tmp_path):
    """Cells whose clusters repeat reuse the held-out scores (checked against a fresh merge and evaluation), and
    paper-rule cells from seed `anytime_seeds` on have no recomputed curve while partition-objective cells do."""
    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c.embedded.benchmark import cluster_methods, run_benchmark
    from peft_d2c.embedded.mainjob import load_quick_assets
    from peft_d2c.evaluation.heldout import evaluate_routing

    data = run_benchmark(
        model="tiny",
        clusters=[2],
        seeds=2,
        iterations=3,
        json_path=str(tmp_path / "b.json"),
        cache_dir=str(tmp_path / "cache"),
        show_progress=False,
        methods=["kmeans", "kmeans_svd", "d2c", "d2c (paper)"],
        anytime_seeds=1,
        search_options={"search": "partition"},
    )
    cells = {(r["method"], r["seed"]): r for r in data["results"] if r["method"] not in REFERENCE_METHODS}
    assert "anytime" in cells[("d2c (paper)", 0)] and "anytime" not in cells[("d2c (paper)", 1)]
    assert all("anytime" in cells[("d2c", s)] for s in (0, 1))
    labels = [m for m, _ in cluster_methods({"search": "partition"})]
    order = sorted(cells, key=lambda key: (key[1], labels.index(key[0])))
    seen, reused = {}, 0
    for key in order:  # the run order: the first cell of a partition is evaluated, every later one reuses it
        partition = tuple(sorted(tuple(sorted(c)) for c in cells[key]["clusters"]))
        if partition in seen:
            assert cells[key]["heldout_reused_from"] == list(seen[partition])
            assert cells[key]["per_task"] == cells[seen[partition]]["per_task"]
            reused += 1
        else:
            assert "heldout_reused_from" not in cells[key]
            seen[partition] = key
    assert reused >= 1  # K-means finds the same partition for both seeds (kmeans and kmeans_svd may agree too)
    # The reused scores are what a fresh merge of that partition scores.
    key = next(k for k in order if "heldout_reused_from" in cells[k] and k[0].startswith("kmeans"))
    model, tokenizer, _, fewshot, test = load_quick_assets(str(tmp_path / "cache"))
    config = D2CMergeConfig(num_clusters=2, seed=key[1], method=key[0], show_progress=False)
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    assert sorted(map(sorted, result.clusters)) == sorted(map(sorted, cells[key]["clusters"]))
    fresh = evaluate_routing(model, tokenizer, test, result.routing)
    for task, scores in fresh.items():
        assert scores["exact_match"] == cells[key]["per_task"][task]["exact_match"]
        assert scores["loss"] == pytest.approx(cells[key]["per_task"][task]["loss"], rel=1e-5)


def _merge_cell(method, k, seed, merge, score, per_task=None, stats=None):
    return {
        **_cell(method, k, seed, score),
        "combination_type": merge,
        "forward_passes": 100 if method.startswith("d2c") else 0,
        **({"per_task": per_task} if per_task else {}),
        **({"search_stats": stats} if stats else {}),
    }


class TestMergeReport:
    def test_merge_rows_pair_each_merge_with_ties_on_the_seeds_both_have(self):
        from peft_d2c.embedded.merge_report import format_merge_tables, merge_rows

        results = [_merge_cell("random", 2, s, "ties", 0.50 + 0.02 * s) for s in range(4)]
        results += [_merge_cell("random", 2, s, "core_ta", v) for s, v in enumerate([0.55, 0.50, 0.60])]
        stats = {"seconds": 10.0, "merge_seconds": 2.0}
        results += [_merge_cell("d2c", 2, s, m, 0.6, stats=stats) for s in range(2) for m in ("ties", "core_ta")]
        data = {"model": "m", "combination_types": ["ties", "core_ta"], "results": results}
        rows = {(r["method"], r["merge"]): r for r in merge_rows(data)}
        ties, core = rows[("random", "ties")], rows[("random", "core_ta")]
        assert ties["n"] == 4 and ties["score"] == pytest.approx(0.53) and ties["diff"] == 0.0
        diffs = [0.55 - 0.50, 0.50 - 0.52, 0.60 - 0.54]  # core_ta minus ties, seeds 0-2, by hand
        mean = sum(diffs) / 3
        std = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
        assert core["n"] == 3 and core["pairs"] == 3 and core["wins"] == 2
        assert core["diff"] == pytest.approx(mean) and core["high"] - mean == pytest.approx(4.303 * std / 3**0.5)
        assert core["merge_share"] is None and rows[("d2c", "core_ta")]["merge_share"] == pytest.approx(0.2)
        table = format_merge_tables(data)
        assert (
            "| 2 | random | 53.0 ± 2.6 (4) | 55.0 ± 5.0 (3); +3.0 [-7.8, +13.8], 2/3 |" in table
        )  # 4.303 * 0.0436 / sqrt(3)
        assert "| 2 | d2c | `core_ta` | 100 |" in table and "| 20 |" in table

    def test_task_keep_rows_average_the_cells_every_merge_has(self):
        from peft_d2c.embedded.merge_report import format_merge_tables, task_keep_rows

        def scores(a, b):
            return {"a": {"exact_match": a, "loss": 1.0}, "b": {"exact_match": b, "loss": 1.0}}

        results = [{**_cell("single-task LoRAs", 2, 0, 0.9), "per_task": scores(1.0, 0.8)}]
        results += [
            _merge_cell("random", 2, 0, "ties", 0.5, scores(0.6, 0.4)),
            _merge_cell("random", 2, 1, "ties", 0.5, scores(0.8, 0.2)),
            _merge_cell("random", 2, 0, "knots_ties", 0.5, scores(0.9, 0.5)),
            _merge_cell("random", 2, 2, "ties", 0.5, scores(0.0, 0.0)),  # not in knots_ties: left out
            _merge_cell("random", 2, 1, "knots_ties", 0.5, scores(0.7, 0.3)),
        ]
        data = {"model": "m", "tasks": ["a", "b"], "results": results}
        rows = {r["task"]: r for r in task_keep_rows(data)}
        assert rows["a"]["single"] == 1.0 and rows["a"]["n"] == {2: 2}
        assert rows["a"]["kept"][2] == pytest.approx({"ties": 0.7, "knots_ties": 0.8})
        assert rows["b"]["kept"][2] == pytest.approx({"ties": 0.3, "knots_ties": 0.4})
        table = format_merge_tables(data)
        # mean kept: ties (0.7 + 0.3) / 2 over single (1.0 + 0.8) / 2 = 56%, knots_ties 0.6 / 0.9 = 67%
        assert "| a | 100 | 70 | 80 |" in table and "| **mean EM kept, % of single-task** | 100 | 56 | 67 |" in table

    def test_old_files_name_their_merge_and_runs_combine(self):
        from peft_d2c.embedded.merge_report import combine_runs, split_by_merge, with_merge_labels

        old = {"model": "m", "tasks": ["a"], "combination_type": "ties", "methods": {"random": {"method": "random"}}}
        old["results"] = [_cell("zero-shot", 0, 0, 0.1), _cell("random", 2, 0, 0.5)]
        new = {"model": "m", "tasks": ["a"], "combination_types": ["core_ta"], "methods": {}}
        new["results"] = [_merge_cell("zero-shot", 0, 0, "core_ta", 0.1), _merge_cell("random", 2, 0, "core_ta", 0.6)]
        labelled = with_merge_labels(old)
        assert labelled["combination_types"] == ["ties"] and "combination_type" in labelled["results"][1]
        assert "combination_type" not in old["results"][1]  # the input is left as it was
        both = combine_runs([old, new])
        assert both["combination_types"] == ["ties", "core_ta"]
        assert [c["method"] for c in both["results"]] == ["zero-shot", "random", "random"]  # one zero-shot
        parts = split_by_merge(both)
        assert [c["heldout_score"] for c in parts["core_ta"]["results"]] == [0.1, 0.6]
        with pytest.raises(ValueError, match="differ in `tasks`"):
            combine_runs([old, {**new, "tasks": ["b"]}])


def test_merge_axis_runs_every_method_with_every_merge_and_resumes_an_old_run(tmp_path, capsys):
    """A run with one merge, resumed with a second: the first merge's cells are kept, a baseline's partition is the
    same under both merges, and the new merge's held-out scores are those of a fresh merge and evaluation."""
    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c.embedded.benchmark import run_benchmark
    from peft_d2c.embedded.mainjob import load_quick_assets
    from peft_d2c.evaluation.heldout import evaluate_routing

    common = dict(
        model="tiny",
        clusters=[2],
        seeds=1,
        iterations=3,
        json_path=str(tmp_path / "b.json"),
        cache_dir=str(tmp_path / "cache"),
        show_progress=False,
        methods=["kmeans", "d2c"],
    )
    first = run_benchmark(**common, combination_types=["ties"])
    both = run_benchmark(**common, combination_types=["core_ta"], resume=True)
    assert both["combination_types"] == ["ties", "core_ta"]
    cells = {(r["method"], r["combination_type"]): r for r in both["results"]}
    assert set(cells) == {(m, t) for m in ("kmeans", "d2c") for t in ("ties", "core_ta")} | {
        ("zero-shot", "ties"),
        ("single-task LoRAs", "ties"),
    }
    kept = {(r["method"], r["combination_type"]): r["seconds"] for r in first["results"]}
    assert all(cells[key]["seconds"] == seconds for key, seconds in kept.items())
    ties, core = cells[("kmeans", "ties")], cells[("kmeans", "core_ta")]
    assert ties["clusters"] == core["clusters"] and "heldout_reused_from" not in core
    model, tokenizer, _, fewshot, test = load_quick_assets(str(tmp_path / "cache"))
    config = D2CMergeConfig(num_clusters=2, method="kmeans", combination_type="core_ta", show_progress=False)
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    fresh = evaluate_routing(model, tokenizer, test, result.routing)
    for task, scores in fresh.items():
        assert scores["exact_match"] == core["per_task"][task]["exact_match"]
        assert scores["loss"] == pytest.approx(core["per_task"][task]["loss"], rel=1e-5)
    # The command line prints the per-merge tables and the merge axis of the saved file.
    assert main(["benchmark", "--report", common["json_path"]]) == 0
    printed = capsys.readouterr().out
    assert "### `core_ta` merges" in printed and "### The merge axis" in printed
    assert "| 2 | kmeans | " in printed and "K=2 `core_ta`" in printed
