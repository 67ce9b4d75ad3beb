"""The inputs every LoRA layer sees on an adapter's own task, kept as token matrices for the data-aware merges
(`regmean`).

For adapter t (named after its task), the few-shot examples of task t run through the model with adapter t active
(PEFT's `adapter_names=`), and a forward pre-hook on every LoRA layer keeps the inputs of the examples' tokens
(prompt and completion, padding excluded), scaled by 1/√m (m tokens): F_t = X_t/√m, so that F_t^T·F_t is the token
mean of x·x^T and every task weighs alike whatever its length. Ten examples are a few hundred tokens, far fewer than
a real model's input width (4096 for Llama-3-8B): m x in floats instead of an in x in Gram, 12x less at that width.
Where the tokens outnumber the width, the in x in triangular factor of their Gram is kept instead (never larger than
the Gram). Layers fed the same tensor (q, k and v of one block read the same normed hidden states) share one factor
(a layer fed the very tensor object its predecessor was fed). The factors live on the CPU by default (`storage_device`)
and each merge moves one layer input's at a time to the adapters' device. May import the merge modules `lora`,
`merging` and `regmean`, and the scoring modules `loss` and `tokenization`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psutil
import torch

from ...combination_types import DATA_TYPES
from ...errors import MemoryLimitError
from ...sizes import format_size, parse_size
from ..merge.lora import lora_layers
from ..merge.merging import AdapterMerger
from ..merge.regmean import compress_rows
from .loss import LossScorer, input_device, token_batches
from .tokenization import TokenizedExample, padded_batch


def input_factors(
    peft_model: torch.nn.Module,
    tokenized: Mapping[str, Sequence[TokenizedExample]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
    max_batch_tokens: int | None = None,
    stats: dict[str, int] | None = None,
    storage_device: torch.device | str = "cpu",
) -> dict[str, list[torch.Tensor]]:
    """Per adapter of `tokenized` (adapter name = task name), every LoRA layer's inputs on its task's examples, with
    that adapter active, as `regmean.LayerInput` factors: F with F^T·F = the token-mean Gram of the inputs.

    Args:
        peft_model (`PeftModel`): The model holding the adapters, in eval mode (PEFT's `adapter_names=` needs it).
        tokenized (`Mapping[str, Sequence[TokenizedExample]]`): The tokenised few-shot examples of every adapter's task.
        pad_token_id (`int`): Padding id of the batches.
        batch_size (`int`, defaults to 32), max_batch_tokens (`int`, *optional*): Rows and tokens per forward pass.
        stats (`dict`, *optional*): Its `"forward_passes"` entry is increased by the forward passes run here.
        storage_device (`torch.device` or `str`, defaults to `"cpu"`): Where the factors are kept for the run (the
            merges move one layer input's factors at a time to the adapters' device).

    Returns:
        `dict[str, list[Tensor]]`: adapter -> one factor per LoRA layer, in `lora_layers` order, on `storage_device`,
            in float32 (float64 for a float64 model): the m tokens' inputs scaled by 1/√m (m x in) when m < in, else
            the (in x in) triangular factor of their Gram (`regmean.compress_rows`). Layers fed the same input hold
            the same tensor object.

    Example:
        ```python
        >>> factors = input_factors(peft_model, scorer.tokenized, pad_token_id=scorer.pad_token_id)
        >>> factors["capital"][0].shape  # doctest: +SKIP
        torch.Size([152, 64])
        ```
    """
    layers = [layer for _, layer in lora_layers(peft_model)]
    settings = {"pad_token_id": pad_token_id, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens}
    stats = stats if stats is not None else {}
    stats.setdefault("forward_passes", 0)
    return {
        adapter: _adapter_factors(peft_model, layers, adapter, rows, stats, torch.device(storage_device), **settings)
        for adapter, rows in tokenized.items()
    }


def _adapter_factors(
    peft_model,
    layers,
    adapter: str,
    rows: Sequence[TokenizedExample],
    stats,
    storage_device: torch.device,
    *,
    pad_token_id,
    batch_size,
    max_batch_tokens,
) -> list[torch.Tensor]:
    """One adapter's layer-input factors (`input_factors`): its task's rows run with it active, every layer's input
    recorded."""
    device = input_device(peft_model)
    parts: dict[int, list[torch.Tensor]] = {}  # index of the first layer fed an input -> its token rows so far
    owner = [-1] * len(layers)  # layer index -> the index whose rows it shares
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
            kept = parts.setdefault(index, [])
            kept.append(tokens.to(storage_device))
            if sum(part.shape[0] for part in kept) > 2 * tokens.shape[-1]:  # never hold much more than a Gram
                kept[:] = [compress_rows(torch.cat(kept))]

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
    scale = 1 / max(count, 1) ** 0.5  # F^T·F is then the token mean of x·x^T
    factors = {index: compress_rows(torch.cat(kept)) * scale for index, kept in parts.items()}
    return [factors[owner[i]] for i in range(len(layers))]


def predict_layer_input_bytes(
    peft_model: torch.nn.Module,
    tokenized: Mapping[str, Sequence[TokenizedExample]],
    *,
    stats: dict[str, int] | None = None,
) -> int:
    """The bytes `input_factors` will hold for `tokenized`, before collecting them: the same recording run on a
    single short example finds the distinct layer inputs (their width, dtype and which layers share one), and each
    task's m tokens then take min(m, width) x width of those floats per distinct input. `stats` as in `input_factors`
    (one forward pass).

    Example:
        ```python
        >>> predict_layer_input_bytes(peft_model, scorer.tokenized)  # doctest: +SKIP
        2751463424
        ```
    """
    layers = [layer for _, layer in lora_layers(peft_model)]
    if not layers or not tokenized:
        return 0
    adapter, rows = next(iter(tokenized.items()))
    shortest = [min(rows, key=lambda r: len(r.input_ids))]
    stats = stats if stats is not None else {"forward_passes": 0}
    one = _adapter_factors(
        peft_model, layers, adapter, shortest, stats, torch.device("cpu"), pad_token_id=0, batch_size=1,
        max_batch_tokens=None,
    )  # fmt: skip
    distinct = {id(factor): factor for factor in one}.values()
    tokens = [sum(len(r.input_ids) for r in task_rows) for task_rows in tokenized.values()]
    return sum(min(m, f.shape[-1]) * f.shape[-1] * f.element_size() for m in tokens for f in distinct)


def check_memory_limit(layer_input_bytes: int, memory_limit: int | str | None) -> None:
    """Refuse a run whose process would use more than `memory_limit` (`D2CMergeConfig.merge.memory_limit`; default: the
    process's memory plus the memory available now) once `layer_input_bytes` more are held.

    Raises:
        MemoryLimitError: Naming the sizes and the settings that lower them.
    """
    process = psutil.Process().memory_info().rss
    limit = parse_size(memory_limit, "memory_limit") if memory_limit is not None else None
    allowed = limit if limit is not None else process + psutil.virtual_memory().available
    if process + layer_input_bytes <= allowed:
        return
    which = f"`memory_limit`={memory_limit!r}" if limit is not None else "the memory available now (`memory_limit`)"
    raise MemoryLimitError(
        f"combination_type='regmean' would hold {format_size(layer_input_bytes)} of few-shot layer inputs on top of "
        f"the {format_size(process)} this process uses: more than {format_size(allowed)}, {which}. Raise "
        "`memory_limit`, lower `examples_per_task` or `max_length`, merge fewer adapters or modules at once, or "
        "choose a `combination_type` that needs no layer inputs (e.g. 'knots_ties')."
    )


def attach_layer_inputs(merger: AdapterMerger, scorer: LossScorer) -> int:
    """Give `merger` the layer inputs its data-aware combination type merges with (`combination_types.DATA_TYPES`),
    from the scorer's tokenised few-shot examples; nothing for the other types. Adapters that already have theirs are
    skipped. A cross-fitted scorer (`scorer.folds` > 1) also gets every fold's (`AdapterMerger.fold_inputs`: the
    inputs of the examples outside the fold; the all-examples inputs are the shipped merges'). Their size is predicted
    first (`predict_layer_input_bytes`) and checked against `memory_limit` (`check_memory_limit`); the forward passes
    run are added to the scorer's `forward_passes`.

    Returns:
        `int`: the predicted bytes of the layer inputs collected here (0 when none were).

    Raises:
        ValueError: If the type is data-aware and the scorer has no tokenised examples (no tokenizer was given).
    """
    if merger.config.combination_type not in DATA_TYPES:
        return 0
    if not scorer.tokenized:
        raise ValueError(
            f"combination_type={merger.config.combination_type!r} merges with the layer inputs of the few-shot "
            "examples: pass the base model's `tokenizer=` (also with a custom `score_fn`), or choose another "
            "`combination_type`."
        )
    # (the merger's inputs of all examples or of one fold, the tokenised rows they are collected from)
    sources = [(merger.layer_inputs, scorer.tokenized)]
    if scorer.folds > 1:
        sources += [(merger.fold_inputs.setdefault(f, {}), scorer.fit_rows(f)) for f in range(scorer.folds)]
    wanted = [(held, {t: rows for t, rows in tokenized.items() if t not in held}) for held, tokenized in sources]
    wanted = [(held, missing) for held, missing in wanted if missing]
    if not wanted:
        return 0
    was_training = scorer.model.training
    scorer.model.eval()  # PEFT's `adapter_names=` needs eval mode
    stats = {"forward_passes": 0}
    settings = {"pad_token_id": scorer.pad_token_id, "batch_size": scorer.batch_size}
    try:
        predicted = sum(predict_layer_input_bytes(scorer.model, missing, stats=stats) for _, missing in wanted)
        check_memory_limit(predicted, merger.config.merge.memory_limit)
        for held, missing in wanted:
            held.update(
                input_factors(scorer.model, missing, **settings, max_batch_tokens=scorer.max_batch_tokens, stats=stats)
            )
    finally:
        scorer.model.train(was_training)
    scorer.forward_passes += stats["forward_passes"]  # the run's cost counts them (about one pass per task)
    return predicted
