"""Budget sweep: run D2C for K = 1..N (or a list), or for byte budgets that decide K and the rank, and record score
against storage, so a budget is picked knowingly."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..config import SEARCH_SETTINGS
from ..d2c import merge_adapters_d2c
from ..engine.merge.budget import adapter_bytes, partition_bytes
from ..io import atomic_write_json
from ..settings import AUTO_RANK
from .heldout import evaluate_routing
from .plots import plot_sweep

logger = logging.getLogger(__name__)

SWEEP_NAME = "d2c_sweep.json"


def run_sweep(
    peft_model,
    task_examples: Mapping[str, Sequence[Mapping[str, str]]],
    config,
    *,
    tokenizer,
    num_clusters: Sequence[int] | None = None,
    heldout_examples: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
    budgets: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Run `merge_adapters_d2c` once per K, or once per byte budget, and measure each run's score and storage.

    Every run uses `config` with `num_clusters=K` (any storage budget is replaced); with `budgets` (fractions of the
    N source adapters' bytes) instead, with `storage_budget` = that many bytes and `merge.svd_rank="auto"`, so the
    bytes decide K and the rank (an update-space `combination_type` is needed), and next to it the best single merge
    (K = 1 at the highest rank the budget holds, no search) as the `"single"` entry of the point. The score of a run
    is the mean held-out exact match of its routing when `heldout_examples` are given (first word; `whole_score`:
    the whole answer), else the mean few-shot task loss (lower is better). Storage is the bytes of the K merged
    adapters (`peft_d2c.engine.merge.budget.partition_bytes`). The merged adapters of each run are deleted from the
    model once it is measured.

    Args:
        peft_model (`PeftModel`): The model with the N source adapters.
        task_examples (`Mapping[str, Sequence[dict]]`): Few-shot examples per task (as for `merge_adapters_d2c`).
        config (`D2CMergeConfig`): Settings shared by every run.
        tokenizer: The base model's tokenizer.
        num_clusters (`Sequence[int]`, *optional*): The K values; defaults to 1..N.
        heldout_examples (`Mapping[str, Sequence[dict]]`, *optional*): Held-out examples per task.
        budgets (`Sequence[float]`, *optional*): Fractions in (0, 1] of the sources' bytes, instead of `num_clusters`.

    Returns:
        `dict`: `{"metric": ..., "higher_is_better": bool, "num_adapters": N, "source_bytes": ..., "points": [{"k",
        "storage_bytes", "storage_fraction", "score", "clusters"}, ...]}`; with `budgets` each point also has
        `budget_fraction`, `rank`, `shapes` (`stats["shapes"]` of the run) and `single` (`{"rank", "storage_bytes",
        "storage_fraction", "score"}`), and with held-out examples `whole_score`.

    Raises:
        ValueError: If a K is outside 1..N, both `num_clusters` and `budgets` are given, or a budget is not in (0, 1].

    Example:
        ```python
        >>> sweep = run_sweep(model, examples, D2CMergeConfig(num_clusters=1, num_iterations=50), tokenizer=tok)  # doctest: +SKIP
        >>> [(p["k"], p["score"]) for p in sweep["points"]]  # doctest: +SKIP
        [(1, 1.92), (2, 1.41), (3, 1.20), ...]
        ```
    """
    names = [n for n in peft_model.peft_config if n in task_examples]
    n = len(names)
    source_bytes = sum(adapter_bytes(peft_model, name) for name in names)
    if budgets is not None:
        if num_clusters is not None:
            raise ValueError("Give `num_clusters` or `budgets` to a sweep, not both.")
        return _budget_sweep(
            peft_model, task_examples, config, tokenizer, names, source_bytes, budgets, heldout_examples
        )
    ks = list(range(1, n + 1)) if num_clusters is None else [int(k) for k in num_clusters]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(
            f"`num_clusters` of a sweep must lie between 1 and the number of adapters ({n}), got {bad or ks}."
        )
    points = []
    for k in ks:
        run_config = replace(
            config, num_clusters=k, storage_budget=None, merged_adapter_prefix=f"{config.merged_adapter_prefix}k{k}"
        )
        logger.info("Sweep: K=%d", k)
        point = _measured_run(peft_model, task_examples, run_config, tokenizer, names, source_bytes, heldout_examples)
        point.pop("result")
        points.append({"k": k, **point})
    return _sweep_data(config, heldout_examples, n, source_bytes, points)


