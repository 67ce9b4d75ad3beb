"""Restarts and a final pass around the D2C loop: a search that does not depend on its random start.

Pure, like `peft_d2c.engine.search.loop`: it sees adapters only by name and asks a batch `score_fn` for losses, so toy
score functions drive it in tests. Three levers, measured in docs/benchmark.md:

- the whole-partition objective (`objective="partition"` of `d2c_search`): a move is kept only if the summed loss
  of every task of the two clusters it changes drops, so the total few-shot loss never rises;
- restarts: R start partitions, each searched for its share of the T steps; the partition with the lowest total
  few-shot loss is kept (ties: the earliest start);
- a final pass: from the kept partition, try every single move (task t to every other cluster, tasks in name
  order), apply the best improving one of each task, and repeat until a whole sweep improves nothing. The result
  is then a local optimum of the total loss under single moves.

With one start, no final pass and `objective="task"` this is exactly `d2c_search` (the paper's Algorithm 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from .loop import BatchScoreFn, SearchState, _check_partition, d2c_search, partition_losses, total_loss

logger = logging.getLogger(__name__)

# A final-pass change must lower the total few-shot loss by more than this fraction of it (see `_lowers`).
_RELATIVE_IMPROVEMENT = 1e-9


def restart_budgets(num_iterations: int, num_starts: int) -> list[int]:
    """Split T steps over R starts: the cumulative step count at which each start ends (earlier starts get the
    remainder), e.g. `restart_budgets(10, 3) == [4, 7, 10]`."""
    share, extra = divmod(num_iterations, num_starts)
    ends, total = [], 0
    for index in range(num_starts):
        total += share + (index < extra)
        ends.append(total)
    return ends


def robust_search(
    starts: Sequence[Sequence[Sequence[str]]],
    score_fn: BatchScoreFn,
    rng: np.random.Generator,
    *,
    num_iterations: int,
    objective: str = "partition",
    final_pass: bool = True,
    patience: int | None = None,
    proposals_per_step: int = 1,
    proposal: str = "random",
    restart_seed: int | None = None,
    only_starts: Sequence[int] | None = None,
    cost: Callable[[], float] | None = None,
    max_cost: float | None = None,
    state: SearchState | None = None,
    on_step: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Search from every start in turn, keep the partition with the lowest total loss, optionally polish it.

    Args:
        starts (`Sequence[partition]`):
            R start partitions (each K non-empty clusters of the same adapters). `starts[0]` is the run's usual
            start (the `init` partition), so restart 0 is the search a single-start run would do.
        score_fn (`BatchScoreFn`): As for `d2c_search`.
        rng (`np.random.Generator`): The proposals of every start, drawn one start after the other.
        num_iterations (`int`): T, the steps of all starts together (split by `restart_budgets`).
        objective (`str`, defaults to `"partition"`): The acceptance rule of the steps (see `d2c_search`).
        final_pass (`bool`, defaults to `True`): Polish the kept partition with single moves (see the module).
        patience (`int`, *optional*): Per start, stop its steps after this many rejections in a row.
        proposals_per_step (`int`, defaults to 1): As for `d2c_search`.
        proposal (`str`, defaults to `"random"`): As for `d2c_search`; each start begins a fresh round.
        restart_seed (`int`, *optional*):
            Start r >= 1 draws its proposals from a generator seeded by `[restart_seed, r, 1]` (set into `rng` when
            the start begins, so a checkpoint of `rng` stays valid), which makes each start's search independent of
            the others' and lets processes search different starts (`only_starts`). Without it the starts continue
            the draws of `rng` one after the other. Start 0 always draws from `rng`.
        only_starts (`Sequence[int]`, *optional*):
            Search only these starts (each still ends at its step count of the whole run) and return without
            choosing or polishing (`phase` stays `"search"`): one process's share, for `combine_starts`.
        cost (`Callable[[], float]`, *optional*), max_cost (`float`, *optional*):
            A budget of the steps of all starts together, in `cost` units (see `d2c_search`), split between the
            starts like T (`restart_budgets`); the final pass is not limited by it.
        state (`SearchState`, *optional*): A checkpointed state to continue (the caller restores `rng`).
        on_step (`Callable[[SearchState], None]`, *optional*): Called after every step and every final-pass move.

    Returns:
        `SearchState`: the kept partition; `history` holds every start's records (with key `restart`) and the final
        pass's moves (`phase: "final"`); `finished` one summary per start (`index`, `start`, `clusters`,
        `total_loss`, `steps`); `phase` is `"done"`.

    Raises:
        ValueError: If there is no start, or the starts are not partitions of the same adapters.

    Example:
        ```python
        >>> import numpy as np
        >>> groups = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
        >>> def score(requests):  # the share of the cluster's members from another group than the task's
        ...     return [sum(groups[m] != groups[t] for m in members) / len(members) for members, t in requests]
        >>> starts = [[["a1", "b1"], ["a2", "b2"]], [["a1", "a2", "b1"], ["b2"]]]
        >>> final = robust_search(starts, score, np.random.default_rng(0), num_iterations=4)
        >>> sorted(final.clusters)
        [['a1', 'a2'], ['b1', 'b2']]
        ```
    """
    if not starts:
        raise ValueError("`starts` must hold at least one start partition.")
    names = sorted(m for c in starts[0] for m in c)
    for start in starts:
        _check_partition(start)
        if sorted(m for c in start for m in c) != names or len(start) != len(starts[0]):
            raise ValueError("Every start must be a partition of the same adapters into the same number of clusters.")
    ends = restart_budgets(num_iterations, len(starts))
    if max_cost is not None:  # each start's share of the budget (the integer split of T, on the budget)
        cost_ends = restart_budgets(int(max_cost), len(starts))
        cost_shares = [end - (cost_ends[i - 1] if i else 0) for i, end in enumerate(cost_ends)]
    indices = list(range(len(starts))) if only_starts is None else sorted(set(only_starts))
    if state is None:
        state = SearchState(clusters=[sorted(c) for c in starts[0]])
    if not indices:
        return state

    def begin(index: int) -> None:
        state.restart = index
        state.clusters = [sorted(c) for c in starts[index]]
        state.iteration = ends[index - 1] if index else 0
        state.rejections_in_a_row = 0
        state.queue = []
        state.spent = 0.0
        if index and restart_seed is not None:
            rng.bit_generator.state = np.random.default_rng([restart_seed, index, 1]).bit_generator.state

    if state.phase == "search" and state.restart not in indices:
        begin(indices[0])  # a share that does not hold start 0
    while state.phase != "done":
        index = state.restart
        if state.phase == "search":
            state = d2c_search(
                state.clusters,
                score_fn,
                rng,
                num_iterations=ends[index],
                patience=patience,
                state=state,
                on_step=_tagging(on_step, index, len(starts)),
                proposals_per_step=proposals_per_step,
                objective=objective,
                proposal=proposal,
                cost=cost,
                max_cost=None if max_cost is None else cost_shares[index],
            )
            total = total_loss(partition_losses(state.clusters, score_fn))
            state.finished.append(
                {
                    "index": index,
                    "start": [sorted(c) for c in starts[index]],
                    "clusters": [list(c) for c in state.clusters],
                    "total_loss": total,
                    "steps": sum(1 for h in state.history if h.get("restart", 0) == index and "phase" not in h),
                }
            )
            later = [i for i in indices if i > index]
            if later:
                begin(later[0])
                continue
            if only_starts is not None:
                return state
            choose_best_start(state, final_pass=final_pass)
        if state.phase == "final":
            polish(state, score_fn, on_step=on_step)
            state.phase = "done"
    return state


