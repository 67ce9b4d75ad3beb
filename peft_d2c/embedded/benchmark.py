"""The benchmark: D2C against its baselines on the embedded default (or the validation collection), shaped like the
paper's Table 1.

    peft-d2c benchmark                          # SmolLM2-135M, 16 tasks, K = 2 and 4, 2 seeds (~40 min)
    peft-d2c benchmark --model tiny             # the same on the tiny random model (a smoke test)
    peft-d2c benchmark --search partition       # the partition rule, next to the paper's Algorithm 1
    peft-d2c benchmark --combination-type ties knots_ties core_ta      # the merge axis: every method x merge
    peft-d2c benchmark --collection validation  # the same on the validation collection (embedded.validation)

Clustering sees only the `fewshot` split (10 examples per task); every score is on the held-out `test` split:
exact match of the greedy answer's first word, and the mean completion loss, averaged over tasks. Each finished
cell (method, merge, K, seed) is written to the JSON file at once, so `--resume` continues an interrupted run. D2C cells
also record their any-time curve: the mean few-shot loss of the partition held after each number of forward passes
(from the search records where the objective is the total loss, else recomputed for every tenth step with a
separate memoised scorer that is not counted in the cell's forward passes; `peft_d2c.embedded.anytime`). Tables and
plots are in `peft_d2c.embedded.benchmark_report` (one merge) and `peft_d2c.embedded.merge_report` (the merge
axis); the command line lives in `peft_d2c.cli.benchmark`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..combination_types import RANDOM_TYPES
from ..config import D2CMergeConfig
from ..d2c import merge_adapters_d2c
from ..evaluation.generation import BASE_ADAPTER
from ..evaluation.heldout import evaluate_routing, loss_matrix
from ..io import atomic_write_json
from .anytime import AnytimeScorer, anytime_curve
from .benchmark_report import (
    BASELINES,
    PAPER_SEARCH,
    REFERENCE_METHODS,
    format_anytime_table,
    format_table,
    paired_differences,
    plot_benchmark,
    summarize,
)
from .conflict import load_conflict_assets
from .mainjob import load_embedded_assets, load_quick_assets
from .merge_report import format_report, plot_report, with_merge_labels
from .validation import load_validation_assets

logger = logging.getLogger(__name__)

__all__ = [
    "CLUSTER_METHODS",
    "REFERENCE_METHODS",
    "SEARCH_OPTIONS",
    "cluster_methods",
    "format_anytime_table",
    "format_report",
    "format_table",
    "paired_differences",
    "plot_benchmark",
    "plot_report",
    "run_benchmark",
    "summarize",
]

SEARCH_OPTIONS = tuple(PAPER_SEARCH)
_DEFAULTS = {f.name: f.default for f in fields(D2CMergeConfig)}


def cluster_methods(
    search_options: dict[str, Any] | None = None, variants: dict[str, dict[str, Any]] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The merged methods of one benchmark cell, all at the same storage budget K: `(label, config settings)`.

    The baselines (their `method` alone: a baseline refuses search settings); `d2c` with `search_options` (the
    `D2CMergeConfig` defaults, the paper's Algorithm 1, for those not given) from a random start and from the
    `kmeans_svd` partition; `d2c (paper)`, which runs `search="paper"` explicitly, only when `search_options` make
    `d2c` another search; and one `d2c [name]` per entry of `variants` (settings over the defaults, e.g.
    `{"search": "partition", "num_iterations": 30}`).
    """
    d2c = {k: (search_options or {}).get(k, _DEFAULTS[k]) for k in SEARCH_OPTIONS}
    d2c = {k: v for k, v in d2c.items() if v != _DEFAULTS[k]}  # the defaults are left out: the run resolves them
    methods: list[tuple[str, dict[str, Any]]] = [(m, {"method": m}) for m in BASELINES]
    methods += [
        ("d2c", {"method": "d2c", **d2c}),
        ("d2c (kmeans_svd init)", {"method": "d2c", "init": "kmeans_svd", **d2c}),
    ]
    if {**PAPER_SEARCH, **d2c} != PAPER_SEARCH:
        methods.append(("d2c (paper)", {"method": "d2c", "search": "paper"}))
    for name, settings in (variants or {}).items():
        methods.append((f"d2c [{name}]", {"method": "d2c", **settings}))
    return methods


