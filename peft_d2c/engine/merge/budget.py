"""Storage budgets: from a fraction of the N adapters or a size in bytes to K, the number of merged adapters.

The rule (also in `docs/concepts.md`):

- a fraction f in (0, 1]: K = max(1, floor(f * N));
- a size in bytes (`"20MB"`, `"1.5GiB"`, `"300kB"` or an int number of bytes): the largest K whose K merged adapters
  fit, computed from the tensor sizes PEFT's merge produces for the chosen combination type (rank x (in + out)
  elements per adapted module, plus `out` for a LoRA bias when a member has `lora_bias=True`, in the dtype of the
  source LoRA weights: every tensor the merged adapter's safetensors holds). For every type but `cat` a merged adapter
  has a fixed rank (the common source rank, or `svd_rank` / the largest source rank for the `*svd` types), so every
  merged adapter costs at most the same `per_adapter` bytes and K = min(N, floor(budget / per_adapter)). `cat` stacks
  the ranks of a cluster's members, so K merged `cat` adapters always hold every source rank: K = N when the sum of
  the sources fits, and the final partition is checked again (`check_partition_fits`) before anything is merged or
  saved.

With `merge.task_cores` the task cores count too (r x r float32 per module for every task of a cluster of two or
more): K is the largest whose merged adapters fit next to the cores of all N tasks, or N when the N adapters alone
fit (one-member clusters have no core), and the final partition is checked with its exact cores.

A budget too small for a single merged adapter is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import PeftModel

from ...combination_types import SVD_TYPES, UPDATE_TYPES
from ...config import D2CMergeConfig
from ...sizes import format_size, is_bytes_budget, parse_size
from .lora import adapter_rank, lora_factors, lora_layers
from .task_cores import core_bytes

__all__ = [
    "adapter_bytes",
    "check_partition_fits",
    "format_size",
    "is_bytes_budget",
    "merged_adapter_bytes",
    "merged_rank",
    "parse_size",
    "partition_bytes",
    "resolve_num_clusters",
    "stored_bytes",
    "task_cores_bytes",
]


def merged_rank(ranks: Sequence[int], combination_type: str, svd_rank: int | None = None) -> int:
    """Rank of the adapter PEFT's `add_weighted_adapter` creates from adapters of ranks `ranks`.

    PEFT merges a single adapter with `linear` (its own rank); `cat` sums the ranks; the `*svd` types use
    `svd_rank` or the largest rank; the others need equal ranks and keep it. peft-d2c's update-space types
    (`UPDATE_TYPES`) always give rank `svd_rank` or the largest rank, a single member included.

    Example:
        ```python
        >>> merged_rank([8, 4], "cat"), merged_rank([8, 4], "svd", svd_rank=2), merged_rank([8, 8], "ties")
        (12, 2, 8)
        ```
    """
    ranks = list(ranks)
    if combination_type in UPDATE_TYPES:
        return svd_rank or max(ranks)
    if len(ranks) == 1:
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD_TYPES:
        return svd_rank or max(ranks)
    return ranks[0]


def _per_rank_costs(peft_model: PeftModel, adapter_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """(elements per unit of rank, elements of a LoRA bias, bytes per element) of every module any of
    `adapter_names` adapts, from their tensors: the modules of a merged adapter (the union of its members',
    `lora.union_target_modules`), each in the widest element size of the members there (a merge takes its sources'
    widest dtype, its bias too)."""
    costs = []
    for _, layer in lora_layers(peft_model):
        present = [factors for name in adapter_names if (factors := lora_factors(layer, name)) is not None]
        if not present:
            continue
        a, b = present[0]
        size = max(t.element_size() for factors in present for t in factors)
        costs.append(((a.numel() + b.numel()) // a.shape[0], b.shape[0], size))
    return costs


def _has_bias(peft_model: PeftModel, adapter_names: Sequence[str]) -> bool:
    """Whether the merge of `adapter_names` has a LoRA bias in every module (`update_layers.merged_lora_config`: when
    any member has `lora_bias=True`; PEFT's own types refuse such adapters, `lora.check_source_adapters`)."""
    return any(getattr(peft_model.peft_config[name], "lora_bias", False) for name in adapter_names)


def _bytes_at_rank(peft_model: PeftModel, adapter_names: Sequence[str], rank: int) -> int:
    """Bytes of an adapter of rank `rank` on every module any of `adapter_names` adapts, with a LoRA bias in each when
    one of them has one (`_has_bias`)."""
    bias = _has_bias(peft_model, adapter_names)
    return sum(
        (rank * per_rank + bias * out) * size for per_rank, out, size in _per_rank_costs(peft_model, adapter_names)
    )


def stored_bytes(layer, adapter_name: str) -> int:
    """Bytes of the tensors `adapter_name` stores in one LoRA layer (its A and B, and its LoRA bias if it has one), as
    its `adapter_model.safetensors` holds them; 0 where it does not adapt the layer."""
    factors = lora_factors(layer, adapter_name)
    if factors is None:
        return 0
    bias = layer.lora_B[adapter_name].bias if adapter_name in layer.lora_B else None
    tensors = [*factors, *([bias] if bias is not None else [])]
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_bytes(peft_model: PeftModel, adapter_name: str, rank: int | None = None) -> int:
    """Bytes of the LoRA weights of `adapter_name` (as in its `adapter_model.safetensors`, without the header: its
    factors, with their rank pattern, and its LoRA biases), or of an adapter on the same modules with rank `rank`.

    Args:
        peft_model (`PeftModel`): Holds the adapter.
        adapter_name (`str`): A loaded LoRA adapter.
        rank (`int`, *optional*): Size at this rank instead of the adapter's own.

    Returns:
        `int`: sum over adapted modules of rank x (in + out) x bytes per element, plus out x bytes per element where
            the adapter has a LoRA bias.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; loaded: {sorted(peft_model.peft_config)}.")
    if rank is None:  # the tensors themselves: exact for rank patterns and biases alike
        return sum(stored_bytes(layer, adapter_name) for _, layer in lora_layers(peft_model))
    return _bytes_at_rank(peft_model, [adapter_name], rank)


def merged_adapter_bytes(peft_model: PeftModel, members: Sequence[str], config: D2CMergeConfig) -> int:
    """Bytes of the adapter PEFT creates by merging `members` with `config.combination_type` (on the union of the
    members' modules, which the update-space types adapt when the members' targets differ).

    Example:
        ```python
        >>> merged_adapter_bytes(model, ["copy", "sort"], D2CMergeConfig(num_clusters=2, combination_type="cat"))  # doctest: +SKIP
        49152
        ```
    """
    return _bytes_at_rank(peft_model, members, merged_rank_of(peft_model, members, config))


def merged_rank_of(peft_model: PeftModel, members: Sequence[str], config: D2CMergeConfig) -> int:
    """Rank of the merged adapter of `members` under `config` (`merged_rank` of their largest ranks)."""
    ranks = [adapter_rank(peft_model, m) for m in members]
    return merged_rank(ranks, config.combination_type, config.merge.svd_rank)


def task_cores_bytes(peft_model: PeftModel, members: Sequence[str], config: D2CMergeConfig) -> int:
    """Bytes of the task cores of a cluster of `members` (`merge.task_cores`; 0 without, and for one member): one
    r x r float32 core per member in every module the cluster's merged adapter adapts (`engine.merge.task_cores`)."""
    if not config.merge.task_cores or len(members) < 2:
        return 0
    rank = merged_rank_of(peft_model, members, config)
    return len(members) * core_bytes([rank] * len(_per_rank_costs(peft_model, members)))


def partition_bytes(peft_model: PeftModel, clusters: Sequence[Sequence[str]], config: D2CMergeConfig) -> int:
    """Total bytes of the merged adapters of a partition, with their task cores (`merge.task_cores`)."""
    return sum(
        merged_adapter_bytes(peft_model, members, config) + task_cores_bytes(peft_model, members, config)
        for members in clusters
    )


def resolve_num_clusters(peft_model: PeftModel, adapter_names: Sequence[str], config: D2CMergeConfig) -> int:
    """K for `config` and these N adapters: `num_clusters`, or the storage budget converted by the module's rule.

    Args:
        peft_model (`PeftModel`): Holds the source adapters (their shapes and dtypes give the sizes).
        adapter_names (`Sequence[str]`): The N adapters to cluster.
        config (`D2CMergeConfig`): `num_clusters`, or `storage_budget` as a fraction or a size.

    Returns:
        `int`: K in [1, N].

    Raises:
        ValueError: If K is out of range, or the byte budget cannot hold one merged adapter (or, for `cat`, all the
            source ranks).

    Example:
        ```python
        >>> resolve_num_clusters(model, names, D2CMergeConfig(storage_budget="100kB"))  # doctest: +SKIP
        2
        ```
    """
    names = list(adapter_names)
    if not is_bytes_budget(config.storage_budget):
        return config.resolve_num_clusters(len(names))
    budget = parse_size(config.storage_budget)
    n = len(names)
    if config.combination_type == "cat":
        total = partition_bytes(peft_model, [[m] for m in names], config)
        if total > budget:
            raise ValueError(
                f"`storage_budget`={config.storage_budget!r} ({format_size(budget)}) is too small for "
                f"combination_type='cat': `cat` stacks the ranks of every member, so any partition of these {n} "
                f"adapters stores {format_size(total)}; raise the budget or use another `combination_type`."
            )
        return n
    per_adapter = merged_adapter_bytes(peft_model, names, config)  # every cluster's modules are among all of them
    if config.combination_type not in UPDATE_TYPES:  # PEFT copies a one-member cluster at its own rank
        per_adapter = max(per_adapter, *(adapter_bytes(peft_model, m) for m in names))
    cores = task_cores_bytes(peft_model, names, config)  # every task's core, on at most every module
    k = min(n, max(0, budget - cores) // per_adapter)
    if cores and n * per_adapter <= budget:  # every adapter alone: one-member clusters have no core
        k = n
    if k < 1:
        with_cores = f" and the {n} task cores ({format_size(cores)})" if cores else ""
        raise ValueError(
            f"`storage_budget`={config.storage_budget!r} ({format_size(budget)}) is too small for one merged adapter "
            f"({format_size(per_adapter)} with combination_type={config.combination_type!r}){with_cores}; give at "
            f"least {per_adapter + cores} bytes."
        )
    return int(k)


def check_partition_fits(peft_model: PeftModel, clusters: Sequence[Sequence[str]], config: D2CMergeConfig) -> int:
    """Check the merged adapters of the final partition against a byte budget (a no-op for other budgets).

    Returns:
        `int`: the partition's size in bytes.

    Raises:
        ValueError: If the merged adapters would not fit `config.storage_budget`.
    """
    total = partition_bytes(peft_model, clusters, config)
    if is_bytes_budget(config.storage_budget):
        budget = parse_size(config.storage_budget)
        if total > budget:
            raise ValueError(
                f"The {len(clusters)} merged adapters would take {format_size(total)}, more than "
                f"`storage_budget`={config.storage_budget!r} ({format_size(budget)}); nothing was saved."
            )
    return total
