"""Scale: several proposals per step, batched scoring, in-place merges, and memory that stays flat as T grows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recompute import load_reference

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.combination_types import COMBINATION_TYPES
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge.lora import lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.loss import LossScorer, _keeps_logits_by_mask, plan_batches
from peft_d2c.engine.search.loop import balanced_random_partition, canonical_partition, d2c_search

GROUPS = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "b3": "b", "c1": "c", "c2": "c", "c3": "c"}
OPTIMUM = [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c1", "c2", "c3"]]
REFILLABLE = [t for t in COMBINATION_TYPES if not t.startswith("dare")]


def group_score(requests):
    return [sum(GROUPS[m] != GROUPS[t] for m in members) / len(members) for members, t in requests]


pytestmark = pytest.mark.usefixtures("one_thread")


class TestProposalsPerStep:
    def test_best_improving_candidate_is_applied(self):
        calls = []

        def spy(requests):
            losses = group_score(requests)
            calls.append(losses)
            return losses

        rng = np.random.default_rng(0)
        state = d2c_search(
            balanced_random_partition(list(GROUPS), 3, rng), spy, rng, num_iterations=30, proposals_per_step=4
        )
        assert len(state.history) == 30 and all(len(c) == 8 for c in calls)
        for record, losses in zip(state.history, calls, strict=True):
            drops = [losses[2 * i] - losses[2 * i + 1] for i in range(4)]
            assert record["loss_before"] - record["loss_after"] == max(drops)
            assert record["accepted"] == (max(drops) > 0)
            assert record["candidates"] == 4 and record["improving"] == sum(d > 0 for d in drops)

    def test_several_proposals_find_the_optimum_in_fewer_steps(self):
        found = 0
        for seed in range(10):
            rng = np.random.default_rng(seed)
            start = balanced_random_partition(list(GROUPS), 3, rng)
            found += (
                canonical_partition(
                    d2c_search(start, group_score, rng, num_iterations=40, proposals_per_step=6).clusters
                )
                == OPTIMUM
            )
        assert found >= 9

    @pytest.mark.parametrize("value", [0, 1.5, True])
    def test_invalid_proposals_per_step_raises(self, value):
        with pytest.raises(ValueError, match="`proposals_per_step` must be an int >= 1"):
            d2c_search(OPTIMUM, group_score, np.random.default_rng(0), num_iterations=1, proposals_per_step=value)
        with pytest.raises((ValueError, TypeError), match="proposals_per_step"):
            D2CMergeConfig(num_clusters=2, proposals_per_step=value)

    def test_default_matches_the_naive_reference_implementation(self, tiny_assets, tiny_tokenizer, tiny_task_examples):
        """proposals_per_step=1 is Algorithm 1: same clusters and history as the uncached, unbatched reference."""
        reference_d2c = load_reference()
        config = D2CMergeConfig(num_clusters=3, num_iterations=40, seed=3, search="paper")
        reference = reference_d2c(tiny.load_peft_model(*tiny_assets), tiny_tokenizer, tiny_task_examples, config)
        result = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets), tiny_task_examples, config, tokenizer=tiny_tokenizer
        )
        assert result.clusters == reference["clusters"] and result.history == reference["history"]
        assert reference["stats"]["num_merges"] == 80 and reference["stats"]["forward_passes"] == 80
        assert result.stats["num_merges"] < 80 and result.stats["forward_passes"] < 40


PLANS = [
    # sizes, batch_size, max_clusters, expected batches
    ([10, 10], 32, 8, [[0, 1]]),
    ([10] * 4, 32, 8, [[0, 1], [2, 3]]),
    ([10] * 8, 32, 8, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ([10] * 6, 32, 8, [[0, 1, 2], [3, 4, 5]]),
    ([40, 40, 40], 32, 8, [[0], [1], [2]]),
    ([1] * 6, 32, 2, [[0, 1], [2, 3], [4, 5]]),
]


class TestBatchedScoring:
    @pytest.mark.parametrize("sizes,batch_size,max_clusters,expected", PLANS)
    def test_plan_batches(self, sizes, batch_size, max_clusters, expected):
        clusters = [(f"c{i}",) for i in range(len(sizes))]
        plan = plan_batches(sizes, clusters, batch_size=batch_size, max_clusters=max_clusters)
        assert plan == expected
        assert [i for batch in plan for i in batch] == list(range(len(sizes)))

    def test_one_forward_per_batch_and_each_loss_once(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        config = D2CMergeConfig(num_clusters=2, combination_type="knots_ties")  # scoring alone: no layer inputs
        examples = normalize_task_examples(tiny_task_examples)
        scorer = LossScorer(tiny_peft_model.eval(), tiny_tokenizer, examples, AdapterMerger(tiny_peft_model, config))
        names = list(tiny.TASK_FAMILIES)
        requests = [((names[i], names[(i + 1) % 6]), names[i]) for i in range(6)]
        requests += [((names[i], names[(i + 2) % 6]), names[i]) for i in range(2)]  # 8 distinct, 80 rows
        losses = scorer(requests)
        assert scorer.forward_passes == 4 and scorer.cache_misses == 8  # 4 planned batches of 2 merges each
        assert scorer(list(reversed(requests))) == list(reversed(losses)) and scorer.forward_passes == 4
        other = D2CMergeConfig(num_clusters=2, merged_adapter_prefix="alone", combination_type="knots_ties")
        alone = LossScorer(tiny_peft_model, tiny_tokenizer, examples, AdapterMerger(tiny_peft_model, other))
        # Mixed-adapter rows give each merge its own loss. Only float rounding depends on the batch a row shares,
        # which is why `plan_batches` never lets the number of processes change a batch.
        assert [alone([r])[0] for r in requests] == pytest.approx(losses, rel=1e-6)

    @pytest.mark.parametrize("combination_type", REFILLABLE)
    def test_refilled_slot_equals_a_fresh_peft_merge(self, tiny_peft_model, combination_type):
        merger = AdapterMerger(tiny_peft_model, D2CMergeConfig(num_clusters=1, combination_type=combination_type))
        merger.layer_inputs = tiny.random_layer_inputs(
            tiny_peft_model, sorted(tiny.TASK_FAMILIES)
        )  # used by `regmean` only
        merger.merge(["copy", "sort", "shift"], "slot")
        merger.merge(["first", "last", "reverse"], "fresh")
        merger.refill(["first", "last", "reverse"], "slot")
        for _, layer in lora_layers(tiny_peft_model):
            assert torch.equal(layer.lora_A["slot"].weight, layer.lora_A["fresh"].weight)
            assert torch.equal(layer.lora_B["slot"].weight, layer.lora_B["fresh"].weight)

    def test_lru_refills_slots_and_dare_merges_do_not(self, tiny_peft_model):
        names = list(tiny.TASK_FAMILIES)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        for combination_type, refills in [("ties", True), ("dare_ties", False)]:
            merger = AdapterMerger(
                tiny_peft_model,
                D2CMergeConfig(num_clusters=2, combination_type=combination_type, merge={"cache_size": 3}),
            )
            for pair in pairs:
                merger.adapter_for(pair)
            assert merger.num_merges == len(pairs)
            assert (merger.num_refills == len(pairs) - 3) if refills else merger.num_refills == 0
            merger.cleanup()

    def test_bfloat16_model_keeps_its_dtype(self, tiny_assets, tiny_tokenizer, tiny_task_examples):
        model = tiny.load_peft_model(*tiny_assets).to(torch.bfloat16)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        result = merge_adapters_d2c(
            model, tiny_task_examples, D2CMergeConfig(num_clusters=2, num_iterations=6), tokenizer=tiny_tokenizer
        )
        assert all(np.isfinite(v) for v in result.task_losses.values())
        assert {n: p.dtype for n, p in model.named_parameters() if n in dtypes} == dtypes
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".d2c_" in n)


class TestMemoryStaysFlat:
    def test_live_adapters_and_lora_weights_bounded_over_a_long_run(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        """Memory measured by what the model holds at every forward pass, not by timing: it must not grow with T."""
        model = tiny_peft_model
        _keeps_logits_by_mask(model.eval())  # the one-off logits_to_keep probe runs before the hook counts passes
        per_adapter = sum(p.numel() for n, p in model.named_parameters() if ".copy." in n)
        base_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        seen = []
        hook = model.register_forward_pre_hook(
            lambda module, args: seen.append(
                (len(model.peft_config), sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))
            )
        )
        try:
            config = D2CMergeConfig(
                num_clusters=3, num_iterations=300, seed=1, search="paper", merge={"cache_size": 3}
            )
            result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        finally:
            hook.remove()
        n = len(tiny.TASK_FAMILIES)
        assert len(seen) == result.stats["forward_passes"] + result.stats["router_forward_passes"]
        assert result.stats["forward_passes"] > 10 and result.stats["router_forward_passes"] == 2  # 60 prompts / 32
        assert max(count for count, _ in seen) <= n + 3
        assert max(numel for _, numel in seen) <= base_lora + 3 * per_adapter
        # Every loss is computed once: 600 requests, far fewer distinct (cluster, task) pairs; at the end the n tasks'
        # losses (`task_losses`, `stats["fewshot_loss"]`), all cached.
        assert result.stats["cache_misses"] + result.stats["cache_hits"] == 2 * 300 + n
        assert result.stats["cache_misses"] < 150
        assert result.stats["num_merges"] <= result.stats["cache_misses"]
