"""Loss of a merged adapter on a task's few-shot examples: tokenised once (`tokenization`), batched, memoised.

The loss is the mean token cross-entropy of the completions given their prompts, pooled over the task's examples
(prompt and padding tokens masked). Cross-fitted (`folds` > 1, for a merge fitted to the few-shot examples' layer
inputs, `regmean`): example i of a task is in fold i mod F, and is scored under the cluster's merge fitted to the layer
inputs of the other folds' examples, so the loss measures how the merge does on examples it was not fitted to.
Prompt and completion are tokenised separately and concatenated, with EOS
appended to the completion, so the boundary between them never depends on how a tokenizer merges the two strings.
Several merged adapters are scored in one forward pass through PEFT's mixed-adapter batches (`adapter_names=`).

Which requests share a forward pass (`plan_batches`) depends only on the requests, never on the processes: pure
Python, so a loss is computed in exactly the same batch (the same floating-point result) by one process or by many
(`LossScorer` deals the planned batches out to an Accelerate process group, `peft_d2c.engine.runtime.distributed`).
May import `peft_d2c.data`, `peft_d2c.errors`, the scoring module `tokenization`, the
merger (`engine.merge.merging`) and the process groups (`engine.runtime.distributed`).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from ...data.examples import Example
from ...errors import NonFiniteLossError
from ..merge.merging import AdapterMerger
from ..runtime.distributed import SingleProcess
from .tokenization import TokenizedExample, check_token_ids, pad_token_id_for, padded_batch, tokenize_example

logger = logging.getLogger(__name__)

UserScoreFn = Callable[[torch.nn.Module, str, str, list[dict[str, str]]], float]
IGNORE_INDEX = -100
Members = tuple[str, ...]


# model -> whether it accepts a boolean `logits_to_keep` mask (found by trying it once; see `_keeps_logits_by_mask`).
_MASK_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's input ids go: the device of its input embeddings (with `device_map="auto"` the first
    parameter may live elsewhere), or of its first parameter for a model without `get_input_embeddings`."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_input_embeddings() if get_input_embeddings is not None else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def _keeps_logits_by_mask(model: torch.nn.Module) -> bool:
    """Whether the model can be asked for the logits of the completion positions only (a boolean `logits_to_keep`
    mask). Found by trying it once on a three-token input: transformers 4.49 to 5.20 accept the argument but fail on
    a boolean mask (`IndexError: too many indices`), older releases name it otherwise. Not when the output layer is
    itself adapted: PEFT's mixed-adapter batches split the rows of each LoRA layer's input by batch row, which a
    flattened selection of positions no longer has."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if get_output_embeddings is None or isinstance(get_output_embeddings(), BaseTunerLayer):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    if model not in _MASK_SUPPORT:
        device = input_device(model)
        keep = torch.tensor([[False, True, True]], device=device)
        try:
            with torch.inference_mode():
                logits = model(input_ids=torch.zeros((1, 3), dtype=torch.long, device=device), logits_to_keep=keep)
            supported = logits.logits.reshape(-1, logits.logits.shape[-1]).shape[0] == 2
        except Exception as error:  # any failure means: this transformers cannot do it, use full logits
            logger.info("Boolean logits_to_keep is not supported here (%s: %s).", type(error).__name__, error)
            supported = False
        _MASK_SUPPORT[model] = supported
    return _MASK_SUPPORT[model]


def token_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int, max_tokens: int | None):
    """Consecutive slices of `order` (rows sorted longest first) with at most `batch_size` rows and, with
    `max_tokens`, at most that many tokens once padded to the slice's first (longest) row; a longer row goes alone."""
    start = 0
    while start < len(order):
        width = lengths[order[start]]
        size = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(width, 1)))
        yield order[start : start + size]
        start += size