def choose_best_start(state: SearchState, *, final_pass: bool) -> SearchState:
    """Keep the finished start with the lowest total loss (ties: the earliest) and move on to the final pass (or
    to `"done"` without one)."""
    best = min(range(len(state.finished)), key=lambda i: (state.finished[i]["total_loss"], i))
    state.clusters = [list(c) for c in state.finished[best]["clusters"]]
    state.phase = "final" if final_pass else "done"
    return state


def combine_starts(shares: Sequence[SearchState], num_starts: int) -> SearchState:
    """One state from the shares of `robust_search(..., only_starts=...)` that together searched every start.

    The history and the finished summaries are put in start order, which is the order one process searching every
    start in turn (with the same `restart_seed`) records them in; `iteration` is the last start's.

    Raises:
        ValueError: If the shares do not hold every start exactly once.
    """
    finished = sorted((f for share in shares for f in share.finished), key=lambda f: f["index"])
    if [f["index"] for f in finished] != list(range(num_starts)):
        raise ValueError(
            f"The shares searched starts {[f['index'] for f in finished]}, not each of {num_starts} once."
        )
    history = sorted((h for share in shares for h in share.history), key=lambda h: h.get("restart", 0))
    last = max((share for share in shares if share.finished), key=lambda share: share.finished[-1]["index"])
    combined = SearchState(clusters=[list(c) for c in last.clusters], iteration=last.iteration, history=history)
    combined.restart = num_starts - 1
    combined.finished = finished
    return combined


