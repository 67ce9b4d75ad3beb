"""merging.py: PEFT merges with the documented weights, seeded merges, the LRU, validation and the Gram matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, UnsupportedAdapterError
from peft_d2c import testing as tiny
from peft_d2c.combination_types import COMBINATION_TYPES, DENSITY_TYPES
from peft_d2c.engine.merge.lora import (
    check_new_adapter_name,
    check_peft_model,
    check_source_adapters,
    delta_gram_matrix,
    lora_layers,
)
from peft_d2c.engine.merge.merging import AdapterMerger, merge_weights_for


def copies_model(tiny_assets, family="copy", k=3) -> PeftModel:
    base_dir, adapter_dirs = tiny_assets
    return tiny.load_peft_model(base_dir, {f"c{i}": adapter_dirs[family] for i in range(k)})


def assert_same_update(model, merged, original, rtol=1e-4):
    for name, layer in lora_layers(model):
        expected = layer.get_delta_weight(original)
        got = layer.get_delta_weight(merged)
        scale = expected.abs().max().item()
        assert torch.allclose(got, expected, atol=rtol * scale), f"{merged} differs from {original} at {name}"


class TestMergeWeights:
    # tsv_m keeps r/k singular directions per copy: it never gives identical copies back (tests/test_merge_methods.py)
    @pytest.mark.parametrize("combination_type", [t for t in COMBINATION_TYPES if t != "tsv_m"])
    def test_identical_copies_merge_to_the_adapter(self, tiny_assets, combination_type):
        """The weight table is honest: k identical copies merge back to the adapter (density 1, no pruning)."""
        model = copies_model(tiny_assets)
        density = {"density": 1.0} if combination_type in DENSITY_TYPES else {}  # only the pruning types take one
        config = D2CMergeConfig(num_clusters=1, combination_type=combination_type, merge=density)
        merger = AdapterMerger(model, config)
        # `regmean` weighs each copy by its own inputs: three different layer inputs must still give the copy back.
        merger.layer_inputs = tiny.random_layer_inputs(model, ["c0", "c1", "c2"])
        merger.merge(["c0", "c1", "c2"], "merged")
        assert_same_update(model, "merged", "c0")

    def test_uniform_weights_with_linear_multiply_the_update(self, tiny_assets):
        """Documented PEFT behaviour: `linear` with w = 1/k sums √w·A and √w·B, giving k times the update."""
        model = copies_model(tiny_assets)
        config = D2CMergeConfig(num_clusters=1, combination_type="linear", merge={"weight": 1 / 3})
        AdapterMerger(model, config).merge(["c0", "c1", "c2"], "merged")
        for _, layer in lora_layers(model):
            torch.testing.assert_close(layer.get_delta_weight("merged"), 3 * layer.get_delta_weight("c0"))

    def test_single_member_merge_is_the_adapter(self, tiny_assets):
        model = copies_model(tiny_assets, k=1)
        merger = AdapterMerger(model, D2CMergeConfig(num_clusters=1))
        merger.layer_inputs = tiny.random_layer_inputs(model, ["c0"])  # the default `regmean` merges with layer inputs
        merger.merge(["c0"], "merged")
        assert_same_update(model, "merged", "c0", rtol=1e-5)

    @pytest.mark.parametrize("combination_type,k,expected", [("cat", 4, 0.25), ("ties", 3, 1.0), ("linear", 2, 0.25)])
    def test_weight_table(self, combination_type, k, expected):
        assert merge_weights_for(combination_type, k) == [expected] * k
        assert merge_weights_for(combination_type, k, override=0.7) == [0.7] * k


class TestSeededMerges:
    def test_dare_merge_is_reproducible_and_leaves_global_rng_alone(self, tiny_peft_model):
        config = D2CMergeConfig(num_clusters=1, combination_type="dare_ties", seed=3, merge={"density": 0.5})
        merger = AdapterMerger(tiny_peft_model, config)
        rng_state = torch.random.get_rng_state()
        merger.merge(["copy", "sort", "shift"], "m1")
        merger.merge(["shift", "copy", "sort"], "m2")
        assert torch.equal(torch.random.get_rng_state(), rng_state)
        for _, layer in lora_layers(tiny_peft_model):
            assert torch.equal(layer.get_delta_weight("m1"), layer.get_delta_weight("m2"))
        other_seed = AdapterMerger(
            tiny_peft_model, D2CMergeConfig(num_clusters=1, combination_type="dare_ties", seed=4)
        )
        other_seed.merge(["copy", "sort", "shift"], "m3")
        assert any(
            not torch.equal(layer.get_delta_weight("m1"), layer.get_delta_weight("m3"))
            for _, layer in lora_layers(tiny_peft_model)
        )


class TestLRU:
    def test_live_adapters_stay_bounded_and_are_reused(self, tiny_peft_model):
        merger = AdapterMerger(tiny_peft_model, D2CMergeConfig(num_clusters=2, merge={"cache_size": 3}))
        names = list(tiny.TASK_FAMILIES)
        merger.layer_inputs = tiny.random_layer_inputs(
            tiny_peft_model, names
        )  # the default `regmean` merges with them
        before = set(tiny_peft_model.peft_config)
        clusters = [tuple(sorted((a, b))) for i, a in enumerate(names) for b in names[i + 1 :]]
        for members in clusters:
            merger.adapter_for(members)
            assert merger.num_live <= 3
            assert len(tiny_peft_model.peft_config) <= len(before) + 3
        merges = merger.num_merges
        assert merger.adapter_for(clusters[-1]) in tiny_peft_model.peft_config
        assert merger.num_merges == merges  # still live: no new merge
        assert merger.adapter_for(["copy"]) == "copy"  # a singleton is the source adapter itself
        merger.cleanup()
        assert set(tiny_peft_model.peft_config) == before

    def test_failed_merge_leaves_no_half_registered_adapter(self, tiny_assets):
        base_dir, adapter_dirs = tiny_assets
        model = tiny.load_peft_model(base_dir, {"copy": adapter_dirs["copy"]})
        big = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), tiny.lora_config(r=4))
        big.save_pretrained(str(tiny_assets[0]) + "-r4")
        model.load_adapter(str(tiny_assets[0]) + "-r4", adapter_name="r4")
        merger = AdapterMerger(model, D2CMergeConfig(num_clusters=1, combination_type="ties"))
        with pytest.raises(ValueError, match="same r value"):
            merger.merge(["copy", "r4"], "broken")
        assert "broken" not in model.peft_config


class TestValidation:
    def make_variant(self, tiny_assets, tmp_path, **lora_kwargs):
        base_dir, adapter_dirs = tiny_assets
        variant = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), tiny.lora_config(**lora_kwargs))
        variant.save_pretrained(str(tmp_path / "variant"))
        model = tiny.load_peft_model(base_dir, {"copy": adapter_dirs["copy"]})
        model.load_adapter(str(tmp_path / "variant"), adapter_name="variant")
        return model

    @pytest.mark.parametrize(
        "kwargs,match",
        [({"use_dora": True}, "DoRA"), ({"use_rslora": True}, "rslora"), ({"lora_bias": True}, "lora_bias")],
    )
    def test_lora_variants_are_refused(self, tiny_assets, tmp_path, kwargs, match):
        model = self.make_variant(tiny_assets, tmp_path, **kwargs)
        with pytest.raises(UnsupportedAdapterError, match=match):
            check_source_adapters(model, ["copy", "variant"], "ties")

    def test_unequal_ranks_refused_for_ties_but_fine_for_cat(self, tiny_assets, tmp_path):
        model = self.make_variant(tiny_assets, tmp_path, r=4)
        with pytest.raises(ValueError, match="equal rank"):
            check_source_adapters(model, ["copy", "variant"], "ties")
        check_source_adapters(model, ["copy", "variant"], "cat")

    def test_different_target_modules_refused(self, tiny_assets, tmp_path):
        base_dir, adapter_dirs = tiny_assets
        from peft import LoraConfig

        other = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=8, target_modules=["k_proj"]))
        other.save_pretrained(str(tmp_path / "k"))
        model = tiny.load_peft_model(base_dir, {"copy": adapter_dirs["copy"]})
        model.load_adapter(str(tmp_path / "k"), adapter_name="k")
        with pytest.raises(ValueError, match="adapt different modules"):
            check_source_adapters(model, ["copy", "k"], "cat")

    def test_plain_model_refused(self, tiny_assets):
        with pytest.raises(TypeError, match="must be a peft.PeftModel"):
            check_peft_model(LlamaForCausalLM.from_pretrained(tiny_assets[0]))

    @pytest.mark.parametrize("name,match", [("d2c.0", r"'\.'"), ("copy", "already exists"), ("train", "clashes")])
    def test_unsafe_new_names_refused(self, tiny_peft_model, name, match):
        with pytest.raises(ValueError, match=match):
            check_new_adapter_name(tiny_peft_model, name)


class TestGramMatrix:
    def test_matches_inner_products_of_flattened_updates(self, tiny_peft_model):
        names = list(tiny.TASK_FAMILIES)
        gram = delta_gram_matrix(tiny_peft_model, names)
        features = np.stack(
            [
                torch.cat([layer.get_delta_weight(n).double().flatten() for _, layer in lora_layers(tiny_peft_model)])
                .detach()
                .numpy()
                for n in names
            ]
        )
        np.testing.assert_allclose(gram, features @ features.T, rtol=1e-5)