def completion_loss_sums(
    model: torch.nn.Module,
    rows: Sequence[TokenizedExample],
    adapter_names: Sequence[str] | None,
    *,
    pad_token_id: int,
    batch_size: int,
    max_batch_tokens: int | None = None,
) -> tuple[list[float], list[int], int]:
    """Summed completion cross-entropy and completion token count of every row, each under its own adapter.

    `adapter_names` has one name per row for a `PeftModel` (PEFT's mixed-adapter batches), or is `None` for a plain
    model.

    Rows are sorted by length and padded to the longest row of their batch; a batch holds at most `batch_size` rows
    and, with `max_batch_tokens`, at most that many tokens (rows x longest row). Where the model supports it, the output
    layer runs only at the positions that predict a completion token (`logits_to_keep`): with a large vocabulary it
    is a sizeable part of a forward pass, and prompt positions are never scored. The caller puts the model in eval
    mode (PEFT refuses `adapter_names` in training mode).

    Returns:
        `(sums, counts, forward_passes)`.
    """
    device = input_device(model)
    keep_by_mask = _keeps_logits_by_mask(model)  # a one-off three-token probe, not counted as a scoring pass
    sums = [0.0] * len(rows)
    counts = [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids), reverse=True)
    forward_passes = 0
    with torch.inference_mode():
        lengths = [len(row.input_ids) for row in rows]
        for batch in token_batches(order, lengths, batch_size, max_batch_tokens):
            input_ids, attention_mask = padded_batch([rows[i].input_ids for i in batch], pad_token_id)
            width = input_ids.shape[1]
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for r, i in enumerate(batch):
                ids = rows[i].input_ids
                labels[r, rows[i].completion_start : len(ids)] = torch.tensor(ids[rows[i].completion_start :])
            # Position p predicts token p + 1: the scored positions are those whose next token is a completion token.
            targets = labels[:, 1:]
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            scored[:, :-1] = targets != IGNORE_INDEX
            extra = {"logits_to_keep": scored.to(device)} if keep_by_mask else {}
            if adapter_names is not None:
                extra["adapter_names"] = [adapter_names[i] for i in batch]
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra).logits
            forward_passes += 1
            # A model spread over devices (`device_map="auto"`) returns its logits on the last one.
            out = logits.device
            if not keep_by_mask:  # all positions came back: select the scored ones
                logits = logits[scored.to(out)]
            # In float32 whatever the model's dtype: a bf16 log-softmax over the vocabulary loses ~3 digits.
            token_losses = F.cross_entropy(logits.float(), targets[scored[:, :-1]].to(out), reduction="none")
            row_of_token = scored.nonzero()[:, 0].to(out)
            row_sums = torch.zeros(len(batch), dtype=token_losses.dtype, device=out)
            row_sums = row_sums.index_add(0, row_of_token, token_losses).tolist()
            row_counts = scored.sum(dim=1).tolist()
            for r, i in enumerate(batch):
                sums[i], counts[i] = row_sums[r], row_counts[r]
    return sums, counts, forward_passes


