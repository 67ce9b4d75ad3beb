"""Data-driven merge weights on the embedded default (issue 13, item 3): held-out exact match with and without tuning.

For the D2C cells of a benchmark results file (`peft-d2c benchmark --json ...`), every final cluster of two or more
adapters gets its per-adapter merge weights tuned on the few-shot loss of its own tasks
(`peft_d2c.evaluation.tune.tune_cluster_weights`: a seeded (1+1)-ES, `--budget` evaluations per cluster), then the
routing is scored on the held-out `test` split and compared with the cell's untuned score, paired by seed.

    OMP_NUM_THREADS=1 python benchmarks/tune_weights.py --results benchmark_results/merge_ties.json \
        --merge ties --clusters 2 4 --seeds 0 1 2 --json benchmark_results/tune_weights.json

Cells are written to `--json` as they finish; a rerun skips the cells already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from peft_d2c import D2CMergeConfig
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.embedded.benchmark_report import t_interval
from peft_d2c.embedded.mainjob import load_embedded_assets
from peft_d2c.embedded.merge_report import with_merge_labels
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.evaluation.heldout import evaluate_routing
from peft_d2c.evaluation.tune import cluster_loss, tune_cluster_weights
from peft_d2c.io import atomic_write_json


def tune_cell(model, tokenizer, fewshot, test, cell, budget: int) -> dict:
    config = D2CMergeConfig(
        num_clusters=cell["num_clusters"],
        combination_type=cell["combination_type"],
        merged_adapter_prefix=f"tw{cell['num_clusters']}s{cell['seed']}",
    )
    merger = AdapterMerger(model, config)
    # A data-aware merge (`regmean`) needs every member's layer inputs on its few-shot examples, as in the run.
    tasks = sorted(t for members in cell["clusters"] for t in members)
    examples = normalize_task_examples({t: fewshot[t][: config.scoring.examples_per_task] for t in tasks})
    attach_layer_inputs(merger, LossScorer.for_config(model, tokenizer, examples, merger))
    routing, clusters, started, passes = {}, [], time.perf_counter(), 0
    names = []
    try:
        for index, members in enumerate(cell["clusters"]):
            members = sorted(members)
            examples = {t: fewshot[t][: config.scoring.examples_per_task] for t in members}
            if len(members) == 1:
                routing[members[0]] = members[0]
                continue
            name = merger.merge(members, f"{config.merged_adapter_prefix}_c{index}")
            names.append(name)
            untuned = cluster_loss(model, tokenizer, examples, name, config.scoring.batch_size)
            search, spent = tune_cluster_weights(
                model, tokenizer, merger, members, name, examples, budget=budget, seed=cell["seed"] * 100 + index
            )
            passes += spent
            recorded = statistics.mean(cell["fewshot_losses"][t] for t in members)
            clusters.append(
                {
                    "members": members,
                    "weights": search.weights,
                    "untuned_loss": untuned,
                    "recorded_loss": recorded,
                    "tuned_loss": search.value,
                    "accepted": len(search.history) - 1,
                }
            )
            routing.update({t: name for t in members})
        scores = evaluate_routing(model, tokenizer, test, routing)
    finally:
        for name in names:
            model.delete_adapter(name)
    return {
        "key": f"{cell['method']}|{cell['num_clusters']}|{cell['seed']}|{cell['combination_type']}",
        "num_clusters": cell["num_clusters"],
        "seed": cell["seed"],
        "merge": cell["combination_type"],
        "untuned_score": cell["heldout_score"],
        "tuned_score": statistics.mean(s["exact_match"] for s in scores.values()),
        "untuned_fewshot": cell["fewshot_loss"],
        "per_task": scores,
        "clusters": clusters,
        "forward_passes": passes,
        "search_forward_passes": cell["forward_passes"],
        "seconds": time.perf_counter() - started,
    }


def report(cells: list[dict]) -> str:
    lines = [
        "| K | merge | seeds | untuned EM % | tuned EM % | tuned - untuned (95% t) | seeds better | cluster loss "
        "untuned -> tuned | tuning passes (search's) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, merge in sorted({(c["num_clusters"], c["merge"]) for c in cells}):
        group = [c for c in cells if (c["num_clusters"], c["merge"]) == (k, merge)]
        diff, low, high = t_interval([c["tuned_score"] - c["untuned_score"] for c in group])
        losses = [cl for c in group for cl in c["clusters"]]
        lines.append(
            f"| {k} | `{merge}` | {len(group)} | {100 * statistics.mean(c['untuned_score'] for c in group):.1f} | "
            f"{100 * statistics.mean(c['tuned_score'] for c in group):.1f} | {100 * diff:+.1f} "
            + (f"[{100 * low:+.1f}, {100 * high:+.1f}]" if len(group) > 1 else "(one seed)")
            + f" | {sum(c['tuned_score'] > c['untuned_score'] for c in group)} of {len(group)} | "
            f"{statistics.mean(cl['untuned_loss'] for cl in losses):.3f} -> "
            f"{statistics.mean(cl['tuned_loss'] for cl in losses):.3f} | "
            f"{statistics.mean(c['forward_passes'] for c in group):.0f} "
            f"({statistics.mean(c['search_forward_passes'] for c in group):.0f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="A `peft-d2c benchmark` results file.")
    parser.add_argument("--method", default="d2c")
    parser.add_argument("--merge", default="ties")
    parser.add_argument("--clusters", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=20, help="Objective evaluations per cluster.")
    parser.add_argument("--json", default="benchmark_results/tune_weights.json")
    parser.add_argument("--report", action="store_true", help="Print the table of --json and exit.")
    args = parser.parse_args()
    done = {}
    if os.path.isfile(args.json):
        with open(args.json, encoding="utf-8") as f:
            done = {c["key"]: c for c in json.load(f)["cells"]}
    if args.report:
        print(report(list(done.values())))
        return
    with open(args.results, encoding="utf-8") as f:
        results = with_merge_labels(json.load(f))["results"]
    wanted = [
        c
        for c in results
        if c["method"] == args.method
        and c["combination_type"] == args.merge
        and c["num_clusters"] in args.clusters
        and c["seed"] in args.seeds
    ]
    model, tokenizer, _, fewshot, test = load_embedded_assets(None, False, False)
    for cell in sorted(wanted, key=lambda c: (c["seed"], c["num_clusters"])):
        key = f"{cell['method']}|{cell['num_clusters']}|{cell['seed']}|{cell['combination_type']}"
        if key in done:
            continue
        done[key] = tune_cell(model, tokenizer, fewshot, test, cell, args.budget)
        atomic_write_json(args.json, {"budget": args.budget, "cells": list(done.values())})
        c = done[key]
        print(f"{key}: EM {c['untuned_score']:.3f} -> {c['tuned_score']:.3f} ({c['seconds']:.0f} s)", flush=True)
    print(report(list(done.values())))


if __name__ == "__main__":
    main()
