"""`merge_adapters_d2c`: the one call that clusters a PeftModel's LoRA adapters and merges each cluster."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from tqdm.auto import tqdm

from .config import D2CMergeConfig
from .data import normalize_task_examples
from .merging import AdapterMerger, check_peft_model, check_source_adapters, delta_gram_matrix
from .result import D2CResult
from .scoring import LossScorer, UserScoreFn
from .search import SearchState, balanced_random_partition, d2c_search, kmeans_partition

logger = logging.getLogger(__name__)


def merge_adapters_d2c(
    peft_model: PeftModel,
    task_examples: Any,
    config: D2CMergeConfig,
    *,
    tokenizer=None,
    adapter_names: Sequence[str] | None = None,
    score_fn: UserScoreFn | None = None,
    adapter_sources: dict[str, dict[str, Any]] | None = None,
) -> D2CResult:
    """Cluster the LoRA adapters of `peft_model` into K groups and merge each group into one adapter.

    With `config.method="d2c"` this is Algorithm 1 of "Data-driven Clustering of LoRA adapters" (arXiv 2601.17441):
    starting from a partition, it repeatedly proposes to move one adapter t to another cluster and keeps the move
    only if the loss of task t on its few-shot examples drops. The baselines (`"random"`, `"kmeans"`,
    `"kmeans_svd"`) return their partition directly. Each final cluster is merged with PEFT's
    `add_weighted_adapter` into an adapter named `{merged_adapter_prefix}_{i}`, added to `peft_model`.

    The user's adapters are never modified; temporary merged adapters are removed (also on error or Ctrl-C), and the
    active adapter, train/eval mode and every parameter's `requires_grad` are restored.

    Args:
        peft_model (`PeftModel`):
            A model with the N single-task LoRA adapters loaded, named after their tasks.
        task_examples (`Mapping[str, Sequence[dict]]` or `datasets.Dataset`):
            Few-shot examples per task (= adapter name): `{"prompt": str, "completion": str}` dicts, or a dataset
            with `task`, `prompt` and `completion` columns. Only the first `config.examples_per_task` are used.
        config (`D2CMergeConfig`):
            K (or the storage budget), the method, the merge settings and the seed.
        tokenizer (*optional*):
            The base model's tokenizer; required unless `score_fn` is given.
        adapter_names (`Sequence[str]`, *optional*):
            Adapters to cluster. Defaults to every LoRA adapter of the model that has examples.
        score_fn (`Callable`, *optional*):
            `score_fn(model, adapter_name, task, examples) -> float` (lower is better) replacing the built-in
            completion loss, e.g. a negated generation metric.
        adapter_sources (`dict[str, dict]`, *optional*):
            Where each adapter came from, recorded in the result (defaults to `peft_model.d2c_adapter_sources`,
            which `peft_d2c.load_adapters` sets).

    Returns:
        `D2CResult`: clusters, routing, merged adapter names, losses and the search history.

    Raises:
        TypeError: If `peft_model` is not a `PeftModel`, `config` is not a `D2CMergeConfig`, or the examples are
            malformed.
        ValueError: If K is out of range, an adapter lacks examples (or examples name an unknown adapter), adapters
            cannot be merged together, a merged adapter name is taken, or a loss is NaN/inf.
        UnsupportedAdapterError: If an adapter is not a plain LoRA (DoRA, rslora, lora_bias, other variants).

    Example:
        ```python
        >>> from peft_d2c import D2CMergeConfig, merge_adapters_d2c
        >>> result = merge_adapters_d2c(peft_model, task_examples, D2CMergeConfig(num_clusters=2), tokenizer=tok)
        >>> result.routing  # doctest: +SKIP
        {'capital': 'd2c_0', 'currency': 'd2c_0', 'plural': 'd2c_1', ...}
        ```
    """
    started = time.perf_counter()
    check_peft_model(peft_model)
    if not isinstance(config, D2CMergeConfig):
        raise TypeError(f"`config` must be a D2CMergeConfig, got {type(config).__name__}.")
    if score_fn is None and tokenizer is None:
        raise ValueError("Pass the base model's `tokenizer=` (or a custom `score_fn=`) to score the adapters.")
    examples = normalize_task_examples(task_examples)
    names = _resolve_adapter_names(peft_model, examples, adapter_names)
    examples = {name: examples[name][: config.examples_per_task] for name in names}
    num_clusters = config.resolve_num_clusters(len(names))
    check_source_adapters(peft_model, names, config.combination_type)
    merged_names = [f"{config.merged_adapter_prefix}_{i}" for i in range(num_clusters)]
    merger = AdapterMerger(peft_model, config)
    merger.check_names(merged_names)

    snapshot = _ModelState.capture(peft_model)
    created: list[str] = []
    try:
        peft_model.eval()
        scorer = LossScorer(
            peft_model,
            tokenizer,
            examples,
            merger,
            batch_size=config.batch_size,
            use_chat_template=config.use_chat_template,
            max_length=config.max_length,
            user_score_fn=score_fn,
        )
        rng = np.random.default_rng(config.seed)
        start = _start_partition(peft_model, names, num_clusters, config, rng)
        state = SearchState(clusters=[list(c) for c in start])
        if config.method == "d2c":
            state = _run_search(state, scorer, rng, config)
        clusters = state.clusters
        task_losses = dict(zip(names, scorer([(clusters[_index_of(clusters, n)], n) for n in names])))
        merger.cleanup()
        for name, members in zip(merged_names, clusters):
            created.append(merger.merge(members, name))
    except BaseException:
        for name in created:
            peft_model.delete_adapter(name)
        raise
    finally:
        merger.cleanup()
        snapshot.restore(peft_model)

    assignment = {n: i for i, members in enumerate(clusters) for n in members}
    sources = adapter_sources if adapter_sources is not None else getattr(peft_model, "d2c_adapter_sources", {})
    return D2CResult(
        clusters=[list(c) for c in clusters],
        assignment={n: assignment[n] for n in names},
        merged_adapter_names=merged_names,
        routing={n: merged_names[assignment[n]] for n in names},
        task_losses=task_losses,
        history=state.history,
        config=config,
        initial_clusters=[list(c) for c in start],
        base_model=_base_model_name(peft_model, names[0]),
        sources={n: dict(sources.get(n, {})) for n in names},
        stats={
            "num_merges": merger.num_merges,
            "forward_passes": scorer.forward_passes,
            "cache_hits": scorer.cache_hits,
            "cache_misses": scorer.cache_misses,
            "seconds": time.perf_counter() - started,
        },
        model=peft_model,
    )


def _resolve_adapter_names(peft_model: PeftModel, examples: dict, adapter_names: Sequence[str] | None) -> list[str]:
    loaded = list(peft_model.peft_config)
    unknown = sorted(set(examples) - set(loaded))
    if unknown:
        raise ValueError(f"Examples were given for tasks with no loaded adapter: {unknown}; loaded: {loaded}.")
    if adapter_names is None:
        names = [n for n in loaded if n in examples]
        skipped = [n for n in loaded if n not in examples]
        if skipped:
            logger.info("Leaving out adapters without examples: %s", skipped)
    else:
        if isinstance(adapter_names, str):
            raise TypeError("`adapter_names` must be a list of adapter names, not a single string.")
        names = list(adapter_names)
        if len(set(names)) != len(names):
            raise ValueError(f"`adapter_names` lists an adapter twice: {names}.")
        not_loaded = [n for n in names if n not in loaded]
        if not_loaded:
            raise ValueError(f"Unknown adapters in `adapter_names`: {not_loaded}; loaded: {loaded}.")
        without = [n for n in names if n not in examples]
        if without:
            raise ValueError(f"Adapters without examples: {without}; every clustered adapter needs its task's examples.")
    if not names:
        raise ValueError(f"No adapter to cluster: none of the loaded adapters {loaded} has examples.")
    return names


def _start_partition(
    peft_model: PeftModel, names: list[str], k: int, config: D2CMergeConfig, rng: np.random.Generator
) -> list[list[str]]:
    strategy = config.init if config.method == "d2c" else config.method
    if strategy == "random":
        return balanced_random_partition(names, k, rng)
    gram = delta_gram_matrix(peft_model, names)
    components = config.svd_embedding_dim if strategy == "kmeans_svd" else None
    return kmeans_partition(names, gram, k, seed=config.seed, svd_components=components)


def _run_search(state: SearchState, scorer: LossScorer, rng: np.random.Generator, config: D2CMergeConfig):
    disable = not config.show_progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    with tqdm(total=config.num_iterations, desc="D2C search", unit="step", disable=disable) as bar:

        def on_step(current: SearchState) -> None:
            bar.update(1)
            last = current.history[-1]
            logger.debug("step %d: %s", current.iteration, last)

        return d2c_search(
            state.clusters,
            scorer,
            rng,
            num_iterations=config.num_iterations,
            patience=config.patience,
            state=state,
            on_step=on_step,
        )


def _index_of(clusters: list[list[str]], name: str) -> int:
    return next(i for i, members in enumerate(clusters) if name in members)


def _base_model_name(peft_model: PeftModel, adapter_name: str) -> str | None:
    name = peft_model.peft_config[adapter_name].base_model_name_or_path
    if not name:
        name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    return name or None


class _ModelState:
    """What a run must give back untouched: active adapter, train/eval mode of every module, `requires_grad`."""

    def __init__(self, active: Any, training: dict[str, bool], requires_grad: dict[str, bool]) -> None:
        self.active = active
        self.training = training
        self.requires_grad = requires_grad

    @classmethod
    def capture(cls, model: torch.nn.Module) -> _ModelState:
        return cls(
            active=model.active_adapter,
            training={name: module.training for name, module in model.named_modules()},
            requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        )

    def restore(self, model: torch.nn.Module) -> None:
        if model.active_adapter != self.active:
            model.set_adapter(self.active)
        for name, module in model.named_modules():
            if name in self.training:
                module.training = self.training[name]
        for name, param in model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])
