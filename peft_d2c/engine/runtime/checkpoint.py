"""Resumable D2C searches: the search state, written atomically every few steps and checked before it is reused.

A checkpoint (`d2c_checkpoint.json` in the run's `checkpoint_dir`) holds the partition, the step reached, the
numpy generator's state, the history, the start partition and every loss computed so far. Restoring all of it makes
the rest of a resumed run draw, score and decide exactly as the uninterrupted run would have. It also holds a
fingerprint of what the losses depend on (the settings, the adapter names and weights, the examples), so a
checkpoint written for another run is refused instead of silently mixing two searches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ...config import D2CMergeConfig
from ...errors import CheckpointMismatchError
from ...io import atomic_write_json
from ..search.loop import SearchState

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "d2c_checkpoint.json"
CHECKPOINT_FORMAT = 2  # 2: the cache holds both scores of a request (loss and miss)
# Settings that change neither the search nor its losses, so a run may resume with other values.
_RESUMABLE_SETTINGS = ("show_progress", "checkpoint_every", "memory_limit")


def score_fn_identity(score_fn: Callable | None) -> str:
    """Which loss a run used: the built-in completion loss, or a user function by qualified name and code digest."""
    if score_fn is None:
        return "completion_loss"
    name = f"{getattr(score_fn, '__module__', '?')}.{getattr(score_fn, '__qualname__', type(score_fn).__name__)}"
    code = getattr(score_fn, "__code__", None) or getattr(type(score_fn).__call__, "__code__", None)
    body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16] if code else "no-code"
    return f"custom:{name}:{body}"


def run_fingerprint(
    config: D2CMergeConfig,
    adapter_names: Sequence[str],
    examples: Mapping[str, Sequence[Any]],
    adapter_digest: str,
    *,
    score_fn: Callable | None = None,
    tokenized: Mapping[str, Sequence[Any]] | None = None,
    model_digest: str | None = None,
) -> dict[str, Any]:
    """What a search's results depend on, in a JSON-comparable form.

    Args:
        config (`D2CMergeConfig`): The run's settings (those in `_RESUMABLE_SETTINGS` left out).
        adapter_names (`Sequence[str]`): The clustered adapters, in order.
        examples (`Mapping[str, Sequence]`): The examples of every task (objects with `to_dict()`, or dicts).
        adapter_digest (`str`): A digest of the adapters' weights (see `peft_d2c.engine.merge.lora.adapter_digest`).
        score_fn (`Callable`, *optional*): The user score function replacing the built-in loss, if any.
        tokenized (`Mapping[str, Sequence]`, *optional*): The token ids the loss sees (objects with `input_ids` and
            `completion_start`): they change with the tokenizer and the chat template.
        model_digest (`str`, *optional*): A digest of the base model's weights and dtype
            (`peft_d2c.engine.merge.lora.base_model_digest`).

    Returns:
        `dict`: `config`, `adapters`, `adapter_weights`, `examples`, `tokens`, `base_model` and `score_fn` entries.
    """
    settings = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_SETTINGS}
    rows = {
        task: [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in items] for task, items in examples.items()
    }
    examples_digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    tokens_digest = None
    if tokenized:
        ids = {task: [[list(t.input_ids), t.completion_start] for t in items] for task, items in tokenized.items()}
        tokens_digest = hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()
    return {
        "config": settings,
        "adapters": list(adapter_names),
        "adapter_weights": adapter_digest,
        "examples": examples_digest,
        "tokens": tokens_digest,
        "base_model": model_digest,
        "score_fn": score_fn_identity(score_fn),
    }


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME)


def save_checkpoint(checkpoint_dir: str | os.PathLike, payload: dict[str, Any]) -> str:
    """Write `payload` (fingerprint, state, rng, cache, initial_clusters) atomically; return the file's path."""
    path = checkpoint_path(checkpoint_dir)
    atomic_write_json(path, {"format": CHECKPOINT_FORMAT, **payload})
    return path


