"""The weights `add_weighted_adapter` needs per combination type, and the seed of each cluster's merge.

Merging k identical copies of an adapter must give that adapter back, whatever the combination type; PEFT
weighs members differently per type, so the weights that achieve this differ too (`merge_weights_for`). Every
merge is seeded from its members (`merge_seed`), so random merges (`dare_*`) are reproducible and cacheable.
Imports nothing from peft_d2c.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["merge_seed", "merge_weights_for"]

# Types whose members all get weight 1 (a disjoint mean after pruning, or TSV-M's sum of orthogonalised directions).
_WEIGHT_ONE_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd", "core_ties", "knots_ties", "tsv_m")


def merge_weights_for(combination_type: str, cluster_size: int, override: float | None = None) -> list[float]:
    """Weights for `add_weighted_adapter` such that merging k identical copies of an adapter gives that adapter.

    PEFT treats the weights differently per combination type (`peft/tuners/lora/model.py`):
    - `cat`, `svd`, `dare_linear_svd`, `magnitude_prune_svd` sum w_i·ΔW_i: w_i = 1/k is the mean update.
    - `ties`, `ties_svd`, `dare_ties`, `dare_ties_svd` take a disjoint mean after pruning: w_i = 1.
    - `linear`, `dare_linear`, `magnitude_prune` sum √w_i·A_i and √w_i·B_i separately: w_i = 1/k² gives
      mean(B)·mean(A), which is exact for identical copies (w_i = 1/k would give k·ΔW).
    - peft-d2c's update-space types (`peft_d2c.engine.merge_methods`): `core_ta` sums w_i·ΔW_i (w_i = 1/k, the
      mean); `core_ties` and `knots_ties` take TIES' disjoint mean (w_i = 1); `tsv_m` sums its members'
      orthogonalised singular directions, each scaled by w_i (w_i = 1, as in TSV-M).

    A single-member cluster always gets weight 1 (PEFT then copies the adapter), unless `override` is given.

    Args:
        combination_type (`str`): A PEFT combination type.
        cluster_size (`int`): k, the number of merged adapters.
        override (`float`, *optional*): Use this weight for every member instead.

    Returns:
        `list[float]`: one weight per member.

    Example:
        ```python
        >>> merge_weights_for("cat", 4)
        [0.25, 0.25, 0.25, 0.25]
        >>> merge_weights_for("linear", 2)
        [0.25, 0.25]
        ```
    """
    if override is not None:
        return [float(override)] * cluster_size
    if cluster_size == 1 or combination_type in _WEIGHT_ONE_TYPES:
        return [1.0] * cluster_size
    if combination_type in ("linear", "dare_linear", "magnitude_prune"):
        return [1.0 / cluster_size**2] * cluster_size
    return [1.0 / cluster_size] * cluster_size


def merge_seed(seed: int, members: Sequence[str]) -> int:
    """Seed of the merge of `members`: stable across processes and Python runs (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}|{'|'.join(sorted(members))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)
