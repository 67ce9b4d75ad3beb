"""The completion loss of mixed-adapter batches equals the loss computed row by row from the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging import version
from peft import LoraConfig, get_peft_model

from peft_d2c.data.examples import Example
from peft_d2c.engine.scoring.loss import (
    _keeps_logits_by_mask,
    completion_loss_sums,
    pad_token_id_for,
    tokenize_example,
)


def row_by_row(model, rows, adapter_names):
    """Summed completion cross-entropy of each row alone, from every position's logits, under its adapter."""
    sums, counts = [], []
    for row, name in zip(rows, adapter_names, strict=True):
        ids = torch.tensor([row.input_ids])
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0]
            else:
                model.set_adapter(name)
                logits = model(input_ids=ids).logits[0]
        targets = ids[0, row.completion_start :]
        sums.append(float(F.cross_entropy(logits[row.completion_start - 1 : -1], targets, reduction="sum")))
        counts.append(len(targets))
    return sums, counts


def mixed_rows(tokenizer, examples):
    rows, names = [], []
    for i, (task, adapter) in enumerate([("copy", "copy"), ("sort", "reverse"), ("first", "__base__")]):
        for example in examples[task][: 3 + i]:  # rows of different lengths in one batch
            rows.append(tokenize_example(tokenizer, Example(example["prompt"], example["completion"])))
            names.append(adapter)
    return rows, names


def test_mixed_batch_loss_matches_row_by_row_full_logits(tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    model = tiny_peft_model.eval()
    # transformers >= 5.21 takes the completion-positions-only path (a boolean `logits_to_keep`); older releases
    # fall back to full logits, found by trying. Either way the losses must be the row-by-row ones.
    fast = version.parse(transformers.__version__) >= version.parse("5.21")
    assert _keeps_logits_by_mask(model) == fast
    rows, names = mixed_rows(tiny_tokenizer, tiny_task_examples)
    sums, counts, passes = completion_loss_sums(
        model, rows, names, pad_token_id=pad_token_id_for(tiny_tokenizer), batch_size=5
    )
    expected_sums, expected_counts = row_by_row(model, rows, names)
    assert passes == 3 and counts == expected_counts
    assert sums == pytest.approx(expected_sums, rel=1e-5)


def test_adapted_output_layer_falls_back_to_full_logits(tiny_assets, tiny_tokenizer, tiny_task_examples):
    """With a LoRA on `lm_head`, PEFT splits that layer's input by batch row, so every position's logits are kept."""
    base_dir, _ = tiny_assets
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config, adapter_name="copy")
    model.add_adapter("reverse", LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    model.eval()
    assert not _keeps_logits_by_mask(model)
    rows, names = mixed_rows(tiny_tokenizer, tiny_task_examples)
    sums, counts, _ = completion_loss_sums(
        model, rows, names, pad_token_id=pad_token_id_for(tiny_tokenizer), batch_size=4
    )
    expected_sums, expected_counts = row_by_row(model, rows, names)
    assert counts == expected_counts and sums == pytest.approx(expected_sums, rel=1e-5)


def test_plain_model_without_adapter_names(tiny_assets, tiny_tokenizer, tiny_task_examples):
    base_dir, _ = tiny_assets
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    row = tokenize_example(tiny_tokenizer, Example(**tiny_task_examples["copy"][0]))
    (total,), (count,), _ = completion_loss_sums(model, [row], None, pad_token_id=0, batch_size=1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0]
    targets = torch.tensor(row.input_ids[row.completion_start :])
    assert count == len(targets)
    expected = F.cross_entropy(logits[row.completion_start - 1 : -1], targets, reduction="sum")
    assert total == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("left", [False, True])
def test_padded_batch_pads_to_the_longest_on_the_asked_side(left):
    from peft_d2c.engine.scoring.tokenization import padded_batch

    input_ids, mask = padded_batch([[5, 6, 7], [8], [9, 10]], pad_token_id=0, left=left)
    if left:  # generation: every prompt ends at the last column
        assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
        assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    else:  # scoring: every token keeps its position
        assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
        assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert input_ids.dtype == mask.dtype == torch.long


def test_the_loss_is_the_mean_completion_token_loss_pooled_over_a_tasks_examples(
    tiny_peft_model, tiny_tokenizer, tiny_task_examples
):
    """The scorer's one score: per task, the mean cross-entropy of every completion token of its examples under the
    merge (pooled over tokens, not a mean of per-example means); the expected value comes from the merged adapter's
    full logits, one example at a time. A request asked again is answered from the cache, and a checkpointed cache
    (of this version, or an older one that also held the miss) restores the same losses."""
    from peft_d2c import D2CMergeConfig
    from peft_d2c.engine.merge.merging import AdapterMerger
    from peft_d2c.engine.scoring.loss import LossScorer

    model = tiny_peft_model.eval()
    tasks = sorted(tiny_task_examples)[:2]
    examples = {t: [Example(e["prompt"], e["completion"]) for e in tiny_task_examples[t][:4]] for t in tasks}
    config = D2CMergeConfig(num_clusters=1, combination_type="core_ta", merged_adapter_prefix="m")
    merger = AdapterMerger(model, config)
    scorer = LossScorer.for_config(model, tiny_tokenizer, examples, merger)
    members = tuple(tasks)
    try:
        losses = scorer([(members, t) for t in tasks])
        passes = scorer.forward_passes
        assert scorer([(members, t) for t in reversed(tasks)]) == losses[::-1]
        assert scorer.forward_passes == passes and scorer.cache_misses == len(tasks)
        merged = merger.adapter_for(members)
        for task, loss in zip(tasks, losses, strict=True):
            token_losses = []
            with torch.no_grad():
                for row in scorer.tokenized[task]:
                    model.set_adapter(merged)
                    ids = torch.tensor([row.input_ids])
                    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                    targets = ids[0, row.completion_start :]
                    picked = log_probs[row.completion_start - 1 : -1].gather(1, targets[:, None])
                    token_losses += (-picked[:, 0]).tolist()
            assert isinstance(loss, float)
            assert loss == pytest.approx(sum(token_losses) / len(token_losses), rel=1e-4)  # pooled over tokens
    finally:
        merger.cleanup()
    saved = scorer.cache_to_list()
    assert saved == [[list(members), t, {"loss": loss}] for t, loss in zip(tasks, losses, strict=True)]
    older = [[m, t, {**scores, "miss": 0.5}] for m, t, scores in saved]  # a checkpoint that held both scores
    for items in (saved, older):
        scorer.load_cache(items)
        assert scorer.cache == {(members, t): loss for t, loss in zip(tasks, losses, strict=True)}
