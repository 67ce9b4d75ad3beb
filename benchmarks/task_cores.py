"""Per-task cores against more clusters at equal bytes (issue 38, part 5).

    OMP_NUM_THREADS=2 python benchmarks/task_cores.py --collection conflict --budgets 1/32,1/16,1/8 \
        --json benchmark_results/task_cores_conflict.json

For each budget (a fraction of the N source adapters' bytes) and each K of `--clusters`: the highest rank r whose K
merged adapters and N task cores (`merge.task_cores=True`, r x r float32 numbers per module and task) fit, a run
with `--method` partitions, and the held-out first-word and whole-answer exact match of every task under its own
task adapter (`result.serving_routing`) and under its cluster's merged adapter (`result.routing`, what a prompt of no
known task would get). Compare with the frontier without cores (`benchmarks/frontier.py`, the same budgets and seed).
"""

from __future__ import annotations

import argparse
import json
import time

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.cli.commands import _parse_budgets
from peft_d2c.embedded.benchmark import _load
from peft_d2c.engine.merge.budget import adapter_bytes, merged_adapter_bytes, task_cores_bytes
from peft_d2c.engine.merge.lora import adapter_rank
from peft_d2c.evaluation.heldout import evaluate_routing


def _config(k: int, rank: int, args) -> D2CMergeConfig:
    return D2CMergeConfig(
        num_clusters=k,
        method=args.method,
        seed=args.seed,
        fit_router=False,
        show_progress=False,
        merge={"svd_rank": rank, "task_cores": True},
    )


def _highest_rank(peft_model, names, k: int, budget: int, args) -> int | None:
    """The highest rank whose K merged adapters (on every module any source adapts) and N cores fit `budget`."""
    best = None
    for rank in range(1, 4 * max(adapter_rank(peft_model, n) for n in names) + 1):
        config = _config(k, rank, args)
        if k * merged_adapter_bytes(peft_model, names, config) + task_cores_bytes(peft_model, names, config) <= budget:
            best = rank
    return best


def _means(scores: dict) -> tuple[float, float]:
    tasks = list(scores)
    return (
        100 * sum(scores[t]["exact_match"] for t in tasks) / len(tasks),
        100 * sum(scores[t]["whole_match"] for t in tasks) / len(tasks),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", default="conflict", choices=["embedded", "validation", "conflict"])
    parser.add_argument("--method", default="random", choices=["d2c", "random", "kmeans", "kmeans_svd"])
    parser.add_argument("--budgets", default="1/32,1/16,1/8")
    parser.add_argument("--clusters", default="1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmark_results/task_cores.json")
    args = parser.parse_args()
    started = time.perf_counter()
    peft_model, tokenizer, _, fewshot, test = _load("smollm2", args.collection, None, True, False)
    names = list(fewshot)
    source_bytes = sum(adapter_bytes(peft_model, n) for n in names)
    points = []
    for fraction in _parse_budgets(args.budgets):
        budget = int(fraction * source_bytes)
        for k in (int(x) for x in args.clusters.split(",")):
            rank = _highest_rank(peft_model, names, k, budget, args)
            if rank is None:
                continue
            run_started = time.perf_counter()
            result = merge_adapters_d2c(peft_model, fewshot, _config(k, rank, args), tokenizer=tokenizer)
            own = evaluate_routing(peft_model, tokenizer, test, result.serving_routing)
            merged = evaluate_routing(peft_model, tokenizer, test, result.routing)
            config = result.config
            stored = sum(
                merged_adapter_bytes(peft_model, c, config) + task_cores_bytes(peft_model, c, config)
                for c in result.clusters
            )
            point = {
                "budget_fraction": fraction,
                "k": k,
                "rank": rank,
                "storage_fraction": stored / source_bytes,
                "task_adapters": _means(own),
                "merged_adapters": _means(merged),
                "clusters": result.clusters,
                "seconds": time.perf_counter() - run_started,
            }
            points.append(point)
            print(json.dumps({k: v for k, v in point.items() if k != "clusters"}), flush=True)
            for name in [*result.task_adapters.values(), *result.merged_adapter_names]:
                peft_model.delete_adapter(name)
    out = {"collection": args.collection, "method": args.method, "seed": args.seed, "source_bytes": source_bytes}
    out |= {"points": points, "seconds": time.perf_counter() - started}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"{args.collection}, {args.method} partitions, seed {args.seed}: held-out EM % (first word / whole answer)")
    print("| budget | K x rank + cores | storage % | task adapters | merged adapters (no task) |")
    print("|---|---|---|---|---|")
    for p in points:
        own, merged = p["task_adapters"], p["merged_adapters"]
        print(
            f"| {p['budget_fraction']:.4g} | {p['k']} x {p['rank']} | {100 * p['storage_fraction']:.2f} | "
            f"{own[0]:.1f} / {own[1]:.1f} | {merged[0]:.1f} / {merged[1]:.1f} |"
        )
    print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
