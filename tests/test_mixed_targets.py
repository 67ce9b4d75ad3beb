"""Collections whose adapters adapt different modules (issue 22): q/v on some, every linear projection on others.

An update-space merge is defined there (a member that does not adapt a module adds a zero update; the merged adapter
adapts the union), so peft-d2c merges it; PEFT's own combination types are refused with the fix named.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from recompute import task_loss
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.merge.budget import merged_adapter_bytes
from peft_d2c.engine.merge.lora import adapter_modules, lora_factors, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def mixed_assets(tiny_assets, tmp_path_factory):
    """Two extra adapters of other recipes: q/v at rank 4, and every linear projection at rank 8 with rslora."""
    base_dir, adapter_dirs = tiny_assets
    root = tmp_path_factory.mktemp("mixed")
    tokenizer = tiny.make_tokenizer()
    extra = {
        "copy_qv": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        "sort_all": LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True),
    }
    dirs = dict(adapter_dirs)
    for index, (name, config) in enumerate(extra.items()):
        family = name.split("_")[0]
        dirs[name] = tiny.train_adapter(
            base_dir, tokenizer, family, str(root / name), steps=20, seed=50 + index, config=config
        )
    return base_dir, dirs


@pytest.fixture
def mixed_model(mixed_assets):
    base_dir, dirs = mixed_assets
    return tiny.load_peft_model(base_dir, dirs)


def examples_for(names):
    return {n: tiny.make_examples(n.split("_")[0], 10, seed=7) for n in names}


def test_peft_types_are_refused_with_the_update_space_fix(mixed_model, tiny_tokenizer):
    names = [n for n in mixed_model.peft_config if n != "sort_all"]  # copy_qv: q/v; the others: q/v/o
    config = D2CMergeConfig(num_clusters=2, method="random", combination_type="ties")
    with pytest.raises(ValueError, match=r"adapt different modules.*knots_ties.*union"):
        merge_adapters_d2c(mixed_model, examples_for(names), config, tokenizer=tiny_tokenizer, adapter_names=names)


@pytest.mark.parametrize("kind", ["knots_ties", "core_ta", "regmean"])
def test_update_space_merge_adapts_the_union_and_reloads_in_plain_peft(
    mixed_model, mixed_assets, tiny_tokenizer, tmp_path, kind
):
    model = mixed_model
    names = sorted(model.peft_config)
    config = D2CMergeConfig(num_clusters=1, method="random", combination_type=kind)
    result = merge_adapters_d2c(model, examples_for(names), config, tokenizer=tiny_tokenizer)
    merged = result.merged_adapter_names[0]
    union = set().union(*(adapter_modules(model, n) for n in names))
    assert adapter_modules(model, merged) == union
    assert any(m.endswith("mlp.down_proj") for m in union)  # only sort_all adapts the MLP
    if kind == "knots_ties":
        # Where one member alone adapts a module, TIES' disjoint mean is that member's own update (w = 1), and
        # rank 8 holds it exactly: compare with the update read from the adapter's file.
        base_dir, dirs = mixed_assets
        tensors = load_file(f"{dirs['sort_all']}/adapter_model.safetensors")
        checked = 0
        for name, layer in lora_layers(model):
            if not name.endswith("mlp.down_proj"):
                continue
            key = name.removeprefix("base_model.model.")
            a = tensors[f"base_model.model.{key}.lora_A.weight"].double()
            b = tensors[f"base_model.model.{key}.lora_B.weight"].double()
            expected = b @ a * (16 / 8**0.5)  # rslora: alpha / sqrt(r)
            new_a, new_b = lora_factors(layer, merged)
            torch.testing.assert_close((new_b @ new_a).double(), expected, rtol=1e-4, atol=1e-6)
            checked += 1
        assert checked == 2
    # The saved merged adapter loads in plain PEFT, adapts the union, and computes what the in-memory one computes.
    result.save_pretrained(tmp_path / "out")
    # Its bytes are those of the union, as the byte budget counts them (the file's tensors, header aside).
    saved = load_file(str(tmp_path / "out" / merged / "adapter_model.safetensors"))
    assert merged_adapter_bytes(model, names, config) == sum(t.numel() * t.element_size() for t in saved.values())
    fresh = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(mixed_assets[0]), str(tmp_path / "out" / merged)
    )
    assert {n.removeprefix("base_model.model.") for n, _ in lora_layers(fresh)} == {
        n.removeprefix("base_model.model.") for n in union
    }
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.set_adapter(merged)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )


def test_d2c_search_runs_on_a_mixed_collection(mixed_model, tiny_tokenizer):
    """The search refills temporary slots (built once, as wide as the merge of every adapter) with every cluster."""
    names = sorted(mixed_model.peft_config)
    config = D2CMergeConfig(num_clusters=3, num_iterations=12, seed=3, merge={"cache_size": 2})
    result = merge_adapters_d2c(mixed_model, examples_for(names), config, tokenizer=tiny_tokenizer)
    examples = examples_for(names)
    for merged, members in zip(result.merged_adapter_names, result.clusters, strict=True):
        assert adapter_modules(mixed_model, merged) == set().union(*(adapter_modules(mixed_model, m) for m in members))
    assert result.stats["num_refills"] == result.stats["num_merges"] - len(result.clusters)  # final merges: fresh
    # The losses the search saw (refilled slots included) are those of the fresh final merges, scored independently.
    for task in names:
        expected = task_loss(mixed_model, result.routing[task], tiny_tokenizer, examples[task])
        assert result.task_losses[task] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", ["regmean", "knots_ties"])
def test_a_wide_slot_serves_narrower_merges_as_their_own_adapter(mixed_model, kind):
    """With `sources`, a slot is built once for the merge of them all (every linear projection, rank 8) and then holds
    merges of rank 4 on q/v, or rank 8 on q/v/o: zero-padded, zeros elsewhere (also after a merge that adapted every
    projection), the logits of a fresh merge."""
    model = mixed_model
    names = sorted(model.peft_config)
    # A merge weight makes even one member a merge (of rank 4 for copy_qv), not the source adapter itself.
    merge = {"cache_size": 2, "weight": 0.5}
    merger = AdapterMerger(model, D2CMergeConfig(num_clusters=2, combination_type=kind, merge=merge), sources=names)
    merger.layer_inputs = tiny.random_layer_inputs(model, names)  # used by `regmean` only
    config = D2CMergeConfig(num_clusters=2, combination_type=kind, merge=merge, merged_adapter_prefix="f")
    fresh = AdapterMerger(model, config)
    fresh.layer_inputs = merger.layer_inputs
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.eval()
    for index, cluster in enumerate((["copy_qv"], ["sort_all", "reverse"], ["first", "last"], ["copy", "copy_qv"])):
        slot = merger.adapter_for(cluster)
        assert model.peft_config[slot].r == 8 and adapter_modules(model, slot) == set(
            adapter_modules(model, "sort_all")
        )
        own = fresh.merge(cluster, f"fresh{index}")
        assert model.peft_config[own].r == (4 if cluster == ["copy_qv"] else 8)
        logits = {}
        for name in (slot, own):
            model.set_adapter(name)
            with torch.no_grad():
                logits[name] = model(input_ids=ids).logits
        torch.testing.assert_close(logits[slot], logits[own], rtol=1e-5, atol=1e-6)
        # The slot's update is the fresh merge's, module by module (zero where the fresh merge has no layer).
        for _, layer in lora_layers(model):
            a, b = lora_factors(layer, slot)
            expected = (
                torch.zeros_like(b @ a)
                if lora_factors(layer, own) is None
                else lora_factors(layer, own)[1] @ lora_factors(layer, own)[0]
            )
            torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-7)
    assert merger.num_merges == 4 and merger.num_refills == 4 and merger.num_live == 2
