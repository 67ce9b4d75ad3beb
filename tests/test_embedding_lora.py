"""Adapters that adapt `embed_tokens` (LoRA on an `nn.Embedding`: `lora_embedding_A` / `lora_embedding_B`).

`regmean` merges with the layer inputs of every module, and an embedding's inputs are token ids: such adapters are
refused before any work, with the fix named. PEFT's own types and the other update-space types merge them; the
expected values are computed here from the raw factors (dense SVDs of the mean update) or by PEFT's
`add_weighted_adapter` itself.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, UnsupportedAdapterError, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.merge.lora import check_source_adapters, lora_factors, lora_layers
from peft_d2c.engine.merge.merging import merge_weights_for

# Not "copy": PEFT keeps embedding factors in an `nn.ParameterDict`, whose `copy` method the name would shadow.
TASKS = ["reverse", "sort", "shift"]
EMBEDDING = "base_model.model.model.embed_tokens"


@pytest.fixture(scope="module")
def embedding_adapter_dirs(tiny_assets, tmp_path_factory):
    """Three briefly trained rank-4 LoRAs on embed_tokens, q_proj and v_proj."""
    base_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("embedding")
    tokenizer = tiny.make_tokenizer()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"], lora_dropout=0.0)
    return {
        task: tiny.train_adapter(base_dir, tokenizer, task, str(root / task), steps=10, seed=i, config=config)
        for i, task in enumerate(TASKS)
    }


@pytest.fixture
def embedding_model(tiny_assets, embedding_adapter_dirs):
    model = tiny.load_peft_model(tiny_assets[0], embedding_adapter_dirs)
    assert any(lora_factors(layer, TASKS[0]) is not None for name, layer in lora_layers(model) if name == EMBEDDING)
    return model


def examples(tiny_task_examples):
    return {task: tiny_task_examples[task] for task in TASKS}


def test_regmean_refuses_embedding_adapters_before_any_work(embedding_model, tiny_tokenizer, tiny_task_examples):
    """On main at 710cc18 the default `regmean` run passed the checks, then crashed collecting layer inputs (the
    embedding's forward pre-hook receives token ids)."""
    with pytest.raises(UnsupportedAdapterError, match="embed_tokens.*`combination_type`"):
        check_source_adapters(embedding_model, TASKS, "regmean")
    before = set(embedding_model.peft_config)
    config = D2CMergeConfig(num_clusters=2, method="random", combination_type="regmean")
    with pytest.raises(UnsupportedAdapterError, match="embed_tokens"):
        merge_adapters_d2c(embedding_model, examples(tiny_task_examples), config, tokenizer=tiny_tokenizer)
    assert set(embedding_model.peft_config) == before


@pytest.mark.parametrize("combination_type", ["ties", "cat"])
def test_peft_types_merge_embedding_adapters(embedding_model, tiny_tokenizer, tiny_task_examples, combination_type):
    """Each merged adapter equals PEFT's own `add_weighted_adapter` merge of its cluster, embedding included."""
    config = D2CMergeConfig(num_clusters=2, method="random", combination_type=combination_type)
    result = merge_adapters_d2c(embedding_model, examples(tiny_task_examples), config, tokenizer=tiny_tokenizer)
    for index, (name, cluster) in enumerate(zip(result.merged_adapter_names, result.clusters, strict=True)):
        check = f"check{index}"
        embedding_model.add_weighted_adapter(
            sorted(cluster),
            merge_weights_for(combination_type, len(cluster)),
            check,
            combination_type=combination_type,
            density=config.merge.density,
        )
        for module, layer in lora_layers(embedding_model):
            ours, theirs = lora_factors(layer, name), lora_factors(layer, check)
            torch.testing.assert_close(ours[1] @ ours[0], theirs[1] @ theirs[0], msg=module)


@pytest.mark.parametrize("combination_type", ["core_ta", "tsv_m"])
def test_update_types_allocate_ranks_on_embedding_adapters(
    embedding_model, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, combination_type
):
    """`rank_allocation="spectrum"` truncates the embedding's factors too (on main at 710cc18: `KeyError`); every
    module, the embedding included, is the best rank-r approximation of the cluster's merge at its allocated rank
    (`core_ta`: of the mean update, from a dense SVD), and plain PEFT loads the saved adapters."""
    config = D2CMergeConfig(
        num_clusters=2, method="random", combination_type=combination_type, merge={"rank_allocation": "spectrum"}
    )
    result = merge_adapters_d2c(embedding_model, examples(tiny_task_examples), config, tokenizer=tiny_tokenizer)
    result.save_pretrained(tmp_path / "out")
    for name, cluster in zip(result.merged_adapter_names, result.clusters, strict=True):
        for module, layer in lora_layers(embedding_model):
            a, b = lora_factors(layer, name)
            assert float(layer.scaling[name]) == 1.0
            if combination_type == "core_ta":
                mean = sum(
                    float(layer.scaling[m]) * lora_factors(layer, m)[1].double() @ lora_factors(layer, m)[0].double()
                    for m in cluster
                ) / len(cluster)
                u, s, vh = torch.linalg.svd(mean)
                r = a.shape[0]
                best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
                error = torch.linalg.norm(b.double() @ a.double() - best) / torch.linalg.norm(mean)
                assert float(error) < 1e-4, (name, module)
        base = LlamaForCausalLM.from_pretrained(tiny_assets[0])
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / name), adapter_name=name).eval()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        embedding_model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(input_ids=ids).logits, embedding_model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5
            )
