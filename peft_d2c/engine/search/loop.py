"""The D2C search (Algorithm 1 of arXiv 2601.17441), its moves, the random start partition, the K-means baselines.

The one search loop of peft-d2c (`d2c_search`), with two acceptance rules: the paper's (`objective="task"`, the moved
task's loss) and the whole-partition one (`objective="partition"`, the summed loss of every task of the two clusters a
move changes). `peft_d2c.engine.search.plan.SearchPlan` says which a run takes and for how many steps.

Pure: this module knows nothing about torch, PEFT or the Hub. It sees the adapters only by name and asks a
`score_fn` for the loss of a task under the merge of a set of adapters, so a test can drive it with a toy function.

Choices the paper leaves open, made here:
- the random start is balanced (cluster sizes differ by at most one);
- the source and target clusters are distinct, and a cluster holding a single adapter is never emptied: the source
  cluster is drawn among clusters with at least two members (the same distribution as resampling invalid pairs);
- a move is kept only if the loss strictly drops (`loss_after < loss_before`).

`proposals_per_step` (default 1, the paper's Algorithm 1) is an extension: each step draws several candidate moves
from the current partition, scores all of them in one batch (which a caller can split over processes), and applies
only the candidate whose task loss drops the most. It makes each step greedier and costs more evaluations per step,
but those evaluations are independent, so they batch and parallelise; with 1 the draws, scores and decisions are
exactly those of Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Members = tuple[str, ...]
# Scores a batch of (cluster members, task) requests at once; lower is better. Batching lets the caller evaluate the
# two merges of one proposal in a single forward pass.
BatchScoreFn = Callable[[Sequence[tuple[Members, str]]], Sequence[float]]
# Acceptance objectives: the paper's moved-task loss, or the total loss of every task whose merge a move changes.
OBJECTIVES = ("task", "partition")


@dataclass(frozen=True)
class Move:
    """`task` goes from cluster `source` to cluster `target`."""

    source: int
    target: int
    task: str


def draw_move(clusters: Sequence[Sequence[str]], rng: np.random.Generator) -> Move:
    """One proposal of Algorithm 1: a source cluster with >= 2 members, another target cluster and a task of the
    source, each drawn uniformly (three `rng.integers` draws, in that order)."""
    eligible = [i for i, c in enumerate(clusters) if len(c) >= 2]
    source = int(eligible[rng.integers(len(eligible))])
    others = [i for i in range(len(clusters)) if i != source]
    target = int(others[rng.integers(len(others))])
    members = clusters[source]
    return Move(source, target, members[int(rng.integers(len(members)))])


def apply_move(clusters: Sequence[Sequence[str]], move: Move) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The members of `move.source` and `move.target` after the move (sorted); the other clusters do not change."""
    source = tuple(sorted(m for m in clusters[move.source] if m != move.task))
    return source, tuple(sorted([*clusters[move.target], move.task]))


def canonical_partition(clusters: Sequence[Sequence[str]]) -> list[list[str]]:
    """Sort the members of each cluster, and the clusters by their first member, so equal partitions compare equal."""
    return sorted((sorted(c) for c in clusters), key=lambda c: c[0] if c else "")


def balanced_random_partition(names: Sequence[str], num_clusters: int, rng: np.random.Generator) -> list[list[str]]:
    """Shuffle `names` and deal them round-robin into `num_clusters` clusters (sizes differ by at most one).

    Example:
        ```python
        >>> import numpy as np
        >>> sorted(len(c) for c in balanced_random_partition(list("abcdefg"), 3, np.random.default_rng(0)))
        [2, 2, 3]
        ```
    """
    _check_k(len(names), num_clusters)
    order = rng.permutation(len(names))
    clusters: list[list[str]] = [[] for _ in range(num_clusters)]
    for position, index in enumerate(order):
        clusters[position % num_clusters].append(names[index])
    return [sorted(c) for c in clusters]


def fill_empty_clusters(labels: Sequence[int], num_clusters: int) -> list[int]:
    """Make every cluster label in `0..num_clusters-1` used at least once, deterministically.

    K-means can return fewer distinct labels than asked (duplicate points). An empty cluster takes one member from
    the currently largest cluster (lowest label on ties, the last member of it in input order).
    """
    labels = [int(x) for x in labels]
    _check_k(len(labels), num_clusters)
    for empty in range(num_clusters):
        if empty in labels:
            continue
        sizes = [labels.count(c) for c in range(num_clusters)]
        donor = max(range(num_clusters), key=lambda c: (sizes[c], -c))
        last = max(i for i, label in enumerate(labels) if label == donor)
        labels[last] = empty
    return labels


