"""The conflict collection: a third collection, where tasks interfere and so the partition decides the result.

Sixteen tasks in eight pairs (`conflict_data/`, built by `scripts/build_conflict_tasks.py` from the words of three
embedded tasks): both tasks of a pair read the same word lists in the same prompt form and transform them
differently (first word / last word, reverse / rotate, ...; answers of one to three words). In six pairs the prompt
does not name the task, so one merged adapter holding both tasks of such a pair cannot answer both; in two it does.
The adapters are trained with a recipe unlike the embedded and validation ones: rank 8, alpha 32, dropout 0.05, on
the key, output and MLP up / down projections, 96 steps. `peft-d2c benchmark --collection conflict` runs the
benchmark on it; score it with the whole-answer exact match. May import the `embedded` modules `adapters` and
`tasks`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapters import AdapterRecipe, load_collection_assets
from .tasks import load_task_folder

CONFLICT_TASKS_DIR = str(Path(__file__).resolve().parent / "conflict_data")
# In pairs: both tasks of a pair share their inputs and prompt form (the last two pairs name the task).
CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    ("first_word", "last_word"),
    ("reverse", "rotate"),
    ("capitalise", "hyphenate"),
    ("drop_first", "drop_last"),
    ("initials", "middle_word"),
    ("count", "double_first"),
    ("named_reverse", "named_sort"),
    ("named_drop_first", "named_last_two"),
)
CONFLICT_TASK_NAMES: tuple[str, ...] = tuple(task for pair in CONFLICT_PAIRS for task in pair)
CONFLICT_RECIPE = AdapterRecipe(
    r=8,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=("k_proj", "o_proj", "up_proj", "down_proj"),
    learning_rate=1e-3,
    max_steps=96,
)


def load_conflict_tasks(split: str, *, limit: int | None = None) -> dict[str, list[dict[str, str]]]:
    """Examples of the conflict tasks (`"train"`, `"fewshot"` or `"test"`), as `load_embedded_tasks` gives the
    embedded ones."""
    return load_task_folder(CONFLICT_TASKS_DIR, CONFLICT_TASK_NAMES, split, limit=limit)


def load_conflict_assets(
    cache_dir: str | os.PathLike | None = None,
    fetch: bool = True,
    show_progress: bool = True,
    *,
    tasks: Sequence[str] | None = None,
) -> tuple[Any, Any, dict, dict, dict]:
    """The conflict collection, like `mainjob.load_embedded_assets`: `(peft_model, tokenizer, source_info, fewshot,
    test)`, its adapters trained on the first call (a few minutes on 2 CPU cores) and cached after.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*), fetch (`bool`), show_progress (`bool`): As for the main job.
        tasks (`Sequence[str]`, *optional*): A subset of `CONFLICT_TASK_NAMES` (default: all sixteen).
    """
    return load_collection_assets(
        "conflict", CONFLICT_TASKS_DIR, CONFLICT_TASK_NAMES, lambda task: CONFLICT_RECIPE,
        tasks=tasks, cache_dir=cache_dir, fetch=fetch, show_progress=show_progress,
    )  # fmt: skip
