"""Task data specs: where each task's few-shot examples come from (a Hub dataset, a local folder or data files).

A spec maps every task (= source adapter name) to a `TaskDataSpec`: the dataset, its config and split, how a row
becomes a `{"prompt", "completion"}` pair (a column mapping or format templates), how many rows to sample and the
seed. Specs are written in Python or in YAML:

```yaml
defaults:                 # optional, applied to every task
  num_examples: 10
  seed: 0
tasks:
  capital:
    path: my-org/word-tasks          # Hub id, local Hub-layout folder, or a .json/.jsonl/.csv/.parquet file
    name: capital-world              # config name (optional)
    prompt_template: "Country: {country}\\nCapital:"
    completion_template: " {capital}"
  sentiment:
    path: data/sentiment.csv
    columns: {prompt: text, completion: label}
```
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import yaml

__all__ = ["TaskDataSpec", "TaskExamples", "load_data_spec", "load_task_examples"]

logger = logging.getLogger(__name__)

# File suffixes loaded with a `datasets` packaged builder instead of being treated as a dataset folder or Hub id.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
EXAMPLE_KEYS = ("prompt", "completion")


@dataclass
class TaskDataSpec:
    """Where the few-shot examples of one task come from and how a dataset row becomes an example.

    Args:
        path (`str`):
            A Hub dataset id (`"org/name"`), a local folder laid out like a Hub dataset repo, a local
            `.json`/`.jsonl`/`.csv`/`.parquet` file, or a `datasets` builder name (`"json"`, `"csv"`, ...) together
            with `data_files`.
        name (`str`, *optional*):
            The dataset config name.
        split (`str`, defaults to `"train"`):
            The split to sample from.
        columns (`dict[str, str]`, *optional*):
            Which columns hold the prompt and the completion, e.g. `{"prompt": "question", "completion": "answer"}`.
            Defaults to columns named `prompt` and `completion`.
        prompt_template (`str`, *optional*):
            A `str.format` template over the row's columns, e.g. `"Country: {country}\\nCapital:"`; replaces the
            `prompt` column.
        completion_template (`str`, *optional*):
            Same for the completion, e.g. `" {capital}"`.
        num_examples (`int`, defaults to 10):
            How many rows to sample.
        seed (`int`, defaults to 0):
            Seed of the sampling (rows are drawn without replacement).
        data_files (`str`, `list[str]` or `dict[str, str | list[str]]`, *optional*):
            Data files passed to `datasets.load_dataset`; a plain file or list is read as the `split`.
        revision (`str`, *optional*):
            Branch, tag or commit of a Hub dataset.

    Example:
        ```python
        >>> from peft_d2c.data.spec import TaskDataSpec
        >>> TaskDataSpec("org/capitals", prompt_template="Country: {country}\\nCapital:", completion_template=" {capital}")
        ```
    """

    path: str
    name: str | None = None
    split: str = "train"
    columns: dict[str, str] | None = None
    prompt_template: str | None = None
    completion_template: str | None = None
    num_examples: int = 10
    seed: int = 0
    data_files: str | list[str] | dict[str, Any] | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path:
            raise TypeError(f"`path` must be a non-empty string (Hub id, folder or file), got {self.path!r}.")
        for key in ("name", "prompt_template", "completion_template", "revision"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"`{key}` must be a string or None, got {value!r}.")
        if not isinstance(self.split, str) or not self.split:
            raise TypeError(f"`split` must be a non-empty string, got {self.split!r}.")
        if self.columns is not None:
            if not isinstance(self.columns, Mapping):
                raise TypeError(f"`columns` must map 'prompt'/'completion' to column names, got {self.columns!r}.")
            unknown = sorted(set(self.columns) - set(EXAMPLE_KEYS))
            if unknown:
                raise ValueError(f"`columns` keys must be in {list(EXAMPLE_KEYS)}, got {unknown}.")
            self.columns = {str(k): str(v) for k, v in self.columns.items()}
        for key in ("num_examples", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{key}` must be an int, got {value!r}.")
        if self.num_examples < 1:
            raise ValueError(f"`num_examples` must be >= 1, got {self.num_examples}.")
        if self.seed < 0:
            raise ValueError(f"`seed` must be >= 0, got {self.seed}.")
        for key in ("prompt_template", "completion_template"):
            template = getattr(self, key)
            if template is not None:
                template_fields(template, key)  # raises on a malformed template
        if self.columns and self.prompt_template is not None and "prompt" in self.columns:
            raise ValueError("Give either `columns['prompt']` or `prompt_template`, not both.")
        if self.columns and self.completion_template is not None and "completion" in self.columns:
            raise ValueError("Give either `columns['completion']` or `completion_template`, not both.")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain dict, without the unset fields."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def source(self) -> dict[str, Any]:
        """Where the data came from, as recorded in `D2CResult.data_sources` and the model cards."""
        out: dict[str, Any] = {"path": self.path, "name": self.name, "split": self.split}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.data_files is not None:
            out["data_files"] = self.data_files
        return out


class TaskExamples(dict):
    """`{task: [{"prompt": ..., "completion": ...}]}` plus `data_sources`: `{task: {"path", "name", "split"}}`."""

    def __init__(self, examples: Mapping[str, list[dict[str, str]]], data_sources: Mapping[str, dict[str, Any]]):
        super().__init__(examples)
        self.data_sources = dict(data_sources)


_SPEC_KEYS = tuple(f.name for f in fields(TaskDataSpec))


def template_fields(template: str, argument: str = "template") -> list[str]:
    """Column names a `str.format` template refers to (`"{country}"` -> `["country"]`).

    Raises:
        ValueError: If the template is malformed or uses positional fields (`{}` or `{0}`).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"`{argument}` is not a valid format string ({err}): {template!r}.") from err
    names = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        base = field_name.split(".")[0].split("[")[0]
        if base == "" or base.isdigit():
            raise ValueError(f"`{argument}` must use named fields like '{{country}}', got {template!r}.")
        if base not in names:
            names.append(base)
    return names


