"""D2CMergeConfig: validation, K from a budget, exact JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from peft_d2c import D2CMergeConfig, D2CWarning
from peft_d2c.hub.cards import read_result_folder

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
    ({"num_clusters": 2, "merge": {"density": 0.0}}, ValueError, "`density`"),
    # alpha = 1 leaves the (singular) Gram sums unregularised: the Cholesky failed mid-run on main at 710cc18.
    (
        {"num_clusters": 2, "merge": {"regmean_alpha": 1.0}},
        ValueError,
        r"`regmean_alpha` must be a number in \(0, 1\), got 1.0",
    ),
    ({"num_clusters": 2, "merge": {"regmean_alpha": 1}}, ValueError, r"`regmean_alpha` must be a number in \(0, 1\)"),
    (
        {"num_clusters": 2, "merge": {"regmean_alpha": 0.0}},
        ValueError,
        r"`regmean_alpha` must be a number in \(0, 1\)",
    ),
    ({"num_clusters": 2, "num_iterations": -1}, ValueError, "`num_iterations` must be >= 0"),
    ({"num_clusters": 2, "scoring": {"examples_per_task": 0}}, ValueError, "`examples_per_task`"),
    ({"num_clusters": 2, "merge": {"cache_size": 1}}, ValueError, "`cache_size` must be >= 2"),
    ({"num_clusters": 2, "merged_adapter_prefix": "d2c.v1"}, ValueError, "merged_adapter_prefix"),
    ({"num_clusters": 2, "patience": 0}, ValueError, "`patience` must be >= 1"),
    ({"num_clusters": 2, "merge": {"weight": float("nan")}}, ValueError, "`weight` must be a finite number"),
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
        config = D2CMergeConfig(num_clusters=3, method="d2c", init="kmeans_svd", combination_type="dare_ties", seed=4, num_iterations=12, merge={"density": 0.7})  # fmt: skip
        path = config.save_pretrained(tmp_path)
        assert json.loads(open(path).read()) == {**config.to_dict(), "d2c_config_version": 3}
        assert D2CMergeConfig.from_pretrained(tmp_path) == config
        assert D2CMergeConfig.from_pretrained(path).to_dict() == config.to_dict()

    def test_a_default_t_round_trips_as_the_t_the_run_used(self, tmp_path):
        """`num_iterations=None` is saved resolved where `search` fixes it: the reloaded config has the T of the run,
        not None. With `search=None` both depend on N and K and stay None (a run's config has them resolved)."""
        config = D2CMergeConfig(num_clusters=3, combination_type="dare_ties", seed=4, search="partition")
        loaded = D2CMergeConfig.from_pretrained(config.save_pretrained(tmp_path / "set"))
        assert loaded == dataclasses.replace(config, num_iterations=30) and loaded.search_steps == config.search_steps
        by_run = D2CMergeConfig(num_clusters=3, seed=4)
        loaded = D2CMergeConfig.from_pretrained(by_run.save_pretrained(tmp_path / "by_run"))
        assert (loaded.search, loaded.num_iterations) == (None, None) and loaded == by_run

    def test_unknown_keys_from_newer_versions_warn_and_are_dropped(self):
        data = {**D2CMergeConfig(num_clusters=2).to_dict(), "future_option": 1}
        with pytest.warns(D2CWarning, match="future_option"):
            assert D2CMergeConfig.from_dict(data) == D2CMergeConfig(num_clusters=2)

    @pytest.mark.parametrize("method", ["random", "kmeans", "kmeans_svd"])
    def test_a_baseline_config_is_left_as_it_is_and_warns_about_nothing(self, method):
        """A baseline does not search: no plan, and resolving its config fills in no search setting (which the
        config would then refuse)."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", D2CWarning)
            config = D2CMergeConfig(num_clusters=5, method=method)
            assert config.resolved_for(None) == config
        assert (config.init, config.search, config.num_iterations) == (None, None, None)


def test_search_steps_default_per_search_and_explicit_t_wins():
    """`search_steps` (the T a saved config records) is 30 partition steps and the paper's 100 steps up to 16
    adapters; an explicit num_iterations is kept. With `search=None` it waits for the run's plan."""
    assert D2CMergeConfig(num_clusters=2).search is None and D2CMergeConfig(num_clusters=2).search_steps is None
    assert D2CMergeConfig(num_clusters=2, search="partition").search_steps == 30
    assert D2CMergeConfig(num_clusters=2, search="paper").search_steps == 100
    assert D2CMergeConfig(num_clusters=2, search="paper", num_iterations=7).search_steps == 7
    config = D2CMergeConfig(num_clusters=2)
    assert D2CMergeConfig.from_dict({**config.to_dict(), "search": "paper"}).search_steps == 100
    with pytest.raises(ValueError, match="max_forward_passes"):
        D2CMergeConfig(num_clusters=2, max_forward_passes=0)
    with pytest.raises(TypeError, match="max_forward_passes"):
        D2CMergeConfig(num_clusters=2, max_forward_passes=2.5)


def test_the_card_names_the_search_the_run_planned():
    """The card shows the search from the result's recorded plan (`stats["search_plan"]`), or, for a result saved
    before the plan was recorded, from its config (T = `DEFAULT_STEPS` where None); a baseline shows no search."""
    from peft_d2c.hub.cards import _method_section

    def section(stats=None, method="d2c", **config):
        base = {"scoring": {"examples_per_task": 10}, "seed": 0, "combination_type": "ties", **config}
        result = {"num_adapters": 4, "num_clusters": 2, "method": method, "stats": stats or {}}
        return _method_section({"result": result, "config": base, "routing": {}, "names": []})

    assert "(start `random`, `partition` search, 30 proposed moves, 10 few-shot" in section(search="partition")
    assert "`paper` search, 100 proposed moves" in section(search="paper", num_iterations=None)
    assert "`paper` search, 12 proposed moves" in section(search="paper", num_iterations=12)
    plan = {"rule": "paper", "num_iterations": 250, "init": "kmeans_svd", "proposals_per_step": 4, "patience": 9,
            "max_forward_passes": None}  # fmt: skip
    planned = section({"search_plan": plan}, search="paper", num_iterations=250, init="kmeans_svd")
    assert "(start `kmeans_svd`, `paper` search, 250 proposed moves (4 candidate moves a step, patience 9)" in planned
    assert "scored by their few-shot loss" in planned
    baseline = section(method="kmeans")
    assert "search" not in baseline and "(10 few-shot examples per task" in baseline


# What an old peft-d2c (before `search`, `restarts`, ... existed: commit 839ff9e) wrote, key for key.
OLD_FILE = {
    "batch_size": 32, "checkpoint_every": 10, "combination_type": "ties", "density": 0.5, "examples_per_task": 10,
    "init": "random", "majority_sign_method": "total", "max_length": None, "merge_cache_size": 8,
    "merge_weight": None, "merged_adapter_prefix": "d2c", "method": "d2c", "num_clusters": 2, "num_iterations": 100,
    "patience": None, "proposals_per_step": 1, "seed": 3, "show_progress": True, "storage_budget": None,
    "svd_embedding_dim": 8, "svd_rank": None, "use_chat_template": False,
}  # fmt: skip
# Version-1 files (no `d2c_config_version`) -> the run they describe: (file content, search, combination, T).
OLD_FILES = [
    (OLD_FILE, "paper", "ties", 100),
    ({k: v for k, v in OLD_FILE.items() if k not in ("combination_type", "num_iterations")}, "paper", "ties", 100),
    ({"num_clusters": 2}, "paper", "ties", 100),
    ({"num_clusters": 2, "num_iterations": None}, "paper", "ties", 100),
    ({"num_clusters": 2, "search": "partition", "num_iterations": None, "combination_type": "ties"}, "partition",
     "ties", 30),  # between the partition default (12358e6) and knots_ties (ee75b00)
    ({"num_clusters": 2, "search": "partition", "num_iterations": None, "combination_type": "knots_ties"},
     "partition", "knots_ties", 30),
    ({"num_clusters": 2, "search": "paper", "num_iterations": 7, "combination_type": "core_ta"}, "paper", "core_ta",
     7),
]  # fmt: skip


class TestSavedFormat:
    @pytest.mark.parametrize("search,num_iterations,saved", [("partition", None, 30), ("paper", None, 100),
                                                             ("partition", 7, 7), ("paper", 0, 0)])  # fmt: skip
    def test_the_saved_file_holds_the_resolved_t_search_merge_and_version(
        self, tmp_path, search, num_iterations, saved
    ):
        """`num_iterations=None` used to be saved as null, which a later change of `DEFAULT_STEPS` would reread as
        another T; the file holds the T the run used, its `search` and `combination_type`, and its format version."""
        config = D2CMergeConfig(num_clusters=2, search=search, num_iterations=num_iterations)
        data = json.loads(open(config.save_pretrained(tmp_path)).read())
        assert data["num_iterations"] == saved
        assert (data["search"], data["combination_type"], data["d2c_config_version"]) == (search, "regmean", 3)

    @pytest.mark.parametrize("content,search,combination_type,steps", OLD_FILES)
    def test_a_version_1_file_loads_as_the_run_it_describes(self, tmp_path, content, search, combination_type, steps):
        """A file without `search` was written when every run was the paper's search with ties merges (T = 100);
        it used to reload with today's defaults (partition search, knots_ties, T = 30), i.e. as another run."""
        path = tmp_path / "d2c_config.json"
        path.write_text(json.dumps(content))
        loaded = D2CMergeConfig.from_pretrained(tmp_path)
        assert (loaded.search, loaded.combination_type, loaded.num_iterations) == (search, combination_type, steps)
        # the only start and draws of then; the flat merge and scoring settings of then in their groups
        assert (loaded.init, loaded.legacy_settings, loaded.seed) == ("random", {}, content.get("seed", 0))
        assert (loaded.merge.density, loaded.merge.cache_size, loaded.scoring.examples_per_task) == (
            content.get("density", 0.5),
            content.get("merge_cache_size", 8),
            content.get("examples_per_task", 10),
        )
        # saved again, it is the same run in today's format
        resaved = loaded.save_pretrained(tmp_path / "again")
        assert D2CMergeConfig.from_pretrained(resaved) == loaded
        assert json.loads(open(resaved).read())["d2c_config_version"] == 3

    def test_an_explicit_version_1_key_reads_the_same_as_none(self, tmp_path):
        path = tmp_path / "d2c_config.json"
        path.write_text(json.dumps({"num_clusters": 2, "d2c_config_version": 1}))
        assert D2CMergeConfig.from_pretrained(path) == D2CMergeConfig(
            num_clusters=2,
            search="paper",
            combination_type="ties",
            num_iterations=100,
            init="random",
        )

    @pytest.mark.parametrize("version", [4, 99])
    def test_a_file_of_a_newer_version_is_refused(self, tmp_path, version):
        data = {**D2CMergeConfig(num_clusters=2).to_dict(), "d2c_config_version": version}
        (tmp_path / "d2c_config.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=rf"saved by a newer peft-d2c .*={version}.*upgrade peft-d2c"):
            D2CMergeConfig.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match="saved by a newer peft-d2c"):
            D2CMergeConfig.from_dict(data)

    @pytest.mark.parametrize("version", [0, "2", None, True])
    def test_a_bad_version_is_refused(self, tmp_path, version):
        data = {**D2CMergeConfig(num_clusters=2).to_dict(), "d2c_config_version": version}
        (tmp_path / "d2c_config.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="`d2c_config_version` must be a version number"):
            D2CMergeConfig.from_pretrained(tmp_path)

    def test_the_card_of_an_old_result_folder_names_the_run_it_was(self, tmp_path):
        """The model card (and a push) reads `d2c_config.json` through `from_pretrained` too."""
        (tmp_path / "d2c_0").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp_path / "d2c_0" / name).write_text("{}")
        (tmp_path / "d2c_routing.json").write_text(json.dumps({"copy": "d2c_0"}))
        (tmp_path / "d2c_result.json").write_text(json.dumps({"merged_adapter_names": ["d2c_0"]}))
        (tmp_path / "d2c_config.json").write_text(json.dumps({"num_clusters": 1, "num_iterations": None}))
        config = read_result_folder(tmp_path)["config"]
        assert (config["search"], config["combination_type"], config["num_iterations"]) == ("paper", "ties", 100)
        (tmp_path / "d2c_config.json").write_text(json.dumps({"num_clusters": 1, "d2c_config_version": 4}))
        with pytest.raises(ValueError, match="newer peft-d2c"):
            read_result_folder(tmp_path)
