"""Requests without a task label: which merged adapter should answer a prompt, learnt from the few-shot prompts.

A prompt's embedding is the base model's last hidden state (adapters off, after the final norm: what a llama.cpp
server returns from its embedding endpoints with mean pooling), averaged over the prompt's tokens. Its features: the
embedding scaled to unit length (servers return it so), minus the mean of the few-shot prompts' unit embeddings,
scaled to unit length again. Each task's centroid is the normalised mean of its few-shot prompts'
features; a prompt goes to the task whose centroid is the most similar (cosine), and so to the merged adapter that
serves that task. Alternatives (a logistic-regression probe on the same features, another layer) were measured
against it in `benchmarks/routing.py` (docs/routing.md).

What else is fitted comes from the few-shot prompts alone, each left out of its own centroid (leave-one-out):

- the softmax temperature that makes the confidences calibrated (the highest leave-one-out likelihood);
- per task, the similarity below which a prompt belongs to no known task. Each task's leave-one-out similarities
  are standardised by their own mean and spread (the pooled spread where a task has too few prompts to have one);
  one quantile of the standardised values, over all tasks, is chosen so that a share `false_reject` (5%) of the
  few-shot prompts would be refused (a split-conformal rule: a new prompt of a known task is refused about that
  often), and each task's threshold is its mean minus that many of its spreads;
- whether the tasks can be told apart at all: a leave-one-out accuracy not above chance (one-sided binomial test at
  1%) is warned about at fit time and recorded (`stats["above_chance"]`), and the model card says so.

Prompts are seen as the scorer saw them: with `use_chat_template`, wrapped in the tokenizer's chat template as one
user turn (`prompt_token_ids`), for the features and for `generate_routed` alike.

The router is two small files next to a saved result (no pickle): `d2c_router.safetensors` (centroids and mean) and
`d2c_router.json` (tasks, temperature, thresholds, the chat template flag, how the features are made).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...errors import D2CWarning
from ...io import atomic_write_json, read_json
from ..scoring.loss import input_device
from ..scoring.tokenization import pad_token_id_for, padded_batch, prompt_token_ids
from .generation import BASE_ADAPTER, generate_answers

ROUTER_WEIGHTS_NAME = "d2c_router.safetensors"
ROUTER_CONFIG_NAME = "d2c_router.json"
# 2: a threshold per task and the chat template flag (format 1 files, one threshold for all, still load).
ROUTER_FORMAT = 2
FALLBACKS = ("nearest", "base")
# Prompts longer than this are cut to their last tokens for the features (the end of a prompt says what is asked).
MAX_FEATURE_TOKENS = 512
_TEMPERATURES = [10 ** (k / 10) for k in range(-30, 1)]  # 0.001 .. 1
FALSE_REJECT = 0.05  # share of a known task's prompts the thresholds may refuse
_CHANCE_P_VALUE = 0.01  # leave-one-out accuracy below this significance against chance is warned about


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
        known (`bool`): Whether `similarity` reaches the threshold of `task` (else the prompt is of no known task).
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
        thresholds (`list[float]`): Per task (order of `tasks`), the lowest similarity of a prompt of that task.
        stats (`dict`): What the fit measured on the few-shot prompts (leave-one-out accuracy, whether it is above
            chance, the false-reject target and the standardised quantile behind the thresholds, prompts per task).
        use_chat_template (`bool`): Whether prompts are wrapped in the tokenizer's chat template (as the scorer did).
    """

    tasks: list[str]
    centroids: torch.Tensor
    mean: torch.Tensor
    temperature: float
    thresholds: list[float]
    stats: dict[str, Any]
    use_chat_template: bool = False

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
            known = similarity >= self.thresholds[best]
            adapter = routing[task] if known or fallback == "nearest" else BASE_ADAPTER
            routes.append(Route(task, adapter, float(probs[row, best]), similarity, known))
        return routes

    def with_task(self, task: str, features: torch.Tensor) -> PromptRouter:
        """A copy that also routes to `task`, its centroid made from its prompts' `features` (`prompt_features`);
        the mean, temperature and the other tasks' thresholds are kept, and the new task's threshold comes from
        its prompts' leave-one-out similarities with the fit's quantile (what `D2CResult.add_adapter` uses).

        Raises:
            ValueError: If the router already knows `task` or `features` is empty.
        """
        if task in self.tasks or features.shape[0] == 0:
            raise ValueError(f"Cannot add task {task!r}: it is known already, or it has no prompt.")
        unit = _centred(features, self.mean)
        labels = torch.zeros(len(unit), dtype=torch.long)
        own = _leave_one_out_similarities(unit, labels, unit.sum(0, keepdim=True))[:, 0]
        calibration = self.stats.get("calibration")
        if calibration is None:  # a router of format 1: one threshold for every task
            threshold = min(self.thresholds)
        else:
            means, spreads, _ = _task_spreads(own, labels, 1, pooled=calibration["pooled_spread"])
            threshold = float(means[0] - calibration["quantile"] * spreads[0])
        centroid = _normalise(unit.sum(0))
        stats = {**self.stats, "added_tasks": [*self.stats.get("added_tasks", []), task]}
        centroids = torch.cat([self.centroids, centroid[None]])
        return dataclasses.replace(
            self, tasks=[*self.tasks, task], centroids=centroids, thresholds=[*self.thresholds, threshold], stats=stats
        )

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
            "thresholds": self.thresholds,  # in the order of `tasks`
            "use_chat_template": self.use_chat_template,
            "features": (
                "the base model's last hidden state (adapters off, after the final norm), mean over the prompt's "
                f"tokens (its last {MAX_FEATURE_TOKENS} at most, special tokens as the tokenizer adds them), divided "
                "by its L2 norm, minus `mean`, divided by its L2 norm again; with `use_chat_template`, the prompt is "
                "first wrapped in the tokenizer's chat template as one user turn with the generation prompt"
            ),
            "rule": (
                "task = argmax over rows of centroids @ feature; no known task when that similarity < the task's "
                "threshold"
            ),
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
        tasks = list(config["tasks"])
        if centroids.shape != (len(tasks), mean.shape[0]) or len(config.get("thresholds", tasks)) != len(tasks):
            raise ValueError(
                f"{directory!r}: centroids of shape {tuple(centroids.shape)} and "
                f"{len(config.get('thresholds', tasks))} thresholds for {len(tasks)} tasks and features of size "
                f"{mean.shape[0]}; the router files do not belong together."
            )
        if "thresholds" in config:
            thresholds = [float(x) for x in config["thresholds"]]
        else:  # format 1: the lowest leave-one-out similarity of all few-shot prompts, for every task
            thresholds = [float(config["threshold"])] * len(tasks)
        return cls(
            tasks,
            centroids,
            mean,
            float(config["temperature"]),
            thresholds,
            dict(config.get("stats", {})),
            bool(config.get("use_chat_template", False)),
        )


