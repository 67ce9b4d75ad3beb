"""Loss of a merged adapter on a task's few-shot examples: tokenised once, batched, memoised for the whole run.

The loss is the mean token cross-entropy of the completions given their prompts, pooled over the task's examples
(prompt and padding tokens masked). Prompt and completion are tokenised separately and concatenated, with EOS
appended to the completion, so the boundary between them never depends on how a tokenizer merges the two strings.
Several merged adapters are scored in one forward pass through PEFT's mixed-adapter batches (`adapter_names=`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Example
from .errors import NonFiniteLossError
from .merging import AdapterMerger

logger = logging.getLogger(__name__)

Members = tuple[str, ...]
UserScoreFn = Callable[[torch.nn.Module, str, str, list[dict[str, str]]], float]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + completion, and where the completion starts."""

    input_ids: tuple[int, ...]
    completion_start: int


def tokenize_example(
    tokenizer, example: Example, *, use_chat_template: bool = False, max_length: int | None = None
) -> TokenizedExample:
    """Tokenise one example the way every peft-d2c loss sees it.

    The prompt keeps the tokenizer's special tokens (e.g. BOS); the completion gets none but a final EOS. With
    `max_length`, the prompt is cut from the left so the completion is always scored whole.
    """
    prompt = example.prompt
    if use_chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        keep = max(1, max_length - len(completion_ids))
        prompt_ids = prompt_ids[-keep:]
        completion_ids = completion_ids[: max_length - keep]
    return TokenizedExample(tuple(prompt_ids) + tuple(completion_ids), len(prompt_ids))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def completion_loss_sums(
    model: torch.nn.Module,
    rows: Sequence[TokenizedExample],
    adapter_names: Sequence[str],
    *,
    pad_token_id: int,
    batch_size: int,
) -> tuple[list[float], list[int], int]:
    """Summed completion cross-entropy and completion token count of every row, each under its own adapter.

    Rows are sorted by length and padded to the longest row of their batch. The caller puts the model in eval mode
    (PEFT refuses `adapter_names` in training mode).

    Returns:
        `(sums, counts, forward_passes)`.
    """
    device = next(model.parameters()).device
    sums = [0.0] * len(rows)
    counts = [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids), reverse=True)
    forward_passes = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(rows[i].input_ids) for i in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for r, i in enumerate(batch):
                ids = rows[i].input_ids
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention_mask[r, : len(ids)] = 1
                labels[r, rows[i].completion_start : len(ids)] = torch.tensor(ids[rows[i].completion_start :])
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                adapter_names=[adapter_names[i] for i in batch],
            ).logits
            forward_passes += 1
            shifted_labels = labels[:, 1:].to(device)
            token_losses = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            row_sums = token_losses.sum(dim=1).tolist()
            row_counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).tolist()
            for r, i in enumerate(batch):
                sums[i], counts[i] = row_sums[r], row_counts[r]
    return sums, counts, forward_passes


class LossScorer:
    """The `score_fn` of the D2C search: loss of task t under the merge of a cluster, memoised per run.

    Args:
        model (`PeftModel`): The model holding the source adapters (in eval mode while scoring).
        tokenizer: The tokenizer of the base model (unused when `user_score_fn` is given).
        examples (`Mapping[str, Sequence[Example]]`): The few-shot examples of every task.
        merger (`AdapterMerger`): Provides live merged adapters for clusters.
        batch_size (`int`): Rows per forward pass.
        use_chat_template (`bool`), max_length (`int`, *optional*): Tokenisation settings (see `tokenize_example`).
        user_score_fn (*optional*): `score_fn(model, adapter_name, task, examples) -> float` replacing the loss.

    Attributes:
        cache_hits, cache_misses, forward_passes (`int`): Counters for tests and benchmarks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        examples: Mapping[str, Sequence[Example]],
        merger: AdapterMerger,
        *,
        batch_size: int = 32,
        use_chat_template: bool = False,
        max_length: int | None = None,
        user_score_fn: UserScoreFn | None = None,
    ) -> None:
        self.model = model
        self.merger = merger
        self.examples = {task: list(items) for task, items in examples.items()}
        self.batch_size = batch_size
        self.user_score_fn = user_score_fn
        self.cache: dict[tuple[Members, str], float] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.forward_passes = 0
        self.pad_token_id = 0
        self.tokenized: dict[str, list[TokenizedExample]] = {}
        if user_score_fn is None:
            self.pad_token_id = _pad_id(tokenizer)
            self.tokenized = {
                task: [
                    tokenize_example(tokenizer, ex, use_chat_template=use_chat_template, max_length=max_length)
                    for ex in items
                ]
                for task, items in self.examples.items()
            }

    def __call__(self, requests: Sequence[tuple[Sequence[str], str]]) -> list[float]:
        """Losses of `(members, task)` requests, computing only those not seen before in this run."""
        keys = [(tuple(sorted(members)), task) for members, task in requests]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        # Score as many distinct clusters together as the live-adapter cache can hold at once.
        chunk: list[tuple[Members, str]] = []
        clusters: set[Members] = set()
        for key in missing:
            if key[0] not in clusters and len(clusters) >= self.merger.config.merge_cache_size:
                self._score_chunk(chunk)
                chunk, clusters = [], set()
            chunk.append(key)
            clusters.add(key[0])
        if chunk:
            self._score_chunk(chunk)
        return [self.cache[k] for k in keys]

    def _score_chunk(self, keys: Sequence[tuple[Members, str]]) -> None:
        self.merger.pin([members for members, _ in keys])
        try:
            adapter_names = [self.merger.adapter_for(members) for members, _ in keys]
        finally:
            self.merger.unpin()
        if self.user_score_fn is not None:
            losses = [
                float(self.user_score_fn(self.model, name, task, [e.to_dict() for e in self.examples[task]]))
                for name, (_, task) in zip(adapter_names, keys)
            ]
        else:
            rows, row_adapters, owners = [], [], []
            for index, (name, (_, task)) in enumerate(zip(adapter_names, keys)):
                for tokenized in self.tokenized[task]:
                    rows.append(tokenized)
                    row_adapters.append(name)
                    owners.append(index)
            sums, counts, passes = completion_loss_sums(
                self.model, rows, row_adapters, pad_token_id=self.pad_token_id, batch_size=self.batch_size
            )
            self.forward_passes += passes
            total = [0.0] * len(keys)
            tokens = [0] * len(keys)
            for owner, row_sum, row_count in zip(owners, sums, counts):
                total[owner] += row_sum
                tokens[owner] += row_count
            losses = [t / max(n, 1) for t, n in zip(total, tokens)]
        for key, loss in zip(keys, losses):
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"The loss of task {key[1]!r} under the merge of {list(key[0])} is {loss}; check the adapters' "
                    "weights for NaN/inf and the model dtype."
                )
            self.cache[key] = loss
