"""The default merge at a real width (issue 35): layer inputs kept as token matrices, their size predicted before they
are collected, a run refused before any work when they would not fit, and the merged update of a wide model equal
to the dense Gram-form RegMean of inputs captured by hand.

The wide model is a randomly initialised Llama of hidden size 1024 (one block): ten short examples per task are far
fewer tokens than that width, which is the case of every 1B-8B model (hidden 2048-4096)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from recompute import captured_layer_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from peft_d2c import D2CMergeConfig, MemoryLimitError, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.merge.regmean import layer_input_bytes
from peft_d2c.engine.scoring.layer_inputs import input_factors, predict_layer_input_bytes
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.sizes import format_size

WIDE = 1024
TASKS = ["copy", "reverse", "sort", "first"]


@pytest.fixture(scope="module")
def wide_model():
    """A 1024-wide, one-block Llama with four random q/v LoRAs (r = 8), one per tiny task."""
    tokenizer = tiny.make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDE,
        intermediate_size=2816,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name=TASKS[0])
    for task in TASKS[1:]:
        model.add_adapter(task, lora)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for task in TASKS:
                layer.lora_B[task].weight.mul_(0.05)
    examples = {t: tiny.make_examples(t, 10, seed=i) for i, t in enumerate(TASKS)}
    return model.eval(), tokenizer, examples


def dense_regmean(updates, grams, weights, alpha):
    """(Σ w_i ΔW_i G̃_i)(Σ w_j G̃_j)^-1 with G̃ = α G + (1 - α) diag(G), on dense float64 matrices."""

    def regularise(g):
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))

    left = sum(w * u @ regularise(g) for u, g, w in zip(updates, grams, weights, strict=True))
    right = sum(w * regularise(g) for g, w in zip(grams, weights, strict=True))
    return torch.linalg.solve(right.T, left.T).T


def test_wide_layer_inputs_are_token_matrices_of_the_predicted_size(wide_model):
    model, tokenizer, examples = wide_model
    merger = AdapterMerger(model, D2CMergeConfig(num_clusters=2))
    scorer = LossScorer.for_config(model, tokenizer, normalize_task_examples(examples), merger)
    tokens = {t: sum(len(row.input_ids) for row in rows) for t, rows in scorer.tokenized.items()}
    assert max(tokens.values()) < WIDE
    predicted = predict_layer_input_bytes(model, scorer.tokenized)
    factors = input_factors(model, scorer.tokenized, pad_token_id=scorer.pad_token_id)
    # one distinct input per block (q and v read the same hidden states): m x 1024 float32 per task, not 1024^2
    assert predicted == layer_input_bytes(factors) == sum(m * WIDE * 4 for m in tokens.values())
    for task, rows in scorer.tokenized.items():
        q, v = factors[task]
        assert q is v and q.shape == (tokens[task], WIDE)
        x = captured_layer_inputs(model, rows, task)[0]
        torch.testing.assert_close(q.double().T @ q.double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_wide_merge_equals_the_dense_gram_form(wide_model):
    model, tokenizer, examples = wide_model
    result = merge_adapters_d2c(
        model,
        examples,
        D2CMergeConfig(num_clusters=1, method="random", merge={"regmean_alpha": 0.8}),
        tokenizer=tokenizer,
    )
    merged = result.merged_adapter_names[0]
    merger = AdapterMerger(model, D2CMergeConfig(num_clusters=1))
    tokenized = LossScorer.for_config(model, tokenizer, normalize_task_examples(examples), merger).tokenized
    grams = {}
    for task in TASKS:
        x = captured_layer_inputs(model, tokenized[task], task)[0]
        grams[task] = x.T @ x / x.shape[0]
    try:
        for _, layer in lora_layers(model):
            updates = []
            for task in sorted(TASKS):
                a, b = lora_factors(layer, task)
                updates.append(b.double() @ a.double() * layer.scaling[task])
            expected = dense_regmean(updates, [grams[t] for t in sorted(TASKS)], [0.25] * 4, 0.8)
            a, b = lora_factors(layer, merged)
            actual = (b @ a).double() * layer.scaling[merged]
            # rank 8 kept of a rank-32 merge: the best rank-8 approximation of the dense merge (Eckart-Young)
            residual = torch.linalg.norm(actual - expected)
            torch.testing.assert_close(
                residual, torch.linalg.norm(torch.linalg.svdvals(expected)[8:]), rtol=1e-3, atol=0
            )
    finally:
        model.delete_adapter(merged)


def test_a_run_that_would_exceed_memory_limit_is_refused_before_any_work(
    tiny_peft_model, tiny_tokenizer, tiny_task_examples
):
    model = tiny_peft_model
    adapters = set(model.peft_config)
    shape = model.base_model.model.config
    fewshot = normalize_task_examples({t: rows[:10] for t, rows in tiny_task_examples.items()})  # a run's 10
    merger = AdapterMerger(model, D2CMergeConfig(num_clusters=2))
    tokenized = LossScorer.for_config(model, tiny_tokenizer, fewshot, merger).tokenized
    # q/v/o adapters: two distinct inputs per block, each min(tokens, hidden) x hidden float32 per task
    expected = sum(
        2 * shape.num_hidden_layers * min(m, shape.hidden_size) * shape.hidden_size * 4
        for m in (sum(len(r.input_ids) for r in rows) for rows in tokenized.values())
    )
    config = D2CMergeConfig(num_clusters=2, merge={"memory_limit": "1MB"})
    with pytest.raises(MemoryLimitError, match="memory_limit") as error:
        merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
    assert format_size(expected) in str(error.value)
    assert set(model.peft_config) == adapters  # nothing merged, nothing left behind
    # a limit above the process's memory plus the layer inputs lets the same run through
    result = merge_adapters_d2c(
        model,
        tiny_task_examples,
        D2CMergeConfig(num_clusters=2, num_iterations=1, merge={"memory_limit": "1TB"}),
        tokenizer=tiny_tokenizer,
    )
    assert result.stats["layer_input_bytes"] == expected


def test_memory_limit_must_be_a_size():
    with pytest.raises(ValueError, match="memory_limit"):
        D2CMergeConfig(num_clusters=2, merge={"memory_limit": "lots"})