# The default benchmark's merged methods (the `D2CMergeConfig` defaults for the D2C search).
CLUSTER_METHODS = cluster_methods()


COLLECTIONS = ("embedded", "validation", "conflict")


def _load(model: str, collection: str, cache_dir: str | None, fetch: bool, show_progress: bool):
    if collection not in COLLECTIONS:
        raise ValueError(f"`collection` must be one of {list(COLLECTIONS)}, got {collection!r}.")
    if model == "tiny":
        if collection != "embedded":
            raise ValueError(f"The tiny model has no {collection} collection; use `--model smollm2`.")
        return load_quick_assets(cache_dir)
    if collection == "validation":
        return load_validation_assets(cache_dir, fetch, show_progress)
    if collection == "conflict":
        return load_conflict_assets(cache_dir, fetch, show_progress)
    return load_embedded_assets(cache_dir, fetch, show_progress)


def _mean_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """The cell's held-out means over tasks: first-word exact match, whole-answer exact match, completion loss."""
    tasks = list(scores)

    def mean(key: str) -> float | None:  # cells of files written before the whole-answer score lack it
        values = [scores[t][key] for t in tasks if key in scores[t]]
        return sum(values) / len(values) if len(values) == len(tasks) else None

    return {
        "heldout_score": mean("exact_match"),
        "heldout_whole_score": mean("whole_match"),
        "heldout_loss": mean("loss"),
    }


