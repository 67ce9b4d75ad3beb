"""The search settings a run takes when the user leaves them at None, and how they grow with N and K.

Up to `REFERENCE_N` adapters (the 16 embedded tasks and the 12 of the validation collection, where they were
measured; docs/benchmark.md) the acceptance rule is `"partition"` while clusters hold at most
`PARTITION_MAX_CLUSTER_SIZE` adapters on average, else `"paper_then_partition"` (`default_search_rule`); a run keeps
the paper's random start and, for `"partition"`, its random proposals, with `DEFAULT_STEPS` steps.
Above it random draws leave adapters never proposed (43 of 256 with T scaled by N/16) and a random start keeps the
search far from the right clusters (purity 0.47 at N = 256), so the partition search starts from the lower-loss of
the random and the weight-similarity partition (`init="lowest_loss"`) and proposes every adapter `SWEEP_ROUNDS`
times into the cluster where it fits best (`proposal="targeted"`); docs/performance.md has the measurements.
`search="paper"` keeps the paper's start and draws at every N (its T grows as N / `REFERENCE_N`).
"""

from __future__ import annotations

import math

# The acceptance rules (`D2CMergeConfig.search`) and proposals (`proposal`, `engine.search.proposals`) there are.
SEARCHES = ("paper", "partition", "paper_then_partition")
PROPOSALS = ("random", "sweep", "targeted", "misfit")
# What a task's examples score under a merge (`D2CMergeConfig.task_score`; both from the same forward passes).
TASK_SCORES = ("loss", "miss")
# T per `search` up to REFERENCE_N adapters: a "partition" step scores every task of the two clusters it changes
# (2N/K tasks), a "paper" step only the moved task, so 30 partition steps cost 0.67x, 1.10x and 3.42x the forward
# passes of the paper's 100 steps at K = 8, 4 and 2 on the embedded default (regmean, 10 seeds, docs/benchmark.md).
# "paper_then_partition" takes the paper's T for its first phase (its second has at most as many steps).
DEFAULT_STEPS = {"paper": 100, "partition": 30, "paper_then_partition": 100}
# Above it, random proposals get DEFAULT_STEPS x N / REFERENCE_N steps (rounded up): each adapter is proposed as
# often on average as in the collections the defaults were measured on.
REFERENCE_N = 16
# Steps of "sweep" and "targeted" proposals: this many rounds of N, so every adapter is proposed twice at any N.
SWEEP_ROUNDS = 2
# Up to REFERENCE_N adapters, a mean cluster size N / K above this makes "partition" the dearer search: a step scores
# the ~2N/K tasks of the two clusters it changes, so its 30 steps cost 3.42x the paper's 100 steps' forward passes at
# N / K = 8 (embedded, K = 2) and 1.85x at 6 (validation, K = 2; above 2x in 3 of 10 seeds), against 1.10x at 4 and
# 0.88x at 3 (10 seeds each, docs/benchmark.md). There "paper_then_partition" (at most 2x the paper's passes by
# construction; 1.70x and 1.76x at those K = 2, its EM level with the partition search's) is the default.
PARTITION_MAX_CLUSTER_SIZE = 4
# Proposals that score the task under every other cluster's current merge (K - 1 losses a proposal).
TARGETED_PROPOSALS = ("targeted", "misfit")


def default_search_rule(num_adapters: int, num_clusters: int, restarts: int = 1) -> str:
    """The acceptance rule (`D2CMergeConfig.search`) of a run of `num_adapters` adapters into `num_clusters` when
    `search` is None: `"paper_then_partition"` up to `REFERENCE_N` adapters with clusters of more than
    `PARTITION_MAX_CLUSTER_SIZE` adapters on average, one start and K >= 2, else `"partition"`. Above `REFERENCE_N`
    the partition search from the lowest-loss start is kept whatever K (the paper's random start is far from the right
    clusters there; docs/performance.md)."""
    small_clusters = num_adapters <= PARTITION_MAX_CLUSTER_SIZE * num_clusters
    if num_adapters > REFERENCE_N or small_clusters or restarts != 1 or num_clusters < 2:
        return "partition"
    return "paper_then_partition"


def default_search(num_adapters: int, search: str) -> tuple[str, str]:
    """`(init, proposal)` for `num_adapters` adapters and acceptance rule `search` (see `D2CMergeConfig`): the
    second phase of `"paper_then_partition"` proposes `"misfit"` moves at any N (lower few-shot loss than the paper's
    end in 9 of 10 seeds at K = 2, against 6 of 10 with random ones; docs/benchmark.md)."""
    if search == "paper_then_partition":
        return "random", "misfit"
    if num_adapters > REFERENCE_N and search == "partition":
        return "lowest_loss", "targeted"
    return "random", "random"


def default_steps(num_adapters: int, search: str, proposal: str) -> int:
    """T for `num_adapters` adapters: `SWEEP_ROUNDS` x N for proposals in rounds (all but "random"; not for the
    paper phase of "paper_then_partition"), else `DEFAULT_STEPS[search]` x max(1, N / `REFERENCE_N`), rounded up."""
    if proposal != "random" and search != "paper_then_partition":  # whose T is its paper phase's, random draws
        return SWEEP_ROUNDS * num_adapters
    return math.ceil(DEFAULT_STEPS[search] * max(1, num_adapters / REFERENCE_N))


def default_task_score(search: str) -> str:
    """`task_score` when it is None: `"miss"` for `"paper_then_partition"` (its second phase; the first is the
    paper's rule on the loss either way), else `"loss"`. At K = 2 the loss's second phase answered 2.3 held-out
    points fewer than the paper's end on the validation collection; on the miss, flat where a task fails either way,
    the search is level with the paper's rule on both collections (+0.4 [-0.2, +1.0] embedded, -0.1 [-0.4, +0.2]
    validation, 10 seeds each, at 1.73x and 1.78x its passes; docs/benchmark.md)."""
    return "miss" if search == "paper_then_partition" else "loss"


def merge_cache_size_for(proposal: str, num_clusters: int, merge_cache_size: int) -> int:
    """Live merges a run keeps: `merge_cache_size`, raised to K + 2 for "targeted" and "misfit" proposals. A targeted
    step scores the task under every other cluster's merge, then the step's two new merges: with fewer live slots the
    LRU would rebuild most of the K current merges at every step (16,326 merges in 1076 s at N = 256, K = 32, instead
    of 1,503 in 379 s; docs/performance.md)."""
    return max(merge_cache_size, num_clusters + 2) if proposal in TARGETED_PROPOSALS else merge_cache_size
