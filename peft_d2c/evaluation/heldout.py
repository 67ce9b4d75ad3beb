"""Held-out scores of a routing table: every task answered by the adapter that serves it, all in mixed batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..data.examples import Example
from ..engine.scoring.loss import completion_loss_sums, pad_token_id_for, tokenize_example
from .generation import generate_answers, normalize_answer, normalize_whole_answer


def evaluate_routing(
    model,
    tokenizer,
    examples: Mapping[str, Sequence[Mapping[str, str]]],
    routing: Mapping[str, str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    use_chat_template: bool = False,
) -> dict[str, dict[str, float]]:
    """Exact match (of the first word and of the whole answer) and completion loss of every task under the adapter
    `routing` names for it.

    Rows of all tasks go through PEFT's mixed-adapter batches (`adapter_names=` per row), so a whole routing table
    costs one pass over the examples. `"__base__"` routes a task to the base model (zero-shot). One greedy generation
    serves both scores: it runs for `max_new_tokens` or, if more, one token past the longest reference (so a whole
    answer can be complete), and greedy decoding makes its first tokens those of a shorter generation.

    Args:
        model (`PeftModel`): Holds every adapter named in `routing`.
        tokenizer: The base model's tokenizer.
        examples (`Mapping[str, Sequence[dict]]`): Held-out `{"prompt", "completion"}` examples per task.
        routing (`Mapping[str, str]`): Task -> adapter name (a source, merged or `"__base__"` adapter).
        batch_size (`int`, defaults to 32), max_new_tokens (`int`, defaults to 8): Generation settings.
        use_chat_template (`bool`, defaults to `False`): Wrap the prompts in the chat template, for the answers and
            the loss alike (pass the run's `scoring.use_chat_template`).

    Returns:
        `dict[str, dict[str, float]]`: `{task: {"exact_match": share in [0, 1] (first word, `normalize_answer`),
        "whole_match": share in [0, 1] (whole answer, `normalize_whole_answer`), "loss": nats per token}}`.

    Raises:
        KeyError: If a task of `examples` has no entry in `routing`.
    """
    missing = sorted(set(examples) - set(routing))
    if missing:
        raise KeyError(f"No adapter routed for tasks {missing}.")
    tasks, prompts, references, names, rows = [], [], [], [], []
    for task, items in examples.items():
        for item in items:
            example = Example(item["prompt"], item["completion"])
            tasks.append(task)
            prompts.append(example.prompt)
            references.append(example.completion)
            names.append(routing[task])
            rows.append(tokenize_example(tokenizer, example, use_chat_template=use_chat_template))
    longest = max((len(row.input_ids) - row.completion_start for row in rows), default=0)
    was_training = model.training
    model.eval()
    try:
        generated = generate_answers(
            model,
            tokenizer,
            prompts,
            adapter_names=names,
            max_new_tokens=max(max_new_tokens, longest + 1),
            batch_size=batch_size,
            use_chat_template=use_chat_template,
        )
        sums, counts, _ = completion_loss_sums(
            model, rows, names, pad_token_id=pad_token_id_for(tokenizer), batch_size=batch_size
        )
    finally:
        model.train(was_training)
    scores: dict[str, dict[str, float]] = {}
    for task in examples:
        index = [i for i, t in enumerate(tasks) if t == task]
        correct = sum(normalize_answer(generated[i]) == normalize_answer(references[i]) for i in index)
        whole = sum(normalize_whole_answer(generated[i]) == normalize_whole_answer(references[i]) for i in index)
        scores[task] = {
            "exact_match": correct / len(index),
            "whole_match": whole / len(index),
            "loss": sum(sums[i] for i in index) / max(1, sum(counts[i] for i in index)),
        }
    return scores


def loss_matrix(
    model,
    tokenizer,
    examples: Mapping[str, Sequence[Mapping[str, str]]],
    adapter_names: Sequence[str],
    *,
    batch_size=32,
) -> list[list[float]]:
    """Completion loss of every task (rows, in `examples` order) under every adapter (columns), in mixed batches."""
    rows, names, owners = [], [], []
    tasks = list(examples)
    for t, task in enumerate(tasks):
        tokenized = [tokenize_example(tokenizer, Example(e["prompt"], e["completion"])) for e in examples[task]]
        for a, name in enumerate(adapter_names):
            rows += tokenized
            names += [name] * len(tokenized)
            owners += [(t, a)] * len(tokenized)
    was_training = model.training
    model.eval()
    try:
        sums, counts, _ = completion_loss_sums(
            model, rows, names, pad_token_id=pad_token_id_for(tokenizer), batch_size=batch_size
        )
    finally:
        model.train(was_training)
    total = [[0.0] * len(adapter_names) for _ in tasks]
    tokens = [[0] * len(adapter_names) for _ in tasks]
    for (t, a), s, c in zip(owners, sums, counts, strict=True):
        total[t][a] += s
        tokens[t][a] += c
    return [[total[t][a] / max(1, tokens[t][a]) for a in range(len(adapter_names))] for t in range(len(tasks))]