def run_benchmark(
    *,
    model: str = "smollm2",
    collection: str = "embedded",
    clusters: Sequence[int] = (2, 4),
    seeds: int = 2,
    iterations: int | None = None,
    json_path: str = "benchmark_results/benchmark.json",
    plot_path: str | None = None,
    resume: bool = False,
    cache_dir: str | None = None,
    fetch: bool = True,
    show_progress: bool = True,
    search_options: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    combination_types: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    first_seed: int = 0,
    anytime_seeds: int | None = None,
) -> dict[str, Any]:
    """Run every method with every merge at every K and seed, write the results JSON (and plots), return the results.

    Args:
        model (`str`): `"smollm2"` (the embedded default) or `"tiny"`.
        collection (`str`): `"embedded"` (the 16 tasks), `"validation"` (`embedded.validation`: 12 other tasks,
            adapters of other recipes; smollm2 only) or `"conflict"` (`embedded.conflict`: 16 tasks in pairs that
            share their inputs and want different outputs; smollm2 only).
        clusters (`Sequence[int]`): The storage budgets K.
        seeds (`int`): Seeds `first_seed .. first_seed + seeds - 1` per (method, merge, K), run seed by seed.
        iterations (`int`, *optional*): T of the D2C runs (default: each run's `SearchPlan`'s; a variant may set
            its own `num_iterations`).
        json_path (`str`): `{"model": ..., "combination_types": [...], "results": [{"method", "combination_type",
            "num_clusters", "storage_fraction", "seed", "heldout_score", "heldout_loss", "fewshot_loss",
            "forward_passes", "seconds", "anytime", ...}]}`, rewritten after every cell.
        plot_path (`str`, *optional*): PNG of score vs storage per method, plus `<stem>_heatmap.png` and the
            any-time curves `<stem>_anytime_k<K>.png`.
        resume (`bool`): Reuse the finished cells of an existing `json_path` with the same settings (it may hold
            other methods or merges too).
        cache_dir (`str`, *optional*), fetch (`bool`), show_progress (`bool`): As for the main job.
        search_options (`dict`, *optional*): `search`, `proposals_per_step`, `patience` of the `d2c` methods (the
            `D2CMergeConfig` defaults, the paper's Algorithm 1, for those not given).
        variants (`dict[str, dict]`, *optional*): Extra D2C methods `d2c [name]` (see `cluster_methods`).
        combination_types (`Sequence[str]`, *optional*): The merge axis: every method runs with each of these
            merges (default: `D2CMergeConfig`'s `combination_type` alone). A baseline's partition does not depend
            on the merge; a D2C search does, since it scores merged adapters.
        methods (`Sequence[str]`, *optional*): Run only these labels (references always run).
        first_seed (`int`): The first seed.
        anytime_seeds (`int`, *optional*): Record the any-time curve of paper-rule D2C cells only for seeds below
            this (their curve is recomputed with extra scoring; partition-objective cells always have theirs, from
            their records). `None`: every seed.

    Returns:
        `dict`: the content of the JSON file.

    Raises:
        ValueError: If `seeds` < 1, a K is out of range, a method or merge is unknown, or `--resume` meets a file
            of other settings.
    """
    if seeds < 1:
        raise ValueError(f"`--seeds` must be >= 1, got {seeds}.")
    merges = list(dict.fromkeys(combination_types or [_DEFAULTS["combination_type"]]))
    for merge in merges:
        D2CMergeConfig(num_clusters=1, combination_type=merge)  # the config's own check and message
    table = cluster_methods(search_options, variants)
    if methods is not None:
        unknown = sorted(set(methods) - {label for label, _ in table})
        if unknown:
            raise ValueError(f"`--methods` must name methods of {[label for label, _ in table]}, got {unknown}.")
        table = [(label, kwargs) for label, kwargs in table if label in methods]
    started = time.perf_counter()
    peft_model, tokenizer, source_info, fewshot, test = _load(model, collection, cache_dir, fetch, show_progress)
    tasks = list(fewshot)
    for k in clusters:
        if not 1 <= k <= len(tasks):
            raise ValueError(f"`--clusters` values must be between 1 and {len(tasks)}, got {k}.")
    settings = {
        "model": model,
        **({"collection": collection} if collection != "embedded" else {}),
        "base_model": source_info,
        "iterations": iterations,
        "tasks": tasks,
        "combination_types": merges,
        "methods": {label: kwargs for label, kwargs in table},
    }
    done: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    if resume and os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            previous = with_merge_labels(json.load(f))
        same = all(previous.get(k) == v for k, v in settings.items() if k not in ("methods", "combination_types"))
        old_methods = previous.get("methods", {})
        same = same and all(old_methods.get(label, kwargs) == kwargs for label, kwargs in table)
        if not same:
            raise ValueError(f"{json_path} holds a run with other settings; drop --resume or pick another --json.")
        settings["methods"] = {**old_methods, **settings["methods"]}
        settings["combination_types"] = list(dict.fromkeys([*previous["combination_types"], *merges]))
        done = {_cell_key(r): r for r in previous["results"]}
        if len(done) < len(previous["results"]):  # rewriting the file would silently drop all but one of them
            raise ValueError(
                f"{json_path} holds several cells of the same method, K, seed and merge (e.g. cells of another "
                "collection added by hand); move them to another file before --resume."
            )
        logger.info("Resuming: %d cells already done", len(done))
    results = dict(done)
    # Held-out scores by partition: the same clusters under the same (deterministic) merge give the same merged
    # adapters, so e.g. a K-means partition that every seed finds is evaluated once.
    evaluated = {
        _partition_key(r["clusters"], r["seed"], r["combination_type"]): r for r in done.values() if "clusters" in r
    }
    anytime_scorers = {
        merge: AnytimeScorer(peft_model, tokenizer, fewshot, merge, prefix=f"anytime{i}")
        for i, merge in enumerate(merges)
    }

    def save() -> dict[str, Any]:
        data = {**settings, "results": list(results.values())}
        atomic_write_json(json_path, data)
        return data

    def run_cell(key, compute):
        if key in results:
            return
        cell_start = time.perf_counter()
        cell = compute()
        cell.update(
            method=key[0],
            num_clusters=key[1],
            seed=key[2],
            combination_type=key[3],
            seconds=time.perf_counter() - cell_start,
        )
        results[key] = cell
        save()
        logger.info(
            "%s K=%d seed=%d %s: EM %.3f, loss %.3f (%.0f s)",
            *key,
            cell["heldout_score"],
            cell["heldout_loss"],
            cell["seconds"],
        )

    def reference(routing):
        scores = evaluate_routing(peft_model, tokenizer, test, routing)
        return {
            "storage_fraction": 0.0 if routing[tasks[0]] == BASE_ADAPTER else 1.0,
            **_mean_scores(scores),
            "per_task": scores,
        }

    labels = [label for label, _ in table]
    try:
        # No merge in either reference: they are recorded under the first merge of the file.
        no_merge = settings["combination_types"][0]
        run_cell(("zero-shot", 0, 0, no_merge), lambda: reference({t: BASE_ADAPTER for t in tasks}))
        run_cell(("single-task LoRAs", len(tasks), 0, no_merge), lambda: reference({t: t for t in tasks}))
        for seed in range(first_seed, first_seed + seeds):
            for k in clusters:
                for merge in merges:
                    for label, kwargs in table:

                        def compute(label=label, kwargs=kwargs, k=k, seed=seed, merge=merge):
                            prefix = f"bench{k}s{seed}m{labels.index(label)}c{merges.index(merge)}"
                            # `from_dict` takes a variant's flat merge / scoring keys too (e.g. `regmean_alpha=0.8`)
                            config = D2CMergeConfig.from_dict(
                                {
                                    **({"num_iterations": iterations} if kwargs.get("method", "d2c") == "d2c" else {}),
                                    **kwargs,
                                    "num_clusters": k,
                                    "seed": seed,
                                    "merged_adapter_prefix": prefix,
                                    "show_progress": show_progress,
                                    "combination_type": merge,
                                }
                            )
                            curve = anytime_seeds is None or seed < anytime_seeds or config.search == "partition"
                            scorer = anytime_scorers[merge] if curve else None
                            return _cell(peft_model, tokenizer, fewshot, test, config, label, scorer, evaluated)

                        run_cell((label, k, seed, merge), compute)
    finally:
        for scorer in anytime_scorers.values():
            scorer.close()
    data = save()
    data["seconds"] = time.perf_counter() - started
    if plot_path:
        plot_report(data, plot_path)
    return data


