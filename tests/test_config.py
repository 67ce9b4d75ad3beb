"""D2CMergeConfig: validation, K from a budget, exact JSON round trip."""

from __future__ import annotations

import json

import pytest

from peft_d2c import D2CMergeConfig, D2CWarning

BAD_CONFIGS = [
    ({}, ValueError, "exactly one of `num_clusters` and `storage_budget`"),
    ({"num_clusters": 2, "storage_budget": 0.5}, ValueError, "exactly one"),
    ({"num_clusters": 0}, ValueError, "`num_clusters` must be >= 1"),
    ({"num_clusters": 2.0}, TypeError, "`num_clusters` must be an int"),
    ({"storage_budget": 0.0}, ValueError, r"`storage_budget` must be a fraction in \(0, 1\]"),
    ({"storage_budget": 1.5}, ValueError, "storage_budget"),
    ({"num_clusters": 2, "method": "spectral"}, ValueError, r"`method` must be one of \['d2c', 'random'"),
    ({"num_clusters": 2, "init": "best"}, ValueError, "`init` must be one of"),
    ({"num_clusters": 2, "combination_type": "mean"}, ValueError, "`combination_type` must be one of"),
    ({"num_clusters": 2, "density": 0.0}, ValueError, "`density`"),
    ({"num_clusters": 2, "num_iterations": -1}, ValueError, "`num_iterations` must be >= 0"),
    ({"num_clusters": 2, "examples_per_task": 0}, ValueError, "`examples_per_task`"),
    ({"num_clusters": 2, "merge_cache_size": 1}, ValueError, "`merge_cache_size` must be >= 2"),
    ({"num_clusters": 2, "merged_adapter_prefix": "d2c.v1"}, ValueError, "merged_adapter_prefix"),
    ({"num_clusters": 2, "patience": 0}, ValueError, "`patience` must be >= 1"),
    ({"num_clusters": 2, "merge_weight": float("nan")}, ValueError, "merge_weight"),
]


class TestD2CMergeConfig:
    @pytest.mark.parametrize("kwargs,error,match", BAD_CONFIGS)
    def test_invalid_settings_raise_naming_the_argument(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            D2CMergeConfig(**kwargs)

    @pytest.mark.parametrize("budget,n,k", [(0.125, 16, 2), (0.25, 16, 4), (0.01, 16, 1), (1.0, 5, 5), (0.3, 10, 3)])
    def test_storage_budget_resolves_to_floor_of_fraction(self, budget, n, k):
        assert D2CMergeConfig(storage_budget=budget).resolve_num_clusters(n) == k

    def test_num_clusters_larger_than_adapters_raises(self):
        with pytest.raises(ValueError, match=r"between 1 and the number of adapters \(3\), got 4"):
            D2CMergeConfig(num_clusters=4).resolve_num_clusters(3)

    def test_save_and_load_round_trip_exactly(self, tmp_path):
        config = D2CMergeConfig(
            num_clusters=3, method="d2c", init="kmeans_svd", combination_type="dare_ties", density=0.7, seed=4
        )
        path = config.save_pretrained(tmp_path)
        assert json.loads(open(path).read()) == config.to_dict()
        assert D2CMergeConfig.from_pretrained(tmp_path) == config
        assert D2CMergeConfig.from_pretrained(path).to_dict() == config.to_dict()

    def test_unknown_keys_from_newer_versions_warn_and_are_dropped(self):
        data = {**D2CMergeConfig(num_clusters=2).to_dict(), "future_option": 1}
        with pytest.warns(D2CWarning, match="future_option"):
            assert D2CMergeConfig.from_dict(data) == D2CMergeConfig(num_clusters=2)

    def test_init_ignored_by_baselines_warns(self):
        with pytest.warns(D2CWarning, match="ignored"):
            D2CMergeConfig(num_clusters=2, method="random", init="kmeans")


def test_search_steps_default_per_search_and_explicit_t_wins():
    """T defaults to 30 partition steps and to the paper's 100 steps; an explicit num_iterations is kept."""
    assert D2CMergeConfig(num_clusters=2).search == "partition"
    assert D2CMergeConfig(num_clusters=2).search_steps == 30
    assert D2CMergeConfig(num_clusters=2, search="paper").search_steps == 100
    assert D2CMergeConfig(num_clusters=2, search="paper", num_iterations=7).search_steps == 7
    config = D2CMergeConfig(num_clusters=2)
    assert D2CMergeConfig.from_dict({**config.to_dict(), "search": "paper"}).search_steps == 100


def test_the_card_names_the_search_and_its_default_t():
    """A result saved with `num_iterations=None` shows the T its search ran (the card reads the saved config)."""
    from peft_d2c.hub.cards import _method_section

    def section(**config):
        base = {"init": "random", "examples_per_task": 10, "seed": 0, "combination_type": "ties", **config}
        return _method_section(
            {"result": {"num_adapters": 4, "num_clusters": 2}, "config": base, "routing": {}, "names": []}
        )

    assert "`partition` search, 30 proposed moves" in section(search="partition", num_iterations=None)
    assert "`paper` search, 100 proposed moves" in section(search="paper", num_iterations=None)
    assert "`paper` search, 12 proposed moves" in section(search="paper", num_iterations=12)
