"""Held-out scoring shared by the benchmark: greedy answers, exact match, and completion loss.

Conventions match the D2C loss (`peft_d2c.engine.scoring`): the prompt is tokenised with the tokenizer's special tokens, the
completion without them, EOS is appended, and no chat template is applied. With a `PeftModel`, the adapter is chosen
per row through PEFT's mixed-adapter batches (`adapter_names=`), where `"__base__"` means the base model; nothing
calls `set_adapter`, so the model's active adapter and requires_grad flags are never touched.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel

from ..data.examples import Example
from ..engine.scoring import completion_loss_sums, input_device, pad_token_id_for, tokenize_example

__all__ = ["BASE_ADAPTER", "completion_loss", "exact_match_accuracy", "generate_answers", "normalize_answer"]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
_PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u2026"


def normalize_answer(text: str) -> str:
    """The first word of `text`, lower-cased, with punctuation stripped from both ends.

    Args:
        text (`str`): A generated answer or a reference completion.

    Returns:
        `str`: e.g. `" Paris.\\nCountry: Spain"` -> `"paris"`; `""` when there is no word.

    Example:
        ```python
        >>> normalize_answer(" Positive!")
        'positive'
        ```
    """
    for word in text.split():
        word = word.strip(_PUNCTUATION).lower()
        if word:
            return word
    return ""


def _get(example: Any, key: str) -> str:
    return example[key] if isinstance(example, Mapping) else getattr(example, key)


def _is_peft(model: torch.nn.Module) -> bool:
    # Not `hasattr(model, "peft_config")`: PEFT also sets that on the wrapped base model, whose forward and generate
    # do not accept `adapter_names`.
    return isinstance(model, PeftModel)


def _row_adapters(model: torch.nn.Module, adapter_names: Sequence[str] | None, n_rows: int) -> list[str] | None:
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
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
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
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding.

    Args:
        model (`PreTrainedModel` or `PeftModel`): The model; left in the training mode it was in.
        tokenizer: Its tokenizer (not modified; padding is done here).
        prompts (`list[str]`): The prompts, used as they are (no chat template).
        adapter_names (`list[str]`, *optional*): One adapter per prompt (PEFT mixed-adapter batch); `"__base__"` is
            the base model. Defaults to the base model for a `PeftModel`, and to the model itself otherwise.
        max_new_tokens (`int`, *optional*, defaults to 8): Tokens generated per prompt at most.
        batch_size (`int`, *optional*, defaults to 32): Prompts per `generate` call.

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
    rows = _row_adapters(model, adapter_names, len(prompts))
    encoded = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    pad_id, device = pad_token_id_for(tokenizer), input_device(model)
    answers = [""] * len(prompts)
    with _eval_mode(model):
        for batch in _batch_order([len(ids) for ids in encoded], batch_size):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]) :] = 1
            kwargs = {} if rows is None else {"adapter_names": [rows[i] for i in batch]}
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            for row, i in enumerate(batch):
                answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
    return answers


def exact_match_accuracy(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, str]],
    *,
    adapter_name: str | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> float:
    """Share of examples whose greedy answer has the same first word as the completion (see `normalize_answer`).

    Args:
        model, tokenizer: As for `generate_answers`.
        examples (`list[dict]`): `{"prompt": ..., "completion": ...}` dicts (or objects with those attributes).
        adapter_name (`str`, *optional*): The adapter to answer with; `None` or `"__base__"` is the base model.
        max_new_tokens (`int`, *optional*, defaults to 8), batch_size (`int`, *optional*, defaults to 32): As for
            `generate_answers`.

    Returns:
        `float`: Exact-match accuracy in [0, 1].

    Raises:
        ValueError: If `examples` is empty.
    """
    if not examples:
        raise ValueError("`examples` is empty; there is nothing to score.")
    names = [adapter_name or BASE_ADAPTER] * len(examples)
    answers = generate_answers(
        model,
        tokenizer,
        [_get(e, "prompt") for e in examples],
        adapter_names=names,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    hits = [
        normalize_answer(answer) == normalize_answer(_get(e, "completion")) != ""
        for answer, e in zip(answers, examples, strict=True)
    ]
    return sum(hits) / len(hits)


def completion_loss(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, str]],
    *,
    adapter_name: str | None = None,
    batch_size: int = 32,
) -> float:
    """Mean token cross-entropy of the completions (+ EOS) given their prompts, pooled over all examples.

    The same loss D2C optimises (`peft_d2c.engine.scoring`), for one adapter.

    Args:
        model, tokenizer: As for `generate_answers`.
        examples (`list[dict]`): `{"prompt": ..., "completion": ...}` dicts (or objects with those attributes).
        adapter_name (`str`, *optional*): The adapter to score; `None` or `"__base__"` is the base model.
        batch_size (`int`, *optional*, defaults to 32): Examples per forward pass.

    Returns:
        `float`: Total completion cross-entropy divided by the number of completion tokens (nats per token).

    Raises:
        ValueError: If `examples` is empty.
    """
    if not examples:
        raise ValueError("`examples` is empty; there is nothing to score.")
    rows = [tokenize_example(tokenizer, Example(_get(e, "prompt"), _get(e, "completion"))) for e in examples]
    adapters = _row_adapters(model, [adapter_name or BASE_ADAPTER] * len(rows), len(rows))
    with _eval_mode(model):
        sums, counts, _ = completion_loss_sums(
            model, rows, adapters, pad_token_id=pad_token_id_for(tokenizer), batch_size=batch_size
        )
    return sum(sums) / sum(counts)
