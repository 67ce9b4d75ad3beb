"""Resumable D2C searches: the search state, written atomically every few steps and checked before it is reused.

A checkpoint (`d2c_checkpoint.json` in the run's `checkpoint_dir`) holds the partition, the step reached, the
numpy generator's state, the history, the start partition and every loss computed so far. Restoring all of it makes
the rest of a resumed run draw, score and decide exactly as the uninterrupted run would have; the run's counters and
any-time trace, restored too, make it report what that run reports. A resumed run takes its start from the
checkpoint instead of computing it again. It also holds a
fingerprint of what the losses depend on (the settings, the adapter names and weights, the examples), so a
checkpoint written for another run is refused instead of silently mixing two searches.
"""

from __future__ import annotations

import dataclasses
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
# 2: the cache holds a score dict per request (older files' other scores, such as the miss, are dropped on loading).
# Still 2 with the counters, the trace and the start's kind: optional entries, so older files of format 2 resume (see
# `SearchCheckpointer`).
CHECKPOINT_FORMAT = 2
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
    settings["merge"] = {k: v for k, v in settings["merge"].items() if k not in _RESUMABLE_SETTINGS}
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
    """Write `payload` (fingerprint, state, rng, cache, initial_clusters, start_kind, counters, trace) atomically;
    return the file's path."""
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


# What a run reports in `D2CResult.stats`, saved with the search state so that a resumed run reports what the
# uninterrupted run does. Counted alike by every process (the same requests, the same scoring plan) ...
SHARED_COUNTERS = ("scoring_passes", "cache_hits", "cache_misses")
# ... or by each process for itself: saved per process, restored where the run resumes on as many processes.
# `num_merges` is the one that can still end above the uninterrupted run's: the merges live in the model at the
# checkpoint are not in it (a file cannot hold them), so those the search asks for again are merged, and counted,
# again (at most `merge.cache_size`; never with the `"partition"` rule, which scores every task of a merge at once).
PROCESS_COUNTERS = ("forward_passes", "num_merges")
# Not saved, as they cannot equal the uninterrupted run's: wall times (`merge_seconds`, `forward_seconds`), and
# `num_refills`, since a resumed run's merger starts with no merged adapter in the model to refill.


@dataclasses.dataclass
class Resumed:
    """What a run takes from its checkpoint: its start, how it was made (None in a checkpoint older than that
    entry), and the search state reached."""

    start: list[list[str]]
    start_kind: str | None
    state: SearchState


class SearchCheckpointer:
    """Saves a run's search state, generator, loss cache and counters (main process only) and restores them on every
    process.

    Besides the search state, a checkpoint holds what the run reports (`SHARED_COUNTERS`, `PROCESS_COUNTERS` and the
    any-time `trace`) and how the start was made, so a resumed run reports the uninterrupted run's `stats` (but
    the wall times and merges: see `PROCESS_COUNTERS`). A checkpoint written before it held them still resumes to the
    same search; its counters and trace then hold this call's work only, and the start's kind is the caller's to
    fill in.

    Args:
        directory (`str` or `os.PathLike`): The run's `checkpoint_dir`.
        fingerprint (`str`): `run_fingerprint` of the run; a checkpoint of another run is refused.
        group (`SingleProcess` or `AccelerateProcesses`): The run's processes.
        scorer (`LossScorer`): Whose cache and counters (and those of its `merger`) are saved and restored.
        rng (`np.random.Generator`): The run's generator, saved and restored in place.
        every (`int`): Save every this many steps.
        trace (`list`, *optional*): The run's any-time trace ([history records, forward passes so far] per step),
            saved and restored in place.
    """

    def __init__(
        self, directory, fingerprint, group, scorer, rng: np.random.Generator, every: int, trace: list | None = None
    ):
        self.directory = os.fspath(directory)
        self.fingerprint = fingerprint
        self.group = group
        self.scorer = scorer
        self.rng = rng
        self.every = every
        self.trace = trace if trace is not None else []
        self.initial_clusters: list[list[str]] = []
        self.start_kind: str | None = None

    def resume(self) -> Resumed | None:
        """This run's checkpoint if the folder holds one (read on the main process, sent to the others), with the
        generator, the cache, the counters and the trace restored in place; None: start afresh (then `begin`)."""
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
        if kind == "none":
            return None
        self.begin(value["initial_clusters"], value.get("start_kind"))
        self.rng.bit_generator.state = value["rng"]
        self.scorer.load_cache(value["cache"])
        self._restore_counters(value.get("counters"))
        self.trace[:] = [list(point) for point in value.get("trace", [])]
        restored = SearchState.from_dict(value["state"])
        logger.info("Resuming the D2C search from %s at step %d.", self.directory, restored.iteration)
        return Resumed([list(c) for c in self.initial_clusters], self.start_kind, restored)

    def begin(self, start: list[list[str]], start_kind: str | None) -> None:
        """Record the start partition and how it was made, for the saves."""
        self.initial_clusters = [list(c) for c in start]
        self.start_kind = start_kind

    def save(self, state: SearchState) -> None:
        """Write the state, generator, cache, counters and trace atomically (main process only; every process calls
        it, as each sends its own counters)."""
        per_process = self.group.gather({name: getattr(self._owner(name), name) for name in PROCESS_COUNTERS})
        if not self.group.is_main_process:
            return
        counters = {name: getattr(self.scorer, name) for name in SHARED_COUNTERS}
        save_checkpoint(
            self.directory,
            {
                "fingerprint": self.fingerprint,
                "initial_clusters": self.initial_clusters,
                "start_kind": self.start_kind,
                "state": state.to_dict(),
                "rng": self.rng.bit_generator.state,
                "cache": self.scorer.cache_to_list(),
                "counters": {**counters, "per_process": per_process},
                "trace": self.trace,
            },
        )

    def _owner(self, counter: str):
        return self.scorer.merger if counter == "num_merges" else self.scorer

    def _restore_counters(self, counters: dict[str, Any] | None) -> None:
        """Set the counters to the checkpoint's (replacing this call's own count of the same work before the
        search); the per-process ones only where the run resumes on as many processes as it was saved from."""
        if not counters:
            return
        for name in SHARED_COUNTERS:
            setattr(self.scorer, name, int(counters[name]))
        per_process = counters.get("per_process", [])
        if len(per_process) == self.group.num_processes:
            for name, value in per_process[self.group.process_index].items():
                setattr(self._owner(name), name, int(value))
