"""Storage budgets: from a fraction of the N adapters or a size in bytes to K, the number of merged adapters.

The rule (also in `docs/concepts.md`):

- a fraction f in (0, 1]: K = max(1, floor(f * N));
- a size in bytes (`"20MB"`, `"1.5GiB"`, `"300kB"` or an int number of bytes): the largest K whose K merged adapters
  fit, computed from the tensor sizes PEFT's merge produces for the chosen combination type (rank x (in + out)
  elements per adapted module, in the dtype of the source LoRA weights). For every type but `cat` a merged adapter
  has a fixed rank (the common source rank, or `svd_rank` / the largest source rank for the `*svd` types), so every
  merged adapter costs at most the same `per_adapter` bytes and K = min(N, floor(budget / per_adapter)). `cat` stacks
  the ranks of a cluster's members, so K merged `cat` adapters always hold every source rank: K = N when the sum of
  the sources fits, and the final partition is checked again (`check_partition_fits`) before anything is merged or
  saved.

A budget too small for a single merged adapter is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")

# Decimal units as the Hub shows file sizes (kB = 1000 bytes); binary units with an "i" (KiB = 1024 bytes).
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, argument: str = "storage_budget") -> int:
    """Number of bytes in a size such as `"20MB"`, `"1.5 GiB"`, `"300kB"` or `1048576`.

    Units are case-insensitive: `B`, `kB`/`MB`/`GB`/`TB` (powers of 1000) and `KiB`/`MiB`/`GiB`/`TiB` (powers of
    1024). A bare number is a number of bytes.

    Args:
        value (`str` or `int`): The size.
        argument (`str`, defaults to `"storage_budget"`): Name used in error messages.

    Returns:
        `int`: the size in bytes (rounded down), at least 1.

    Raises:
        ValueError: If the text is not a positive number followed by a known unit.

    Example:
        ```python
        >>> parse_size("20MB"), parse_size("1KiB"), parse_size(512)
        (20000000, 1024, 512)
        ```
    """
    if isinstance(value, bool):
        raise ValueError(f"`{argument}` must be a size such as '20MB' or a fraction in (0, 1], got {value!r}.")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_PATTERN.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            allowed = ["B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]
            raise ValueError(
                f"`{argument}` must be a number followed by one of the units {allowed} (e.g. '20MB'), got {value!r}."
            )
        size = math.floor(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"`{argument}` must be a positive size, got {value!r}.")
    return size


def format_size(num_bytes: int | float) -> str:
    """Human-readable decimal size, e.g. `format_size(20_000_000) == "20.0 MB"`."""
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


def is_bytes_budget(storage_budget: Any) -> bool:
    """Whether `storage_budget` is a size in bytes (a string, or an int > 1) rather than a fraction."""
    if isinstance(storage_budget, bool) or storage_budget is None:
        return False
    return isinstance(storage_budget, str) or (isinstance(storage_budget, int) and storage_budget > 1)


def merged_rank(ranks: Sequence[int], combination_type: str, svd_rank: int | None = None) -> int:
    """Rank of the adapter PEFT's `add_weighted_adapter` creates from adapters of ranks `ranks`.

    PEFT merges a single adapter with `linear` (its own rank); `cat` sums the ranks; the `*svd` types use
    `svd_rank` or the largest rank; the others need equal ranks and keep it.

    Example:
        ```python
        >>> merged_rank([8, 4], "cat"), merged_rank([8, 4], "svd", svd_rank=2), merged_rank([8, 8], "ties")
        (12, 2, 8)
        ```
    """
    ranks = list(ranks)
    if len(ranks) == 1:
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD_TYPES:
        return svd_rank or max(ranks)
    return ranks[0]


def _per_rank_costs(peft_model, adapter_name: str) -> list[tuple[int, int]]:
    """(elements per unit of rank, bytes per element) of every module `adapter_name` adapts, from its tensors."""
    from .merging import lora_factors, lora_layers

    costs = []
    for _, layer in lora_layers(peft_model):
        factors = lora_factors(layer, adapter_name)
        if factors is None:
            continue
        a, b = factors
        rank = a.shape[0]
        costs.append(((a.numel() + b.numel()) // rank, a.element_size()))
    return costs


def adapter_bytes(peft_model, adapter_name: str, rank: int | None = None) -> int:
    """Bytes of the LoRA weights of `adapter_name` (as in its `adapter_model.safetensors`, without the header),
    or of an adapter on the same modules with rank `rank`.

    Args:
        peft_model (`PeftModel`): Holds the adapter.
        adapter_name (`str`): A loaded LoRA adapter.
        rank (`int`, *optional*): Size at this rank instead of the adapter's own.

    Returns:
        `int`: sum over adapted modules of rank x (in + out) x bytes per element.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; loaded: {sorted(peft_model.peft_config)}.")
    from .merging import adapter_rank

    r = adapter_rank(peft_model, adapter_name) if rank is None else rank
    return sum(r * per_rank * size for per_rank, size in _per_rank_costs(peft_model, adapter_name))


def merged_adapter_bytes(peft_model, members: Sequence[str], config) -> int:
    """Bytes of the adapter PEFT creates by merging `members` with `config.combination_type`.

    Example:
        ```python
        >>> merged_adapter_bytes(model, ["copy", "sort"], D2CMergeConfig(num_clusters=2, combination_type="cat"))  # doctest: +SKIP
        49152
        ```
    """
    from .merging import adapter_rank

    ranks = [adapter_rank(peft_model, m) for m in members]
    rank = merged_rank(ranks, config.combination_type, config.svd_rank)
    return adapter_bytes(peft_model, sorted(members)[0], rank)


def partition_bytes(peft_model, clusters: Sequence[Sequence[str]], config) -> int:
    """Total bytes of the merged adapters of a partition."""
    return sum(merged_adapter_bytes(peft_model, members, config) for members in clusters)


def resolve_num_clusters(peft_model, adapter_names: Sequence[str], config) -> int:
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
    per_adapter = max(merged_adapter_bytes(peft_model, names, config), *(adapter_bytes(peft_model, m) for m in names))
    k = min(n, budget // per_adapter)
    if k < 1:
        raise ValueError(
            f"`storage_budget`={config.storage_budget!r} ({format_size(budget)}) is too small for one merged adapter "
            f"({format_size(per_adapter)} with combination_type={config.combination_type!r}); give at least "
            f"{per_adapter} bytes."
        )
    return int(k)


def check_partition_fits(peft_model, clusters: Sequence[Sequence[str]], config) -> int:
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