def load_checkpoint(checkpoint_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Read the checkpoint of `checkpoint_dir` if there is one, and check that it belongs to this run.

    Args:
        checkpoint_dir (`str` or `os.PathLike`): The folder given to the run.
        fingerprint (`dict`): `run_fingerprint` of the current call.

    Returns:
        `dict` or `None`: the checkpoint's payload, or `None` when the folder holds no checkpoint yet.

    Raises:
        CheckpointMismatchError: If the checkpoint was written for other settings, adapters or examples (the
            message names each difference), or by an incompatible version of peft-d2c.
    """
    path = checkpoint_path(checkpoint_dir)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{path} has checkpoint format {payload.get('format')!r}, this peft-d2c writes {CHECKPOINT_FORMAT}; "
            "delete it (or choose another `checkpoint_dir`) to start over."
        )
    differences = _differences(payload.get("fingerprint", {}), fingerprint)
    if differences:
        raise CheckpointMismatchError(
            f"The checkpoint in {path} belongs to another run: {'; '.join(differences)}. Re-run with the same "
            "settings, adapters and examples to resume it, or use another `checkpoint_dir` (or delete the file) to "
            "start a new search."
        )
    return payload


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    saved_config, current_config = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(saved_config) | set(current_config)):
        if saved_config.get(key) != current_config.get(key):
            out.append(f"`{key}` was {saved_config.get(key)!r}, now {current_config.get(key)!r}")
    if saved.get("adapters") != current.get("adapters"):
        out.append(f"adapters were {saved.get('adapters')}, now {current.get('adapters')}")
    elif saved.get("adapter_weights") != current.get("adapter_weights"):
        out.append("the adapters' weights changed")
    if saved.get("examples") != current.get("examples"):
        out.append("the task examples changed")
    if saved.get("tokens") != current.get("tokens"):
        out.append("the token ids of the examples changed (another tokenizer or chat template)")
    if saved.get("base_model") != current.get("base_model"):
        out.append("the base model's weights or dtype changed")
    if saved.get("score_fn") != current.get("score_fn"):
        out.append(f"the score function was {saved.get('score_fn')!r}, now {current.get('score_fn')!r}")
    return out


class SearchCheckpointer:
    """Saves a run's search state, generator and loss cache (main process only) and restores them on every process.

    Args:
        directory (`str` or `os.PathLike`): The run's `checkpoint_dir`.
        fingerprint (`str`): `run_fingerprint` of the run; a checkpoint of another run is refused.
        group (`SingleProcess` or `AccelerateProcesses`): The run's processes.
        scorer (`LossScorer`): Whose cache is saved and restored.
        rng (`np.random.Generator`): The run's generator, saved and restored in place.
        every (`int`): Save every this many steps.
    """

    def __init__(self, directory, fingerprint, group, scorer, rng: np.random.Generator, every: int):
        self.directory = os.fspath(directory)
        self.fingerprint = fingerprint
        self.group = group
        self.scorer = scorer
        self.rng = rng
        self.every = every
        self.initial_clusters: list[list[str]] = []

    def resume(self, start: list[list[str]], state: SearchState) -> tuple[list[list[str]], SearchState]:
        """Load this run's checkpoint if there is one (read on the main process, sent to the others)."""
        outcome: tuple[str, Any] = ("none", None)
        if self.group.is_main_process:
            try:
                payload = load_checkpoint(self.directory, self.fingerprint)
                outcome = ("none", None) if payload is None else ("ok", payload)
            except Exception as error:  # sent to every process so that all of them stop
                outcome = ("error", error)
        kind, value = self.group.broadcast(outcome)
        if kind == "error":
            raise value
        self.initial_clusters = [list(c) for c in start]
        if kind == "none":
            return start, state
        self.initial_clusters = [list(c) for c in value["initial_clusters"]]
        self.rng.bit_generator.state = value["rng"]
        self.scorer.load_cache(value["cache"])
        restored = SearchState.from_dict(value["state"])
        logger.info("Resuming the D2C search from %s at step %d.", self.directory, restored.iteration)
        return self.initial_clusters, restored

    def save(self, state: SearchState) -> None:
        """Write the state, generator and cache atomically (main process only)."""
        if not self.group.is_main_process:
            return
        save_checkpoint(
            self.directory,
            {
                "fingerprint": self.fingerprint,
                "initial_clusters": self.initial_clusters,
                "state": state.to_dict(),
                "rng": self.rng.bit_generator.state,
                "cache": self.scorer.cache_to_list(),
            },
        )
