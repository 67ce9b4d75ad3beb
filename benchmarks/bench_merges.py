"""Merge methods side by side on the embedded default (SmolLM2-135M-Instruct + 16 task adapters), issue 13.

For fixed partitions (the random, kmeans_svd and D2C partitions recorded in docs/benchmark_results.json, found with
`ties` merges), every cluster is merged with each combination type and the routing is scored on the held-out
`test` split (`evaluation.heldout.evaluate_routing`, greedy exact match). Optionally (`--search`) a full D2C search
runs with each new type as its merge, to compare the time spent merging with the time of the whole search.

    OMP_NUM_THREADS=1 nohup python benchmarks/bench_merges.py --json benchmarks/bench_merges.json > bench.log 2>&1 &

Cells are written to the JSON file as they finish; a rerun skips cells already there.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.embedded.mainjob import load_embedded_assets
from peft_d2c.engine.merging import AdapterMerger
from peft_d2c.evaluation.heldout import evaluate_routing
from peft_d2c.io import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDED = os.path.join(HERE, "..", "docs", "benchmark_results.json")
# "type@w" runs `type` with `merge_weight=w` for every member (core_ta@1: the sum of the updates, not their mean).
TYPES = ("ties", "core_ta", "core_ta@1", "core_ties", "knots_ties", "tsv_m")
# (clustering method as recorded, K, seed), most informative first: the run may be cut short.
PARTITIONS = [
    ("d2c", 4, 0),
    ("d2c", 2, 0),
    ("random", 4, 0),
    ("kmeans_svd", 4, 0),
    ("random", 2, 0),
    ("kmeans_svd", 2, 0),
    ("d2c", 4, 1),
    ("d2c", 2, 1),
    ("random", 4, 1),
    ("d2c", 4, 2),
]


def mean_em(scores):
    return sum(v["exact_match"] for v in scores.values()) / len(scores)


def report(path: str, main_types: list[str]) -> str:
    """Markdown tables of a finished (or partial) run: mean EM per partition and type, merge time, the searches,
    and per task the exact match under each type next to the single-task LoRA's (mean over the partitions)."""
    with open(path, encoding="utf-8") as f:
        cells = {r["key"]: r for r in json.load(f)["results"]}
    with open(RECORDED, encoding="utf-8") as f:
        single = next(r for r in json.load(f)["results"] if r["method"] == "single-task LoRAs")["per_task"]
    parts = [key.rsplit("|", 1) for key in cells if not key.startswith("search")]
    partitions = list(dict.fromkeys(p for p, _ in parts))
    types = list(dict.fromkeys(t for _, t in parts))
    lines = ["| partition | " + " | ".join(f"`{t}`" for t in types) + " |", "|---" * (len(types) + 1) + "|"]
    for partition in partitions:
        row = [
            f"{100 * cells[f'{partition}|{t}']['heldout_score']:.1f}" if f"{partition}|{t}" in cells else "-"
            for t in types
        ]
        lines.append(f"| {partition.replace('|', ' K=', 1).replace('|', ' seed ')} | " + " | ".join(row) + " |")
    types = [t for t in types if t in main_types] + [t for t in types if t not in main_types]
    complete = [p for p in partitions if all(f"{p}|{t}" in cells for t in main_types)]
    lines[0] = "| partition | " + " | ".join(f"`{t}`" for t in types) + " |"
    lines[2:] = [
        f"| {p.replace('|', ' K=', 1).replace('|', ' seed ')} | "
        + " | ".join(f"{100 * cells[f'{p}|{t}']['heldout_score']:.1f}" if f"{p}|{t}" in cells else "-" for t in types)
        + " |"
        for p in partitions
    ]
    extra = ["-"] * (len(types) - len(main_types))
    types = list(main_types)
    for label, field in (("mean EM (partitions with every type)", "heldout_score"), ("merge s (K merges)", None)):
        values = []
        for t in types:
            got = [cells[f"{p}|{t}"] for p in complete]
            if field:
                values.append(f"{100 * sum(c[field] for c in got) / max(1, len(got)):.1f}")
            else:
                values.append(f"{sum(c['merge_seconds'] for c in got) / max(1, len(got)):.1f}")
        lines.append(f"| **{label}** | " + " | ".join(values + extra) + " |")
    lines += [
        "",
        "| D2C search (K=4, T=100, seed 0) | held-out EM | search s | merge s | merges (refills) |",
        "|---|---|---|---|---|",
    ]
    for key, cell in cells.items():
        if key.startswith("search"):
            stats = cell["stats"]
            lines.append(
                f"| `{key.rsplit('|', 1)[1]}` | {100 * cell['heldout_score']:.1f} | {stats['seconds']:.0f} | "
                f"{stats['merge_seconds']:.1f} | {stats['num_merges']} ({stats['num_refills']}) |"
            )
    lines += [
        "",
        "| task | single-task EM | " + " | ".join(f"`{t}` EM" for t in types) + " |",
        "|---" * (len(types) + 2) + "|",
    ]
    for task, score in single.items():
        row = []
        for t in types:
            got = [cells[f"{p}|{t}"]["per_task"][task]["exact_match"] for p in complete]
            row.append(f"{100 * sum(got) / max(1, len(got)):.0f}" if got else "-")
        lines.append(f"| {task} | {100 * score['exact_match']:.0f} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=os.path.join(HERE, "bench_merges.json"))
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--partitions", type=int, default=len(PARTITIONS), help="How many of PARTITIONS to run.")
    parser.add_argument("--search", nargs="*", default=[], help="Types to run a full D2C search with (K=4, T=100).")
    parser.add_argument("--report", action="store_true", help="Print the markdown tables of --json and exit.")
    args = parser.parse_args()
    if args.report:
        print(report(args.json, args.types))
        return

    with open(RECORDED, encoding="utf-8") as f:
        recorded = json.load(f)
    cells = {(r["method"], r["num_clusters"], r["seed"]): r for r in recorded["results"]}
    results = {}
    if os.path.isfile(args.json):
        with open(args.json, encoding="utf-8") as f:
            results = {r["key"]: r for r in json.load(f)["results"]}

    model, tokenizer, _, fewshot, test = load_embedded_assets(show_progress=False)

    def save():
        atomic_write_json(args.json, {"types": list(args.types), "results": list(results.values())})

    def run_partition(method, k, seed, combination_type):
        clusters = cells[(method, k, seed)]["clusters"]
        name, _, weight = combination_type.partition("@")
        prefix = "bm" + "".join(c for c in combination_type if c.isalnum())
        config = D2CMergeConfig(
            num_clusters=k,
            combination_type=name,
            merge_weight=float(weight) if weight else None,
            merged_adapter_prefix=prefix,
        )
        merger = AdapterMerger(model, config)
        routing, created = {}, []
        started = time.perf_counter()
        try:
            for index, members in enumerate(clusters):
                created.append(merger.merge(members, f"{prefix}_{index}"))
                routing.update({task: created[-1] for task in members})
            merge_seconds = time.perf_counter() - started
            started = time.perf_counter()
            scores = evaluate_routing(model, tokenizer, test, routing)
        finally:
            for name in created:
                model.delete_adapter(name)
        return {
            "clusters": clusters,
            "merge_seconds": merge_seconds,
            "eval_seconds": time.perf_counter() - started,
            "heldout_score": mean_em(scores),
            "per_task": scores,
        }

    def run_search(combination_type):
        name, _, weight = combination_type.partition("@")
        config = D2CMergeConfig(
            num_clusters=4,
            num_iterations=100,
            seed=0,
            combination_type=name,
            merge_weight=float(weight) if weight else None,
            merged_adapter_prefix="bs" + "".join(c for c in combination_type if c.isalnum()),
            show_progress=False,
        )
        result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
        try:
            scores = evaluate_routing(model, tokenizer, test, result.routing)
        finally:
            for name in result.merged_adapter_names:
                model.delete_adapter(name)
        return {
            "clusters": result.clusters,
            "stats": result.stats,
            "heldout_score": mean_em(scores),
            "per_task": scores,
        }

    jobs = [
        (f"{m}|{k}|{s}|{t}", run_partition, (m, k, s, t))
        for m, k, s in PARTITIONS[: args.partitions]
        for t in args.types
    ]
    jobs[2 * len(args.types) : 2 * len(args.types)] = [(f"search|4|0|{t}", run_search, (t,)) for t in args.search]
    for key, function, arguments in jobs:
        if key in results:
            continue
        cell = function(*arguments)
        cell["key"] = key
        results[key] = cell
        save()
        print(
            f"{key}: EM {cell['heldout_score']:.3f} {cell.get('merge_seconds', cell.get('stats'))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
