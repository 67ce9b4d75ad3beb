"""Requests without a task label: which merged adapter should answer a prompt, learnt from the few-shot prompts.

A prompt's embedding is the base model's last hidden state (adapters off, after the final norm: what a llama.cpp
server returns from its embedding endpoints with mean pooling), averaged over the prompt's tokens. Its features: the
embedding scaled to unit length (servers return it so), minus the mean of the few-shot prompts' unit embeddings,
scaled to unit length again. Each task's centroid is the normalised mean of its few-shot prompts'
features; a prompt goes to the task whose centroid is the most similar (cosine), and so to the merged adapter that
serves that task. Alternatives (a logistic-regression probe on the same features, another layer) were measured
against it in `benchmarks/routing.py` (docs/routing.md).

Two numbers are fitted on the few-shot prompts alone, leaving each prompt out of its own centroid: the softmax
temperature that makes the confidences calibrated (the highest leave-one-out likelihood), and the similarity below
which a prompt belongs to no known task (the lowest leave-one-out similarity of a few-shot prompt to its own task).

The router is two small files next to a saved result (no pickle): `d2c_router.safetensors` (centroids and mean) and
`d2c_router.json` (tasks, temperature, threshold, how the features are made).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...io import atomic_write_json, read_json
from ..scoring.loss import input_device
from ..scoring.tokenization import pad_token_id_for, padded_batch
from .generation import BASE_ADAPTER, generate_answers

ROUTER_WEIGHTS_NAME = "d2c_router.safetensors"
ROUTER_CONFIG_NAME = "d2c_router.json"
ROUTER_FORMAT = 1
FALLBACKS = ("nearest", "base")
# Prompts longer than this are cut to their last tokens for the features (the end of a prompt says what is asked).
MAX_FEATURE_TOKENS = 512
_TEMPERATURES = [10 ** (k / 10) for k in range(-30, 1)]  # 0.001 .. 1


@dataclass(frozen=True)
class Route:
    """Where a prompt goes.

    Attributes:
        task (`str`): The most similar known task.
        adapter (`str`): The merged adapter to answer with: the task's, or `"__base__"` (the base model) when the
            prompt is of no known task and the fallback is `"base"`.
        confidence (`float`): The router's probability of `task` (softmax over the tasks, calibrated on the
            few-shot prompts).
        similarity (`float`): Cosine similarity of the prompt to the task's centroid.
        known (`bool`): Whether `similarity` reaches the router's threshold (else the prompt is of no known task).
    """

    task: str
    adapter: str
    confidence: float
    similarity: float
    known: bool


@dataclass
class PromptRouter:
    """A nearest-centroid router over tasks (see the module). Build it with `fit_prompt_router`.

    Attributes:
        tasks (`list[str]`): The known tasks, in the order of `centroids`' rows.
        centroids (`torch.Tensor`): `[num_tasks, hidden]` float32, unit rows.
        mean (`torch.Tensor`): `[hidden]` float32, the mean unit embedding of the fit, subtracted from every unit
            embedding before normalising again.
        temperature (`float`): Softmax temperature of the confidences.
        threshold (`float`): The lowest similarity of a prompt of a known task.
        stats (`dict`): What the fit measured on the few-shot prompts (leave-one-out accuracy, prompts per task).
    """

    tasks: list[str]
    centroids: torch.Tensor
    mean: torch.Tensor
    temperature: float
    threshold: float
    stats: dict[str, Any]

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """`[n, num_tasks]` cosine similarities of embeddings `[n, hidden]` (`prompt_features`, with or without unit
        length) to every task's centroid."""
        return _centred(features, self.mean) @ self.centroids.T

    def route_features(
        self, features: torch.Tensor, routing: Mapping[str, str], *, fallback: str = "nearest"
    ) -> list[Route]:
        """The `Route` of every row of `features`, with `routing` (task -> merged adapter).

        Args:
            features (`torch.Tensor`): `[n, hidden]` from `prompt_features`.
            routing (`Mapping[str, str]`): Task -> adapter, e.g. `D2CResult.routing`.
            fallback (`str`, defaults to `"nearest"`): For a prompt of no known task, `"nearest"` answers with the
                nearest task's adapter anyway (`known=False` says so), `"base"` with the base model.
        """
        if fallback not in FALLBACKS:
            raise ValueError(f"`fallback` must be one of {list(FALLBACKS)}, got {fallback!r}.")
        missing = sorted(set(self.tasks) - set(routing))
        if missing:
            raise KeyError(f"The routing has no adapter for the router's tasks {missing}.")
        sims = self.similarities(features)
        probs = torch.softmax(sims / self.temperature, dim=-1)
        routes = []
        for row in range(sims.shape[0]):
            best = int(sims[row].argmax())
            task, similarity = self.tasks[best], float(sims[row, best])
            known = similarity >= self.threshold
            adapter = routing[task] if known or fallback == "nearest" else BASE_ADAPTER
            routes.append(Route(task, adapter, float(probs[row, best]), similarity, known))
        return routes

    def with_task(self, task: str, features: torch.Tensor) -> PromptRouter:
        """A copy that also routes to `task`, its centroid made from its prompts' `features` (`prompt_features`);
        the mean, temperature and threshold of the fit are kept (what `D2CResult.add_adapter` uses).

        Raises:
            ValueError: If the router already knows `task` or `features` is empty.
        """
        if task in self.tasks or features.shape[0] == 0:
            raise ValueError(f"Cannot add task {task!r}: it is known already, or it has no prompt.")
        centroid = _normalise(_centred(features, self.mean).sum(0))
        stats = {**self.stats, "added_tasks": [*self.stats.get("added_tasks", []), task]}
        centroids = torch.cat([self.centroids, centroid[None]])
        return PromptRouter([*self.tasks, task], centroids, self.mean, self.temperature, self.threshold, stats)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write `d2c_router.safetensors` and `d2c_router.json` into `directory`; returns their names."""
        directory = os.fspath(directory)
        save_file(
            {"centroids": self.centroids.contiguous(), "mean": self.mean.contiguous()},
            os.path.join(directory, ROUTER_WEIGHTS_NAME),
            metadata={"format": str(ROUTER_FORMAT)},
        )
        config = {
            "format": ROUTER_FORMAT,
            "tasks": self.tasks,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "features": (
                "the base model's last hidden state (adapters off, after the final norm), mean over the prompt's "
                f"tokens (its last {MAX_FEATURE_TOKENS} at most, special tokens as the tokenizer adds them), divided "
                "by its L2 norm, minus `mean`, divided by its L2 norm again"
            ),
            "rule": "task = argmax over rows of centroids @ feature; no known task when that similarity < threshold",
            "stats": self.stats,
        }
        atomic_write_json(os.path.join(directory, ROUTER_CONFIG_NAME), config)
        return [ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PromptRouter:
        """Read a router written by `save_pretrained`.

        Raises:
            FileNotFoundError: If `directory` holds no router.
            ValueError: If the files were written by a newer format or do not match each other.
        """
        directory = os.fspath(directory)
        config_path = os.path.join(directory, ROUTER_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"No {ROUTER_CONFIG_NAME} in {directory!r}.")
        config = read_json(config_path)
        if config.get("format", 0) > ROUTER_FORMAT:
            raise ValueError(f"{config_path} has router format {config['format']}; upgrade peft-d2c.")
        tensors = load_file(os.path.join(directory, ROUTER_WEIGHTS_NAME))
        centroids, mean = tensors["centroids"].float(), tensors["mean"].float()
        if centroids.shape != (len(config["tasks"]), mean.shape[0]):
            raise ValueError(
                f"{directory!r}: centroids of shape {tuple(centroids.shape)} for {len(config['tasks'])} tasks and "
                f"features of size {mean.shape[0]}; the router files do not belong together."
            )
        return cls(
            list(config["tasks"]),
            centroids,
            mean,
            float(config["temperature"]),
            float(config["threshold"]),
            dict(config.get("stats", {})),
        )


@torch.no_grad()
def prompt_features(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], *, batch_size: int = 16, layer: int = -1
) -> torch.Tensor:
    """`[len(prompts), hidden]` float32 embeddings: the base model's hidden state `layer` (the last, after the
    final norm, by default) averaged over each prompt's tokens, adapters off (a `PeftModel`'s adapters are disabled
    for the call and its mode restored); one forward pass per `batch_size` prompts.
    """
    encoded = [list(tokenizer(p)["input_ids"])[-MAX_FEATURE_TOKENS:] for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("A prompt tokenises to nothing; the router needs at least one token per prompt.")
    pad_id, device = pad_token_id_for(tokenizer), input_device(model)
    out = torch.zeros(len(prompts), model.config.hidden_size, dtype=torch.float32)
    was_training = model.training
    model.eval()
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with disabled:
            order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, mask = padded_batch([encoded[i] for i in batch], pad_id)  # right: positions kept
                hidden = model(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
                ).hidden_states[layer]
                weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
                pooled = (hidden.float() * weights).sum(1) / weights.sum(1)
                out[batch] = pooled.cpu()
    finally:
        model.train(was_training)
    return out


def fit_prompt_router(
    model: torch.nn.Module, tokenizer, task_prompts: Mapping[str, Sequence[str]], *, batch_size: int = 16
) -> PromptRouter:
    """Fit the router on every task's few-shot prompts (see the module).

    Args:
        model (`PeftModel` or `PreTrainedModel`): The model holding the base (its adapters are switched off).
        tokenizer: The base model's tokenizer.
        task_prompts (`Mapping[str, Sequence[str]]`): Task -> its few-shot prompts (two or more tasks, one prompt
            or more each; two or more give the leave-one-out fit).
        batch_size (`int`, defaults to 16): Prompts per forward pass.

    Returns:
        `PromptRouter`.

    Raises:
        ValueError: If there are fewer than two tasks or a task has no prompt.
    """
    tasks = sorted(task_prompts)
    if len(tasks) < 2:
        raise ValueError(f"A router needs two tasks or more, got {tasks}.")
    empty = [t for t in tasks if not task_prompts[t]]
    if empty:
        raise ValueError(f"Tasks {empty} have no prompt to fit the router on.")
    prompts = [p for t in tasks for p in task_prompts[t]]
    labels = torch.tensor([i for i, t in enumerate(tasks) for _ in task_prompts[t]])
    embeddings = _normalise(prompt_features(model, tokenizer, prompts, batch_size=batch_size))
    mean = embeddings.mean(0)
    unit = _centred(embeddings, mean)
    sums = torch.zeros(len(tasks), unit.shape[1]).index_add_(0, labels, unit)
    centroids = _normalise(sums)
    loo = _leave_one_out_similarities(unit, labels, sums)
    own = loo[torch.arange(len(labels)), labels]
    temperature = max(
        _TEMPERATURES, key=lambda tau: float(torch.log_softmax(loo / tau, -1)[range(len(labels)), labels].sum())
    )
    stats = {
        "prompts_per_task": {t: len(task_prompts[t]) for t in tasks},
        "leave_one_out_accuracy": float((loo.argmax(1) == labels).float().mean()),
        "forward_passes": math.ceil(len(prompts) / batch_size),  # `prompt_features`' batches
    }
    return PromptRouter(tasks, centroids, mean, float(temperature), float(own.min()), stats)


def _leave_one_out_similarities(unit: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Similarities of every prompt to every centroid, its own task's centroid made without it (a task with one
    prompt keeps it: nothing else to compare with)."""
    counts = torch.bincount(labels, minlength=sums.shape[0])
    sims = unit @ _normalise(sums).T
    own_sums = sums[labels] - unit * (counts[labels] > 1).unsqueeze(1)
    sims[torch.arange(len(labels)), labels] = (unit * _normalise(own_sums)).sum(1)
    return sims


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _centred(embeddings: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The features of embeddings: unit length, minus the mean unit embedding of the fit, unit length again."""
    return _normalise(_normalise(embeddings.float().cpu()) - mean)


def route_prompts(
    model: torch.nn.Module,
    tokenizer,
    router: PromptRouter,
    routing: Mapping[str, str],
    prompts: Sequence[str],
    *,
    fallback: str = "nearest",
) -> list[Route]:
    """`router.route_features` of the prompts' features (one forward pass of the base per batch of prompts)."""
    return router.route_features(prompt_features(model, tokenizer, prompts), routing, fallback=fallback)


def generate_routed(
    model: torch.nn.Module,
    tokenizer,
    router: PromptRouter,
    routing: Mapping[str, str],
    prompt: str,
    *,
    fallback: str = "nearest",
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> tuple[str, Route]:
    """Route `prompt` and answer it greedily with the chosen adapter, in one call.

    The adapter is picked per call through PEFT's `adapter_names=` (the model's active adapter is not changed).

    Returns:
        `tuple[str, Route]`: the decoded new tokens (special tokens skipped) and the route taken.
    """
    (route,) = route_prompts(model, tokenizer, router, routing, [prompt], fallback=fallback)
    (answer,) = generate_answers(
        model, tokenizer, [prompt], adapter_names=[route.adapter], max_new_tokens=max_new_tokens, **generate_kwargs
    )
    return answer, route
