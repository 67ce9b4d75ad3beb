"""Which merges a run can ask for (`D2CMergeConfig.combination_type`), and what each kind needs or does."""

from __future__ import annotations

# peft-d2c's rank-r merges in update space (`engine/merge/merge_methods.py`, `engine/merge/regmean.py`): rslora /
# lora_bias scaling applied exactly, any mix of target modules. DATA_TYPES among them use the few-shot examples'
# layer inputs.
DATA_TYPES = ("regmean",)
UPDATE_TYPES = ("core_ta", "core_ties", "knots_ties", "tsv_m", *DATA_TYPES)
# PEFT's merges that prune the values of each update (a share `density` kept; `add_weighted_adapter`).
PEFT_PRUNING_TYPES = (
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
COMBINATION_TYPES = ("svd", "linear", "cat", *PEFT_PRUNING_TYPES, *UPDATE_TYPES)
# Combination types that need every merged adapter to have the same rank (`peft/tuners/lora/model.py`).
EQUAL_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
# Combination types that merge the full updates B·A and factor the result again with an SVD (rank `svd_rank`).
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
# Combination types that draw random masks (DARE) from torch's generator.
RANDOM_TYPES = ("dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")
# Combination types that prune (a share `density` of the values kept) and those that elect a sign per entry
# (`majority_sign_method`): PEFT's TIES / DARE / magnitude merges and peft-d2c's TIES in a low-rank basis.
DENSITY_TYPES = (*PEFT_PRUNING_TYPES, "knots_ties", "core_ties")
SIGN_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd", "knots_ties", "core_ties")
