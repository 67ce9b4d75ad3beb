"""Budget sweep: run D2C for K = 1..N (or a list) and record score against storage, so a budget is picked knowingly."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..d2c import merge_adapters_d2c
from ..engine.merge.budget import adapter_bytes, partition_bytes
from ..io import atomic_write_json
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
) -> dict[str, Any]:
    """Run `merge_adapters_d2c` once per K and measure each run's score and storage.

    Every run uses `config` with `num_clusters=K` (any storage budget is replaced). The score of a run is the mean
    held-out exact match of its routing when `heldout_examples` are given, else the mean few-shot task loss (lower
    is better). Storage is the bytes of the K merged adapters (`peft_d2c.engine.merge.budget.partition_bytes`). The
    merged adapters of each run are deleted from the model once it is measured.

    Args:
        peft_model (`PeftModel`): The model with the N source adapters.
        task_examples (`Mapping[str, Sequence[dict]]`): Few-shot examples per task (as for `merge_adapters_d2c`).
        config (`D2CMergeConfig`): Settings shared by every run.
        tokenizer: The base model's tokenizer.
        num_clusters (`Sequence[int]`, *optional*): The K values; defaults to 1..N.
        heldout_examples (`Mapping[str, Sequence[dict]]`, *optional*): Held-out examples per task.

    Returns:
        `dict`: `{"metric": ..., "higher_is_better": bool, "num_adapters": N, "source_bytes": ..., "points": [{"k",
        "storage_bytes", "storage_fraction", "score", "clusters"}, ...]}`.

    Raises:
        ValueError: If a K is outside 1..N.

    Example:
        ```python
        >>> sweep = run_sweep(model, examples, D2CMergeConfig(num_clusters=1, num_iterations=50), tokenizer=tok)  # doctest: +SKIP
        >>> [(p["k"], p["score"]) for p in sweep["points"]]  # doctest: +SKIP
        [(1, 1.92), (2, 1.41), (3, 1.20), ...]
        ```
    """
    names = [n for n in peft_model.peft_config if n in task_examples]
    n = len(names)
    ks = list(range(1, n + 1)) if num_clusters is None else [int(k) for k in num_clusters]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(
            f"`num_clusters` of a sweep must lie between 1 and the number of adapters ({n}), got {bad or ks}."
        )
    source_bytes = sum(adapter_bytes(peft_model, name) for name in names)
    points = []
    for k in ks:
        run_config = replace(
            config, num_clusters=k, storage_budget=None, merged_adapter_prefix=f"{config.merged_adapter_prefix}k{k}"
        )
        logger.info("Sweep: K=%d", k)
        result = merge_adapters_d2c(peft_model, task_examples, run_config, tokenizer=tokenizer, adapter_names=names)
        try:
            storage = partition_bytes(peft_model, result.clusters, run_config)
            if heldout_examples is not None:
                scores = evaluate_routing(
                    peft_model, tokenizer, heldout_examples, result.routing, batch_size=config.scoring.batch_size
                )
                score = sum(s["exact_match"] for s in scores.values()) / len(scores)
            else:
                score = result.stats["fewshot_loss"]
        finally:
            for name in result.merged_adapter_names:
                peft_model.delete_adapter(name)
        points.append(
            {
                "k": k,
                "storage_bytes": storage,
                "storage_fraction": storage / source_bytes,
                "score": score,
                "clusters": result.clusters,
            }
        )
    return {
        "metric": "heldout exact match" if heldout_examples is not None else "few-shot loss",
        "higher_is_better": heldout_examples is not None,
        "num_adapters": n,
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
