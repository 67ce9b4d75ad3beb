"""The search a run does, resolved once and recorded: `SearchPlan`.

Pure (the standard library and `peft_d2c.config`, which loads no torch). `SearchPlan.for_run` is the one place where
a search setting left at None gets its value; `peft_d2c.d2c` runs the plan, and the result (`stats["search_plan"]`),
its saved config (`D2CMergeConfig.resolved_for`), its model card and `evaluation.estimate` all read the same plan.

The default is the paper's Algorithm 1 (`rule="paper"`): a balanced random start, the paper's random moves, a move
kept if the moved task's mean completion loss drops, and T = ceil(100 x max(1, N / 16)) steps, so each adapter is
proposed as often as at N = 16. T is the only setting that changes with N or K. The one alternative rule,
`"partition"` (the summed loss of every task of the two clusters a move changes), takes T = ceil(30 x max(1, N / 16)).
No other variant won on both benchmark collections (docs/benchmark.md, "Defaults on two collections").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ...config import DEFAULT_STEPS, SEARCHES, D2CMergeConfig

# T grows with N above this many adapters (the 16 embedded tasks, where the defaults were measured): each adapter is
# then proposed as often on average as there.
REFERENCE_N = 16


def default_steps(rule: str, num_adapters: int) -> int:
    """T of `rule` over `num_adapters` adapters when `num_iterations` is None: `DEFAULT_STEPS[rule]` (100 paper
    steps, 30 partition steps) x max(1, N / `REFERENCE_N`), rounded up.

    Example:
        ```python
        >>> [default_steps("paper", n) for n in (8, 16, 17, 40)]
        [100, 100, 107, 250]
        ```
    """
    return math.ceil(DEFAULT_STEPS[rule] * max(1, num_adapters / REFERENCE_N))


@dataclass(frozen=True)
class SearchPlan:
    """What one D2C search runs: every search setting with its value, none left at None but the two limits.

    Attributes:
        rule (`str`): `"paper"` (Algorithm 1: the moved task's loss) or `"partition"` (the summed loss of every task
            of the two clusters a move changes).
        num_iterations (`int`): T, the steps.
        init (`str`): The start partition: `"random"` (balanced), `"kmeans"` or `"kmeans_svd"`.
        proposals_per_step (`int`): p, the candidate moves scored per step (1: the paper's).
        patience (`int`, *optional*): Stop after this many rejected steps in a row.
        max_forward_passes (`int`, *optional*): Stop before a step once the steps spent this many scoring passes.
        cross_fit_folds (`int`): F, the folds of the cross-fitted loss (`ScoringSettings.cross_fit_folds`); 1 is the
            paper's loss.
    """

    rule: str
    num_iterations: int
    init: str = "random"
    proposals_per_step: int = 1
    patience: int | None = None
    max_forward_passes: int | None = None
    cross_fit_folds: int = 1

    def __post_init__(self) -> None:
        if self.rule not in SEARCHES:
            raise ValueError(f"`rule` must be one of {list(SEARCHES)}, got {self.rule!r}.")

    @property
    def objective(self) -> str:
        """The acceptance objective of `loop.d2c_search`: `"task"` for the paper's rule, else `"partition"`."""
        return "task" if self.rule == "paper" else "partition"

    @classmethod
    def for_run(cls, config: D2CMergeConfig, num_adapters: int, num_clusters: int) -> SearchPlan:
        """The plan of a `method="d2c"` run of `config` over `num_adapters` adapters into `num_clusters` clusters.

        `search` None is `"paper"`, `init` None `"random"`; T is `num_iterations`, else `max_forward_passes` (the
        budget then ends the search: a step costs at least one pass unless all its losses are cached), else
        `default_steps(rule, N)`. K changes nothing.

        Raises:
            ValueError: If `config.method` is a baseline, which does not search.

        Example:
            ```python
            >>> from peft_d2c import D2CMergeConfig
            >>> SearchPlan.for_run(D2CMergeConfig(num_clusters=4), 40, 4)
            SearchPlan(rule='paper', num_iterations=250, init='random', proposals_per_step=1, patience=None, max_forward_passes=None, cross_fit_folds=1)
            ```
        """
        if config.method != "d2c":
            raise ValueError(f"`method={config.method!r}` is a baseline: it returns its partition without a search.")
        rule = config.search or "paper"
        if config.num_iterations is not None:
            steps = config.num_iterations
        elif config.max_forward_passes is not None:
            steps = config.max_forward_passes
        else:
            steps = default_steps(rule, num_adapters)
        return cls(
            rule=rule,
            num_iterations=steps,
            init=config.init or "random",
            proposals_per_step=config.proposals_per_step,
            patience=config.patience,
            max_forward_passes=config.max_forward_passes,
            cross_fit_folds=config.scoring.cross_fit_folds or 1,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-serialisable dict (`D2CResult.stats["search_plan"]`)."""
        return asdict(self)