@torch.no_grad()
def prompt_features(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    layer: int = -1,
    use_chat_template: bool = False,
) -> torch.Tensor:
    """`[len(prompts), hidden]` float32 embeddings: the base model's hidden state `layer` (the last, after the
    final norm, by default) averaged over each prompt's tokens, adapters off (a `PeftModel`'s adapters are disabled
    for the call and its mode restored); one forward pass per `batch_size` prompts. With `use_chat_template`, each
    prompt is first wrapped in the tokenizer's chat template (`prompt_token_ids`).
    """
    encoded = [
        prompt_token_ids(tokenizer, p, use_chat_template=use_chat_template)[-MAX_FEATURE_TOKENS:] for p in prompts
    ]
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
    model: torch.nn.Module,
    tokenizer,
    task_prompts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 16,
    use_chat_template: bool = False,
    false_reject: float = FALSE_REJECT,
) -> PromptRouter:
    """Fit the router on every task's few-shot prompts (see the module).

    Args:
        model (`PeftModel` or `PreTrainedModel`): The model holding the base (its adapters are switched off).
        tokenizer: The base model's tokenizer.
        task_prompts (`Mapping[str, Sequence[str]]`): Task -> its few-shot prompts (two or more tasks, one prompt
            or more each; two or more give the leave-one-out fit).
        batch_size (`int`, defaults to 16): Prompts per forward pass.
        use_chat_template (`bool`, defaults to `False`): Wrap prompts in the chat template, here and when routing
            (pass the scorer's `scoring.use_chat_template`).
        false_reject (`float`, defaults to 0.05): Share of a known task's prompts the per-task thresholds may call
            unknown (calibrated on the leave-one-out similarities).

    Returns:
        `PromptRouter`.

    Raises:
        ValueError: If there are fewer than two tasks, a task has no prompt, or `false_reject` is not in (0, 1).

    Warns:
        D2CWarning: If the leave-one-out accuracy is not above chance: the prompts do not say their task, and a
            routed prompt is as likely to reach a wrong adapter as with a random pick.
    """
    tasks = sorted(task_prompts)
    if len(tasks) < 2:
        raise ValueError(f"A router needs two tasks or more, got {tasks}.")
    empty = [t for t in tasks if not task_prompts[t]]
    if empty:
        raise ValueError(f"Tasks {empty} have no prompt to fit the router on.")
    if not 0 < false_reject < 1:
        raise ValueError(f"`false_reject` must be in (0, 1), got {false_reject}.")
    prompts = [p for t in tasks for p in task_prompts[t]]
    labels = torch.tensor([i for i, t in enumerate(tasks) for _ in task_prompts[t]])
    features = prompt_features(model, tokenizer, prompts, batch_size=batch_size, use_chat_template=use_chat_template)
    embeddings = _normalise(features)
    mean = embeddings.mean(0)
    unit = _centred(embeddings, mean)
    sums = torch.zeros(len(tasks), unit.shape[1]).index_add_(0, labels, unit)
    centroids = _normalise(sums)
    loo = _leave_one_out_similarities(unit, labels, sums)
    own = loo[torch.arange(len(labels)), labels]
    temperature = max(
        _TEMPERATURES, key=lambda tau: float(torch.log_softmax(loo / tau, -1)[range(len(labels)), labels].sum())
    )
    means, spreads, pooled = _task_spreads(own, labels, len(tasks))
    quantile = _conformal_quantile(own, labels, means, spreads, false_reject)
    # The prompt at the quantile sits on its threshold: 1e-6 below it keeps it accepted whatever the rounding.
    thresholds = means - quantile * spreads - 1e-6
    best = loo.argmax(1)
    correct = int((best == labels).sum())
    above_chance = _binomial_tail(correct, len(labels), 1 / len(tasks)) < _CHANCE_P_VALUE
    stats = {
        "prompts_per_task": {t: len(task_prompts[t]) for t in tasks},
        "leave_one_out_accuracy": correct / len(labels),
        "chance_accuracy": 1 / len(tasks),
        "above_chance": above_chance,
        # few-shot prompts that would be called unknown, each against its own task's centroid made without it
        "leave_one_out_false_reject": float((loo.max(1).values.double() < thresholds[best]).double().mean()),
        "calibration": {"false_reject": false_reject, "quantile": quantile, "pooled_spread": pooled},
        "forward_passes": math.ceil(len(prompts) / batch_size),  # `prompt_features`' batches
    }
    if not above_chance:
        warnings.warn(
            f"The prompt router tells the tasks apart no better than chance on their few-shot prompts (leave-one-out "
            f"accuracy {correct / len(labels):.0%} of {len(labels)} prompts, chance {1 / len(tasks):.0%}: not "
            f"significantly above it, p >= {_CHANCE_P_VALUE}): their prompts do not say which task they are, or too "
            "few say it, so `route()` may pick adapters about at random. Label requests with their task "
            "(`load_d2c_collection(...).task(...)`) instead.",
            D2CWarning,
            stacklevel=2,
        )
    return PromptRouter(
        tasks, centroids, mean, float(temperature), [float(x) for x in thresholds], stats, use_chat_template
    )


