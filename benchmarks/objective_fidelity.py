"""Does the few-shot objective rank merges as the held-out score does? The paper's loss against the cross-fitted one,
over random partitions and over shapes (K clusters of rank r) at equal bytes.

    OMP_NUM_THREADS=2 python benchmarks/objective_fidelity.py --collection conflict --shapes 1x8 2x4 4x2 1x16 2x8 4x4 \
        2x16 4x8 8x4 --seeds 3

Every cell is a shape KxR (K merged adapters of rank R, `merge.svd_rank` = R, `regmean`) and a seed: a balanced random
partition (`method="random"`, that seed; K = 1 has one partition and runs once). Recorded per cell: the held-out
whole-answer exact match and completion loss (greedy answers on the held-out split, task-labelled routing), the bytes
of the K merged adapters as a fraction of the N sources', and three few-shot objectives of the same merges: the
paper's loss (each cluster's merge fitted to all ten examples' layer inputs, scored on the same ten) and the
cross-fitted losses with F = 2 and F = 5 folds (`ScoringSettings.cross_fit_folds`), each the mean over tasks of the
task's loss under its cluster's merge.

Printed: Spearman's rank correlation of each objective (negated) with the held-out whole-answer EM over all cells,
with a 95% bootstrap interval over cells (2000 resamples, seed 0), the share of cell pairs it orders as the held-out EM
does, and per byte budget the shape each objective would choose (the lowest mean objective over seeds) against the
shape with the best mean held-out EM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import numpy as np
from scipy.stats import spearmanr

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.embedded.benchmark import _load
from peft_d2c.engine.merge.budget import adapter_bytes, partition_bytes
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.evaluation.heldout import evaluate_routing

FOLDS = (1, 2, 5)


class Objectives:
    """Memoised scorers per (folds, rank), the layer inputs collected once per number of folds."""

    def __init__(self, peft_model, tokenizer, fewshot) -> None:
        self.model, self.tokenizer = peft_model, tokenizer
        self.examples = normalize_task_examples(fewshot)
        self.scorers: dict[tuple[int, int], LossScorer] = {}

    def __call__(self, folds: int, rank: int, clusters) -> float:
        key = (folds, rank)
        if key not in self.scorers:
            config = D2CMergeConfig(
                num_clusters=1,
                merged_adapter_prefix=f"objective{folds}r{rank}",
                scoring={"cross_fit_folds": folds},
                merge={"svd_rank": rank},
            )
            merger = AdapterMerger(self.model, config)
            scorer = LossScorer.for_config(self.model, self.tokenizer, self.examples, merger)
            shared = next((s for (f, _), s in self.scorers.items() if f == folds), None)
            if shared is not None:  # the same examples' layer inputs: collected once per number of folds
                merger.layer_inputs, merger.fold_inputs = shared.merger.layer_inputs, shared.merger.fold_inputs
            else:
                attach_layer_inputs(merger, scorer)
            self.scorers[key] = scorer
        scorer = self.scorers[key]
        losses = scorer([(tuple(sorted(c)), t) for c in clusters for t in c])
        scorer.merger.cleanup()
        return float(np.mean(losses))


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, reps: int = 2000) -> tuple[float, float, float]:
    """Spearman's rho of x and y with its 95% percentile bootstrap interval over the pairs (seed 0)."""
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(reps):
        index = rng.integers(0, len(x), len(x))
        if len(set(index)) > 2:
            draws.append(spearmanr(x[index], y[index]).statistic)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(spearmanr(x, y).statistic), float(low), float(high)


