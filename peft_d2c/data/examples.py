"""Task examples: user input (mappings, `datasets.Dataset`, data specs) normalised to `{task: [Example]}`."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Example", "normalize_task_examples"]


@dataclass(frozen=True)
class Example:
    """One few-shot example of a task: the model sees `prompt` and is scored on `completion`."""

    prompt: str
    completion: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


def _to_example(task: str, index: int, item: Any) -> Example:
    if isinstance(item, Example):
        example = item
    elif isinstance(item, Mapping):
        missing = [key for key in ("prompt", "completion") if key not in item]
        if missing:
            raise ValueError(f"Example {index} of task {task!r} has no {missing} key; got keys {sorted(item)}.")
        example = Example(item["prompt"], item["completion"])
    else:
        raise TypeError(
            f"Example {index} of task {task!r} must be a dict with 'prompt' and 'completion', got {type(item).__name__}."
        )
    if not isinstance(example.prompt, str) or not isinstance(example.completion, str):
        raise TypeError(f"Example {index} of task {task!r}: 'prompt' and 'completion' must be strings.")
    if not example.completion.strip():
        raise ValueError(f"Example {index} of task {task!r} has an empty completion; there is nothing to score.")
    return example


def normalize_task_examples(task_examples: Any) -> dict[str, list[Example]]:
    """Turn user-supplied task examples into `{task: [Example, ...]}`.

    Args:
        task_examples (`Mapping[str, Sequence[dict]]` or `datasets.Dataset`):
            Either a mapping from task (= adapter) name to `{"prompt": ..., "completion": ...}` dicts, or a
            `datasets.Dataset` with `task`, `prompt` and `completion` columns.

    Returns:
        `dict[str, list[Example]]`: the examples of every task, in their original order.

    Raises:
        TypeError: If the input is neither a mapping nor a dataset, or an example is not a dict of strings.
        ValueError: If a task has no examples, an example lacks a key, or a completion is empty.

    Example:
        ```python
        >>> from peft_d2c.data import normalize_task_examples
        >>> normalize_task_examples({"capital": [{"prompt": "France:", "completion": " Paris"}]})
        {'capital': [Example(prompt='France:', completion=' Paris')]}
        ```
    """
    if _is_dataset(task_examples):
        missing = [c for c in ("task", "prompt", "completion") if c not in task_examples.column_names]
        if missing:
            raise ValueError(
                f"The task dataset needs columns 'task', 'prompt' and 'completion'; missing {missing} "
                f"(has {task_examples.column_names})."
            )
        grouped: dict[str, list[dict[str, str]]] = {}
        for row in task_examples.select_columns(["task", "prompt", "completion"]):
            grouped.setdefault(row["task"], []).append(row)
        task_examples = grouped
    if not isinstance(task_examples, Mapping):
        raise TypeError(
            "`task_examples` must be a mapping {task: [{'prompt': ..., 'completion': ...}]} or a datasets.Dataset "
            f"with task/prompt/completion columns, got {type(task_examples).__name__}."
        )
    result: dict[str, list[Example]] = {}
    for task, items in task_examples.items():
        if not isinstance(task, str):
            raise TypeError(f"Task names must be strings (the adapter names), got {task!r}.")
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise TypeError(f"The examples of task {task!r} must be a list of dicts, got {type(items).__name__}.")
        if len(items) == 0:
            raise ValueError(f"Task {task!r} has no examples; give it at least one or leave its adapter out.")
        result[task] = [_to_example(task, i, item) for i, item in enumerate(items)]
    return result


def _is_dataset(obj: Any) -> bool:
    # A caller holding a Dataset has imported `datasets` already; do not pay its import time for plain dicts.
    if "datasets" not in sys.modules:
        return False
    from datasets import Dataset  # heavy; only reached when `datasets` is already imported (see above)

    return isinstance(obj, Dataset)