# A task with fewer leave-one-out similarities than this takes the pooled spread of all tasks.
_MIN_PROMPTS_FOR_SPREAD = 3


def _task_spreads(
    own: torch.Tensor, labels: torch.Tensor, num_tasks: int, *, pooled: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per task, the mean and spread (standard deviation) of its prompts' similarities `own` to their own task, and
    the pooled spread of all tasks (given, or computed from the tasks with two prompts or more).

    A task's spread is at least half the pooled one (ten prompts that happen to agree must not make a threshold
    that refuses every new prompt), and the pooled one where it has fewer than `_MIN_PROMPTS_FOR_SPREAD`.
    """
    own = own.double()
    means = torch.zeros(num_tasks, dtype=torch.float64)
    variances = torch.zeros(num_tasks, dtype=torch.float64)
    counts = torch.bincount(labels, minlength=num_tasks)
    for task in range(num_tasks):
        values = own[labels == task]
        means[task] = values.mean()
        if len(values) > 1:
            variances[task] = values.var(correction=1)
    if pooled is None:
        dof = (counts - 1).clamp_min(0)
        pooled = math.sqrt(float((dof * variances).sum() / dof.sum())) if dof.sum() > 0 else 0.0
    spreads = torch.where(counts >= _MIN_PROMPTS_FOR_SPREAD, variances.sqrt().clamp_min(pooled / 2), pooled)
    return means, spreads.clamp_min(1e-6), pooled


def _conformal_quantile(
    own: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, spreads: torch.Tensor, false_reject: float
) -> float:
    """How many spreads below its task's mean a prompt of a known task may fall: the split-conformal quantile
    (the ceil((n + 1)(1 - false_reject))-th smallest) of the standardised shortfalls of the prompts of tasks with two
    or more prompts (a task's only prompt is compared with itself). With too few prompts for the target, the
    largest shortfall; 0 where no task has two prompts."""
    counts = torch.bincount(labels, minlength=len(means))
    keep = counts[labels] > 1
    shortfalls = ((means[labels] - own.double()) / spreads[labels])[keep].sort().values
    if len(shortfalls) == 0:
        return 0.0
    rank = math.ceil((len(shortfalls) + 1) * (1 - false_reject))
    return float(shortfalls[min(rank, len(shortfalls)) - 1])


def _binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), summed in log space (hundreds of trials do not overflow)."""
    if successes <= 0:
        return 1.0

    def log_pmf(k: int) -> float:
        log_comb = math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
        return log_comb + k * math.log(p) + (trials - k) * math.log1p(-p)

    return min(1.0, sum(math.exp(log_pmf(k)) for k in range(successes, trials + 1)))


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
    """`router.route_features` of the prompts' features (one forward pass of the base per batch of prompts; the
    chat template applied exactly when the router was fitted with it)."""
    features = prompt_features(model, tokenizer, prompts, use_chat_template=router.use_chat_template)
    return router.route_features(features, routing, fallback=fallback)


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

    The adapter is picked per call through PEFT's `adapter_names=` (the model's active adapter is not changed); the
    prompt is wrapped in the chat template exactly when the router was fitted with it.

    Returns:
        `tuple[str, Route]`: the decoded new tokens (special tokens skipped) and the route taken.
    """
    (route,) = route_prompts(model, tokenizer, router, routing, [prompt], fallback=fallback)
    (answer,) = generate_answers(
        model,
        tokenizer,
        [prompt],
        adapter_names=[route.adapter],
        max_new_tokens=max_new_tokens,
        use_chat_template=router.use_chat_template,
        **generate_kwargs,
    )
    return answer, route
