"""The validation collection: a second collection, built unlike the embedded one, on which defaults are checked.

Twelve tasks the embedded 16 do not use (`validation_data/`, built by `scripts/build_validation_tasks.py`: ISO
country / currency / language / region codes from `pycountry`'s databases, and word2vec analogy pairs asked the other
way round, as questions), on the same base model, with adapters trained by four recipes dealt out in turn, as a Hub
collection has them: rank 16 and 4, alpha 2r and r, dropout 0.05 and 0.1, q/k/v/o on some and every linear
projection (attention and MLP) on others, rslora on some. `peft-d2c benchmark --collection validation` runs the
benchmark on it; a default changes only when it wins on both collections (`docs/benchmark.md`). Never tune on it.
May import `peft_d2c.engine` and the `embedded` modules `adapters`, `base_model` and `tasks`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapters import AdapterRecipe, load_collection_assets
from .tasks import load_task_folder

VALIDATION_TASKS_DIR = str(Path(__file__).resolve().parent / "validation_data")
VALIDATION_TASK_NAMES: tuple[str, ...] = (
    "iso_alpha2",
    "iso_country",
    "currency_name",
    "language_name",
    "region_country",
    "capital_to_country",
    "plural_to_singular",
    "past_to_participle",
    "adverb_to_adjective",
    "nationality_to_country",
    "female_to_male",
    "comparative_to_adjective",
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
# The recipes, dealt out to the tasks in turn (task i gets VALIDATION_RECIPES[i % 4]); none is the embedded recipe
# (r = 8, alpha 16, no dropout, q/v, learning rate 1e-3).
VALIDATION_RECIPES = (
    AdapterRecipe(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ATTENTION, learning_rate=5e-4),
    AdapterRecipe(r=4, lora_alpha=4, lora_dropout=0.1, target_modules=("q_proj", "v_proj"), learning_rate=2e-3),
    AdapterRecipe(
        r=16, lora_alpha=16, lora_dropout=0.05, target_modules=ALL_LINEAR, use_rslora=True, learning_rate=5e-4
    ),
    AdapterRecipe(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL_LINEAR, learning_rate=1e-3),
)


def validation_recipe(task: str) -> AdapterRecipe:
    """The recipe of a validation task's adapter (`VALIDATION_RECIPES`, dealt out in task order)."""
    return VALIDATION_RECIPES[VALIDATION_TASK_NAMES.index(task) % len(VALIDATION_RECIPES)]


def load_validation_tasks(split: str, *, limit: int | None = None) -> dict[str, list[dict[str, str]]]:
    """Examples of the validation tasks (`"train"`, `"fewshot"` or `"test"`), as `load_embedded_tasks` gives the
    embedded ones."""
    return load_task_folder(VALIDATION_TASKS_DIR, VALIDATION_TASK_NAMES, split, limit=limit)


def load_validation_assets(
    cache_dir: str | os.PathLike | None = None,
    fetch: bool = True,
    show_progress: bool = True,
    *,
    tasks: Sequence[str] | None = None,
) -> tuple[Any, Any, dict, dict, dict]:
    """The validation collection, like `mainjob.load_embedded_assets`: `(peft_model, tokenizer, source_info, fewshot,
    test)`, its adapters trained on the first call (about 10 minutes on 2 CPU cores) and cached after.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*), fetch (`bool`), show_progress (`bool`): As for the main job.
        tasks (`Sequence[str]`, *optional*): A subset of `VALIDATION_TASK_NAMES` (default: all twelve).
    """
    return load_collection_assets(
        "validation", VALIDATION_TASKS_DIR, VALIDATION_TASK_NAMES, validation_recipe,
        tasks=tasks, cache_dir=cache_dir, fetch=fetch, show_progress=show_progress,
    )  # fmt: skip