def polish(
    state: SearchState,
    score_fn: BatchScoreFn,
    *,
    on_step: Callable[[SearchState], None] | None = None,
    max_sweeps: int = 100,
) -> SearchState:
    """The final pass: apply improving single moves and singleton relocations until none is left.

    A sweep takes every task t (name order) of a cluster with at least two members, scores its K - 1 moves in one
    `score_fn` call (the summed losses of the two clusters' tasks before and after, as the partition objective) and
    applies the best one if it lowers the total. A single move can never take the only member u of a cluster away,
    so when a sweep applies nothing, each singleton {u} is tried once more: u joins another cluster c' and some
    task t of a cluster that keeps at least one member takes u's place (the best such pair, if it lowers the
    total). Sweeps repeat until neither applies anything (at most `max_sweeps`; a change counts only when it lowers
    the total by more than rounding, see `_lowers`): the result is a local optimum of both. Every applied
    change is appended to `state.history` as `{"phase": "final", "task", "source", "target", "loss_before",
    "loss_after", "accepted": True, "total_loss"}` (a relocation also has `"relocated": u`). No random draws.
    """
    current = partition_losses(state.clusters, score_fn)
    for _ in range(max_sweeps):
        improved = False
        for task in sorted(current):
            improved |= _best_single_move(state, score_fn, current, task, on_step)
        if improved:
            continue
        for slot in range(len(state.clusters)):
            if len(state.clusters[slot]) == 1:
                improved |= _best_relocation(state, score_fn, current, slot, on_step)
        if not improved:
            return state
    logger.warning("The final pass stopped after max_sweeps=%d sweeps that each still improved the total.", max_sweeps)
    return state


def _lowers(before: float, after: float) -> bool:
    """Whether `after` is a real improvement on `before`, not a rounding difference.

    The two are sums of (mostly) the same losses in another order, so equal totals can differ in their last bits;
    taking such a difference for an improvement lets two moves undo each other for ever (seen with scores
    quantised to 0.1). An improvement must exceed `_RELATIVE_IMPROVEMENT` of the total.
    """
    return after < before - _RELATIVE_IMPROVEMENT * max(abs(before), abs(after), 1.0)


def _apply(state, current, changes, record, on_step) -> bool:
    """Set the changed clusters (`{index: members}` with their losses), log the record, report an improvement."""
    for index, (members, losses) in changes.items():
        state.clusters[index] = list(members)
        current.update(losses)
    state.history.append({"phase": "final", **record, "accepted": True, "total_loss": total_loss(current)})
    if on_step is not None:
        on_step(state)
    return True


def _score(score_fn: BatchScoreFn, clusters: list[tuple[str, ...]]) -> dict[tuple[tuple[str, ...], str], float]:
    requests = list(dict.fromkeys((c, m) for c in clusters for m in c))
    return dict(zip(requests, (float(x) for x in score_fn(requests)), strict=True))


def _best_single_move(state, score_fn, current, task, on_step) -> bool:
    clusters = state.clusters
    source = next(i for i, c in enumerate(clusters) if task in c)
    if len(clusters[source]) < 2 or len(clusters) < 2:
        return False
    shrunk = tuple(m for m in clusters[source] if m != task)
    grown = {i: tuple(sorted([*clusters[i], task])) for i in range(len(clusters)) if i != source}
    losses = _score(score_fn, [shrunk, *grown.values()])
    moves = []
    for i, members in grown.items():
        before = sum(current[m] for m in (*clusters[source], *clusters[i]))
        after = sum(losses[(shrunk, m)] for m in shrunk) + sum(losses[(members, m)] for m in members)
        moves.append((after - before, i, before, after))
    _, target, before, after = min(moves)
    if not _lowers(before, after):
        return False
    changes = {
        source: (shrunk, {m: losses[(shrunk, m)] for m in shrunk}),
        target: (grown[target], {m: losses[(grown[target], m)] for m in grown[target]}),
    }
    record = {"task": task, "source": source, "target": target, "loss_before": before, "loss_after": after}
    return _apply(state, current, changes, record, on_step)


def _best_relocation(state, score_fn, current, slot, on_step) -> bool:
    clusters = state.clusters
    (moved,) = clusters[slot]
    candidates = []
    for joined in range(len(clusters)):
        if joined == slot:
            continue
        for source in range(len(clusters)):
            members = [*clusters[source], moved] if source == joined else list(clusters[source])
            if source == slot or len(members) < 2:
                continue
            for task in sorted(m for m in members if m != moved):
                new = {slot: (task,), joined: tuple(sorted(m for m in [*clusters[joined], moved] if m != task))}
                if source != joined:
                    new[source] = tuple(m for m in clusters[source] if m != task)
                candidates.append((task, source, joined, new))
    losses = _score(score_fn, [c for *_, new in candidates for c in new.values()])
    best = None
    for task, source, joined, new in candidates:
        before = sum(current[m] for i in new for m in clusters[i])
        after = sum(losses[(c, m)] for c in new.values() for m in c)
        if best is None or after - before < best[0]:
            best = (after - before, task, source, joined, new, before, after)
    if best is None or not _lowers(best[5], best[6]):
        return False
    _, task, source, joined, new, before, after = best
    changes = {i: (c, {m: losses[(c, m)] for m in c}) for i, c in new.items()}
    record = {"task": task, "source": source, "target": slot, "loss_before": before, "loss_after": after}
    return _apply(state, current, changes, {**record, "relocated": moved, "joined": joined}, on_step)


def _tagging(on_step, index: int, num_starts: int):
    """Wrap `on_step` so that every step record of start `index` carries `restart` (only with several starts)."""

    def wrapped(state: SearchState) -> None:
        if num_starts > 1:
            state.history[-1]["restart"] = index
        if on_step is not None:
            on_step(state)

    return wrapped
