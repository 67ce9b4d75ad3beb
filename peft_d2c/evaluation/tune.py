"""Data-driven merge weights for a finished partition: each cluster's per-adapter weights tuned on the few-shot
loss of the cluster's own tasks (`engine.search.weight_search.search_weights`, gradient-free as in LoraHub).

An experiment, not part of `merge_adapters_d2c`: `benchmarks/tune_weights.py` measures whether the tuned weights
raise held-out exact match (10 examples per task may well be overfitted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..engine.merge.merging import AdapterMerger, merge_weights_for
from ..engine.search.weight_search import WeightSearchResult, search_weights
from .heldout import loss_matrix

__all__ = ["cluster_loss", "tune_cluster_weights"]


def cluster_loss(
    peft_model, tokenizer, examples: Mapping[str, Sequence[Mapping[str, str]]], adapter_name: str, batch_size: int = 32
) -> float:
    """Mean over the tasks of `examples` of the completion loss (nats per token) under `adapter_name`."""
    losses = loss_matrix(peft_model, tokenizer, examples, [adapter_name], batch_size=batch_size)
    return sum(row[0] for row in losses) / len(losses)


def tune_cluster_weights(
    peft_model,
    tokenizer,
    merger: AdapterMerger,
    members: Sequence[str],
    adapter_name: str,
    examples: Mapping[str, Sequence[Mapping[str, str]]],
    *,
    budget: int,
    seed: int,
) -> tuple[WeightSearchResult, int]:
    """Tune the merge weights of `members` (one source adapter per task of `examples`) on `cluster_loss`.

    `adapter_name` must be a merged adapter of `members` made by `merger` (it is refilled for every evaluation and
    left holding the best weights). Returns the search result (weights in the order of sorted `members`) and the
    forward passes spent (batches of `merger.config.scoring.batch_size` rows, per evaluation).
    """
    members = sorted(members)
    initial = merge_weights_for(merger.config.combination_type, len(members), merger.config.merge.weight)

    def objective(weights: list[float]) -> float:
        merger.refill(members, adapter_name, dict(zip(members, weights, strict=True)))
        return cluster_loss(peft_model, tokenizer, examples, adapter_name, merger.config.scoring.batch_size)

    result = search_weights(objective, initial, budget=budget, seed=seed)
    merger.refill(members, adapter_name, dict(zip(members, result.weights, strict=True)))
    rows = sum(len(items) for items in examples.values())
    return result, result.evaluations * math.ceil(rows / merger.config.scoring.batch_size)
