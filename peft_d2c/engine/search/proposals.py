"""Where the D2C search looks next: the paper's random moves, or rounds that propose every adapter in turn.

Pure (numpy only), like `peft_d2c.engine.search.loop`. A proposal is a `Move`: `task` leaves cluster `source` for
cluster `target`; with `swapped` set, that member of `target` goes the other way. A swap keeps both cluster sizes,
and it is the only change that can take the sole member of a cluster elsewhere, which a single move never may.

- `"random"` (the paper's Algorithm 1): a source cluster with at least two members, another target cluster and a
  task of the source, all uniformly. With N adapters and T steps an adapter is proposed about T/N times, and some
  never are when T is small against N.
- `"sweep"`: the adapters are proposed in rounds, each round a fresh random order of all N, so after r rounds every
  adapter has been proposed exactly r times whatever N is. The target is a uniformly drawn other cluster; the
  change is a move or a swap with a uniformly drawn member of the target, half and half (always a swap when the
  task is alone in its cluster). Swaps are the way out of a partition where no single move lowers the loss but
  two tasks would each be better in the other's cluster.

- `"targeted"`: as `"sweep"`, but the target is the cluster under whose current merge the task's own loss is
  lowest (one loss per other cluster, scored in one batch; the first such cluster on ties), so the proposals go
  where the task already fits. It costs K - 1 extra single-task losses per proposal.
- `"misfit"`: as `"targeted"`, but a round proposes the adapters in the order of how much better their task does
  under another cluster's current merge than under its own (largest gap first; scored for all N tasks at the start
  of the round, N x (K - 1) losses), so a search that can afford only a few steps spends them where a move is most
  likely to help.

Every random draw is made before any score of the step is known; the targeted choice depends only on losses that
every process holds (gathered), so processes that share the generator draw the same proposals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Share of the "sweep" proposals that are swaps when a plain move is also possible.
SWAP_SHARE = 0.5


@dataclass(frozen=True)
class Move:
    """`task` goes from cluster `source` to cluster `target`; `swapped` (a member of `target`) goes the other way."""

    source: int
    target: int
    task: str
    swapped: str | None = None


def draw_move(
    proposal: str,
    clusters: Sequence[Sequence[str]],
    rng: np.random.Generator,
    queue: list[str],
    score_fn: Callable[[Sequence[tuple[tuple[str, ...], str]]], Sequence[float]],
) -> Move:
    """The next proposal of kind `proposal` (one of `search_defaults.PROPOSALS`); `queue` is the current round's
    adapters not proposed yet (unused by `"random"`), `score_fn` the search's batch scorer (used by the targeted
    kinds)."""
    if proposal == "sweep":
        return draw_sweep_move(clusters, rng, queue)
    if proposal == "targeted":
        return draw_targeted_move(clusters, rng, queue, score_fn)
    if proposal == "misfit":
        return draw_misfit_move(clusters, rng, queue, score_fn)
    return draw_random_move(clusters, rng)


def draw_random_move(clusters: Sequence[Sequence[str]], rng: np.random.Generator) -> Move:
    """One proposal of Algorithm 1: a source cluster with >= 2 members, another target cluster, a task of source."""
    eligible = [i for i, c in enumerate(clusters) if len(c) >= 2]
    source = int(eligible[rng.integers(len(eligible))])
    others = [i for i in range(len(clusters)) if i != source]
    target = int(others[rng.integers(len(others))])
    members = clusters[source]
    return Move(source, target, members[int(rng.integers(len(members)))])


def draw_sweep_move(clusters: Sequence[Sequence[str]], rng: np.random.Generator, queue: list[str]) -> Move:
    """The next adapter of the current round, moved or swapped into a random other cluster.

    Args:
        clusters (`Sequence[Sequence[str]]`): The current partition (at least two clusters).
        rng (`np.random.Generator`): Draws the round orders, targets and swap partners.
        queue (`list[str]`): The adapters of the round not proposed yet, consumed in place; when it is empty a new
            round (a permutation of every adapter, in name order first) fills it. Saved with the search state.

    Returns:
        `Move`: the proposal (with `swapped` set for a swap).
    """
    task, source, others = _next_task(clusters, rng, queue)
    return _move_or_swap(clusters, rng, source, int(others[rng.integers(len(others))]), task)


def draw_targeted_move(
    clusters: Sequence[Sequence[str]],
    rng: np.random.Generator,
    queue: list[str],
    score_fn: Callable[[Sequence[tuple[tuple[str, ...], str]]], Sequence[float]],
) -> Move:
    """As `draw_sweep_move`, but into the other cluster whose current merge gives the task its lowest loss.

    `score_fn` takes `(members, task)` requests as the search's `BatchScoreFn`; it is asked for the task under each
    other cluster's members (not including the task), in cluster order, in one call.
    """
    task, source, others = _next_task(clusters, rng, queue)
    losses = [float(x) for x in score_fn([(tuple(sorted(clusters[i])), task) for i in others])]
    target = others[min(range(len(others)), key=lambda j: (losses[j], j))]
    return _move_or_swap(clusters, rng, source, target, task)


def draw_misfit_move(
    clusters: Sequence[Sequence[str]],
    rng: np.random.Generator,
    queue: list[str],
    score_fn: Callable[[Sequence[tuple[tuple[str, ...], str]]], Sequence[float]],
) -> Move:
    """As `draw_targeted_move`, but a new round orders the adapters by `misfit_order` instead of at random."""
    if not queue:
        queue.extend(misfit_order(clusters, score_fn))
    return draw_targeted_move(clusters, rng, queue, score_fn)


def misfit_order(
    clusters: Sequence[Sequence[str]], score_fn: Callable[[Sequence[tuple[tuple[str, ...], str]]], Sequence[float]]
) -> list[str]:
    """Every task, by how much lower its loss is under the best other cluster's merge than under its own cluster's
    (largest first, name order on ties); one `score_fn` call for the N x K losses."""
    owner = {m: i for i, c in enumerate(clusters) for m in c}
    members = [tuple(sorted(c)) for c in clusters]
    requests = [(members[i], task) for task in sorted(owner) for i in range(len(clusters))]
    losses = iter(float(x) for x in score_fn(requests))
    gaps = {}
    for task in sorted(owner):
        row = [next(losses) for _ in clusters]
        own = row.pop(owner[task])
        gaps[task] = own - min(row)
    return sorted(gaps, key=lambda task: (-gaps[task], task))


def _next_task(clusters: Sequence[Sequence[str]], rng: np.random.Generator, queue: list[str]):
    """The next task of the round (a new shuffled round when `queue` is empty), its cluster and the other clusters."""
    if not queue:
        names = sorted(m for c in clusters for m in c)
        queue.extend(names[int(i)] for i in rng.permutation(len(names)))
    task = queue.pop(0)
    source = next(i for i, c in enumerate(clusters) if task in c)
    return task, source, [i for i in range(len(clusters)) if i != source]


def _move_or_swap(clusters: Sequence[Sequence[str]], rng: np.random.Generator, source: int, target: int, task: str):
    """A move when the source keeps a member and the coin says so (`1 - SWAP_SHARE`), else a swap with a random
    member of the target."""
    if len(clusters[source]) >= 2 and rng.random() >= SWAP_SHARE:
        return Move(source, target, task)
    members = clusters[target]
    return Move(source, target, task, members[int(rng.integers(len(members)))])


def apply_move(clusters: Sequence[Sequence[str]], move: Move) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The members of `move.source` and `move.target` after the move (sorted); the other clusters do not change."""
    source = [m for m in clusters[move.source] if m != move.task]
    target = [m for m in clusters[move.target] if m != move.swapped]
    if move.swapped is not None:
        source.append(move.swapped)
    return tuple(sorted(source)), tuple(sorted([*target, move.task]))
