"""Gradient-free tuning of one cluster's merge weights on its few-shot loss (pure: no torch, no model).

LoraHub (Huang et al., COLM 2024) tunes the weights of a LoRA combination on a handful of examples with a
gradient-free optimiser. `search_weights` does the same with the simplest seeded evolution strategy, a (1+1)-ES
with the one-fifth success rule (Rechenberg; Auger & Hansen's tutorial): the weights are the default weights of the
merge times factors in `[low, high]`, starting at 1 (the untuned merge), so the result is never worse on the
objective than the untuned merge, and every evaluation is counted against `budget`.

Example:
    ```python
    >>> result = search_weights(lambda w: (w[0] - 0.3) ** 2 + (w[1] - 0.8) ** 2, [0.5, 0.5], budget=200, seed=0)
    >>> [round(w, 1) for w in result.weights], result.evaluations
    ([0.3, 0.8], 200)
    ```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["WeightSearchResult", "search_weights"]

# One-fifth success rule: grow the step by this factor after a success, shrink it by its fourth root after a failure
# (the step then stays put when one proposal in five succeeds).
_STEP_GROWTH = 1.5


@dataclass
class WeightSearchResult:
    """What `search_weights` found.

    Attributes:
        weights (`list[float]`): The best weights evaluated (the initial ones if nothing was better).
        value (`float`): The objective at `weights`.
        initial_value (`float`): The objective at the initial weights.
        evaluations (`int`): Objective calls made (`budget`, or 1 for a single member, which has nothing to tune).
        history (`list[tuple[int, float]]`): `(evaluations so far, best value)` after every accepted proposal.
    """

    weights: list[float]
    value: float
    initial_value: float
    evaluations: int
    history: list[tuple[int, float]] = field(default_factory=list)


def search_weights(
    objective: Callable[[list[float]], float],
    initial: Sequence[float],
    *,
    budget: int,
    seed: int,
    step: float = 0.3,
    low: float = 0.0,
    high: float = 2.0,
) -> WeightSearchResult:
    """Minimise `objective(weights)` over weights `initial[i] * f_i` with factors f_i in `[low, high]`.

    Args:
        objective (`Callable[[list[float]], float]`): E.g. the mean few-shot loss of a cluster's tasks under the merge
            with these weights.
        initial (`Sequence[float]`): The merge's default weights (`engine.merge.merging.merge_weights_for`).
        budget (`int`): Objective calls, the initial weights' included (>= 1).
        seed (`int`): Seed of the proposals.
        step (`float`, defaults to 0.3): Initial standard deviation of the factor proposals.
        low (`float`, defaults to 0.0), high (`float`, defaults to 2.0): Bounds of the factors.

    Returns:
        `WeightSearchResult`.

    Raises:
        ValueError: If `budget` < 1, `initial` is empty, or the bounds do not contain 1.
    """
    if budget < 1:
        raise ValueError(f"`budget` must be >= 1, got {budget}.")
    if not initial:
        raise ValueError("`initial` must hold at least one weight.")
    if not low <= 1.0 <= high:
        raise ValueError(f"The factor bounds must contain 1 (the untuned merge), got [{low}, {high}].")
    base = np.asarray(initial, dtype=float)
    factors = np.ones_like(base)
    best = float(objective(base.tolist()))
    result = WeightSearchResult(base.tolist(), best, best, 1, [(1, best)])
    if len(base) == 1:  # a single adapter: its own weights, nothing to tune
        return result
    rng = np.random.default_rng(seed)
    sigma = step
    while result.evaluations < budget:
        proposal = np.clip(factors + sigma * rng.standard_normal(len(base)), low, high)
        value = float(objective((base * proposal).tolist()))
        result.evaluations += 1
        if value < best and math.isfinite(value):
            factors, best = proposal, value
            result.weights, result.value = (base * proposal).tolist(), value
            result.history.append((result.evaluations, value))
            sigma *= _STEP_GROWTH
        else:
            sigma *= _STEP_GROWTH ** (-0.25)
    return result
