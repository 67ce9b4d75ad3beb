"""Compare D2C search settings on seeds the benchmark never uses: few-shot loss and forward passes only.

    OMP_NUM_THREADS=2 python benchmarks/search_configs.py --seeds 100 101 --clusters 2 4 \
        --config "paper: search=paper" --config "partition T30: search=partition num_iterations=30" \
        --json benchmark_results/search_configs.json

Each configuration runs `merge_adapters_d2c` on the embedded default (SmolLM2-135M, 16 tasks, 10 few-shot examples
each) from the same random start per seed; no held-out split is read, so choosing a configuration here cannot fit
the test items, and the seeds (100+) are disjoint from the benchmark's (0-9). Every finished run is appended to the
JSON file (so an interrupted run resumes); the table is the mean few-shot loss reached, the forward passes and the
seconds per configuration and K, and how many seeds each configuration ends below the paper's loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.cli.benchmark import parse_variant
from peft_d2c.embedded.mainjob import load_embedded_assets
from peft_d2c.io import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--clusters", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iterations", type=int, default=100, help="T unless a configuration sets num_iterations.")
    parser.add_argument("--config", action="append", required=True, help='"name: key=value ..." (D2CMergeConfig)')
    parser.add_argument("--json", default="benchmark_results/search_configs.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    logging.basicConfig(level=logging.WARNING)
    configs = dict(parse_variant(text) for text in args.config)
    runs = []
    if os.path.isfile(args.json):
        with open(args.json, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
    done = {(r["config"], r["num_clusters"], r["seed"]) for r in runs}
    peft_model, tokenizer, _, fewshot, _ = load_embedded_assets(fetch=False, show_progress=False)
    for seed in args.seeds:
        for k in args.clusters:
            for name, settings in configs.items():
                if (name, k, seed) in done:
                    continue
                settings = {"num_iterations": args.iterations, **settings}
                config = D2CMergeConfig(num_clusters=k, seed=seed, show_progress=False, **settings)
                start = time.perf_counter()
                result = merge_adapters_d2c(peft_model, fewshot, config, tokenizer=tokenizer)
                seconds = time.perf_counter() - start
                for adapter in result.merged_adapter_names:
                    peft_model.delete_adapter(adapter)
                run = {
                    "config": name,
                    "settings": settings,
                    "num_clusters": k,
                    "seed": seed,
                    "fewshot_loss": sum(result.task_losses.values()) / len(result.task_losses),
                    "forward_passes": result.stats["forward_passes"],
                    "seconds": seconds,
                    "clusters": result.clusters,
                }
                runs.append(run)
                atomic_write_json(args.json, {"runs": runs})
                print(
                    f"{name} K={k} seed={seed}: loss {run['fewshot_loss']:.4f}, "
                    f"{run['forward_passes']} passes, {seconds:.0f} s",
                    flush=True,
                )
    print(format_summary(runs, list(configs)))


_COLUMNS = ("fewshot_loss", "forward_passes", "seconds")


def format_summary(runs: list[dict], names: list[str]) -> str:
    """Markdown table per (configuration, K): mean loss, passes, seconds, seeds below the first configuration."""
    lines = [
        "| config | K | seeds | mean few-shot loss | passes | seconds | seeds below " + names[0] + " |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["config"], r["num_clusters"], r["seed"]): r for r in runs}
    for k in sorted({r["num_clusters"] for r in runs}):
        for name in names:
            cells = [r for r in runs if r["config"] == name and r["num_clusters"] == k]
            if not cells:
                continue
            below = [
                by_key[(names[0], k, r["seed"])]["fewshot_loss"] > r["fewshot_loss"]
                for r in cells
                if (names[0], k, r["seed"]) in by_key
            ]
            loss, passes, seconds = (statistics.mean(r[key] for r in cells) for key in _COLUMNS)
            lines.append(
                f"| {name} | {k} | {len(cells)} | {loss:.4f} | {passes:.0f} | {seconds:.0f} "
                f"| {sum(below)}/{len(below)} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
