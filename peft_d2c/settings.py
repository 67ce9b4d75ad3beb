"""The settings groups of `D2CMergeConfig`: the merge's own (`MergeSettings`) and how examples are scored
(`ScoringSettings`), each validated on its own; `D2CMergeConfig` checks them against the rest of the run. May import
the bottom stage (`checks`, `combination_types`, `sizes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from .checks import check_choice, check_fraction, check_int
from .combination_types import DATA_TYPES, DENSITY_TYPES, SIGN_TYPES, SVD_TYPES, UPDATE_TYPES
from .sizes import parse_size


@dataclass(frozen=True)
class MergeSettings:
    """The settings of the merge itself (`D2CMergeConfig.merge`), beyond its `combination_type`.

    Each setting applies to some combination types only (`APPLIES_TO`); a value other than its default with a type
    it does not apply to is refused (`check_applies_to`), never silently ignored.

    Args:
        density (`float`, defaults to 0.5):
            Fraction of values kept by the pruning types (`combination_types.DENSITY_TYPES`: ties, dare,
            magnitude_prune and their svd forms, knots_ties, core_ties).
        majority_sign_method (`str`, defaults to `"total"`):
            Sign election of the TIES types (`combination_types.SIGN_TYPES`): `"total"` or `"frequency"`.
        regmean_alpha (`float`, defaults to 0.9):
            `regmean`: the share of the off-diagonal entries of the layer-input Gram matrices kept (RegMean's alpha),
            in (0, 1): 1 would leave the sum of the (singular) few-shot Grams unregularised.
        memory_limit (`int` or `str`, *optional*):
            `regmean`: the most memory (resident set) the process may use once the layer inputs are held, in bytes or
            as a size (`"16GB"`). A run predicts their size before collecting them and refuses, naming this setting,
            when the process's memory plus theirs would exceed it. Defaults to the process's memory plus the memory
            available when the run starts.
        rank_allocation (`str`, defaults to `"uniform"`):
            Ranks of the final merged adapters (update-space types): `"uniform"` (`svd_rank` or the largest source
            rank in every module) or `"spectrum"` (the same total bytes, or all of a byte `storage_budget`, spent on
            the largest singular values per byte over every merged adapter and module; `engine.merge.rank_budget`).
        weight (`float`, *optional*):
            Weight given to every member of a cluster. `None` picks the weight for which merging k identical copies
            of an adapter gives that adapter back (`engine.merge.merging.merge_weights_for`).
        svd_rank (`int` or `"auto"`, *optional*):
            Rank of the merged adapter for the `*svd` and update-space types (defaults to the largest source rank).
            `"auto"` (update-space types, with a `storage_budget` in bytes): the bytes decide K and the rank together,
            from the few-shot objective: every shape (K merged adapters of rank r, r a power of two up to 4x the
            largest source rank, K the most that fit) is searched, and the one whose final merges have the lowest
            cross-fitted few-shot loss ships (`d2c.merge_adapters_d2c`; `result.stats["shapes"]` lists them all).
        task_cores (`bool`, defaults to `False`):
            Update-space types: also give every task its own r x r core in its cluster's shared rank-r basis
            (`engine.merge.task_cores`): the merged adapter is rewritten as its projection onto the basis its members'
            updates share, and task t is served by the plain LoRA `result.task_adapter(t)` builds from the merged
            adapter and the task's core, the closest update to the task's own in that basis. The cores cost r x r
            float32 numbers per module and task, counted in a byte `storage_budget`. With `svd_rank="auto"` the shapes
            with cores (every rank, not only the powers of two, each judged by the few-shot loss of its task
            adapters) join those without, and the lowest objective ships either kind.
        cache_size (`int`, defaults to 8):
            Number of temporary merged adapters kept alive in the model during the search (an LRU, at least 2); older
            ones are deleted.
    """

    density: float = 0.5
    majority_sign_method: Literal["total", "frequency"] = "total"
    regmean_alpha: float = 0.9
    memory_limit: int | str | None = None
    rank_allocation: Literal["uniform", "spectrum"] = "uniform"
    weight: float | None = None
    svd_rank: int | Literal["auto"] | None = None
    task_cores: bool = False
    cache_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "density", check_fraction("density", self.density))  # frozen: set once here
        check_choice("majority_sign_method", self.majority_sign_method, ("total", "frequency"))
        # alpha = 1 keeps the off-diagonal Gram entries whole: ten examples' Grams are singular, and so is their sum
        # where few tokens reach a layer, so the merge's Cholesky would fail mid-run.
        object.__setattr__(
            self, "regmean_alpha", check_fraction("regmean_alpha", self.regmean_alpha, include_one=False)
        )
        if self.memory_limit is not None:
            parse_size(self.memory_limit, "memory_limit")
        check_choice("rank_allocation", self.rank_allocation, ("uniform", "spectrum"))
        if self.weight is not None:
            if (
                isinstance(self.weight, bool)
                or not isinstance(self.weight, (int, float))
                or not math.isfinite(self.weight)
            ):
                raise ValueError(f"`weight` must be a finite number or None, got {self.weight!r}.")
            object.__setattr__(self, "weight", float(self.weight))
        if self.svd_rank != AUTO_RANK:
            check_int("svd_rank", self.svd_rank, minimum=1, optional=True)
        check_choice("task_cores", self.task_cores, (True, False))
        check_int("cache_size", self.cache_size, minimum=2)

    def check_applies_to(self, combination_type: str) -> None:
        """Refuse every setting with a value other than its default that `combination_type` does not use.

        Raises:
            ValueError: Naming the setting, the types it applies to, and what to do.
        """
        defaults = {f.name: f.default for f in fields(MergeSettings)}
        for name, types in APPLIES_TO.items():
            value = getattr(self, name)
            if value != defaults[name] and combination_type not in types:
                raise ValueError(
                    f"`merge.{name}={value!r}` does not apply to `combination_type={combination_type!r}` (it applies "
                    f"to {list(types)}): remove it, or choose one of those types."
                )


# `merge.svd_rank` that lets the bytes decide K and the rank (`D2CMergeConfig._check_auto_rank`).
AUTO_RANK = "auto"

# The combination types each setting of `MergeSettings` applies to (`weight` and `cache_size` apply to all).
APPLIES_TO = {
    "density": DENSITY_TYPES,
    "majority_sign_method": SIGN_TYPES,
    "regmean_alpha": DATA_TYPES,
    "memory_limit": DATA_TYPES,
    "rank_allocation": UPDATE_TYPES,
    "svd_rank": SVD_TYPES + UPDATE_TYPES,
    "task_cores": UPDATE_TYPES,
}


@dataclass(frozen=True)
class ScoringSettings:
    """How the few-shot examples are scored under a merge (`D2CMergeConfig.scoring`).

    Args:
        examples_per_task (`int`, defaults to 10):
            n, the number of examples per task used for clustering; extra examples are ignored.
        batch_size (`int`, defaults to 32):
            Rows per forward pass when scoring.
        max_batch_tokens (`int`, defaults to 16384):
            Tokens of one scoring forward pass (rows x longest row, padding included): a batch of `batch_size` rows is
            split further, by the examples alone (1- and N-process runs stay bit-identical), so none runs out of memory.
        max_length (`int`, *optional*):
            Truncate prompt + completion to this many tokens (the prompt is cut from the left).
        use_chat_template (`bool`, defaults to `False`):
            Wrap each prompt in the tokenizer's chat template before scoring.
        cross_fit_folds (`int`, *optional*):
            F, for a merge fitted to the few-shot examples' layer inputs (`regmean`): each example is scored under
            the cluster's merge fitted to the other folds' examples (example i of a task in fold i mod F), F merges
            per cluster, so the search's objective is measured on examples the merge was not fitted to. 1 (`None`) is
            the paper's loss: the merge fitted to all the examples, scored on the same ones. The shipped merges are
            always fitted to all examples.
    """

    examples_per_task: int = 10
    batch_size: int = 32
    max_batch_tokens: int = 16384
    max_length: int | None = None
    use_chat_template: bool = False
    cross_fit_folds: int | None = None

    def __post_init__(self) -> None:
        for name in ("examples_per_task", "batch_size", "max_batch_tokens"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("max_length", self.max_length, minimum=2, optional=True)
        check_choice("use_chat_template", self.use_chat_template, (True, False))
        check_int("cross_fit_folds", self.cross_fit_folds, minimum=1, optional=True)


def settings_group(cls: type, value: Any, name: str) -> Any:
    """A settings group from an instance of `cls` or a dict of its fields (unknown keys named)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a {cls.__name__} or a dict of its fields, got {value!r}.")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"Unknown `{name}` setting(s) {unknown}; the settings of `{name}` are {known}.")
    return cls(**value)
