"""The embedded single-task adapters: trained with one fixed recipe, cached per base model and recipe.

`AdapterRecipe` fixes every training setting; adapters are cached under
`<cache>/adapters/<base_key>/<recipe_hash>/<task>/`, so a benchmark trains them once per machine. Examples are
tokenised by `peft_d2c.engine.scoring.tokenization.tokenize_example`, exactly as the D2C loss sees them. May import
`peft_d2c.io`, `peft_d2c.data`, `peft_d2c.engine` and the `embedded` modules `base_model` and `tasks`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..data.examples import Example
from ..engine.runtime.state import preserved_state
from ..engine.scoring.loss import TokenizedExample, input_device, pad_token_id_for, tokenize_example
from ..io import atomic_write_json
from .base_model import default_cache_dir, load_embedded_base_model, staging_dir
from .tasks import check_tasks, load_embedded_tasks, load_task_folder

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AdapterRecipe:
    """How every embedded single-task adapter is trained (the values are calibrated; see `docs/embedded.md`).

    Args:
        r (`int`), lora_alpha (`int`), lora_dropout (`float`), target_modules (`tuple[str, ...]`), use_rslora
            (`bool`): The `LoraConfig`.
        learning_rate (`float`), weight_decay (`float`): AdamW settings; the rate decays linearly to 0.
        warmup_steps (`int`): Linear warm-up steps.
        batch_size (`int`): Examples per optimiser step (drawn from an epoch-wise shuffle).
        max_steps (`int`): Optimiser steps per adapter: a fixed count, so training is reproducible (a time limit
            would not be). Calibrated so the 16 adapters take about 40 s each on average on 2 CPU cores (word tasks
            less, the two sentence tasks more; see `docs/embedded.md`).
        max_length (`int`): Tokens per example at most (the prompt is cut from the left).
        seed (`int`): Base seed; each task's seed is `task_seed(task, seed)`.
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 8
    max_steps: int = 64
    max_length: int = 128
    seed: int = 0
    use_rslora: bool = False
    format_version: int = field(default=1, repr=False)  # bump when the training code changes what it produces

    def __post_init__(self) -> None:
        for name in ("r", "lora_alpha", "batch_size", "max_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be 0 or more, got {self.warmup_steps}.")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"`target_modules` must be a non-empty tuple of module names, got {self.target_modules!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        settings = {**asdict(self), "target_modules": list(self.target_modules)}
        if not self.use_rslora:  # added later: recipes without it keep their hash, so their cached adapters
            del settings["use_rslora"]
        return settings

    def recipe_hash(self) -> str:
        """A short stable hash of the recipe: the adapter cache folder name."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_RECIPE = AdapterRecipe()


def task_seed(task: str, base_seed: int = 0) -> int:
    """A stable seed per task (Python's `hash` is salted per process, so use a digest)."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}/{task}".encode()).digest()[:8], "big") % (2**63)


def _collate(rows: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and `labels` that score only the completion tokens."""
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, start) in enumerate((r.input_ids, r.completion_start) for r in rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _batches(n_examples: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """`steps` batches of indices from consecutive seeded permutations (every example once per epoch)."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n_examples, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def train_task_adapter(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, str]],
    *,
    seed: int,
    output_dir: str | os.PathLike,
    recipe: AdapterRecipe = DEFAULT_RECIPE,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one LoRA adapter on `examples`, save it to `output_dir` (atomically) and leave `model` unchanged.

    The loss covers only the completion tokens and the EOS (the prompt is masked with -100). LoRA initialisation and
    data order are seeded from `seed` inside `torch.random.fork_rng()`, so the caller's global RNG is untouched and
    the same call gives the same adapter.

    Args:
        model (`PreTrainedModel`): A plain causal LM (not a `PeftModel`). LoRA layers are injected for training and
            removed afterwards; its weights, requires_grad flags and training flag are restored.
        tokenizer: Its tokenizer.
        examples (`list[dict]`): `{"prompt": ..., "completion": ...}` training examples.
        seed (`int`): Seed of this adapter (see `task_seed`).
        output_dir (`str` or `os.PathLike`): Where the adapter is saved (`adapter_config.json`, safetensors).
        recipe (`AdapterRecipe`, *optional*): Training settings; defaults to `DEFAULT_RECIPE`.
        metadata (`dict`, *optional*): Extra JSON-serialisable entries for `training_info.json` (saved with the
            adapter, in the same atomic rename).

    Returns:
        `dict`: training statistics (`steps`, `seconds`, `cpu_seconds`, `first_loss`, `last_loss` (mean of the
        last 10 steps), `seed`).

    Raises:
        TypeError: If `model` already holds PEFT adapters.
        ValueError: If `examples` is empty.
        FileExistsError: If `output_dir` already exists.
    """
    if hasattr(model, "peft_config"):
        raise TypeError(
            "`model` already holds PEFT adapters; pass the plain base model (e.g. `peft_model.base_model"
            ".model` after `unload()`), so the adapter is trained on the base weights alone."
        )
    if not examples:
        raise ValueError("`examples` is empty; an adapter needs at least one training example.")
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"`output_dir` {output_dir} already exists; remove it or pass a new folder.")
    rows = [
        tokenize_example(tokenizer, Example(e["prompt"], e["completion"]), max_length=recipe.max_length)
        for e in examples
    ]
    pad_id = pad_token_id_for(tokenizer)
    device = input_device(model)
    lora_config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora,
        task_type="CAUSAL_LM",
    )
    start_time, start_cpu, losses = time.perf_counter(), time.process_time(), []
    with preserved_state(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # only inside fork_rng: seeds the LoRA initialisation without leaking out
        peft_model = get_peft_model(model, lora_config)
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
            scheduler = get_linear_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.max_steps)
            generator = torch.Generator().manual_seed(seed)
            peft_model.train()
            for batch in _batches(len(rows), recipe.batch_size, recipe.max_steps, generator):
                inputs = {k: v.to(device) for k, v in _collate([rows[i] for i in batch], pad_id).items()}
                loss = peft_model(**inputs).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            stats = {
                "steps": recipe.max_steps,
                "seconds": round(time.perf_counter() - start_time, 2),
                "cpu_seconds": round(time.process_time() - start_cpu, 2),  # robust to other jobs on the machine
                "first_loss": losses[0],
                "last_loss": sum(losses[-10:]) / len(losses[-10:]),
                "seed": seed,
            }
            _save_atomically(peft_model, output_dir, {**(metadata or {}), "recipe": recipe.to_dict(), **stats})
        finally:
            peft_model.unload()  # removes the LoRA layers and puts the original modules back
    return stats


def _save_atomically(peft_model, output_dir: Path, info: dict[str, Any]) -> None:
    staging = staging_dir(output_dir)
    try:
        peft_model.save_pretrained(staging)
        atomic_write_json(staging / "training_info.json", info)
        os.rename(staging, output_dir)
    except OSError:
        # Another process (e.g. a second rank) saved the same adapter first: keep its copy, which readers may
        # already be using, rather than swap the folder under them.
        if not (output_dir / "training_info.json").is_file():
            raise
        logger.info("%s was saved by another process meanwhile; keeping that copy.", output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _data_hash(examples: Sequence[Mapping[str, str]]) -> str:
    payload = json.dumps([[e["prompt"], e["completion"]] for e in examples]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def adapter_cache_dir(
    source_info: Mapping[str, str],
    *,
    cache_dir: str | os.PathLike | None = None,
    recipe: AdapterRecipe = DEFAULT_RECIPE,
) -> Path:
    """`<cache>/adapters/<base_key>/<recipe_hash>`: where the adapters of one base model and recipe live."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / "adapters" / source_info["base_key"] / recipe.recipe_hash()


def build_embedded_adapters(
    model: torch.nn.Module,
    tokenizer,
    source_info: Mapping[str, str],
    *,
    cache_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    recipe: AdapterRecipe = DEFAULT_RECIPE,
    show_progress: bool = True,
) -> dict[str, str]:
    """Train (or reuse from the cache) one adapter per embedded task on its `train` split.

    Args:
        model (`PreTrainedModel`): The base model from `load_embedded_base_model` (left unchanged).
        tokenizer: Its tokenizer.
        source_info (`dict`): The third value of `load_embedded_base_model`; its `base_key` keys the cache.
        cache_dir (`str` or `os.PathLike`, *optional*): Defaults to `default_cache_dir()`.
        tasks (`list[str]`, *optional*): A subset of `EMBEDDED_TASK_NAMES`; defaults to all 16.
        recipe (`AdapterRecipe`, *optional*): Training settings; part of the cache path.
        show_progress (`bool`, *optional*, defaults to `True`): Show a tqdm bar over tasks.

    Returns:
        `dict[str, str]`: task -> folder of its saved adapter, in task order.

    Example:
        ```python
        >>> model, tokenizer, info = load_embedded_base_model()
        >>> dirs = build_embedded_adapters(model, tokenizer, info)  # ~11 min the first time on 2 cores, then instant
        ```
    """
    tasks = check_tasks(tasks)
    train = load_embedded_tasks("train", tasks=tasks)
    recipes = {task: recipe for task in tasks}
    return build_task_adapters(
        model, tokenizer, source_info, train, recipes, cache_dir=cache_dir, show_progress=show_progress
    )


def build_task_adapters(
    model: torch.nn.Module,
    tokenizer,
    source_info: Mapping[str, str],
    train: Mapping[str, Sequence[Mapping[str, str]]],
    recipes: Mapping[str, AdapterRecipe],
    *,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> dict[str, str]:
    """Train (or reuse from the cache) one adapter per task of `train` with its own recipe: what
    `build_embedded_adapters` does for the embedded tasks, for any collection (`embedded.validation`).

    Returns:
        `dict[str, str]`: task -> folder of its saved adapter (`adapter_cache_dir(...) / task`), in `train` order.
    """
    adapter_dirs = {}
    for task in tqdm(list(train), desc="adapters", disable=not show_progress):
        recipe = recipes[task]
        folder = adapter_cache_dir(source_info, cache_dir=cache_dir, recipe=recipe) / task
        info_file = folder / "training_info.json"
        data_hash = _data_hash(train[task])
        if info_file.is_file() and json.loads(info_file.read_text()).get("data_hash") == data_hash:
            logger.info("Reusing the cached adapter of %r from %s.", task, folder)
        else:
            if folder.exists():  # trained on other task data, or an interrupted copy from an older version
                logger.info("Replacing the stale adapter of %r in %s.", task, folder)
                shutil.rmtree(folder)
            logger.info(
                "Training the adapter of %r (%d examples, %d steps).", task, len(train[task]), recipe.max_steps
            )
            stats = train_task_adapter(
                model,
                tokenizer,
                train[task],
                seed=task_seed(task, recipe.seed),
                output_dir=folder,
                recipe=recipe,
                metadata={"task": task, "data_hash": data_hash, "base": dict(source_info)},
            )
            logger.info(
                "Trained %r in %.1f s (loss %.3f -> %.3f).",
                task,
                stats["seconds"],
                stats["first_loss"],
                stats["last_loss"],
            )
        adapter_dirs[task] = str(folder)
    return adapter_dirs


def load_embedded_peft_model(
    *,
    fetch: bool = True,
    cache_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    recipe: AdapterRecipe = DEFAULT_RECIPE,
    torch_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> tuple[Any, Any, dict[str, str], dict[str, str]]:
    """The embedded default in one call: base model + one adapter per task, each named by its task, in eval mode.

    Missing adapters are trained first (see `build_embedded_adapters`); cached ones load in about a second.

    Args:
        fetch (`bool`, *optional*, defaults to `True`): Allow downloading the base model (see
            `load_embedded_base_model`).
        cache_dir (`str` or `os.PathLike`, *optional*): Defaults to `default_cache_dir()`.
        tasks (`list[str]`, *optional*): A subset of `EMBEDDED_TASK_NAMES`; defaults to all 16.
        recipe (`AdapterRecipe`, *optional*): Training settings of the adapters.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Dtype of the base model.
        show_progress (`bool`, *optional*, defaults to `True`): Show a tqdm bar while training.

    Returns:
        `tuple`: `(peft_model, tokenizer, source_info, adapter_dirs)`.

    Raises:
        FileNotFoundError: If `fetch=False` and the base model is not cached.

    Example:
        ```python
        >>> from peft_d2c.embedded import load_embedded_peft_model
        >>> model, tokenizer, info, dirs = load_embedded_peft_model()
        >>> sorted(model.peft_config)[:3]
        ['adj_to_adverb', 'capital_common', 'capital_world']
        ```
    """
    tasks = check_tasks(tasks)
    model, tokenizer, source_info = load_embedded_base_model(fetch=fetch, cache_dir=cache_dir, torch_dtype=torch_dtype)
    adapter_dirs = build_embedded_adapters(
        model, tokenizer, source_info, cache_dir=cache_dir, tasks=tasks, recipe=recipe, show_progress=show_progress
    )
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[tasks[0]], adapter_name=tasks[0])
    for task in tasks[1:]:
        peft_model.load_adapter(adapter_dirs[task], adapter_name=task)
    peft_model.eval()
    return peft_model, tokenizer, source_info, adapter_dirs


def load_collection_assets(
    collection: str,
    tasks_dir: str,
    all_names: Sequence[str],
    recipe_for: Callable[[str], AdapterRecipe],
    *,
    tasks: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    fetch: bool = True,
    show_progress: bool = True,
) -> tuple[Any, Any, dict, dict, dict]:
    """A task collection other than the embedded one on the embedded base model: `(peft_model, tokenizer,
    source_info, fewshot, test)`, its adapters (one per task of `tasks`, default `all_names`, trained with
    `recipe_for(task)` on the folder's `train` split) trained on the first call and cached after;
    `source_info["collection"]` names it.

    Raises:
        ValueError: If `tasks` names a task that is not in `all_names`.
    """
    names = list(tasks or all_names)
    unknown = sorted(set(names) - set(all_names))
    if unknown:
        raise ValueError(f"`tasks` has unknown names {unknown}; choose from {list(all_names)}.")
    model, tokenizer, source_info = load_embedded_base_model(
        fetch=fetch, cache_dir=cache_dir, torch_dtype=torch.float32
    )
    train = load_task_folder(tasks_dir, names, "train")
    dirs = build_task_adapters(
        model,
        tokenizer,
        source_info,
        train,
        {task: recipe_for(task) for task in names},
        cache_dir=cache_dir,
        show_progress=show_progress,
    )
    peft_model = PeftModel.from_pretrained(model, dirs[names[0]], adapter_name=names[0])
    for task in names[1:]:
        peft_model.load_adapter(dirs[task], adapter_name=task)
    peft_model.eval()
    fewshot, test = load_task_folder(tasks_dir, names, "fewshot"), load_task_folder(tasks_dir, names, "test")
    return peft_model, tokenizer, {**source_info, "collection": collection}, fewshot, test
