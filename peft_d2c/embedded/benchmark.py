"""The benchmark: D2C against its baselines on the embedded default, shaped like the paper's Table 1.

    peft-d2c benchmark                          # SmolLM2-135M, 16 tasks, K = 2 and 4, 3 seeds
    peft-d2c benchmark --model tiny             # the same on the tiny random model (a smoke test)

Clustering sees only the `fewshot` split (10 examples per task); every score is on the held-out `test` split:
exact match of the greedy answer's first word, and the mean completion loss, averaged over tasks. Each finished
cell (method, K, seed) is written to the JSON file at once, so `--resume` continues an interrupted run. The command
line lives in `peft_d2c.cli.benchmark`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from ..config import D2CMergeConfig
from ..d2c import merge_adapters_d2c
from ..evaluation.generation import BASE_ADAPTER
from ..evaluation.heldout import evaluate_routing, loss_matrix
from ..evaluation.plots import plot_loss_heatmap, plot_score_vs_storage
from ..io import atomic_write_json
from .mainjob import load_embedded_assets, load_quick_assets

logger = logging.getLogger(__name__)

# (label, settings): the merged methods of one benchmark cell, all at the same storage budget K.
CLUSTER_METHODS: list[tuple[str, dict[str, str]]] = [
    ("random", {"method": "random"}),
    ("kmeans", {"method": "kmeans"}),
    ("kmeans_svd", {"method": "kmeans_svd"}),
    ("d2c", {"method": "d2c", "init": "random"}),
    ("d2c (kmeans_svd init)", {"method": "d2c", "init": "kmeans_svd"}),
]
REFERENCE_METHODS = ["zero-shot", "single-task LoRAs"]
DEFAULT_ITERATIONS = 100


def _load(model: str, cache_dir: str | None, fetch: bool, show_progress: bool):
    if model == "tiny":
        return load_quick_assets(cache_dir)
    return load_embedded_assets(cache_dir, fetch, show_progress)


def _mean_scores(scores: dict[str, dict[str, float]]) -> tuple[float, float]:
    tasks = list(scores)
    return (
        sum(scores[t]["exact_match"] for t in tasks) / len(tasks),
        sum(scores[t]["loss"] for t in tasks) / len(tasks),
    )


def run_benchmark(
    *,
    model: str = "smollm2",
    clusters: Sequence[int] = (2, 4),
    seeds: int = 3,
    iterations: int = DEFAULT_ITERATIONS,
    json_path: str = "benchmark_results/benchmark.json",
    plot_path: str | None = None,
    resume: bool = False,
    cache_dir: str | None = None,
    fetch: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every method at every K and seed, write the results JSON (and plot), and return the results.

    Args:
        model (`str`): `"smollm2"` (the embedded default) or `"tiny"`.
        clusters (`Sequence[int]`): The storage budgets K.
        seeds (`int`): Seeds 0..seeds-1 per (method, K).
        iterations (`int`): T of the D2C runs.
        json_path (`str`): `{"model": ..., "results": [{"method", "num_clusters", "storage_fraction", "seed",
            "heldout_score", "heldout_loss", "seconds", ...}]}`, rewritten after every cell.
        plot_path (`str`, *optional*): PNG of score vs storage per method, plus `<stem>_heatmap.png`.
        resume (`bool`): Reuse the finished cells of an existing `json_path` with the same model and T.
        cache_dir (`str`, *optional*), fetch (`bool`), show_progress (`bool`): As for the main job.

    Returns:
        `dict`: the content of the JSON file.

    Raises:
        ValueError: If `seeds` < 1, a K is out of range, or `--resume` meets a file of another model or T.
    """
    if seeds < 1:
        raise ValueError(f"`--seeds` must be >= 1, got {seeds}.")
    started = time.perf_counter()
    peft_model, tokenizer, source_info, fewshot, test = _load(model, cache_dir, fetch, show_progress)
    tasks = list(fewshot)
    for k in clusters:
        if not 1 <= k <= len(tasks):
            raise ValueError(f"`--clusters` values must be between 1 and {len(tasks)}, got {k}.")
    settings = {"model": model, "base_model": source_info, "iterations": iterations, "tasks": tasks}
    done: dict[tuple[str, int, int], dict[str, Any]] = {}
    if resume and os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            previous = json.load(f)
        if {k: previous.get(k) for k in settings} != settings:
            raise ValueError(f"{json_path} holds a run with other settings; drop --resume or pick another --json.")
        done = {(r["method"], r["num_clusters"], r["seed"]): r for r in previous["results"]}
        logger.info("Resuming: %d cells already done", len(done))
    results = dict(done)

    def save() -> dict[str, Any]:
        data = {**settings, "results": list(results.values())}
        atomic_write_json(json_path, data)
        return data

    def run_cell(key, compute):
        if key in results:
            return
        cell_start = time.perf_counter()
        cell = compute()
        cell.update(method=key[0], num_clusters=key[1], seed=key[2], seconds=time.perf_counter() - cell_start)
        results[key] = cell
        save()
        logger.info(
            "%s K=%d seed=%d: EM %.3f, loss %.3f (%.0f s)",
            *key,
            cell["heldout_score"],
            cell["heldout_loss"],
            cell["seconds"],
        )

    def reference(routing):
        scores = evaluate_routing(peft_model, tokenizer, test, routing)
        score, loss = _mean_scores(scores)
        return {
            "storage_fraction": 0.0 if routing[tasks[0]] == BASE_ADAPTER else 1.0,
            "heldout_score": score,
            "heldout_loss": loss,
            "per_task": scores,
        }

    run_cell(("zero-shot", 0, 0), lambda: reference({t: BASE_ADAPTER for t in tasks}))
    run_cell(("single-task LoRAs", len(tasks), 0), lambda: reference({t: t for t in tasks}))
    for k in clusters:
        for seed in range(seeds):
            for label, kwargs in CLUSTER_METHODS:

                def compute(label=label, kwargs=kwargs, k=k, seed=seed):
                    prefix = f"bench{k}s{seed}m{[m for m, _ in CLUSTER_METHODS].index(label)}"
                    config = D2CMergeConfig(
                        num_clusters=k,
                        num_iterations=iterations,
                        seed=seed,
                        merged_adapter_prefix=prefix,
                        show_progress=show_progress,
                        **kwargs,
                    )
                    result = merge_adapters_d2c(peft_model, fewshot, config, tokenizer=tokenizer)
                    try:
                        scores = evaluate_routing(peft_model, tokenizer, test, result.routing)
                        heatmap = None
                        if label == "d2c" and seed == 0:  # one task x cluster loss matrix per K, for the plot
                            heatmap = {
                                "tasks": tasks,
                                "clusters": result.clusters,
                                "losses": loss_matrix(peft_model, tokenizer, fewshot, result.merged_adapter_names),
                            }
                    finally:
                        for name in result.merged_adapter_names:
                            peft_model.delete_adapter(name)
                    score, loss = _mean_scores(scores)
                    return {
                        "storage_fraction": k / len(tasks),
                        "heldout_score": score,
                        "heldout_loss": loss,
                        "clusters": result.clusters,
                        "fewshot_losses": result.task_losses,
                        "per_task": scores,
                        "search_stats": result.stats,
                        **({"heatmap": heatmap} if heatmap else {}),
                    }

                run_cell((label, k, seed), compute)
    data = save()
    data["seconds"] = time.perf_counter() - started
    if plot_path:
        plot_benchmark(data, plot_path)
    return data


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of every (method, K): rows `{method, num_clusters, storage, score, std, loss, n}`."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in data["results"]:
        groups.setdefault((r["method"], r["num_clusters"]), []).append(r)
    order = [*REFERENCE_METHODS, *(label for label, _ in CLUSTER_METHODS)]
    rows = []
    for (method, k), cells in sorted(
        groups.items(), key=lambda kv: (kv[0][1] if kv[0][0] in order[2:] else -1, order.index(kv[0][0]))
    ):
        scores = [c["heldout_score"] for c in cells]
        rows.append(
            {
                "method": method,
                "num_clusters": k,
                "storage": cells[0]["storage_fraction"],
                "score": statistics.mean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "loss": statistics.mean(c["heldout_loss"] for c in cells),
                "n": len(cells),
            }
        )
    return rows