def plan_batches(
    sizes: Sequence[int], clusters: Sequence[Hashable], *, batch_size: int, max_clusters: int
) -> list[list[int]]:
    """Group requests (by index) into scoring batches whose composition depends only on the requests.

    A batch is scored in one forward pass when it holds at most `batch_size` rows. The number of batches is the
    smallest that fits the rows, rounded up to a power of two, and requests are dealt out contiguously with rows
    spread evenly; a batch that would need more than `max_clusters` live merged adapters is split further. Because
    this never looks at the number of processes, a loss is computed with exactly the same batch (hence the same
    floating-point result) whether the batches are scored by one process or dealt out to 2, 4, 8... (which the
    power of two keeps balanced).

    Args:
        sizes (`Sequence[int]`): Rows (examples) of each request.
        clusters (`Sequence[Hashable]`): The live adapter of each request (its cluster, or cluster and task).
        batch_size (`int`): Rows per forward pass.
        max_clusters (`int`): The most distinct clusters one batch may use (the merged-adapter LRU size).

    Returns:
        `list[list[int]]`: request indices of each batch, in order.

    Example:
        ```python
        >>> plan_batches([10] * 8, [("a", "b")] * 8, batch_size=32, max_clusters=8)
        [[0, 1], [2, 3], [4, 5], [6, 7]]
        ```
    """
    if not sizes:
        return []
    total = sum(sizes)
    num_batches = 1
    while num_batches * batch_size < total:
        num_batches *= 2
    num_batches = min(num_batches, len(sizes))
    batches: list[list[int]] = [[] for _ in range(num_batches)]
    done = 0
    for index, size in enumerate(sizes):
        # The batch in which the middle row of this request falls when rows are spread evenly.
        slot = min(num_batches - 1, int((done + size / 2) * num_batches / total))
        batches[slot].append(index)
        done += size
    planned: list[list[int]] = []
    for batch in batches:
        current: list[int] = []
        seen: set[Members] = set()
        for index in batch:
            if clusters[index] not in seen and len(seen) >= max_clusters:
                planned.append(current)
                current, seen = [], set()
            current.append(index)
            seen.add(clusters[index])
        if current:
            planned.append(current)
    return planned


