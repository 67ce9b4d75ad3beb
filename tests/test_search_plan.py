"""The one recorded search plan (`engine.search.plan.SearchPlan`) and the search settings a config refuses.

Pure: no model. The runs that record the plan are in tests/test_d2c.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from peft_d2c import D2CMergeConfig
from peft_d2c.engine.search.plan import REFERENCE_N, SearchPlan, default_steps


def plan(num_adapters: int, num_clusters: int = 2, **settings) -> SearchPlan:
    return SearchPlan.for_run(D2CMergeConfig(num_clusters=num_clusters, **settings), num_adapters, num_clusters)


class TestDefaultPlan:
    @pytest.mark.parametrize("num_adapters,steps", [(8, 100), (16, 100), (17, 107), (40, 250)])
    def test_the_default_is_the_papers_search_with_t_by_hand(self, num_adapters, steps):
        """T = ceil(100 x max(1, N / 16)): 100 up to 16 adapters, ceil(106.25) = 107 at 17, 250 at 40."""
        assert plan(num_adapters) == SearchPlan(rule="paper", num_iterations=steps, init="random")

    @pytest.mark.parametrize("num_adapters,steps", [(8, 30), (16, 30), (17, 32), (40, 75)])
    def test_the_partition_rule_takes_30_steps_scaled_the_same_way(self, num_adapters, steps):
        """ceil(30 x 17 / 16) = ceil(31.875) = 32, 30 x 40 / 16 = 75."""
        assert plan(num_adapters, search="partition") == SearchPlan(rule="partition", num_iterations=steps)

    @pytest.mark.parametrize(
        "before,after",
        [((8, 2), (9, 2)), ((16, 2), (17, 2)), ((8, 2), (8, 3)), ((16, 2), (16, 3)), ((40, 2), (40, 3))],
    )
    def test_nothing_but_t_changes_with_n_or_k(self, before, after):
        """No cliff: crossing N = 8 -> 9, 16 -> 17 or K = 2 -> 3 changes no setting of the plan but T (and T only
        where N > 16)."""
        first, second = plan(*before), plan(*after)
        assert dataclasses.replace(first, num_iterations=0) == dataclasses.replace(second, num_iterations=0)
        assert (first.num_iterations, second.num_iterations) == (default_steps("paper", before[0]),
                                                                 default_steps("paper", after[0]))  # fmt: skip
        if after[0] <= REFERENCE_N or before[0] == after[0]:
            assert first == second

    def test_t_never_gives_an_adapter_fewer_proposals_than_at_16(self):
        for n in (16, 17, 33, 64, 256, 1000):
            assert default_steps("paper", n) / n >= 100 / 16 and default_steps("partition", n) / n >= 30 / 16


class TestSetPlan:
    def test_what_the_user_sets_is_kept_at_every_n(self):
        settings = {"search": "partition", "num_iterations": 7, "init": "kmeans_svd", "proposals_per_step": 3,
                    "patience": 5, "max_forward_passes": 900}  # fmt: skip
        for n in (8, 16, 64):
            assert plan(n, **settings) == SearchPlan(
                rule="partition",
                num_iterations=7,
                init="kmeans_svd",
                proposals_per_step=3,
                patience=5,
                max_forward_passes=900,
            )

    def test_a_pass_budget_without_t_lets_the_budget_end_the_search(self):
        assert plan(16, max_forward_passes=900).num_iterations == 900
        assert plan(256, max_forward_passes=900, num_iterations=5).num_iterations == 5

    def test_the_objective_of_each_rule(self):
        assert plan(16).objective == "task" and plan(16, search="partition").objective == "partition"

    def test_the_plan_is_frozen_and_serialisable(self):
        default = plan(40)
        assert default.to_dict() == {"rule": "paper", "num_iterations": 250, "init": "random", "proposals_per_step": 1,
                                     "patience": None, "max_forward_passes": None, "cross_fit_folds": 1}  # fmt: skip
        assert SearchPlan(**default.to_dict()) == default
        with pytest.raises(dataclasses.FrozenInstanceError):
            default.rule = "partition"  # type: ignore[misc]
        with pytest.raises(ValueError, match="rule"):
            SearchPlan(rule="paper_then_partition", num_iterations=10)

    @pytest.mark.parametrize("method", ["random", "kmeans", "kmeans_svd"])
    def test_a_baseline_has_no_plan(self, method):
        with pytest.raises(ValueError, match="baseline"):
            SearchPlan.for_run(D2CMergeConfig(num_clusters=2, method=method), 16, 2)

    def test_the_resolved_config_records_the_plan_and_plans_the_same_again(self):
        """`resolved_for` fills `search`, `num_iterations`, `init` and `scoring.cross_fit_folds` from the plan: the
        saved config of a result records what ran, and planning it again (at any N) gives the same plan."""
        config = D2CMergeConfig(num_clusters=4, patience=20)
        default = SearchPlan.for_run(config, 40, 4)
        resolved = config.resolved_for(default)
        assert (resolved.search, resolved.num_iterations, resolved.init, resolved.patience) == (
            "paper",
            250,
            "random",
            20,
        )
        assert resolved.scoring.cross_fit_folds == 1  # the paper's loss
        unset = dataclasses.replace(resolved.scoring, cross_fit_folds=None)
        assert dataclasses.replace(resolved, search=None, num_iterations=None, init=None, scoring=unset) == config
        assert SearchPlan.for_run(resolved, 40, 4) == default == SearchPlan.for_run(resolved, 8, 2)
        assert D2CMergeConfig.from_dict(resolved.to_dict()) == resolved


class TestRefusedSettings:
    @pytest.mark.parametrize(
        "setting,value",
        [
            ("search", "paper"),
            ("search", "partition"),
            ("num_iterations", 30),
            ("max_forward_passes", 100),
            ("patience", 5),
            ("proposals_per_step", 2),
            ("init", "random"),
            ("init", "kmeans_svd"),
        ],
    )
    @pytest.mark.parametrize("method", ["random", "kmeans", "kmeans_svd"])
    def test_a_search_setting_is_refused_by_a_baseline(self, method, setting, value):
        """A setting that does not apply is refused at construction, named, with what to do; never ignored."""
        with pytest.raises(ValueError, match=rf"`{setting}=.*method='d2c'") as error:
            D2CMergeConfig(num_clusters=2, method=method, **{setting: value})
        assert f"method={method!r}" in str(error.value) and f"leave `{setting}` at" in str(error.value)

    @pytest.mark.parametrize("method", ["random", "kmeans", "kmeans_svd"])
    def test_a_baseline_takes_the_unset_values(self, method):
        D2CMergeConfig(num_clusters=2, method=method, proposals_per_step=1, init=None, search=None)

    @pytest.mark.parametrize(
        "setting,value",
        [("search", "paper_then_partition"), ("init", "lowest_loss"), ("search", "miss"), ("init", "sweep")],
    )
    def test_removed_values_are_unknown(self, setting, value):
        with pytest.raises(ValueError, match=setting):
            D2CMergeConfig(num_clusters=2, **{setting: value})

    @pytest.mark.parametrize("setting", ["proposal", "task_score", "restarts", "final_pass"])
    def test_removed_settings_are_no_fields(self, setting):
        assert setting not in {f.name for f in dataclasses.fields(D2CMergeConfig)}
        with pytest.raises(TypeError, match=setting):
            D2CMergeConfig(num_clusters=2, **{setting: None})
