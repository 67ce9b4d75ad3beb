"""Which scoring requests share a forward pass: a plan that depends only on the requests, never on the processes.

Pure Python, so a loss is computed in exactly the same batch (the same floating-point result) by one process or
by many (`LossScorer` deals the planned batches out to an Accelerate process group).
"""

from __future__ import annotations

from collections.abc import Sequence

Members = tuple[str, ...]


def plan_batches(
    sizes: Sequence[int], clusters: Sequence[Members], *, batch_size: int, max_clusters: int
) -> list[list[int]]:
    """Group requests (by index) into scoring batches whose composition depends only on the requests.

    A batch is scored in one forward pass when it holds at most `batch_size` rows. The number of batches is the
    smallest that fits the rows, rounded up to a power of two, and requests are dealt out contiguously with rows
    spread evenly; a batch that would need more than `max_clusters` live merged adapters is split further. Because
    this never looks at the number of processes, a loss is computed with exactly the same batch (hence the same
    floating-point result) whether the batches are scored by one process or dealt out to 2, 4, 8... (which the
    power of two keeps balanced).

    Args:
        sizes (`Sequence[int]`): Rows (examples) of each request.
        clusters (`Sequence[Members]`): The cluster of each request.
        batch_size (`int`): Rows per forward pass.
        max_clusters (`int`): The most distinct clusters one batch may use (the merged-adapter LRU size).

    Returns:
        `list[list[int]]`: request indices of each batch, in order.

    Example:
        ```python
        >>> plan_batches([10] * 8, [("a", "b")] * 8, batch_size=32, max_clusters=8)
        [[0, 1], [2, 3], [4, 5], [6, 7]]
        ```
    """
    if not sizes:
        return []
    total = sum(sizes)
    num_batches = 1
    while num_batches * batch_size < total:
        num_batches *= 2
    num_batches = min(num_batches, len(sizes))
    batches: list[list[int]] = [[] for _ in range(num_batches)]
    done = 0
    for index, size in enumerate(sizes):
        # The batch in which the middle row of this request falls when rows are spread evenly.
        slot = min(num_batches - 1, int((done + size / 2) * num_batches / total))
        batches[slot].append(index)
        done += size
    planned: list[list[int]] = []
    for batch in batches:
        current: list[int] = []
        seen: set[Members] = set()
        for index in batch:
            if clusters[index] not in seen and len(seen) >= max_clusters:
                planned.append(current)
                current, seen = [], set()
            current.append(index)
            seen.add(clusters[index])
        if current:
            planned.append(current)
    return planned
