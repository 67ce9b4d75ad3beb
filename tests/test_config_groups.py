"""The grouped configuration (`merge`, `scoring`): settings that do not apply are refused, old configs still load."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from peft_d2c import D2CMergeConfig
from peft_d2c.combination_types import COMBINATION_TYPES
from peft_d2c.config import CONFIG_VERSION, CONFIG_VERSION_KEY, MergeSettings, ScoringSettings

SAVED = os.path.join(os.path.dirname(__file__), "data", "saved_configs")  # written by peft-d2c at 362996a

# For every merge setting: a value other than its default, and the combination types that use it, written out from
# the merge code (`engine/merge/merging.py`, `merge_methods.py`, PEFT's `add_weighted_adapter`), not from the table
# under test.
USED_BY = {
    "density": ({"ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
                 "magnitude_prune_svd", "knots_ties", "core_ties"}, 0.7),
    "majority_sign_method": ({"ties", "ties_svd", "dare_ties", "dare_ties_svd", "knots_ties", "core_ties"}, "frequency"),
    "regmean_alpha": ({"regmean"}, 0.8),
    "memory_limit": ({"regmean"}, "16GB"),
    "rank_allocation": ({"core_ta", "core_ties", "knots_ties", "tsv_m", "regmean"}, "spectrum"),
    "svd_rank": ({"svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd", "core_ta", "core_ties",
                  "knots_ties", "tsv_m", "regmean"}, 4),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(USED_BY))
def test_a_merge_setting_is_refused_where_it_does_not_apply(name):
    used_by, value = USED_BY[name]
    for combination_type in COMBINATION_TYPES:
        settings = {"merge": {name: value}, "num_clusters": 2, "combination_type": combination_type}
        if combination_type in used_by:
            assert getattr(D2CMergeConfig(**settings).merge, name) == value
        else:
            with pytest.raises(
                ValueError, match=rf"`merge\.{name}=.*` does not apply to `combination_type='{combination_type}'`"
            ):
                D2CMergeConfig(**settings)
        # the default value is what every run of that type gets anyway: never refused
        default = getattr(MergeSettings(), name)
        assert getattr(D2CMergeConfig(num_clusters=2, combination_type=combination_type).merge, name) == default


def test_weight_and_cache_size_apply_to_every_type():
    for combination_type in COMBINATION_TYPES:
        config = D2CMergeConfig(
            num_clusters=2, combination_type=combination_type, merge={"weight": 0.5, "cache_size": 3}
        )
        assert (config.merge.weight, config.merge.cache_size) == (0.5, 3)


def test_groups_take_a_dict_or_an_instance_and_are_frozen():
    by_dict = D2CMergeConfig(num_clusters=2, scoring={"batch_size": 8, "examples_per_task": 4})
    by_instance = D2CMergeConfig(num_clusters=2, scoring=ScoringSettings(batch_size=8, examples_per_task=4))
    assert by_dict == by_instance
    assert (by_dict.scoring.batch_size, by_dict.scoring.examples_per_task, by_dict.scoring.max_batch_tokens) == (
        8,
        4,
        16384,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_dict.scoring.batch_size = 4
    # `replace` shares the (immutable) groups; a changed group is a new one
    other = dataclasses.replace(by_dict, seed=3)
    assert other.scoring is by_dict.scoring and other.seed == 3
    with pytest.raises(ValueError, match=r"Unknown `merge` setting\(s\) \['densty'\]"):
        D2CMergeConfig(num_clusters=2, merge={"densty": 0.5})
    with pytest.raises(TypeError, match="`scoring` must be a ScoringSettings or a dict"):
        D2CMergeConfig(num_clusters=2, scoring=[("batch_size", 8)])


@pytest.mark.parametrize(
    ("flat", "group", "name"),
    [("density", "merge", "density"), ("merge_weight", "merge", "weight"), ("batch_size", "scoring", "batch_size")],
)
def test_a_flat_setting_of_before_says_where_it_went(flat, group, name):
    with pytest.raises(TypeError, match=rf"`{flat}` -> `{group}={{'{name}': \.\.\.}}`"):
        D2CMergeConfig(num_clusters=2, **{flat: 1})
    # from_dict (YAML files, the benchmark's --variant) still takes it flat, into its group
    config = D2CMergeConfig.from_dict(
        {"num_clusters": 2, "combination_type": "ties", flat: 0.5 if flat != "batch_size" else 8}
    )
    assert getattr(getattr(config, group), name) == (0.5 if flat != "batch_size" else 8)
    with pytest.raises(ValueError, match="given twice"):
        D2CMergeConfig.from_dict({"num_clusters": 2, flat: 1, group: {name: 1}})


def test_top_level_has_at_most_20_fields():
    assert len(dataclasses.fields(D2CMergeConfig)) <= 20


def _saved(name):
    with open(os.path.join(SAVED, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_a_version_2_config_loads_as_the_run_it_was():
    old = _saved("v2_ties_partition")  # ties, density 0.7, weight 0.5, batch 8, partition search, 2 restarts
    config = D2CMergeConfig.from_pretrained(os.path.join(SAVED, "v2_ties_partition.json"))
    assert (config.combination_type, config.search, config.num_iterations) == ("ties", "partition", 30)
    assert (config.merge.density, config.merge.weight, config.scoring.batch_size) == (0.7, 0.5, 8)
    assert config.legacy_settings == {"restarts": 2, "final_pass": True}
    assert (old["restarts"], old["final_pass"]) == (2, True)
    with pytest.raises(ValueError, match="legacy_settings=.*'restarts': 2"):
        config.check_runnable()
    dataclasses.replace(config, legacy_settings={}).check_runnable()


def test_a_version_2_default_records_its_removed_search():
    config = D2CMergeConfig.from_pretrained(os.path.join(SAVED, "v2_default_k2.json"))
    assert config.legacy_settings == {"search": "paper_then_partition", "proposal": "misfit", "task_score": "miss"}
    assert (config.combination_type, config.num_iterations, config.merge.density) == ("regmean", 100, 0.5)


def test_a_version_2_config_drops_the_settings_its_merge_ignored(tmp_path):
    assert _saved("v2_regmean_paper")["density"] == 0.7  # saved, but regmean never read it
    config = D2CMergeConfig.from_pretrained(os.path.join(SAVED, "v2_regmean_paper.json"))
    assert (config.merge.density, config.scoring.examples_per_task, config.search) == (0.5, 5, "paper")
    assert config.legacy_settings == {}
    config.check_runnable()
    # saved again: version 3, nested, and it reads back equal
    path = config.save_pretrained(tmp_path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert data[CONFIG_VERSION_KEY] == CONFIG_VERSION == 3
    assert data["scoring"]["examples_per_task"] == 5 and "examples_per_task" not in data
    assert D2CMergeConfig.from_pretrained(tmp_path) == config


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_baseline_config_loads_without_the_search_settings_it_never_used(tmp_path, version):
    # version 1 filled in the paper's search for every run, version 2's `resolved_for` filled in the start and T
    data = {"num_clusters": 2, "method": "kmeans", "init": "random", "num_iterations": 100, "search": "paper"}
    (tmp_path / "d2c_config.json").write_text(json.dumps({**data, CONFIG_VERSION_KEY: version}))
    config = D2CMergeConfig.from_pretrained(tmp_path)
    assert (config.method, config.init, config.search, config.num_iterations) == ("kmeans", None, None, None)
    config.check_runnable()
    with pytest.raises(ValueError, match="init"):  # given today, the same settings are refused as not applying
        D2CMergeConfig(num_clusters=2, method="kmeans", init="random")
