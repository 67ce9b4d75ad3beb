"""Tuned merge weights: the pure (1+1)-ES on toy objectives, and on the tiny model the loss of the tuned weights
recomputed from a fresh PEFT merge, independently of the tuner."""

from __future__ import annotations

import pytest
import torch

from peft_d2c import D2CMergeConfig
from peft_d2c.engine.merge.lora import lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.search.weight_search import search_weights
from peft_d2c.evaluation.heldout import loss_matrix
from peft_d2c.evaluation.tune import tune_cluster_weights


class TestSearchWeights:
    def test_finds_the_minimum_of_a_quadratic_inside_the_bounds(self):
        calls = []

        def objective(w):
            calls.append(list(w))
            return (w[0] - 0.2) ** 2 + (w[1] - 1.4) ** 2 + (w[2] - 3.0) ** 2  # w[2]: optimum beyond the bound

        result = search_weights(objective, [1.0, 1.0, 1.0], budget=300, seed=3)
        assert len(calls) == result.evaluations == 300
        assert result.weights == pytest.approx([0.2, 1.4, 2.0], abs=1e-2)  # factor bound 2 caps the third
        assert all(0.0 <= w <= 2.0 for c in calls for w in c)
        assert result.value == pytest.approx(objective(result.weights))
        assert result.initial_value == pytest.approx(0.64 + 0.16 + 4.0)
        values = [v for _, v in result.history]
        assert values == sorted(values, reverse=True) and result.history[-1][1] == result.value

    def test_never_worse_than_the_untuned_weights_and_seeded(self):
        def bumpy(w):  # the untuned weights are the minimum: nothing may be accepted
            return abs(w[0] - 0.5) + abs(w[1] - 0.5)

        result = search_weights(bumpy, [0.5, 0.5], budget=50, seed=0)
        assert result.weights == [0.5, 0.5] and result.value == 0.0 and result.history == [(1, 0.0)]
        again = [search_weights(lambda w: (w[0] - 0.1) ** 2 + w[1] ** 2, [1, 1], budget=40, seed=s) for s in (7, 7, 8)]
        assert again[0].weights == again[1].weights != again[2].weights

    def test_single_member_and_bad_arguments(self):
        assert search_weights(lambda w: 1.0, [1.0], budget=10, seed=0).evaluations == 1
        with pytest.raises(ValueError, match="budget"):
            search_weights(lambda w: 1.0, [1.0, 1.0], budget=0, seed=0)
        with pytest.raises(ValueError, match="contain 1"):
            search_weights(lambda w: 1.0, [1.0, 1.0], budget=5, seed=0, low=1.5)


@pytest.mark.parametrize("combination_type", ["svd", "core_ta"])
def test_explicit_weights_give_the_weighted_sum_of_updates(tiny_peft_model, combination_type):
    """`merge_weight=0.3` in the config and `refill(..., weights)` with other explicit weights each give the exact
    weighted sum Σ w_i·s_i·B_i·A_i, recomputed here from the raw factors (svd_rank 24 = the members' total rank, so
    neither merge truncates)."""
    model = tiny_peft_model
    members = ["copy", "reverse", "sort"]
    settings = {"num_clusters": 1, "combination_type": combination_type}
    by_config = D2CMergeConfig(**settings, merge={"svd_rank": 24, "weight": 0.3})
    AdapterMerger(model, by_config).merge(members, "by_config")
    merger = AdapterMerger(model, D2CMergeConfig(merged_adapter_prefix="w", **settings, merge={"svd_rank": 24}))
    merger.merge(members, "explicit")
    explicit = {"copy": 0.7, "reverse": -0.2, "sort": 0.4}
    merger.refill(members, "explicit", explicit)
    for _, layer in lora_layers(model):
        for name, weights in (("by_config", dict.fromkeys(members, 0.3)), ("explicit", explicit)):
            expected = sum(
                weights[m]
                * float(layer.scaling[m])
                * (layer.lora_B[m].weight.double() @ layer.lora_A[m].weight.double())
                for m in members
            )
            got = float(layer.scaling[name]) * (
                layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()
            )
            assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-5, name
    with pytest.raises(ValueError, match="exactly the members"):
        merger.refill(members, "explicit", {"copy": 1.0})


def test_tuned_weights_loss_recomputed_from_a_fresh_peft_merge(tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    model = tiny_peft_model
    model.eval()
    members = ["copy", "reverse", "sort"]
    examples = {t: tiny_task_examples[t] for t in members}
    config = D2CMergeConfig(num_clusters=1, merged_adapter_prefix="tune", combination_type="ties")  # PEFT's, below
    merger = AdapterMerger(model, config)
    name = merger.merge(members, "tuned")
    result, passes = tune_cluster_weights(model, tiny_tokenizer, merger, members, name, examples, budget=8, seed=0)
    assert result.evaluations == 8 and passes == 8 * 1  # 30 rows: one batch of 32 per evaluation
    assert result.value < result.initial_value and result.weights != [1.0, 1.0, 1.0]  # seed 0 finds better
    # Independently: PEFT's own merge with the tuned weights, scored by the held-out loss code, task by task.
    model.add_weighted_adapter(members, result.weights, "fresh", combination_type="ties", density=0.5)
    fresh = loss_matrix(model, tiny_tokenizer, examples, ["fresh", "tuned"])
    assert sum(row[0] for row in fresh) / 3 == pytest.approx(result.value, rel=1e-5)
    assert [row[1] for row in fresh] == pytest.approx([row[0] for row in fresh], rel=1e-5)  # left at the best
    untuned = loss_matrix(model, tiny_tokenizer, examples, [members[0]])  # sanity: a real, finite loss
    assert all(0 < row[0] < 50 for row in untuned)


def test_regmean_weights_tune_with_the_members_layer_inputs(tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    """`regmean` merges need the layer inputs (as `benchmarks/tune_weights.py` now attaches them): the tuned
    weights never end above the start, and the adapter left behind scores what the search reported."""
    from peft_d2c.data.examples import normalize_task_examples
    from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
    from peft_d2c.engine.scoring.loss import LossScorer

    model = tiny_peft_model
    model.eval()
    members = ["copy", "reverse", "sort"]
    examples = {t: tiny_task_examples[t] for t in members}
    merger = AdapterMerger(model, D2CMergeConfig(num_clusters=1, merged_adapter_prefix="tune"))  # regmean
    with pytest.raises(ValueError, match="needs the layer inputs"):
        merger.merge(members, "no_grams")
    attach_layer_inputs(
        merger, LossScorer.for_config(model, tiny_tokenizer, normalize_task_examples(examples), merger)
    )
    name = merger.merge(members, "tuned")
    result, _ = tune_cluster_weights(model, tiny_tokenizer, merger, members, name, examples, budget=6, seed=1)
    assert result.evaluations == 6 and result.value <= result.initial_value
    left = loss_matrix(model, tiny_tokenizer, examples, [name])
    assert sum(row[0] for row in left) / 3 == pytest.approx(result.value, rel=1e-5)
