"""The paper's steps, then partition steps that may spend only what the paper's steps spent.

Pure, like `peft_d2c.engine.search.loop`. Why two phases: at K = 2 a partition step scores every task, so 30 of them
cost 2-3x the paper's 100 steps, whose losses are mostly cached (docs/benchmark.md). Starting the partition steps
where the paper's rule ended, with a budget of what it spent, bounds both what the user gets and what it costs:

- the first phase is Algorithm 1 exactly (the same draws and decisions as `d2c_search(objective="task")`), on the
  paper's loss (`paper_score_fn`) whatever the second phase scores;
- the second accepts a move only if the total few-shot score (`score_fn`) drops, so the partition it returns never
  has a higher total score than the paper's end;
- the second stops before a step once it has spent as much as the first (`SearchState.budget`), so the whole search
  costs at most twice the paper's steps plus one partition step (and the final pass, if asked for).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .loop import BatchScoreFn, SearchState, d2c_search
from .search_robust import polish


def paper_then_partition(
    clusters,
    score_fn: BatchScoreFn,
    rng: np.random.Generator,
    *,
    num_iterations: int,
    cost: Callable[[], float],
    max_cost: float | None = None,
    patience: int | None = None,
    proposal: str = "random",
    proposals_per_step: int = 1,
    final_pass: bool = False,
    state: SearchState | None = None,
    on_step: Callable[[SearchState], None] | None = None,
    paper_score_fn: BatchScoreFn | None = None,
) -> SearchState:
    """Run T steps of the paper's rule, then at most T partition steps within the passes the first T spent.

    Args:
        clusters (`Sequence[Sequence[str]]`): The start partition.
        score_fn (`BatchScoreFn`): As for `d2c_search`: the score of the second phase and the final pass.
        rng (`np.random.Generator`): The draws of both phases, one after the other.
        num_iterations (`int`): T, the steps of the paper's phase (the second phase has at most as many).
        cost (`Callable[[], float]`): A counter that only grows (the scorer's forward passes): what the first phase
            adds to it is the second phase's budget.
        max_cost (`float`, *optional*): A budget of the first phase in `cost` units (`max_forward_passes`).
        patience (`int`, *optional*): Per phase, stop after this many rejections in a row.
        proposal (`str`, defaults to `"random"`): The second phase's proposals (see `d2c_search`); the first
            always draws the paper's.
        proposals_per_step (`int`, defaults to 1): p of the second phase (see `d2c_search`).
        final_pass (`bool`, defaults to `False`): Polish the result with `search_robust.polish` (not budgeted).
        state (`SearchState`, *optional*): A checkpointed state to continue (the caller restores `rng`).
        on_step (`Callable[[SearchState], None]`, *optional*): Called after every step and every final-pass move.
        paper_score_fn (`BatchScoreFn`, *optional*): The first phase's score (the paper's loss, when the second
            phase scores another); defaults to `score_fn`.

    Returns:
        `SearchState`: the final partition; `history` holds the paper's records, then the second phase's
        (`objective="partition"` records, tagged `phase: "partition"`), then any final-pass moves; `budget` is what
        the first phase spent and `spent` what the second did; `phase` is `"done"`.

    Example:
        ```python
        >>> import numpy as np
        >>> groups = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
        >>> def score(requests):  # the share of the cluster's members from another group than the task's
        ...     return [sum(groups[m] != groups[t] for m in members) / len(members) for members, t in requests]
        >>> calls = []
        >>> def counting(requests):
        ...     calls.append(len(requests))
        ...     return score(requests)
        >>> final = paper_then_partition(
        ...     [["a1", "b1"], ["a2", "b2"]], counting, np.random.default_rng(0), num_iterations=10, cost=lambda: len(calls)
        ... )
        >>> sorted(final.clusters), final.spent <= final.budget + 2
        ([['a1', 'a2'], ['b1', 'b2']], True)
        ```
    """
    if state is None:
        state = SearchState(clusters=[sorted(c) for c in clusters])
    if state.phase == "search":
        state = d2c_search(
            state.clusters,
            paper_score_fn or score_fn,
            rng,
            num_iterations=num_iterations,
            patience=patience,
            state=state,
            on_step=on_step,
            objective="task",
            cost=cost,
            max_cost=max_cost,
        )
        # The second phase's budget is what the first spent; its steps count from T on.
        state.phase, state.budget, state.spent = "partition", state.spent, 0.0
        state.iteration, state.rejections_in_a_row, state.queue = num_iterations, 0, []
    if state.phase == "partition":
        state = d2c_search(
            state.clusters,
            score_fn,
            rng,
            num_iterations=2 * num_iterations,
            patience=patience,
            state=state,
            on_step=_tagging(on_step),
            objective="partition",
            proposal=proposal,
            proposals_per_step=proposals_per_step,
            cost=cost,
            max_cost=state.budget,
        )
        state.phase = "final" if final_pass else "done"
    if state.phase == "final":
        polish(state, score_fn, on_step=on_step)
        state.phase = "done"
    return state


def _tagging(on_step: Callable[[SearchState], None] | None) -> Callable[[SearchState], None]:
    """Wrap `on_step` so that every record of the second phase carries `phase: "partition"`."""

    def wrapped(state: SearchState) -> None:
        state.history[-1]["phase"] = "partition"
        if on_step is not None:
            on_step(state)

    return wrapped