class LossScorer:
    """The `score_fn` of the D2C search: loss of task t under the merge of a cluster, memoised per run.

    Each call computes only the `(members, task)` losses not seen before in this run. Requests are grouped by
    `plan_batches`; each batch needs one forward pass in which every row runs under its own merged adapter (PEFT's
    mixed-adapter batches). Under a multi-process launch the batches are shared out by `process_group` and every
    process receives every loss.

    Args:
        model (`PeftModel`): The model holding the source adapters (in eval mode while scoring).
        tokenizer: The tokenizer of the base model (unused when `user_score_fn` is given).
        examples (`Mapping[str, Sequence[Example]]`): The few-shot examples of every task.
        merger (`AdapterMerger`): Provides live merged adapters for clusters.
        batch_size (`int`): Rows per forward pass.
        use_chat_template (`bool`), max_length (`int`, *optional*): Tokenisation settings (see `tokenize_example`).
        user_score_fn (*optional*): `score_fn(model, adapter_name, task, examples) -> float` replacing the loss.
        process_group (*optional*): A `peft_d2c.engine.runtime.distributed` process group; defaults to a single
        process.
        folds (`int`, defaults to 1): F, the cross-fitting folds (`ScoringSettings.cross_fit_folds`): 1 scores the merge
            fitted to all examples (the paper's loss); F > 1 scores every example under the merge fitted to the
            layer inputs of the other folds (`AdapterMerger.fold_inputs`, which `layer_inputs.attach_layer_inputs`
            collects), F merges per cluster.

    Attributes:
        cache (`dict`): `(sorted members, task) -> loss` for every request computed in this run (by any process).
        cache_hits, cache_misses (`int`): Requests answered from the cache, and distinct losses computed.
        forward_passes (`int`): Forward passes run by this process.
        scoring_passes (`int`): Forward passes of the scoring batches of all processes together (a custom
            `user_score_fn` counts one per loss): the same number on every process, so a search budget in
            forward passes (`max_forward_passes`) stops every process at the same step.
        forward_seconds (`float`): Wall time of this process in `completion_loss_sums` (or the user score function).
    """

    @classmethod
    def for_config(
        cls,
        model: torch.nn.Module,
        tokenizer,
        examples: Mapping[str, Sequence[Example]],
        merger: AdapterMerger,
        *,
        user_score_fn: UserScoreFn | None = None,
        process_group=None,
    ) -> LossScorer:
        """A scorer with the scoring settings of `merger.config` (batch size, chat template, max length) and its
        cross-fitting folds (`scoring.cross_fit_folds`; None is 1)."""
        config = merger.config
        return cls(
            model,
            tokenizer,
            examples,
            merger,
            batch_size=config.scoring.batch_size,
            max_batch_tokens=config.scoring.max_batch_tokens,
            use_chat_template=config.scoring.use_chat_template,
            max_length=config.scoring.max_length,
            user_score_fn=user_score_fn,
            process_group=process_group,
            folds=config.scoring.cross_fit_folds or 1,
        )

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        examples: Mapping[str, Sequence[Example]],
        merger: AdapterMerger,
        *,
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
        use_chat_template: bool = False,
        max_length: int | None = None,
        user_score_fn: UserScoreFn | None = None,
        process_group=None,
        folds: int = 1,
    ) -> None:
        if folds > 1 and user_score_fn is not None:
            raise ValueError(
                "A custom `score_fn` cannot be cross-fitted: leave `scoring.cross_fit_folds` at None or 1."
            )
        fewest = min((len(items) for items in examples.values()), default=folds)
        if folds > 1 and fewest < folds:
            raise ValueError(
                f"`scoring.cross_fit_folds`={folds} needs at least {folds} few-shot examples per task, and a task has {fewest}: "
                "give more examples or fewer folds."
            )
        self.folds = folds
        self.model = model
        self.merger = merger
        self.examples = {task: list(items) for task, items in examples.items()}
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.user_score_fn = user_score_fn
        self.process_group = process_group if process_group is not None else SingleProcess()
        self.cache: dict[tuple[Members, str], float] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.forward_passes = 0
        self.scoring_passes = 0
        self.forward_seconds = 0.0
        self.pad_token_id = 0
        self.tokenized: dict[str, list[TokenizedExample]] = {}
        if tokenizer is not None:  # with a custom score function too: a data-aware merge runs the examples
            self.pad_token_id = pad_token_id_for(tokenizer)
            self.tokenized = {
                task: [
                    tokenize_example(
                        tokenizer, ex, use_chat_template=use_chat_template, max_length=max_length, task=task
                    )
                    for ex in items
                ]
                for task, items in self.examples.items()
            }
            check_token_ids(model, self.tokenized)

    def __call__(self, requests: Sequence[tuple[Sequence[str], str]]) -> list[float]:
        """The loss of `(members, task)` requests, computing only those not seen before."""
        keys = [(tuple(sorted(members)), task) for members, task in requests]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        if missing:
            batches = plan_batches(
                [len(self.examples[task]) for _, task in missing],
                [self.merger.merge_key(members, None, task) for members, task in missing],  # one live adapter each
                batch_size=self.batch_size,
                max_clusters=max(1, self.merger.config.merge.cache_size // self.folds),  # F live merges per cluster
            )
            batch_keys = [[missing[i] for i in batch] for batch in batches]
            for chunk, (batch_scores, passes) in zip(
                batch_keys, self.process_group.map(self._score_batch, batch_keys), strict=True
            ):
                self.scoring_passes += passes
                for key, loss in zip(chunk, batch_scores, strict=True):
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(
                            f"The loss of task {key[1]!r} under the merge of {list(key[0])} is {loss}; "
                            "check the adapters' weights for NaN/inf and the model dtype."
                        )
                    self.cache[key] = loss
        return [self.cache[k] for k in keys]

    def _score_batch(self, keys: Sequence[tuple[Members, str]]) -> tuple[list[float], int]:
        """The losses of one scoring batch and the forward passes they took (one per request for a custom score)."""
        folds = [None] if self.folds == 1 else list(range(self.folds))
        merges = list(
            dict.fromkeys(self.merger.merge_key(members, fold, task) for members, task in keys for fold in folds)
        )
        self.merger.pin(merges)
        try:
            adapter_names = {merge: self.merger.adapter_for(*merge) for merge in merges}
        finally:
            self.merger.unpin()
        started, passes = time.perf_counter(), self.forward_passes
        try:
            if self.user_score_fn is not None:
                values = [
                    float(
                        self.user_score_fn(
                            self.model,
                            adapter_names[self.merger.merge_key(members, None, task)],
                            task,
                            [e.to_dict() for e in self.examples[task]],
                        )
                    )
                    for members, task in keys
                ]
                return values, len(values)
            # One request per fold: the fold's examples of the task under the merge fitted without them.
            requests = [
                (adapter_names[self.merger.merge_key(members, fold, task)], self._fold_rows(task, fold))
                for members, task in keys
                for fold in folds
            ]
            sums = self._loss_sums(requests)
            scores = []
            for index in range(len(keys)):
                parts = sums[index * len(folds) : (index + 1) * len(folds)]
                scores.append(sum(total for total, _ in parts) / max(sum(count for _, count in parts), 1))
            return scores, self.forward_passes - passes
        finally:
            self.forward_seconds += time.perf_counter() - started

    def _in_fold(self, index: int, fold: int) -> bool:
        """Whether a task's example `index` is in `fold`: example i is in fold i mod F."""
        return index % self.folds == fold

    def _fold_rows(self, task: str, fold: int | None) -> list[TokenizedExample]:
        """The task's tokenised examples in `fold`, or all of them for None."""
        rows = self.tokenized[task]
        return list(rows) if fold is None else [row for i, row in enumerate(rows) if self._in_fold(i, fold)]

    def fit_rows(self, fold: int) -> dict[str, list[TokenizedExample]]:
        """Per task, the tokenised examples outside `fold`: those whose layer inputs the fold's merges are fitted to."""
        return {
            task: [row for i, row in enumerate(rows) if not self._in_fold(i, fold)]
            for task, rows in self.tokenized.items()
        }

    def scores_under(self, routing: Mapping[str, str]) -> dict[str, float]:
        """The loss of every task of `routing` (task -> the name of an adapter in the model), not memoised: for
        adapters that are not merges of a cluster the merger made (e.g. the rank-allocated final ones)."""
        tasks = list(routing)
        if self.user_score_fn is not None:
            examples = {t: [e.to_dict() for e in self.examples[t]] for t in tasks}
            values = [float(self.user_score_fn(self.model, routing[t], t, examples[t])) for t in tasks]
            return dict(zip(tasks, values, strict=True))
        sums = self._loss_sums([(routing[t], self.tokenized[t]) for t in tasks])
        return {t: total / max(count, 1) for t, (total, count) in zip(tasks, sums, strict=True)}

    def _loss_sums(self, requests: Sequence[tuple[str, Sequence[TokenizedExample]]]) -> list[tuple[float, int]]:
        """The summed completion-token loss and token count of every `(adapter name, rows)` request, in mixed-adapter
        forward passes."""
        rows, row_adapters, owners = [], [], []
        for index, (name, request_rows) in enumerate(requests):
            for tokenized in request_rows:
                rows.append(tokenized)
                row_adapters.append(name)
                owners.append(index)
        sums, counts, passes = completion_loss_sums(
            self.model,
            rows,
            row_adapters,
            pad_token_id=self.pad_token_id,
            batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
        )
        self.forward_passes += passes
        total, tokens = [0.0] * len(requests), [0] * len(requests)
        for owner, row_sum, row_count in zip(owners, sums, counts, strict=True):
            total[owner] += row_sum
            tokens[owner] += row_count
        return list(zip(total, tokens, strict=True))

    def cache_to_list(self) -> list[list]:
        """The cache as JSON-serialisable `[members, task, {"loss": loss}]` triples (for checkpoints)."""
        return [[list(members), task, {"loss": loss}] for (members, task), loss in self.cache.items()]

    def load_cache(self, items: Sequence[Sequence]) -> None:
        """Restore a cache written by `cache_to_list` (an older one's other scores, such as the miss, are dropped)."""
        self.cache = {(tuple(m), task): float(scores["loss"]) for m, task, scores in items}