def _spec_from_mapping(task: str, raw: Any, defaults: Mapping[str, Any]) -> TaskDataSpec:
    if isinstance(raw, TaskDataSpec):
        return raw
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, Mapping):
        raise TypeError(f"The data spec of task {task!r} must be a mapping or a TaskDataSpec, got {raw!r}.")
    merged = {**defaults, **raw}
    unknown = sorted(set(merged) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the data spec of task {task!r}; allowed keys: {list(_SPEC_KEYS)}."
        )
    if "path" not in merged:
        raise ValueError(f"The data spec of task {task!r} needs a `path` (Hub id, folder or data file).")
    try:
        return TaskDataSpec(**merged)
    except (TypeError, ValueError) as err:
        raise type(err)(f"Task {task!r}: {err}") from err


def load_data_spec(spec: str | os.PathLike | Mapping[str, Any]) -> dict[str, TaskDataSpec]:
    """Read a task data spec from a YAML file or a mapping.

    The mapping has a `tasks` key (`{task: {path: ..., ...}}`) and optional `defaults` applied to every task, or
    is itself the `{task: spec}` mapping. A task's spec may be a `TaskDataSpec`, a dict of its fields, or a bare
    path string.

    Args:
        spec (`str`, `os.PathLike` or `Mapping`): A YAML file path or the already parsed mapping.

    Returns:
        `dict[str, TaskDataSpec]`: one spec per task, in file order.

    Raises:
        FileNotFoundError: If the YAML file does not exist.
        ValueError: If a key is unknown (the message names it and lists the allowed keys) or a value is invalid.
        TypeError: If the spec is not a mapping.

    Example:
        ```python
        >>> from peft_d2c.data.spec import load_data_spec
        >>> specs = load_data_spec({"tasks": {"capital": {"path": "data/capital.jsonl"}}, "defaults": {"seed": 1}})
        >>> specs["capital"].seed
        1
        ```
    """
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Data spec file `spec` not found: {path!r}.")
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f) or {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"A data spec must be a mapping of tasks, got {type(spec).__name__}.")
    if "tasks" in spec or "defaults" in spec:
        unknown = sorted(set(spec) - {"tasks", "defaults"})
        if unknown:
            raise ValueError(
                f"Unknown top-level key(s) {unknown} in the data spec; allowed keys: ['defaults', 'tasks']."
            )
        tasks, defaults = spec.get("tasks") or {}, spec.get("defaults") or {}
    else:
        tasks, defaults = spec, {}
    if not isinstance(tasks, Mapping) or not isinstance(defaults, Mapping):
        raise TypeError("`tasks` and `defaults` of a data spec must be mappings.")
    unknown = sorted(set(defaults) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in the data spec `defaults`; allowed keys: {list(_SPEC_KEYS)}.")
    if not tasks:
        raise ValueError("The data spec has no tasks.")
    return {str(task): _spec_from_mapping(str(task), raw, defaults) for task, raw in tasks.items()}


def _load_split(spec: TaskDataSpec, token: str | bool | None):
    """`datasets.load_dataset` for one spec: Hub id, local Hub-layout folder, or data files."""
    import datasets  # heavy (pyarrow, pandas): imported only when a spec is loaded

    path, data_files = spec.path, spec.data_files
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and suffix in FILE_BUILDERS:
        if os.path.getsize(path) == 0:  # `datasets` fails on an empty file with a bare StopIteration
            raise ValueError(f"`path` {spec.path!r} is an empty file; it holds no examples.")
        path, data_files = FILE_BUILDERS[suffix], spec.path
    if isinstance(data_files, (str, os.PathLike, list, tuple)):
        data_files = {
            spec.split: [os.fspath(f) for f in data_files]
            if isinstance(data_files, (list, tuple))
            else os.fspath(data_files)
        }
    kwargs: dict[str, Any] = {"split": spec.split}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    if token is not None:
        kwargs["token"] = token
    return datasets.load_dataset(path, spec.name, **kwargs)


def _row_to_example(task: str, row: Mapping[str, Any], spec: TaskDataSpec) -> dict[str, str]:
    example = {}
    for key in EXAMPLE_KEYS:
        template = getattr(spec, f"{key}_template")
        if template is not None:
            example[key] = template.format(**row)
        else:
            value = row[(spec.columns or {}).get(key, key)]
            example[key] = value if isinstance(value, str) else str(value)
    return example


def _check_columns(task: str, spec: TaskDataSpec, column_names: list[str]) -> None:
    needed: dict[str, str] = {}
    for key in EXAMPLE_KEYS:
        template = getattr(spec, f"{key}_template")
        if template is not None:
            for name in template_fields(template, f"{key}_template"):
                needed.setdefault(name, f"`{key}_template`")
        else:
            needed.setdefault((spec.columns or {}).get(key, key), f"the {key} column")
    missing = {name: why for name, why in needed.items() if name not in column_names}
    if missing:
        detail = ", ".join(f"{name!r} (used by {why})" for name, why in missing.items())
        raise ValueError(
            f"Task {task!r}: the dataset {spec.path!r} (split {spec.split!r}) has no column {detail}; its columns are "
            f"{column_names}. Set `columns` or the templates of this task."
        )


def load_task_examples(
    spec: str | os.PathLike | Mapping[str, Any], *, token: str | bool | None = None
) -> TaskExamples:
    """Load and sample the few-shot examples of every task of a data spec with `datasets.load_dataset`.

    Rows are drawn without replacement from a generator seeded with the task's `seed`, so the same spec always
    gives the same examples. Datasets shared by several tasks are loaded once.

    Args:
        spec (`str`, `os.PathLike` or `Mapping`):
            A YAML file, or a mapping accepted by `load_data_spec` (values may be `TaskDataSpec`s).
        token (`str` or `bool`, *optional*):
            Hub token for private datasets (never logged or stored).

    Returns:
        `TaskExamples`: a dict `{task: [{"prompt": str, "completion": str}, ...]}`, ready for `merge_adapters_d2c`,
        with a `data_sources` attribute `{task: {"path", "name", "split"}}` for `D2CResult.data_sources` and the cards.

    Raises:
        ValueError: Naming the task, if its dataset has fewer rows than `num_examples`, lacks a column, or a template
            refers to a missing column.

    Example:
        ```python
        >>> from peft_d2c.data.spec import load_task_examples
        >>> examples = load_task_examples("data_spec.yaml")  # doctest: +SKIP
        >>> examples["capital"][0]  # doctest: +SKIP
        {'prompt': 'Country: France\\nCapital:', 'completion': ' Paris'}
        ```
    """
    specs = load_data_spec(spec)
    loaded: dict[tuple, Any] = {}
    examples: dict[str, list[dict[str, str]]] = {}
    for task, task_spec in specs.items():
        key = (task_spec.path, task_spec.name, task_spec.split, repr(task_spec.data_files), task_spec.revision)
        if key not in loaded:
            try:
                loaded[key] = _load_split(task_spec, token)
            except Exception as err:
                message = (
                    f"Task {task!r}: could not load {task_spec.path!r} (config {task_spec.name!r}, split "
                    f"{task_spec.split!r}): {err}"
                )
                raise _same_type(err, message) from err
        dataset = loaded[key]
        _check_columns(task, task_spec, list(dataset.column_names))
        if len(dataset) < task_spec.num_examples:
            raise ValueError(
                f"Task {task!r} asks for `num_examples`={task_spec.num_examples} but the dataset {task_spec.path!r} "
                f"(config {task_spec.name!r}, split {task_spec.split!r}) has only {len(dataset)} rows."
            )
        rng = np.random.default_rng(task_spec.seed)
        indices = rng.choice(len(dataset), size=task_spec.num_examples, replace=False)
        rows = dataset.select([int(i) for i in indices])
        examples[task] = [_row_to_example(task, row, task_spec) for row in rows]
        logger.info("Task %r: sampled %d examples from %r.", task, len(examples[task]), task_spec.path)
    return TaskExamples(examples, {task: s.source() for task, s in specs.items()})


def _same_type(err: Exception, message: str) -> Exception:
    """`err`'s type with a message naming the task, or `err` itself when its type cannot be rebuilt that way."""
    try:
        return type(err)(message)
    except Exception:
        return err
