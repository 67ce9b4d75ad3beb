"""Which merges a run can ask for (`D2CMergeConfig.combination_type`), and what each kind needs or does."""

from __future__ import annotations

# peft-d2c's rank-r merges in update space (`engine/merge/merge_methods.py`, `engine/merge/regmean.py`): rslora /
# lora_bias scaling applied exactly, any mix of target modules. DATA_TYPES among them use the few-shot examples'
# layer inputs.
DATA_TYPES = ("regmean",)
UPDATE_TYPES = ("core_ta", "core_ties", "knots_ties", "tsv_m", *DATA_TYPES)
COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
) + UPDATE_TYPES
# Combination types that need every merged adapter to have the same rank (`peft/tuners/lora/model.py`).
EQUAL_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
# Combination types that merge the full updates B·A and factor the result again with an SVD (rank `svd_rank`).
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
# Combination types that draw random masks (DARE) from torch's generator.
RANDOM_TYPES = ("dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")
