"""Held-out scoring shared by the benchmark: greedy answers, exact match, and completion loss.

Conventions match the D2C loss (`peft_d2c.engine.scoring.loss`): the prompt is tokenised with the tokenizer's special tokens, the
completion without them, EOS is appended, and no chat template is applied. With a `PeftModel`, the adapter is chosen
per row through PEFT's mixed-adapter batches (`adapter_names=`), where `"__base__"` means the base model; nothing
calls `set_adapter`, so the model's active adapter and requires_grad flags are never touched.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.examples import Example
from ..engine.scoring.loss import completion_loss_sums, pad_token_id_for, tokenize_example
from ..engine.serving.generation import BASE_ADAPTER, eval_mode, generate_answers, row_adapters

__all__ = [
    "BASE_ADAPTER",
    "completion_loss",
    "exact_match_accuracy",
    "generate_answers",
    "normalize_answer",
    "normalize_whole_answer",
]

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


def normalize_whole_answer(text: str) -> str:
    """The whole answer of `text`: its first line, lower-cased, words joined by single spaces, punctuation stripped
    from both ends of the answer (not inside it).

    A greedy answer is compared with its reference this way by the whole-answer exact match: unlike the first word,
    a wrong second word or a run-on answer fails it.

    Args:
        text (`str`): A generated answer (generation stops at EOS; what follows the first line break is not part of
            the answer) or a reference completion.

    Returns:
        `str`: e.g. `" New  York.\nCountry: USA"` -> `"new york"`; `""` when the first line holds no word.

    Example:
        ```python
        >>> normalize_whole_answer(" Red, green and Blue!\nNext:")
        'red, green and blue'
        ```
    """
    stripped = text.lstrip()
    line = stripped.splitlines()[0] if stripped else ""
    return " ".join(line.split()).strip(_PUNCTUATION + " ").lower()


def _get(example: Any, key: str) -> str:
    return example[key] if isinstance(example, Mapping) else getattr(example, key)


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

    The same loss D2C optimises (`peft_d2c.engine.scoring.loss`), for one adapter.

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
    adapters = row_adapters(model, [adapter_name or BASE_ADAPTER] * len(rows), len(rows))
    with eval_mode(model):
        sums, counts, _ = completion_loss_sums(
            model, rows, adapters, pad_token_id=pad_token_id_for(tokenizer), batch_size=batch_size
        )
    return sum(sums) / sum(counts)
