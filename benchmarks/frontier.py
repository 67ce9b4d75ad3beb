"""Held-out score against bytes on a bundled collection: the byte budget decides K and the rank (issue 38, part 4).

    OMP_NUM_THREADS=2 python benchmarks/frontier.py --collection conflict --method random \
        --budgets 1/64,1/32,1/16,1/8,1/4,1/2 --json benchmark_results/frontier_conflict_random.json

`peft_d2c.evaluation.sweep.run_sweep(budgets=...)` (what `peft-d2c sweep --budgets` runs on a run config) on the
embedded, validation or conflict collection: per budget (a fraction of the N source adapters' bytes) one run with
`storage_budget` = those bytes and `merge.svd_rank="auto"` (every shape K x rank that fits is searched, `--method`
`d2c` or `random` partitions, and the lowest cross-fitted few-shot loss ships), and the best single merge of the same
bytes (K = 1 at the highest rank that fits). Held-out first-word and whole-answer exact match of both, every shape's
objective, the JSON and the plot (`--plot`). `--task-cores` adds a core per task (`merge.task_cores`, part 5): every
rank is then a shape, and "one merge" is one basis with its cores.
"""

from __future__ import annotations

import argparse
import json
import time

from peft_d2c import D2CMergeConfig
from peft_d2c.cli.commands import _parse_budgets
from peft_d2c.embedded.benchmark import _load
from peft_d2c.evaluation.plots import plot_sweep
from peft_d2c.evaluation.sweep import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", default="conflict", choices=["embedded", "validation", "conflict"])
    parser.add_argument("--method", default="random", choices=["d2c", "random"])
    parser.add_argument("--budgets", default="1/64,1/32,1/16,1/8,1/4,1/2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmark_results/frontier.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--task-cores", action="store_true", help="merge.task_cores: a core per task (part 5)")
    args = parser.parse_args()
    started = time.perf_counter()
    peft_model, tokenizer, _, fewshot, test = _load("smollm2", args.collection, None, True, False)
    config = D2CMergeConfig(
        num_clusters=1,
        method=args.method,
        seed=args.seed,
        fit_router=False,
        show_progress=False,
        merge={"task_cores": args.task_cores},
    )
    sweep = run_sweep(
        peft_model, fewshot, config, tokenizer=tokenizer, heldout_examples=test, budgets=_parse_budgets(args.budgets)
    )
    sweep = {**sweep, "collection": args.collection, "task_cores": args.task_cores}
    sweep["seconds"] = time.perf_counter() - started
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(sweep, f, indent=1)
    if args.plot:
        plot_sweep(sweep, args.plot)
    cores = ", a core per task" if args.task_cores else ""
    print(
        f"{args.collection}, method {args.method}{cores}, seed {args.seed}: held-out EM % (first word / whole answer)"
    )
    print(
        "| budget | chosen K x rank | storage % | EM | whole EM | one merge: rank, EM, whole EM | shapes: objective |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in sweep["points"]:
        single = p["single"]
        one = f"{single['rank']}, {100 * single['score']:.1f}, {100 * single['whole_score']:.1f}" if single else "-"
        shapes = ", ".join(f"{s['num_clusters']}x{s['rank']}: {s['objective']:.3f}" for s in p["shapes"])
        print(
            f"| {p['budget_fraction']:.4g} | {p['k']} x {p['rank']} | {100 * p['storage_fraction']:.1f} | "
            f"{100 * p['score']:.1f} | {100 * p['whole_score']:.1f} | {one} | {shapes} |"
        )
    print(f"wall time: {sweep['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