def format_table(data: dict[str, Any]) -> str:
    """Markdown table in the shape of the paper's Table 1 (average held-out exact match %, mean ± std over seeds)."""
    base = data.get("base_model", {}).get("model_id", data["model"])
    lines = [f"| method | K | storage | {base} EM % | held-out loss | seeds |", "|---|---|---|---|---|---|"]
    for row in summarize(data):
        k = "-" if row["method"] in REFERENCE_METHODS else str(row["num_clusters"])
        lines.append(
            f"| {row['method']} | {k} | {100 * row['storage']:.1f}% | {100 * row['score']:.1f} ± "
            f"{100 * row['std']:.1f} | {row['loss']:.3f} | {row['n']} |"
        )
    return "\n".join(lines)


def plot_benchmark(data: dict[str, Any], path: str) -> list[str]:
    """Score vs storage for every method (the Pareto view) and the task x cluster loss heatmap of the first D2C run
    (largest K) next to it as `<stem>_heatmap.png` (drawn by `peft_d2c.evaluation.plots`)."""
    rows = summarize(data)
    series = {
        method: [(100 * r["storage"], 100 * r["score"], 100 * r["std"]) for r in rows if r["method"] == method]
        for method in dict.fromkeys(r["method"] for r in rows)
    }
    plot_score_vs_storage(
        series,
        path,
        xlabel="storage (% of the single-task adapters kept)",
        ylabel="held-out exact match (%)",
        title=f"D2C vs baselines — {data.get('base_model', {}).get('model_id', data['model'])}",
    )
    written = [path]
    heatmaps = sorted((r for r in data["results"] if "heatmap" in r), key=lambda r: -r["num_clusters"])
    heatmap = heatmaps[0]["heatmap"] if heatmaps else None
    if heatmap is not None:
        heat_path = os.path.splitext(path)[0] + "_heatmap.png"
        written.append(plot_loss_heatmap(heatmap["tasks"], heatmap["clusters"], heatmap["losses"], heat_path))
    return written
