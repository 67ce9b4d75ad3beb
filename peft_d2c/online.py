"""Online addition: put a new task's adapter into the best existing cluster of a `D2CResult` without a new search.

For each cluster c, the new adapter is merged with c's members and its task loss is measured on the new task's
examples (one merge and one loss per cluster, scored in mixed batches). The cluster with the lowest loss receives
the adapter; only its merged adapter is rebuilt, every other merged adapter stays exactly as it was. A result made
with `rank_allocation="spectrum"` rebuilds it by the same rule (`engine.merge.rank_budget`), within the bytes the
others leave of the run's budget; the budget is checked against the bytes the merged adapters really store. Sits at the
result stage: imports `data`, `engine` and `hub.adapters`; `result.D2CResult.add_adapter` calls it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from .combination_types import DATA_TYPES
from .data.examples import normalize_task_examples
from .engine.merge.budget import (
    adapter_bytes,
    check_partition_fits,
    format_size,
    is_bytes_budget,
    parse_size,
    partition_bytes,
)
from .engine.merge.lora import check_source_adapters
from .engine.merge.merging import AdapterMerger
from .engine.merge.rank_budget import merge_with_allocated_ranks
from .engine.merge.task_cores import add_task_adapters
from .engine.runtime.state import ModelState
from .engine.scoring.layer_inputs import attach_layer_inputs
from .engine.scoring.loss import LossScorer
from .engine.serving.prompt_router import prompt_features
from .hub.adapters import load_adapters

logger = logging.getLogger(__name__)


def attach_model(result, directory: str | os.PathLike, *, base_model=None, token: str | bool | None = None):
    """Rebuild the model of a saved result: base model, the recorded source adapters, the saved merged adapters.

    Args:
        result (`D2CResult`): Read with `D2CResult.from_pretrained(directory)`.
        directory (`str` or `os.PathLike`): The folder of the saved result.
        base_model (`PreTrainedModel` or `str`, *optional*): The base model, or its path / Hub id (defaults to the
            recorded `result.base_model`).
        token (`str` or `bool`, *optional*): Hub token for private source adapters.

    Returns:
        `PeftModel`: also stored as `result.model`.

    Raises:
        ValueError: If the result records no base model or no source of some adapter.
        FileNotFoundError: If a source adapter or a merged adapter folder is missing.
    """
    directory = os.fspath(directory)
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        name = base_model if base_model is not None else result.base_model
        if not name:
            raise ValueError("The result records no `base_model`; pass the base model explicitly.")
        base_model = AutoModelForCausalLM.from_pretrained(os.fspath(name))
    missing = sorted(n for n in result.assignment if not result.sources.get(n))
    if missing:
        raise ValueError(f"The result records no source for adapters {missing}; cannot reload them.")
    sources = [{**result.sources[n], "name": n} for n in result.assignment]
    model = load_adapters(base_model, sources, token=token)
    for merged in result.merged_adapter_names:
        folder = os.path.join(directory, merged)
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise FileNotFoundError(f"Merged adapter folder {folder!r} is missing or incomplete.")
        model.load_adapter(folder, adapter_name=merged)
    add_task_adapters(model, result.task_cores, result.task_adapters, result.routing)
    result.model = model.eval()
    return result.model


def add_adapter(
    result,
    name: str,
    examples: Sequence[Mapping[str, str]],
    *,
    tokenizer=None,
    score_fn=None,
    source: Mapping[str, Any] | None = None,
    member_examples: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
) -> dict[str, Any]:
    """Assign the loaded adapter `name` to the cluster where its task loss is lowest and re-merge that cluster.

    See `D2CResult.add_adapter` for the arguments. Returns `{"cluster": i, "merged_adapter": ..., "losses": [...]}`.
    """
    model = result.model
    if model is None:
        raise ValueError(
            "This D2CResult holds no model; load one with `peft_d2c.online.attach_model(result, directory)` "
            "(what `peft-d2c add-adapter` does) or use the result returned by `merge_adapters_d2c`."
        )
    if name in result.assignment:
        raise ValueError(f"Adapter {name!r} is already clustered (in cluster {result.assignment[name]}).")
    if result.task_adapters:
        raise ValueError(
            "This result has task cores (`merge.task_cores`): a new member would change its cluster's shared basis and "
            "every member's core; run `merge_adapters_d2c` again with the new adapter."
        )
    if name not in model.peft_config:
        raise ValueError(
            f"Adapter {name!r} is not loaded in the model; load it first (e.g. `peft_d2c.hub.load_adapters("
            f"result.model, path, names=[{name!r}])`). Loaded: {sorted(model.peft_config)}."
        )
    if score_fn is None and tokenizer is None:
        raise ValueError("Pass the base model's `tokenizer=` (or a custom `score_fn=`) to score the new adapter.")
    if result.prompt_router is not None and tokenizer is None:
        raise ValueError("This result has a prompt router: pass `tokenizer=` so that it learns to route the new task.")
    config = result.config
    check_source_adapters(model, [*result.assignment, name], config.combination_type)
    given = {} if config.combination_type not in DATA_TYPES else dict(member_examples or {})
    missing = sorted(set(result.assignment) - set(given))
    if config.combination_type in DATA_TYPES and missing:
        raise ValueError(
            f"A {config.combination_type!r} result merges with the layer inputs of every member's few-shot "
            f"examples, which a result does not keep: pass `member_examples` for {missing}."
        )
    task_examples = normalize_task_examples({**given, name: list(examples)})
    task_examples = {task: items[: config.scoring.examples_per_task] for task, items in task_examples.items()}

    merger = AdapterMerger(model, config)
    merger.check_names([])
    snapshot = ModelState.capture(model)
    candidates = [[*members, name] for members in result.clusters]
    try:
        model.eval()
        scorer = LossScorer.for_config(model, tokenizer, task_examples, merger, user_score_fn=score_fn)
        attach_layer_inputs(merger, scorer)  # `regmean`: every member's layer inputs, from `member_examples`
        losses = scorer([(members, name) for members in candidates])
        best = min(range(len(losses)), key=lambda i: (losses[i], i))
        new_clusters = [list(c) for c in result.clusters]
        new_clusters[best] = candidates[best]
        spectrum = config.merge.rank_allocation == "spectrum"
        if not spectrum:  # uniform ranks: every merged adapter has the size of the formula
            check_partition_fits(model, new_clusters, config)
        merger.cleanup()
        router = result.prompt_router
        if router is not None:  # the new task's centroid, before anything of the result changes
            prompts = [e.prompt for e in task_examples[name]]
            features = prompt_features(model, tokenizer, prompts, use_chat_template=router.use_chat_template)
            router = router.with_task(name, features)
        merged_name = result.merged_adapter_names[best]
        others = [n for n in result.merged_adapter_names if n != merged_name]
        budget = _total_budget(model, new_clusters, config)
        merged_size, shipped = None, None
        # Keep the old merged adapter (config and weights) in memory: if the new merge fails, it is put back as it was.
        old_config = copy.deepcopy(model.peft_config[merged_name])
        old_weights = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=merged_name).items()}
        model.delete_adapter(merged_name)
        try:
            if spectrum:
                # The run's rule (greedy σ² per byte over every module) for the one adapter rebuilt, with the bytes
                # the untouched adapters really store taken out of the run's budget first.
                left = budget - sum(adapter_bytes(model, n) for n in others)
                merged_size = merge_with_allocated_ranks(merger, [candidates[best]], [merged_name], left)[merged_name]
            else:
                merger.merge(candidates[best], merged_name)
            _check_stored_bytes(model, result.merged_adapter_names, config, budget)
            if spectrum:  # the shipped adapter is not the uniform merge scored above: report its own loss
                shipped = scorer.scores_under({name: merged_name})[name]
        except BaseException:
            if merged_name in model.peft_config:
                model.delete_adapter(merged_name)
            model.add_adapter(merged_name, old_config)
            set_peft_model_state_dict(model, old_weights, adapter_name=merged_name)
            raise
    finally:
        try:
            merger.cleanup()
        finally:  # the model gets its state back even if removing a temporary adapter fails
            snapshot.restore(model)

    result.clusters = new_clusters
    result.assignment[name] = best
    result.routing[name] = merged_name
    result.prompt_router = router
    result.task_losses[name] = float(losses[best] if shipped is None else shipped)
    if merged_size is not None and "merged_sizes" in result.stats:
        result.stats["merged_sizes"][merged_name] = merged_size
    if source is not None:
        result.sources[name] = dict(source)
    elif name in (getattr(model, "d2c_adapter_sources", None) or {}):
        result.sources[name] = dict(model.d2c_adapter_sources[name])
    logger.info("Added %r to cluster %d (%s); losses per cluster: %s", name, best, merged_name, losses)
    return {"cluster": best, "merged_adapter": merged_name, "losses": [float(x) for x in losses]}


def _total_budget(model, clusters: Sequence[Sequence[str]], config) -> int | None:
    """The bytes all merged adapters may take: a byte `storage_budget`, or for `rank_allocation="spectrum"` what the
    uniform merges of `clusters` take (the run's rule, `rank_budget.merge_with_allocated_ranks`); otherwise None."""
    if is_bytes_budget(config.storage_budget):
        return parse_size(config.storage_budget)
    if config.merge.rank_allocation == "spectrum":
        return partition_bytes(model, clusters, config)
    return None


def _check_stored_bytes(model, merged_names: Sequence[str], config, budget: int | None) -> None:
    """Refuse merged adapters whose stored tensors (factors at their real ranks and LoRA biases) exceed `budget`."""
    if budget is None:
        return
    total = sum(adapter_bytes(model, n) for n in merged_names)
    if total > budget:
        if is_bytes_budget(config.storage_budget):
            source = f"`storage_budget`={config.storage_budget!r}"
        else:
            source = "the bytes of uniform ranks, which `rank_allocation='spectrum'` spends"
        raise ValueError(
            f"With the new adapter the {len(merged_names)} merged adapters would store {format_size(total)}, more "
            f"than {format_size(budget)} ({source}); nothing changed."
        )