def concordance(objective: np.ndarray, score: np.ndarray) -> float:
    """Share of cell pairs with different scores that the objective orders the same way (lower loss, higher score)."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(score)), 2) if score[i] != score[j]]
    return sum((objective[i] < objective[j]) == (score[i] > score[j]) for i, j in pairs) / max(len(pairs), 1)


def parse_shape(text: str) -> tuple[int, int]:
    k, _, r = text.partition("x")
    return int(k), int(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", default="conflict", choices=["embedded", "validation", "conflict"])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(2, 8)], help="KxR, e.g. 2x8 4x4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default="benchmark_results/objective_fidelity.json")
    args = parser.parse_args()
    started = time.perf_counter()
    peft_model, tokenizer, _, fewshot, test = _load("smollm2", args.collection, None, True, False)
    tasks = list(fewshot)
    sources = sum(adapter_bytes(peft_model, t) for t in tasks)
    objectives = Objectives(peft_model, tokenizer, fewshot)
    rows = []
    if os.path.isfile(args.json):  # resume: cells already measured are kept
        with open(args.json, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    done = {(r["k"], r["rank"], r["seed"]) for r in rows}
    for k, rank in args.shapes:
        for seed in range(1 if k == 1 else args.seeds):
            if (k, rank, seed) in done:
                continue
            config = D2CMergeConfig(
                num_clusters=k,
                method="random",
                seed=seed,
                merged_adapter_prefix=f"fid{k}r{rank}s{seed}",
                fit_router=False,
                merge={"svd_rank": rank},
            )
            result = merge_adapters_d2c(peft_model, fewshot, config, tokenizer=tokenizer)
            scores = evaluate_routing(peft_model, tokenizer, test, result.routing)
            stored = partition_bytes(peft_model, result.clusters, config)
            for name in result.merged_adapter_names:
                peft_model.delete_adapter(name)
            row = {
                "k": k,
                "rank": rank,
                "seed": seed,
                "bytes_fraction": stored / sources,
                "clusters": result.clusters,
                "heldout_whole": statistics.mean(s["whole_match"] for s in scores.values()),
                "heldout_loss": statistics.mean(s["loss"] for s in scores.values()),
                **{f"objective_f{f}": objectives(f, rank, result.clusters) for f in FOLDS},
            }
            rows.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "clusters"}), flush=True)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"collection": args.collection, "rows": rows}, f, indent=1)
    whole = np.array([r["heldout_whole"] for r in rows])
    print(f"\n{args.collection}: {len(rows)} cells (shapes {[f'{r[0]}x{r[1]}' for r in args.shapes]})")
    print("| objective | rho with whole EM (95% bootstrap) | cell pairs ordered as EM |")
    print("|---|---|---|")
    for folds in FOLDS:
        objective = np.array([r[f"objective_f{folds}"] for r in rows])
        rho = bootstrap_spearman(-objective, whole)
        label = "paper (F = 1)" if folds == 1 else f"cross-fitted F = {folds}"
        print(f"| {label} | {rho[0]:+.2f} [{rho[1]:+.2f}, {rho[2]:+.2f}] | {concordance(objective, whole):.0%} |")
    print("\n| bytes | shape: mean whole EM (cells) | best by held-out | chosen by F = 1 | F = 2 | F = 5 |")
    print("|---|---|---|---|---|---|")
    shapes = sorted({(r["k"], r["rank"]) for r in rows})
    by_bytes: dict[float, list[tuple[int, int]]] = {}
    for shape in shapes:
        fraction = round(next(r["bytes_fraction"] for r in rows if (r["k"], r["rank"]) == shape), 4)
        by_bytes.setdefault(fraction, []).append(shape)

    def mean_of(shape, key):
        return statistics.mean(r[key] for r in rows if (r["k"], r["rank"]) == shape)

    for fraction, group in sorted(by_bytes.items()):
        cells = ", ".join(
            f"{k}x{r}: {mean_of((k, r), 'heldout_whole'):.3f} ({sum((x['k'], x['rank']) == (k, r) for x in rows)})"
            for k, r in group
        )
        best = max(group, key=lambda s: mean_of(s, "heldout_whole"))
        chosen = [min(group, key=lambda s, f=f: mean_of(s, f"objective_f{f}")) for f in FOLDS]
        print(
            f"| {fraction:.4f} | {cells} | {best[0]}x{best[1]} | "
            + " | ".join(f"{c[0]}x{c[1]}" for c in chosen)
            + " |"
        )
    print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
