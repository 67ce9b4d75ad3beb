"""Uniform ranks against `rank_allocation="spectrum"` on the same partitions: held-out exact match, paired by cell.

    python benchmarks/rank_allocation.py benchmark_results/embedded_regmean.json --combination-type regmean
    python benchmarks/rank_allocation.py benchmark_results/validation.json --collection validation

For every cell of a `peft-d2c benchmark` results file with the given method and merge, the cell's final clusters are
merged again with the byte budget spent by singular values (`engine.merge.rank_budget`, the same total bytes as the
uniform merges the cell shipped) and scored on the held-out split; the uniform score is the cell's own. No search runs:
the partition is the cell's, so the difference is the allocation's alone. Prints one row per cell and the paired mean
difference with its 95% t-interval per K.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from peft_d2c import D2CMergeConfig
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.embedded.benchmark_report import t_interval
from peft_d2c.embedded.mainjob import load_embedded_assets
from peft_d2c.embedded.validation import load_validation_assets
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.merge.rank_budget import merge_with_allocated_ranks
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.evaluation.heldout import evaluate_routing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="A results JSON of `peft-d2c benchmark`.")
    parser.add_argument("--collection", default="embedded", choices=["embedded", "validation"])
    parser.add_argument("--method", default="d2c")
    parser.add_argument("--combination-type", default="regmean")
    parser.add_argument("--json", default=None, help="Write the rows here.")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with open(args.results, encoding="utf-8") as f:
        cells = [
            c
            for c in json.load(f)["results"]
            if c["method"] == args.method and c.get("combination_type") == args.combination_type
        ]
    load = load_validation_assets if args.collection == "validation" else load_embedded_assets
    model, tokenizer, _, fewshot, test = load(fetch=False, show_progress=False)
    config = D2CMergeConfig(num_clusters=1, combination_type=args.combination_type, merged_adapter_prefix="alloc")
    merger = AdapterMerger(model, config)
    examples = {t: items[: config.scoring.examples_per_task] for t, items in normalize_task_examples(fewshot).items()}
    attach_layer_inputs(merger, LossScorer.for_config(model, tokenizer, examples, merger))
    rows = []
    for cell in sorted(cells, key=lambda c: (c["num_clusters"], c["seed"])):
        names = [f"alloc_{i}" for i in range(len(cell["clusters"]))]
        sizes = merge_with_allocated_ranks(merger, cell["clusters"], names)
        routing = {t: names[i] for i, members in enumerate(cell["clusters"]) for t in members}
        scores = evaluate_routing(model, tokenizer, test, routing)
        for name in names:
            model.delete_adapter(name)
        spectrum = sum(s["exact_match"] for s in scores.values()) / len(scores)
        rows.append(
            {
                "num_clusters": cell["num_clusters"],
                "seed": cell["seed"],
                "uniform": cell["heldout_score"],
                "spectrum": spectrum,
                "ranks": {n: s["r"] for n, s in sizes.items()},
                "bytes": sum(s["bytes"] for s in sizes.values()),
            }
        )
        print(f"K={cell['num_clusters']} seed={cell['seed']}: uniform {100 * cell['heldout_score']:.1f}, "
              f"spectrum {100 * spectrum:.1f} (largest ranks {rows[-1]['ranks']}, {rows[-1]['bytes']:,} bytes)", flush=True)  # fmt: skip
    for k in sorted({r["num_clusters"] for r in rows}):
        diffs = [100 * (r["spectrum"] - r["uniform"]) for r in rows if r["num_clusters"] == k]
        mean, low, high = t_interval(diffs)
        better = sum(d > 0 for d in diffs)
        print(
            f"K={k}: spectrum - uniform {mean:+.1f} [{low:+.1f}, {high:+.1f}] EM points, {better}/{len(diffs)} better"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