def _measured_run(peft_model, task_examples, run_config, tokenizer, names, source_bytes, heldout_examples) -> dict:
    """One run's storage and score (and its merged adapters deleted): `{"storage_bytes", "storage_fraction", "score",
    "clusters", "result"}` (+ `"whole_score"` with held-out examples)."""
    result = merge_adapters_d2c(peft_model, task_examples, run_config, tokenizer=tokenizer, adapter_names=names)
    try:
        storage = partition_bytes(peft_model, result.clusters, result.config)
        point = {"storage_bytes": storage, "storage_fraction": storage / source_bytes, "clusters": result.clusters}
        if heldout_examples is not None:
            scores = evaluate_routing(
                peft_model,
                tokenizer,
                heldout_examples,
                result.serving_routing,
                batch_size=run_config.scoring.batch_size,
            )
            point["score"] = sum(s["exact_match"] for s in scores.values()) / len(scores)
            point["whole_score"] = sum(s["whole_match"] for s in scores.values()) / len(scores)
        else:
            point["score"] = result.stats["fewshot_loss"]
    finally:
        for name in [*result.merged_adapter_names, *result.task_adapters.values()]:
            peft_model.delete_adapter(name)
    return {**point, "result": result}


def _budget_sweep(peft_model, task_examples, config, tokenizer, names, source_bytes, budgets, heldout_examples):
    """`run_sweep` over byte budgets: per fraction, the run whose bytes decide K and the rank, and the best single
    merge of the same bytes."""
    bad = [f for f in budgets if isinstance(f, bool) or not 0 < f <= 1]
    if bad or not budgets:
        raise ValueError(
            f"`budgets` of a sweep must be fractions in (0, 1] of the sources' bytes, got {bad or budgets}."
        )
    points = []
    for fraction in budgets:
        budget = int(fraction * source_bytes)
        prefix = f"{config.merged_adapter_prefix}b{len(points)}"
        auto = replace(
            config,
            num_clusters=None,
            storage_budget=budget,
            merge=replace(config.merge, svd_rank=AUTO_RANK),
            merged_adapter_prefix=prefix,
        )
        logger.info("Sweep: %.4f of the sources' bytes (%d bytes)", fraction, budget)
        point = _measured_run(peft_model, task_examples, auto, tokenizer, names, source_bytes, heldout_examples)
        result = point.pop("result")
        shapes = result.stats["shapes"]
        # the best single merge: one adapter, no cores (with `merge.task_cores` the auto run weighed both kinds)
        single_rank = next((s["rank"] for s in shapes if s["num_clusters"] == 1 and not s.get("task_cores")), None)
        single = None
        if single_rank is not None:  # the budget holds one merged adapter: the best single merge, no search
            one = replace(
                config,
                method="random",
                num_clusters=1,
                storage_budget=None,
                merge=replace(config.merge, svd_rank=single_rank, task_cores=False),
                scoring=replace(config.scoring, cross_fit_folds=None),
                merged_adapter_prefix=f"{prefix}single",
                **{name: unset for name, unset in SEARCH_SETTINGS.items()},
            )
            single = _measured_run(peft_model, task_examples, one, tokenizer, names, source_bytes, heldout_examples)
            single = {"rank": single_rank, **{k: v for k, v in single.items() if k not in ("result", "clusters")}}
        points.append(
            {
                "budget_fraction": fraction,
                "k": len(result.clusters),
                "rank": result.config.merge.svd_rank,
                **point,
                "shapes": shapes,
                "single": single,
            }
        )
    return _sweep_data(config, heldout_examples, len(names), source_bytes, points)


def _sweep_data(config, heldout_examples, num_adapters: int, source_bytes: int, points: list) -> dict[str, Any]:
    return {
        "metric": "heldout exact match" if heldout_examples is not None else "few-shot loss",
        "higher_is_better": heldout_examples is not None,
        "num_adapters": num_adapters,
        "source_bytes": source_bytes,
        "config": config.to_dict(),
        "points": points,
    }


def save_sweep(sweep: Mapping[str, Any], directory: str | os.PathLike, *, plot: bool = True) -> list[str]:
    """Write `d2c_sweep.json` and, when matplotlib is installed, `d2c_sweep.png` (score vs storage) to `directory`.

    Returns:
        `list[str]`: the written files.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SWEEP_NAME)
    atomic_write_json(path, dict(sweep))
    written = [path]
    if plot and importlib.util.find_spec("matplotlib") is not None:
        written.append(plot_sweep(sweep, os.path.join(directory, "d2c_sweep.png")))
    elif plot:
        logger.info("matplotlib is not installed; no sweep plot (pip install 'peft-d2c[plots]').")
    return written