def labels_to_partition(names: Sequence[str], labels: Sequence[int], num_clusters: int) -> list[list[str]]:
    """Group `names` by `labels` into `num_clusters` clusters (empty ones refilled by `fill_empty_clusters`)."""
    labels = fill_empty_clusters(labels, num_clusters)
    clusters: list[list[str]] = [[] for _ in range(num_clusters)]
    for name, label in zip(names, labels, strict=True):
        clusters[label].append(name)
    return [sorted(c) for c in clusters]


@dataclass
class SearchState:
    """Everything needed to continue a D2C search: the partition, the step reached and the history so far."""

    clusters: list[list[str]]
    iteration: int = 0
    rejections_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # What the steps have cost so far, in the caller's `cost` units (forward passes), for `max_cost`.
    spent: float = 0.0
    # `objective="partition"`: every task's loss under its current cluster, kept across a checkpoint so that a
    # resumed search asks the scorer for nothing an uninterrupted one would not (the same cache hits).
    task_losses: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (used by checkpoints)."""
        return {
            "clusters": [list(c) for c in self.clusters],
            "iteration": self.iteration,
            "rejections_in_a_row": self.rejections_in_a_row,
            "history": [dict(h) for h in self.history],
            "spent": self.spent,
            "task_losses": dict(self.task_losses),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchState:
        """Inverse of `to_dict`; the keys of older searches (`restart`, `phase`, `finished`, `queue`, `budget`) are
        ignored."""
        return cls(
            clusters=[list(c) for c in data["clusters"]],
            iteration=int(data["iteration"]),
            rejections_in_a_row=int(data["rejections_in_a_row"]),
            history=[dict(h) for h in data["history"]],
            spent=float(data.get("spent", 0.0)),
            task_losses={str(t): float(x) for t, x in data.get("task_losses", {}).items()},
        )


def d2c_search(
    clusters: Sequence[Sequence[str]],
    score_fn: BatchScoreFn,
    rng: np.random.Generator,
    *,
    num_iterations: int,
    patience: int | None = None,
    state: SearchState | None = None,
    on_step: Callable[[SearchState], None] | None = None,
    proposals_per_step: int = 1,
    objective: str = "task",
    cost: Callable[[], float] | None = None,
    max_cost: float | None = None,
) -> SearchState:
    """Run Algorithm 1: propose moving one adapter between clusters, keep the move if its task's loss drops.

    Each step draws a source cluster c (among those with at least two members), a target c' != c and an adapter t
    of c, then compares the loss of task t under merge(c) with its loss under merge(c' + t). With
    `proposals_per_step=p > 1`, a step draws p such candidate moves (independently, from the same partition, so a
    move may repeat), scores their 2p requests in one `score_fn` call, and applies only the candidate with the
    largest loss drop (the first one drawn on ties), if that drop is positive.

    Args:
        clusters (`Sequence[Sequence[str]]`):
            The start partition (K non-empty clusters of adapter names).
        score_fn (`BatchScoreFn`):
            Called with a list of `(members, task)` pairs (members sorted), returns their losses (lower is better).
        rng (`np.random.Generator`):
            The only source of randomness of the search.
        num_iterations (`int`):
            T, the number of steps (counted over the whole search, a resumed state included).
        patience (`int`, *optional*):
            Stop after this many steps in a row without an accepted move.
        state (`SearchState`, *optional*):
            A state to continue from (its partition replaces `clusters`); the caller restores `rng` to match.
        on_step (`Callable[[SearchState], None]`, *optional*):
            Called after every step, e.g. for progress bars or checkpoints.
        proposals_per_step (`int`, defaults to 1):
            p, the number of candidate moves scored per step; 1 is the paper's Algorithm 1.
        objective (`str`, defaults to `"task"`):
            `"task"` (the paper's rule) compares the moved task's loss under merge(c) and merge(c' + t).
            `"partition"` compares the summed losses of every task of c and c' before the move (each under its
            cluster's merge) with the summed losses of every task of c - t and c' + t after it: the change of the
            total few-shot loss of the partition, which an accepted move therefore always lowers. Its records
            also carry `total_loss`, the total over all tasks after the step.
        cost (`Callable[[], float]`, *optional*):
            A counter that only grows (the scorer's forward passes); what each step adds to it is added to
            `state.spent`.
        max_cost (`float`, *optional*):
            Stop before a step once `state.spent` has reached it: a budget in `cost` units, next to T.

    Returns:
        `SearchState`: the final partition (cluster order kept from the start) and one history record per step
        with keys `iteration, task, source, target, loss_before, loss_after, accepted` (for p > 1, the best
        candidate's, plus `candidates` = p and `improving` = how many candidates lowered their loss; with
        `objective="partition"` the losses are the sums over the two clusters' tasks, plus `total_loss`).

    Raises:
        ValueError: If a cluster is empty, an adapter appears twice, `proposals_per_step` < 1 or `objective` is
            unknown.

    Example:
        ```python
        >>> import numpy as np
        >>> groups = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
        >>> def score(requests):  # the share of the cluster's members from another group than the task's
        ...     return [sum(groups[m] != groups[t] for m in members) / len(members) for members, t in requests]
        >>> final = d2c_search([["a1", "b1"], ["a2", "b2"]], score, np.random.default_rng(0), num_iterations=30)
        >>> canonical_partition(final.clusters)
        [['a1', 'a2'], ['b1', 'b2']]
        ```
    """
    if isinstance(proposals_per_step, bool) or not isinstance(proposals_per_step, int) or proposals_per_step < 1:
        raise ValueError(f"`proposals_per_step` must be an int >= 1, got {proposals_per_step!r}.")
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {list(OBJECTIVES)}, got {objective!r}.")
    if state is None:
        state = SearchState(clusters=[sorted(c) for c in clusters])
    _check_partition(state.clusters)
    num_clusters = len(state.clusters)
    if num_clusters < 2 or all(len(c) == 1 for c in state.clusters):
        return state  # K = 1 or K = N: a single possible partition, nothing to search.

    current = state.task_losses  # updated in place: the state carries it into a checkpoint
    while state.iteration < num_iterations:
        if patience is not None and state.rejections_in_a_row >= patience:
            break
        if max_cost is not None and state.spent >= max_cost:
            break
        cost_before = cost() if cost is not None else 0.0
        # Draw every candidate before scoring any: the random draws then never depend on this step's scores, so a
        # distributed caller can split the batch freely and every process keeps the same random stream.
        candidates = [draw_move(state.clusters, rng) for _ in range(proposals_per_step)]
        if objective == "task":
            groups = [_task_requests(state.clusters, move) for move in candidates]
        else:
            if not current:  # every task's loss under its cluster (memoised by the caller's scorer)
                current.update(partition_losses(state.clusters, score_fn))
            groups = [_partition_requests(state.clusters, move) for move in candidates]
        requests = [r for before, after in groups for r in (*before, *after)]
        losses = [float(x) for x in score_fn(requests)]
        if len(losses) != len(requests):
            raise ValueError(f"`score_fn` returned {len(losses)} losses for {len(requests)} requests.")
        sums, offset = [], 0
        for before, after in groups:  # (loss before, loss after) of every candidate
            sums.append(
                (
                    sum(losses[offset : offset + len(before)]),
                    sum(losses[offset + len(before) : offset + len(before) + len(after)]),
                )
            )
            offset += len(before) + len(after)
        best = 0
        for index in range(1, len(candidates)):
            if sums[index][0] - sums[index][1] > sums[best][0] - sums[best][1]:
                best = index
        move = candidates[best]
        source, target, task = move.source, move.target, move.task
        loss_before, loss_after = sums[best]
        accepted = loss_after < loss_before
        if accepted:
            state.clusters[source], state.clusters[target] = map(list, apply_move(state.clusters, move))
            state.rejections_in_a_row = 0
            if objective == "partition":
                current.update(partition_losses([state.clusters[source], state.clusters[target]], score_fn))
        else:
            state.rejections_in_a_row += 1
        record: dict[str, Any] = {
            "iteration": state.iteration,
            "task": task,
            "source": source,
            "target": target,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "accepted": accepted,
        }
        if proposals_per_step > 1:
            record["candidates"] = proposals_per_step
            record["improving"] = sum(after < before for before, after in sums)
        if objective == "partition":
            record["total_loss"] = total_loss(current)
        state.history.append(record)
        state.iteration += 1
        if cost is not None:
            state.spent += cost() - cost_before
        if on_step is not None:
            on_step(state)
    return state


def partition_losses(clusters: Sequence[Sequence[str]], score_fn: BatchScoreFn) -> dict[str, float]:
    """The loss of every task under the merge of the cluster holding it, in one `score_fn` call."""
    requests = [(tuple(sorted(c)), task) for c in clusters for task in sorted(c)]
    return {task: float(loss) for (_, task), loss in zip(requests, score_fn(requests), strict=True)}


def total_loss(losses: dict[str, float]) -> float:
    """The sum of per-task losses in task-name order (the same float however the dict was filled)."""
    return sum(losses[task] for task in sorted(losses))


def _task_requests(clusters: Sequence[Sequence[str]], move: Move):
    """The paper's two requests for a move: task t under merge(c), and under merge(c' + t)."""
    return [(tuple(clusters[move.source]), move.task)], [
        (tuple(sorted([*clusters[move.target], move.task])), move.task)
    ]


def _partition_requests(clusters: Sequence[Sequence[str]], move: Move):
    """Every task of c and c' under their merges now, and every task of both clusters under theirs after the move
    (c - t and c' + t)."""
    before = [(tuple(sorted(clusters[i])), m) for i in (move.source, move.target) for m in sorted(clusters[i])]
    shrunk, grown = apply_move(clusters, move)
    return before, [(shrunk, m) for m in shrunk] + [(grown, m) for m in grown]


def _check_k(num_items: int, num_clusters: int) -> None:
    if not 1 <= num_clusters <= num_items:
        raise ValueError(f"`num_clusters` must be between 1 and {num_items}, got {num_clusters}.")


def _check_partition(clusters: Sequence[Sequence[str]]) -> None:
    if any(len(c) == 0 for c in clusters):
        raise ValueError(f"Every cluster of a partition must be non-empty, got sizes {[len(c) for c in clusters]}.")
    names = [m for c in clusters for m in c]
    if len(names) != len(set(names)):
        raise ValueError("An adapter appears in more than one cluster of the partition.")


def gram_embedding(gram: np.ndarray) -> np.ndarray:
    """Points whose inner products are `gram`: row i of the result stands for adapter i.

    For features X (one flattened update per row), `gram = X @ X.T`; the returned N x N matrix U·sqrt(Λ) of its
    eigendecomposition has exactly the same pairwise distances and inner products as X, so K-means and truncated SVD
    on it give the results they would give on X, without ever holding the (N x millions) matrix X in memory.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"`gram` must be a square matrix, got shape {gram.shape}.")
    eigenvalues, eigenvectors = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(eigenvalues)[::-1]  # largest first, as SVD orders its components
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    return eigenvectors[:, order] * np.sqrt(eigenvalues)


def kmeans_partition(
    names: Sequence[str],
    gram: np.ndarray,
    num_clusters: int,
    *,
    seed: int,
    svd_components: int | None = None,
) -> list[list[str]]:
    """K-means baselines: cluster adapters by their flattened full updates, optionally after truncated SVD.

    Args:
        names (`Sequence[str]`): Adapter names, in the row order of `gram`.
        gram (`np.ndarray`): N x N inner products of the flattened updates ΔW = B·A·scaling of every module.
        num_clusters (`int`): K.
        seed (`int`): `random_state` of scikit-learn's KMeans.
        svd_components (`int`, *optional*):
            `None` clusters the updates themselves (the `kmeans` baseline). An int keeps that many truncated-SVD
            components and normalises each embedding to unit length, so K-means groups by cosine similarity (the
            `kmeans_svd` baseline, as in Model-Based Clustering, Ostapenko et al. 2024).

    Returns:
        `list[list[str]]`: K non-empty clusters (an empty K-means cluster is refilled by `fill_empty_clusters`).
    """
    from sklearn.cluster import KMeans  # heavy (scipy); only the K-means baselines and inits need it

    _check_k(len(names), num_clusters)
    points = gram_embedding(gram)
    if svd_components is not None:
        points = points[:, : max(1, min(svd_components, len(names) - 1))]
        norms = np.linalg.norm(points, axis=1, keepdims=True)
        points = points / np.where(norms > 0, norms, 1.0)
    if num_clusters == 1:
        return [sorted(names)]
    labels = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(points)
    return labels_to_partition(names, labels, num_clusters)
