"""`D2CResult.add_adapter`: a new task's adapter joins the cluster with the lowest loss; the others stay as they were."""

from __future__ import annotations

import pytest
import torch
from recompute import task_loss
from safetensors.torch import load_file

from peft_d2c import D2CMergeConfig, D2CResult, merge_adapters_d2c
from peft_d2c.engine.merge.budget import partition_bytes
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.merging import merge_seed, merge_weights_for
from peft_d2c.engine.merge.rank_budget import allocate_ranks
from peft_d2c.evaluation.heldout import loss_matrix
from peft_d2c.online import attach_model

NEW = "shift"


def _weights(model, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{adapter_name}." in k}


@pytest.fixture
def partial_result(tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    names = [n for n in tiny_peft_model.peft_config if n != NEW]
    # `ties`: the test's independent check merges with PEFT's own `add_weighted_adapter`.
    config = D2CMergeConfig(num_clusters=2, num_iterations=6, show_progress=False, combination_type="ties")
    examples = {n: tiny_task_examples[n] for n in names}
    return merge_adapters_d2c(tiny_peft_model, examples, config, tokenizer=tiny_tokenizer, adapter_names=names)


def test_new_adapter_lands_in_the_cluster_with_the_lowest_loss(partial_result, tiny_tokenizer, tiny_task_examples):
    result = partial_result
    model = result.model
    before = {name: _weights(model, name) for name in result.merged_adapter_names}
    old_clusters = [list(c) for c in result.clusters]

    outcome = result.add_adapter(NEW, tiny_task_examples[NEW], tokenizer=tiny_tokenizer)

    # Independent check: merge each cluster + the new adapter with PEFT and score the new task.
    for i, members in enumerate(old_clusters):
        merged = sorted([*members, NEW])
        with torch.random.fork_rng():
            torch.manual_seed(merge_seed(result.config.seed, merged))
            model.add_weighted_adapter(
                merged, merge_weights_for("ties", len(merged)), f"check{i}", combination_type="ties", density=0.5
            )
    matrix = loss_matrix(model, tiny_tokenizer, {NEW: tiny_task_examples[NEW]}, ["check0", "check1"])[0]
    assert outcome["losses"] == pytest.approx(matrix, rel=1e-5)
    best = min(range(2), key=lambda i: matrix[i])
    assert outcome["cluster"] == best and result.assignment[NEW] == best
    assert result.routing[NEW] == result.merged_adapter_names[best]
    assert sorted(result.clusters[best]) == sorted([*old_clusters[best], NEW])
    assert result.clusters[1 - best] == old_clusters[1 - best]

    after = {name: _weights(model, name) for name in result.merged_adapter_names}
    untouched = result.merged_adapter_names[1 - best]
    assert after[untouched].keys() == before[untouched].keys()
    assert all(torch.equal(after[untouched][k], before[untouched][k]) for k in before[untouched])
    changed = result.merged_adapter_names[best]
    check = _weights(model, f"check{best}")
    assert all(torch.equal(v, check[k.replace(changed, f"check{best}")]) for k, v in after[changed].items())
    assert not model.training and model.active_adapter == "copy"


def test_add_adapter_from_a_saved_result(tmp_path, tiny_assets, tiny_tokenizer, tiny_task_examples):
    from transformers import LlamaForCausalLM

    from peft_d2c.hub.adapters import load_adapters

    base_dir, adapter_dirs = tiny_assets
    names = [n for n in adapter_dirs if n != NEW]
    source_model = load_adapters(
        LlamaForCausalLM.from_pretrained(base_dir), [adapter_dirs[n] for n in names], names=names
    )
    config = D2CMergeConfig(num_clusters=2, num_iterations=2, show_progress=False)
    examples = {n: tiny_task_examples[n] for n in names}
    merge_adapters_d2c(source_model, examples, config, tokenizer=tiny_tokenizer).save_pretrained(tmp_path / "out")
    loaded = D2CResult.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="holds no model"):
        loaded.add_adapter(NEW, tiny_task_examples[NEW], tokenizer=tiny_tokenizer)
    model = attach_model(loaded, tmp_path / "out")
    untouched = {name: _weights(model, name) for name in loaded.merged_adapter_names}
    load_adapters(model, adapter_dirs[NEW], names=[NEW])
    outcome = loaded.add_adapter(NEW, tiny_task_examples[NEW], tokenizer=tiny_tokenizer, member_examples=examples)
    assert loaded.sources[NEW]["path"].endswith(NEW)
    other = loaded.merged_adapter_names[1 - outcome["cluster"]]
    assert all(torch.equal(v, untouched[other][k]) for k, v in _weights(model, other).items())


@pytest.mark.parametrize(
    "name,examples,message",
    [
        ("copy", [{"prompt": "a b c =", "completion": "a b c"}], "already clustered"),
        ("nope", [{"prompt": "a b c =", "completion": "a b c"}], "not loaded"),
        (NEW, [], "no examples|empty"),
    ],
)
def test_add_adapter_rejects_bad_input(partial_result, tiny_tokenizer, name, examples, message):
    with pytest.raises(ValueError, match=message):
        partial_result.add_adapter(name, examples, tokenizer=tiny_tokenizer)
    assert NEW not in partial_result.routing


def test_regmean_result_needs_and_uses_every_members_examples(tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    """A data-aware merge needs the members' layer inputs: refused without their examples, and with them the new
    cluster's merged adapter equals a fresh `regmean` run's merge of the same members."""
    names = [n for n in tiny_peft_model.peft_config if n != NEW]
    config = D2CMergeConfig(num_clusters=2, method="random", combination_type="regmean")
    examples = {n: tiny_task_examples[n] for n in names}
    result = merge_adapters_d2c(tiny_peft_model, examples, config, tokenizer=tiny_tokenizer, adapter_names=names)
    with pytest.raises(ValueError, match="member_examples"):
        result.add_adapter(NEW, tiny_task_examples[NEW], tokenizer=tiny_tokenizer)
    outcome = result.add_adapter(NEW, tiny_task_examples[NEW], tokenizer=tiny_tokenizer, member_examples=examples)
    members = result.clusters[outcome["cluster"]]
    assert NEW in members
    fresh = D2CMergeConfig(num_clusters=1, method="random", combination_type="regmean", merged_adapter_prefix="fresh")
    merge_adapters_d2c(
        tiny_peft_model,
        {m: tiny_task_examples[m] for m in members},
        fresh,
        tokenizer=tiny_tokenizer,
        adapter_names=members,
    )
    ours, theirs = _weights(tiny_peft_model, outcome["merged_adapter"]), _weights(tiny_peft_model, "fresh_0")
    assert ours and all(
        torch.allclose(v, theirs[k.replace(outcome["merged_adapter"], "fresh_0")], atol=1e-6) for k, v in ours.items()
    )


def _saved_bytes(folder) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(folder / "adapter_model.safetensors").values())


def test_a_spectrum_result_re_merges_with_allocated_ranks_within_the_budget(
    tiny_peft_model, tiny_tokenizer, tiny_task_examples, tmp_path
):
    """`rank_allocation="spectrum"`: the receiving cluster is re-merged by the same rule (greedy σ² per byte) with the
    bytes the other, untouched adapters leave of the run's budget (here the uniform bytes of the partition), and the
    real bytes of what is saved stay within it. On main at 710cc18 it was re-merged at rank 8 everywhere and checked
    against uniform sizes, not the stored ones."""
    model = tiny_peft_model
    names = [n for n in model.peft_config if n != NEW]
    config = D2CMergeConfig(
        num_clusters=2, method="random", combination_type="core_ta", merge={"rank_allocation": "spectrum"}
    )
    examples = {n: tiny_task_examples[n] for n in names}
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny_tokenizer, adapter_names=names)
    outcome = result.add_adapter(NEW, tiny_task_examples[NEW], tokenizer=tiny_tokenizer)
    changed = outcome["merged_adapter"]
    other = next(n for n in result.merged_adapter_names if n != changed)
    budget = partition_bytes(model, result.clusters, D2CMergeConfig(num_clusters=2, combination_type="core_ta"))
    result.save_pretrained(tmp_path / "out")
    saved = {n: _saved_bytes(tmp_path / "out" / n) for n in result.merged_adapter_names}
    assert sum(saved.values()) <= budget
    assert {n: s["bytes"] for n, s in result.stats["merged_sizes"].items()} == saved
    # Independently: the dense mean update of the new cluster per module, its singular values, the greedy allocation
    # of what `other` leaves, and the best truncation of every module at its rank.
    members = result.clusters[outcome["cluster"]]
    spectra, costs, updates, ranks = {}, {}, {}, {}
    for module, layer in lora_layers(model):
        update = sum(
            float(layer.scaling[m]) * lora_factors(layer, m)[1].double() @ lora_factors(layer, m)[0].double()
            for m in members
        ) / len(members)
        updates[module] = update
        spectra[module] = torch.linalg.svdvals(update)[: 8 * len(members)].tolist()
        a, b = lora_factors(layer, changed)
        costs[module] = (a.shape[1] + b.shape[0]) * a.element_size()
        ranks[module] = a.shape[0]
    expected = allocate_ranks(spectra, costs, budget - saved[other])
    kept = sum(sum(s**2 for s in spectra[m][: ranks[m]]) for m in spectra)
    assert kept == pytest.approx(sum(sum(s**2 for s in spectra[m][: expected[m]]) for m in spectra), rel=1e-5)
    assert len(set(ranks.values())) > 1
    for module, layer in lora_layers(model):
        a, b = lora_factors(layer, changed)
        u, s, vh = torch.linalg.svd(updates[module])
        r = ranks[module]
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        got = (b.double() @ a.double()) * float(layer.scaling[changed])
        assert float(torch.linalg.norm(got - best) / torch.linalg.norm(updates[module])) < 1e-4, module
    # The new task's reported loss is that of the shipped adapter, as a run reports it under "spectrum".
    shipped = task_loss(model, changed, tiny_tokenizer, tiny_task_examples[NEW])
    assert result.task_losses[NEW] == pytest.approx(shipped, rel=1e-4)
