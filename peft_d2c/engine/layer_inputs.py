"""The inputs every LoRA layer sees on an adapter's own task: Gram matrices for the data-aware merges (`regmean`).

For adapter t (named after its task), the few-shot examples of task t run through the model with adapter t active
(PEFT's `adapter_names=`), and a forward pre-hook on every LoRA layer adds up x·x^T over the tokens of the examples
(prompt and completion, padding excluded): G_t = X_t^T·X_t / (number of tokens), the token mean, so every task weighs
alike whatever its length. Layers fed the same tensor (q, k and v of one block read the same normed hidden states)
share one Gram (a layer fed the very tensor object its predecessor was fed): the memory is one in x in matrix per
distinct layer input and adapter. May import the engine modules
`lora`, `merging`, `scoring` and `tokenization`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..combination_types import DATA_TYPES
from .lora import lora_layers
from .merging import AdapterMerger
from .scoring import LossScorer, input_device, token_batches
from .tokenization import TokenizedExample, padded_batch


def input_grams(
    peft_model: torch.nn.Module,
    tokenized: Mapping[str, Sequence[TokenizedExample]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
    max_batch_tokens: int | None = None,
    stats: dict[str, int] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per adapter of `tokenized` (adapter name = task name), the Gram matrix of every LoRA layer's inputs on its
    task's examples, with that adapter active.

    Args:
        peft_model (`PeftModel`): The model holding the adapters, in eval mode (PEFT's `adapter_names=` needs it).
        tokenized (`Mapping[str, Sequence[TokenizedExample]]`): The tokenised few-shot examples of every adapter's task.
        pad_token_id (`int`): Padding id of the batches.
        batch_size (`int`, defaults to 32), max_batch_tokens (`int`, *optional*): Rows and tokens per forward pass.
        stats (`dict`, *optional*): Its `"forward_passes"` entry is increased by the forward passes run here.

    Returns:
        `dict[str, list[Tensor]]`: adapter -> one (in x in) Gram per LoRA layer, in `lora_layers` order, on the
            layer input's device, in float32 (float64 for a float64 model). Layers fed the same input hold the same
            tensor object.

    Example:
        ```python
        >>> grams = input_grams(peft_model, scorer.tokenized, pad_token_id=scorer.pad_token_id)
        >>> grams["capital"][0].shape  # doctest: +SKIP
        torch.Size([64, 64])
        ```
    """
    layers = [layer for _, layer in lora_layers(peft_model)]
    settings = {"pad_token_id": pad_token_id, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens}
    stats = stats if stats is not None else {}
    stats.setdefault("forward_passes", 0)
    return {
        adapter: _adapter_grams(peft_model, layers, adapter, rows, stats, **settings)
        for adapter, rows in tokenized.items()
    }


def _adapter_grams(
    peft_model,
    layers,
    adapter: str,
    rows: Sequence[TokenizedExample],
    stats,
    *,
    pad_token_id,
    batch_size,
    max_batch_tokens,
) -> list[torch.Tensor]:
    """One adapter's Grams (`input_grams`): its task's rows run with it active, every layer's input recorded."""
    device = input_device(peft_model)
    sums: dict[int, torch.Tensor] = {}  # index of the first layer fed an input -> its summed x·x^T
    owner = [-1] * len(layers)  # layer index -> the index whose sum it shares
    batch: dict[str, object] = {}

    def record(index: int):
        def hook(module, args):
            x = args[0]
            if x is batch["last"]:  # the tensor the previous layer was fed (q, k, v; gate and up)
                owner[index] = owner[batch["last_index"]]
                return
            batch.update(last=x, last_index=index)
            owner[index] = index
            tokens = x[batch["mask"].to(x.device)].to(torch.promote_types(x.dtype, torch.float32))
            gram = tokens.mT @ tokens
            sums[index] = gram if index not in sums else sums[index] + gram

        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    count = 0
    try:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids), reverse=True)
        lengths = [len(row.input_ids) for row in rows]
        with torch.inference_mode():
            for indices in token_batches(order, lengths, batch_size, max_batch_tokens):
                input_ids, attention_mask = padded_batch([rows[i].input_ids for i in indices], pad_token_id)
                mask = attention_mask.bool()
                batch.update(last=None, last_index=-1, mask=mask)
                peft_model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    adapter_names=[adapter] * len(indices),
                )
                count += int(mask.sum())
                stats["forward_passes"] += 1
    finally:
        for handle in handles:
            handle.remove()
    means = {index: total / max(count, 1) for index, total in sums.items()}
    return [means[owner[i]] for i in range(len(layers))]


def layer_input_bytes(layer_inputs: Mapping[str, Sequence[torch.Tensor]]) -> int:
    """Bytes the Grams of `layer_inputs` (adapter -> per layer, as `input_grams` returns) hold, each shared tensor
    counted once: the memory a `regmean` run keeps for its whole length, N times one adapter's."""
    distinct = {id(gram): gram for grams in layer_inputs.values() for gram in grams}
    return sum(gram.numel() * gram.element_size() for gram in distinct.values())


def attach_layer_inputs(merger: AdapterMerger, scorer: LossScorer) -> None:
    """Give `merger` the Grams its data-aware combination type merges with (`combination_types.DATA_TYPES`), from the scorer's
    tokenised few-shot examples; nothing for the other types. Adapters that already have theirs are skipped; the
    forward passes run are added to the scorer's `forward_passes`.

    Raises:
        ValueError: If the type is data-aware and the scorer has no tokenised examples (no tokenizer was given).
    """
    if merger.config.combination_type not in DATA_TYPES:
        return
    if not scorer.tokenized:
        raise ValueError(
            f"combination_type={merger.config.combination_type!r} merges with the layer inputs of the few-shot "
            "examples: pass the base model's `tokenizer=` (also with a custom `score_fn`), or choose another "
            "`combination_type`."
        )
    missing = {task: rows for task, rows in scorer.tokenized.items() if task not in merger.layer_inputs}
    was_training = scorer.model.training
    scorer.model.eval()  # PEFT's `adapter_names=` needs eval mode
    stats = {"forward_passes": 0}
    try:
        grams = input_grams(
            scorer.model,
            missing,
            pad_token_id=scorer.pad_token_id,
            batch_size=scorer.batch_size,
            max_batch_tokens=scorer.max_batch_tokens,
            stats=stats,
        )
    finally:
        scorer.model.train(was_training)
    merger.layer_inputs.update(grams)
    scorer.forward_passes += stats["forward_passes"]  # the run's cost counts them (about one pass per task)
