"""Tokenising examples the way every peft-d2c loss sees them, and checks on the ids, shared by scoring, evaluation
and the training of the embedded adapters. Imports only `peft_d2c.data` and `peft_d2c.errors`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ...data.examples import Example
from ...errors import D2CWarning


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + completion, and where the completion starts."""

    input_ids: tuple[int, ...]
    completion_start: int


def prompt_token_ids(tokenizer, prompt: str, *, use_chat_template: bool = False) -> list[int]:
    """The tokens of a prompt as every part of peft-d2c sees it: the scorer, the prompt router and generation.

    Without the chat template, the tokenizer's special tokens are added (e.g. BOS). With it, the prompt is the
    content of one user turn followed by the generation prompt, and the template itself supplies the special
    tokens (none are added a second time).
    """
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def tokenize_example(
    tokenizer,
    example: Example,
    *,
    use_chat_template: bool = False,
    max_length: int | None = None,
    task: str | None = None,
) -> TokenizedExample:
    """Tokenise one example the way every peft-d2c loss sees it (and the embedded adapters were trained on).

    The prompt keeps the tokenizer's special tokens (e.g. BOS); the completion gets none but a final EOS. With
    `max_length`, the prompt is cut from the left; the completion is always scored whole. An empty prompt with a
    tokenizer that adds no BOS would leave the first completion token without a position to predict it: the BOS
    token (else EOS) is then used as the prompt, with a `D2CWarning` naming `task`.

    Raises:
        ValueError: If the completion (with its EOS) does not fit in `max_length - 1` tokens, or the prompt is empty
            and the tokenizer has neither a BOS nor an EOS token.
    """
    where = f"task {task!r}" if task is not None else "an example"
    prompt_ids = prompt_token_ids(tokenizer, example.prompt, use_chat_template=use_chat_template)
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    if not prompt_ids:
        context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if context is None:
            raise ValueError(
                f"An example of {where} has an empty prompt and the tokenizer has no BOS or EOS token, so its first "
                "completion token cannot be scored; give the examples a prompt."
            )
        warnings.warn(
            f"An example of {where} has an empty prompt and the tokenizer adds no BOS token; peft-d2c uses token "
            f"{context} ({'BOS' if context == tokenizer.bos_token_id else 'EOS'}) as its prompt so that every "
            "completion token is scored.",
            D2CWarning,
            stacklevel=2,
        )
        prompt_ids = [context]
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        if len(completion_ids) > max_length - 1:
            raise ValueError(
                f"A completion of {where} has {len(completion_ids)} tokens (with EOS) but `max_length`={max_length} "
                f"leaves room for at most {max_length - 1} after one prompt token; completions are scored whole: "
                "raise `max_length` (or leave it None) or shorten the completion."
            )
        prompt_ids = prompt_ids[-(max_length - len(completion_ids)) :]
    return TokenizedExample(tuple(prompt_ids) + tuple(completion_ids), len(prompt_ids))


def padded_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both `[len(sequences), longest]` long tensors, of token-id lists padded with
    `pad_token_id`: on the right (scoring, Grams, router features: every real token keeps its position) or, with
    `left=True`, on the left (generation: the new tokens follow every prompt's last token)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def pad_token_id_for(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS, else 0 (padding is always masked)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def check_token_ids(model: torch.nn.Module, tokenized: Mapping[str, Sequence[TokenizedExample]]) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer of another model), before any forward pass.

    Embedding matrices are often padded beyond the vocabulary, so the ids are compared with the number of embedding
    rows, not with the tokenizer's size.

    Raises:
        ValueError: Naming the task and the id, if an id is at least the number of embedding rows.
    """
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_input_embeddings() if get_input_embeddings is not None else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    for task, items in tokenized.items():
        largest = max((max(item.input_ids) for item in items if item.input_ids), default=-1)
        if largest >= rows:
            raise ValueError(
                f"Token id {largest} in the examples of task {task!r} is beyond the model's {rows} embedding rows: "
                "the tokenizer does not belong to this model. Pass the base model's own tokenizer."
            )