def _cell_key(cell: dict[str, Any]) -> tuple[str, int, int, str]:
    return cell["method"], cell["num_clusters"], cell["seed"], cell["combination_type"]


def _partition_key(clusters, seed: int, combination_type: str) -> tuple:
    """What the merged adapters of a cell depend on: the clusters, and the seed only for randomised merges."""
    members = tuple(sorted(tuple(sorted(c)) for c in clusters))
    return members, combination_type, seed if combination_type in RANDOM_TYPES else None


def _cell(
    peft_model, tokenizer, fewshot, test, config: D2CMergeConfig, label: str, anytime_scorer, evaluated: dict
) -> dict[str, Any]:
    tasks = list(fewshot)
    result = merge_adapters_d2c(peft_model, fewshot, config, tokenizer=tokenizer)
    key = _partition_key(result.clusters, config.seed, config.combination_type)
    reused = evaluated.get(key)
    try:
        if reused is not None:
            scores = reused["per_task"]
        else:
            scores = evaluate_routing(peft_model, tokenizer, test, result.serving_routing)
        heatmap = None
        if label == "d2c" and config.seed == 0:  # one task x cluster loss matrix per K, for the plot
            heatmap = {
                "tasks": tasks,
                "clusters": result.clusters,
                "losses": loss_matrix(peft_model, tokenizer, fewshot, result.merged_adapter_names),
            }
    finally:
        for name in result.merged_adapter_names:
            peft_model.delete_adapter(name)
    stats = {k: v for k, v in result.stats.items() if k != "trace"}
    cell = {
        "storage_fraction": config.num_clusters / len(tasks),
        **_mean_scores(scores),
        "fewshot_loss": sum(result.task_losses.values()) / len(tasks),
        "forward_passes": result.stats["forward_passes"],
        "clusters": result.clusters,
        "fewshot_losses": result.task_losses,
        "per_task": scores,
        "search_stats": stats,
        **({"heatmap": heatmap} if heatmap else {}),
        **({"heldout_reused_from": [reused["method"], reused["seed"]]} if reused is not None else {}),
    }
    evaluated.setdefault(key, {**cell, "method": label, "seed": config.seed})
    if config.method == "d2c":
        cell["initial_clusters"] = result.initial_clusters
        cell["history"] = result.history
        if anytime_scorer is not None:
            cell["anytime"] = anytime_curve(result, anytime_scorer)
            anytime_scorer.close()  # its temporary merges leave the model (the losses stay memoised)
    return cell
