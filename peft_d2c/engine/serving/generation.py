"""Greedy answers of a model, one adapter per prompt: the one generation loop of the package.

With a `PeftModel`, the adapter is chosen per row through PEFT's mixed-adapter batches (`adapter_names=`), where
`"__base__"` means the base model; nothing calls `set_adapter`, so the model's active adapter and requires_grad
flags are never touched. The held-out evaluation (`peft_d2c.evaluation`) and the prompt router's `generate_routed`
both answer through `generate_answers`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel

from ..scoring.loss import input_device
from ..scoring.tokenization import pad_token_id_for, padded_batch, prompt_token_ids

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches


def _is_peft(model: torch.nn.Module) -> bool:
    # Not `hasattr(model, "peft_config")`: PEFT also sets that on the wrapped base model, whose forward and generate
    # do not accept `adapter_names`.
    return isinstance(model, PeftModel)


def row_adapters(model: torch.nn.Module, adapter_names: Sequence[str] | None, n_rows: int) -> list[str] | None:
    """Validate per-row adapter names; `None` for a plain model (it has no adapters to choose from)."""
    if adapter_names is None:
        return [BASE_ADAPTER] * n_rows if _is_peft(model) else None
    if isinstance(adapter_names, str):
        raise TypeError(f"`adapter_names` must be a list with one name per row, got the string {adapter_names!r}.")
    if len(adapter_names) != n_rows:
        raise ValueError(f"`adapter_names` has {len(adapter_names)} names for {n_rows} rows; give one per row.")
    if not _is_peft(model):
        if any(name != BASE_ADAPTER for name in adapter_names):
            raise ValueError("`adapter_names` needs a `PeftModel`; a plain model only accepts '__base__'.")
        return None
    unknown = sorted(set(adapter_names) - set(model.peft_config) - {BASE_ADAPTER})
    if unknown:
        raise ValueError(f"`adapter_names` has unknown adapters {unknown}; loaded: {sorted(model.peft_config)}.")
    return list(adapter_names)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode and no autograd for the block; the model's training mode is given back after it."""
    training = model.training
    model.eval()  # PEFT refuses `adapter_names` in training mode; dropout must be off for scoring anyway
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(training)


def _batch_order(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices grouped into batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    adapter_names: Sequence[str] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    use_chat_template: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding.

    Args:
        model (`PreTrainedModel` or `PeftModel`): The model; left in the training mode it was in.
        tokenizer: Its tokenizer (not modified; padding is done here).
        prompts (`list[str]`): The prompts.
        adapter_names (`list[str]`, *optional*): One adapter per prompt (PEFT mixed-adapter batch); `"__base__"` is
            the base model. Defaults to the base model for a `PeftModel`, and to the model itself otherwise.
        max_new_tokens (`int`, *optional*, defaults to 8): Tokens generated per prompt at most.
        batch_size (`int`, *optional*, defaults to 32): Prompts per `generate` call.
        use_chat_template (`bool`, *optional*, defaults to `False`): Wrap each prompt in the tokenizer's chat
            template as one user turn (`prompt_token_ids`), as the scorer does with `scoring.use_chat_template`.
        generate_kwargs: More arguments of `model.generate` (e.g. `repetition_penalty`).

    Returns:
        `list[str]`: The decoded new tokens of every prompt (special tokens skipped), in the order of `prompts`.

    Raises:
        ValueError: If `adapter_names` has the wrong length or names an adapter the model does not hold.

    Example:
        ```python
        >>> generate_answers(model, tokenizer, ["Country: France\\nCapital:"], adapter_names=["capital_world"])
        [' Paris']
        ```
    """
    rows = row_adapters(model, adapter_names, len(prompts))
    encoded = [prompt_token_ids(tokenizer, prompt, use_chat_template=use_chat_template) for prompt in prompts]
    pad_id, device = pad_token_id_for(tokenizer), input_device(model)
    answers = [""] * len(prompts)
    with eval_mode(model):
        for batch in _batch_order([len(ids) for ids in encoded], batch_size):
            input_ids, attention_mask = padded_batch([encoded[i] for i in batch], pad_id, left=True)
            width = input_ids.shape[1]
            kwargs = {} if rows is None else {"adapter_names": [rows[i] for i in batch]}
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
                **generate_kwargs,
            )
            for row, i in enumerate(batch):
                answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
    return answers
