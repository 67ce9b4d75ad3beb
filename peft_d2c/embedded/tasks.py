"""The 16 embedded tasks: real word and sentence tasks shipped in `peft_d2c/embedded/task_data/` (built by
`scripts/build_tasks.py`, with a dataset card naming sources and licences), loaded with `datasets`. Imports nothing
of the package.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

EMBEDDED_TASKS_DIR = str(Path(__file__).resolve().parent / "task_data")
EMBEDDED_TASK_NAMES: tuple[str, ...] = (
    "capital_common",
    "capital_world",
    "currency",
    "city_state",
    "family",
    "adj_to_adverb",
    "opposite",
    "comparative",
    "superlative",
    "present_participle",
    "nationality",
    "past_tense",
    "plural",
    "plural_verbs",
    "sentiment",
    "news_topic",
)
SPLITS = ("train", "fewshot", "test")


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(EMBEDDED_TASK_NAMES)
    if isinstance(tasks, str):
        raise TypeError(f"`tasks` must be a list of task names, got the string {tasks!r}; wrap it in a list.")
    unknown = [task for task in tasks if task not in EMBEDDED_TASK_NAMES]
    if unknown:
        raise ValueError(f"`tasks` has unknown names {unknown}; choose from {list(EMBEDDED_TASK_NAMES)}.")
    return list(tasks)


def load_embedded_tasks(
    split: str, *, tasks: Sequence[str] | None = None, limit: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """Examples of the embedded tasks, loaded with `datasets.load_dataset` from the folder shipped in the package.

    Args:
        split (`str`): `"train"` (adapter training), `"fewshot"` (10 per task, what D2C scores) or `"test"`
            (held out, disjoint from both).
        tasks (`list[str]`, *optional*): A subset of `EMBEDDED_TASK_NAMES`; defaults to all 16, in their order.
        limit (`int`, *optional*): Keep at most this many examples per task (the first ones).

    Returns:
        `dict[str, list[dict[str, str]]]`: `{task: [{"prompt": ..., "completion": ...}, ...]}`.

    Raises:
        ValueError: If `split` or a task name is unknown, or `limit` is not positive.

    Example:
        ```python
        >>> from peft_d2c.embedded import load_embedded_tasks
        >>> load_embedded_tasks("fewshot", tasks=["capital_world"], limit=1)
        {'capital_world': [{'prompt': 'Country: Cyprus\\nCapital:', 'completion': ' Nicosia'}]}
        ```
    """
    return load_task_folder(EMBEDDED_TASKS_DIR, check_tasks(tasks), split, limit=limit)


def load_task_folder(
    folder: str, tasks: Sequence[str], split: str, *, limit: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """`{task: [{"prompt", "completion"}, ...]}` of a task folder laid out like a Hub dataset (one config per
    task, `train` / `fewshot` / `test` splits), loaded with `datasets.load_dataset`: `load_embedded_tasks` for any
    shipped collection."""
    import datasets  # heavy (pyarrow, pandas): imported only when task data is read

    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive number of examples per task or None, got {limit}.")
    result = {}
    with quiet_datasets():
        for task in tasks:
            dataset = datasets.load_dataset(folder, task, split=split)
            if limit is not None:
                dataset = dataset.select(range(min(limit, len(dataset))))
            result[task] = [{"prompt": row["prompt"], "completion": row["completion"]} for row in dataset]
    return result


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence `datasets` (progress bars, logs below ERROR) inside the block, then restore the caller's settings.

    Reading the shipped task files is an internal step: without this, a first load prints one "Generating ... split"
    bar per task file (48 for the 16 tasks).
    """
    import datasets  # heavy (pyarrow, pandas): imported only when task data is read

    bars_were_on, verbosity = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps the bars on, and says so
        warnings.filterwarnings("ignore", message="Cannot disable progress bars")
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()
