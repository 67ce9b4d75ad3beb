"""`merge_adapters_d2c`: the one call that clusters a PeftModel's LoRA adapters and merges each cluster.

The orchestration of a run: checks the input, builds the scorer and the merger, picks the start partition, runs the
search (resumable, shared over Accelerate processes), merges the final clusters and returns a `D2CResult`. It sits
above every stage it calls: `config`, `data`, `engine` and `result`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from peft import PeftModel
from tqdm.auto import tqdm

from .combination_types import DATA_TYPES
from .config import AUTO_RANK, D2CMergeConfig
from .data.examples import normalize_task_examples
from .engine.merge.budget import (
    check_partition_fits,
    is_bytes_budget,
    parse_size,
    partition_bytes,
    resolve_num_clusters,
)
from .engine.merge.lora import (
    adapter_digest,
    adapter_rank,
    base_model_digest,
    check_base_models,
    check_peft_model,
    check_source_adapters,
    resolve_adapter_names,
)
from .engine.merge.merging import AdapterMerger
from .engine.merge.rank_budget import merge_with_allocated_ranks
from .engine.merge.task_cores import TaskCores, add_task_adapters, fit_task_cores
from .engine.runtime.checkpoint import SearchCheckpointer, run_fingerprint
from .engine.runtime.distributed import SingleProcess, get_process_group
from .engine.runtime.state import ModelState
from .engine.scoring.layer_inputs import attach_layer_inputs
from .engine.scoring.loss import LossScorer, UserScoreFn
from .engine.search.loop import SearchState, d2c_search
from .engine.search.plan import SearchPlan
from .engine.search.starts import start_partition
from .engine.serving.prompt_router import fit_prompt_router
from .result import D2CResult

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
    checkpoint_dir: str | os.PathLike | None = None,
    process_group: SingleProcess | None = None,
) -> D2CResult:
    """Cluster the LoRA adapters of `peft_model` into K groups and merge each group into one adapter.

    With `config.method="d2c"` this is the D2C search of "Data-driven Clustering and Merging of Adapters for
    On-device Large Language Models" (arXiv 2601.17441): starting from a partition, it repeatedly proposes to move one
    adapter t from its cluster c to another cluster c'. By default (`search=None` = `"paper"`) this is the paper's
    Algorithm 1: from a balanced random partition, a move is kept if the few-shot loss of task t alone drops, for
    T = ceil(100 x max(1, N / 16)) moves. With `config.search="partition"` (T = ceil(30 x max(1, N / 16))) the move is
    kept only if the summed few-shot loss of every task of c and c', each under its cluster's merge, drops, so the
    total few-shot loss of the partition never rises. `engine.search.plan.SearchPlan` resolves these settings once
    and `result.stats["search_plan"]` records them. The
    baselines (`"random"`, `"kmeans"`, `"kmeans_svd"`) return their partition directly. Each final cluster is merged
    into an adapter named `{merged_adapter_prefix}_{i}`, added to `peft_model`: by default with `regmean`, peft-d2c's
    data-aware update-space merge (the update that best reproduces every member's outputs on its own task's few-shot
    layer inputs), into a plain LoRA with the rank of one source adapter (each source's scaling is applied exactly, but
    the rank-r truncation is not lossless); PEFT's `add_weighted_adapter` computes the merge for its own combination
    types (e.g. `ties`). With `merge={"task_cores": True}` each merged adapter becomes its cluster's shared rank-r
    basis and every task gets its own adapter in it (`result.task_adapters`, `engine.merge.task_cores`).

    The user's adapters are never modified; temporary merged adapters are removed (also on error or Ctrl-C), and the
    active adapter, train/eval mode and every parameter's `requires_grad` are restored.

    Under `accelerate launch` (e.g. `accelerate launch --multi_gpu --num_processes 2 script.py`, also on CPU) every
    process runs the same search and the scoring work of each step is shared out; every process ends with the same
    clusters and merged adapters as a single-process run with the same seed. Only the main process writes the
    checkpoint.

    Args:
        peft_model (`PeftModel`):
            A model with the N single-task LoRA adapters loaded, named after their tasks.
        task_examples (`Mapping[str, Sequence[dict]]` or `datasets.Dataset`):
            Few-shot examples per task (= adapter name): `{"prompt": str, "completion": str}` dicts, or a dataset
            with `task`, `prompt` and `completion` columns. Only the first `config.scoring.examples_per_task` are used.
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
        checkpoint_dir (`str` or `os.PathLike`, *optional*):
            Save the search state (partition, step, random state, history, computed losses) to
            `checkpoint_dir/d2c_checkpoint.json` every `config.checkpoint_every` steps and at the end of the search.
            If the folder already holds a checkpoint of this run, the search resumes from it and ends exactly as an
            uninterrupted run would.
        process_group (`SingleProcess` or `AccelerateProcesses`, *optional*):
            Who shares the scoring work. Defaults to `peft_d2c.engine.runtime.distributed.get_process_group()`: every
            process of an `accelerate launch` / torchrun run, which must then all call this function. Pass
            `peft_d2c.engine.runtime.distributed.SingleProcess()` to run on the calling process alone (e.g. inside
            `if accelerator.is_main_process:`).

    Returns:
        `D2CResult`: clusters, routing, merged adapter names, losses and the search history.

    Raises:
        TypeError: If `peft_model` is not a `PeftModel`, `config` is not a `D2CMergeConfig`, or the examples are
            malformed.
        ValueError: If K is out of range, an adapter lacks examples (or examples name an unknown adapter), adapters
            cannot be merged together, a merged adapter name is taken, or a loss is NaN/inf.
        UnsupportedAdapterError: If the merge cannot take an adapter: DoRA and the other LoRA variants always;
            rslora and lora_bias adapters only with PEFT's combination types (the update-space types of
            `combination_types.UPDATE_TYPES`, the default `regmean` among them, accept them); rank patterns with PEFT's types
            except the `*svd` ones.
        CheckpointMismatchError: If `checkpoint_dir` holds a checkpoint of another configuration, adapter set or
            example set.

    Example:
        ```python
        >>> from peft_d2c import D2CMergeConfig, merge_adapters_d2c
        >>> result = merge_adapters_d2c(peft_model, task_examples, D2CMergeConfig(num_clusters=2), tokenizer=tok)
        >>> result.routing  # doctest: +SKIP
        {'capital': 'd2c_0', 'currency': 'd2c_0', 'plural': 'd2c_1', ...}
        ```
    """
    started = time.perf_counter()
    shapes = _validate(peft_model, task_examples, config, tokenizer, score_fn, adapter_names)
    if config.merge.svd_rank == AUTO_RANK and checkpoint_dir is not None:
        raise ValueError(
            "`merge.svd_rank='auto'` searches several shapes: a `checkpoint_dir` is not supported with it."
        )
    names = shapes[0].names
    mergers = [AdapterMerger(peft_model, run.config, sources=run.names) for run in shapes]
    final_names = max((run.merged_names for run in shapes), key=len)  # every shape's final names are among these
    final_names = [*final_names, *_task_adapter_names(config, names).values()]
    mergers[0].check_names(final_names)
    group = process_group if process_group is not None else get_process_group()
    # The adapters' weights digest, computed once: the processes compare it, and the checkpoint records it.
    weights_digest = adapter_digest(peft_model, names) if group.num_processes > 1 or checkpoint_dir else None
    if group.num_processes > 1:
        group.check_same_run(_call_digest(shapes[0].config, names, shapes[0].examples, weights_digest))
    snapshot = ModelState.capture(peft_model)
    searched: list[_Searched] = []
    try:
        peft_model.eval()
        checkpoint = (checkpoint_dir, weights_digest, score_fn)
        compare = config.merge.svd_rank == AUTO_RANK  # the byte budget chooses the shape (even among one)
        for run, merger in zip(shapes, mergers, strict=True):
            if searched:  # the same examples' layer inputs serve every shape
                merger.layer_inputs, merger.fold_inputs = mergers[0].layer_inputs, mergers[0].fold_inputs
            scorer = LossScorer.for_config(
                peft_model, tokenizer, run.examples, merger, user_score_fn=score_fn, process_group=group
            )
            searched.append(_search_shape(peft_model, run, merger, scorer, group, checkpoint, compare=compare))
        best = min(searched, key=lambda shape: shape.objective or 0.0)  # one shape, or the lowest objective
        run, merger, scorer, state = best.run, best.merger, best.scorer, best.state
        task_losses, fewshot_losses, merged_sizes = _final_merges(peft_model, run, state.clusters, merger, scorer)
        task_cores: TaskCores = {}
        task_adapter_names = _task_adapter_names(run.config, names)
        if task_adapter_names:  # the shape that ships has task cores
            task_cores, task_adapter_names, task_losses = _task_cores(
                peft_model, run, state.clusters, scorer, task_adapter_names
            )
            fewshot_losses = [task_losses[n] for n in run.names]
        prompt_router, router_passes, router_seconds = _fit_router(peft_model, tokenizer, run)
    except BaseException:
        for name in final_names:  # none existed before (`check_names`): whatever is there now was made here
            if name in peft_model.peft_config:
                peft_model.delete_adapter(name)
        raise
    finally:
        try:
            for merger_of_shape in mergers:
                merger_of_shape.cleanup()
        finally:  # the user's model gets its state back even if removing a temporary adapter fails
            snapshot.restore(peft_model)
    stats = {
        **_work_stats(merger, scorer, group, best.trace),
        "fewshot_loss": sum(fewshot_losses) / len(fewshot_losses),
        "seconds": time.perf_counter() - started,
        "start": best.start_kind,  # how the start partition was made
        **({"search_plan": run.plan.to_dict()} if run.plan is not None else {}),  # what the search ran
        "router_seconds": router_seconds,
        "router_forward_passes": router_passes,  # not in `forward_passes`: the search's and merges' cost
        **({"merged_sizes": merged_sizes} if merged_sizes else {}),
        **({"shapes": _shape_stats(peft_model, searched)} if compare else {}),
    }
    sources = adapter_sources if adapter_sources is not None else getattr(peft_model, "d2c_adapter_sources", {})
    result = _result(peft_model, tokenizer, run, best.start, state, task_losses, stats, sources, prompt_router)
    return dataclasses.replace(result, task_cores=task_cores, task_adapters=task_adapter_names)


@dataclasses.dataclass
class _Run:
    """What a call runs on, once its input is checked: the resolved config, the adapters and their examples."""

    config: D2CMergeConfig
    names: list[str]
    examples: dict
    data_sources: dict
    num_clusters: int
    merged_names: list[str]
    plan: SearchPlan | None  # the search that runs (None for a baseline)


def _validate(peft_model, task_examples, config, tokenizer, score_fn, adapter_names) -> list[_Run]:
    """Stage 1: refuse bad input before any work, resolve K and the config's defaults for these N and K. One run,
    or with `merge.svd_rank="auto"` one per shape the byte budget allows (`_shape_configs`)."""
    check_peft_model(peft_model)
    if not isinstance(config, D2CMergeConfig):
        raise TypeError(f"`config` must be a D2CMergeConfig, got {type(config).__name__}.")
    config.check_runnable()
    if score_fn is None and tokenizer is None:
        raise ValueError("Pass the base model's `tokenizer=` (or a custom `score_fn=`) to score the adapters.")
    # `load_task_examples` records where each task's data came from; keep it for the result and the model cards.
    data_sources = dict(getattr(task_examples, "data_sources", None) or {})
    examples = normalize_task_examples(task_examples)
    names = resolve_adapter_names(peft_model, examples, adapter_names)
    examples = {name: examples[name][: config.scoring.examples_per_task] for name in names}
    check_source_adapters(peft_model, names, config.combination_type)
    check_base_models(peft_model, names, allow_mixed=config.allow_mixed_base_models)
    runs = []
    for shape in _shape_configs(peft_model, names, config):
        # The search that runs (rule, T, start), planned once for these N and K: the result, card and checkpoint
        # record it, and the resolved config holds it.
        num_clusters = resolve_num_clusters(peft_model, names, shape)
        plan = SearchPlan.for_run(shape, len(names), num_clusters) if shape.method == "d2c" else None
        shape = shape.resolved_for(plan)
        merged_names = [f"{shape.merged_adapter_prefix}_{i}" for i in range(num_clusters)]
        runs.append(_Run(shape, names, examples, data_sources, num_clusters, merged_names, plan))
    return runs


# The ranks `merge.svd_rank="auto"` tries: powers of two up to this many times the largest source rank.
AUTO_RANK_GROWTH = 4


def _shape_configs(peft_model, names: list[str], config: D2CMergeConfig) -> list[D2CMergeConfig]:
    """`config` itself, or for `merge.svd_rank="auto"` one config per shape the byte budget allows: for every rank r a
    power of two up to `AUTO_RANK_GROWTH` x the largest source rank, the K merged adapters of rank r that fit
    (`budget.resolve_num_clusters`), the highest rank kept for each K; a data-aware merge's search then scores the
    cross-fitted loss (F = 2 unless `scoring.cross_fit_folds` is set), so that shapes compare on examples their merges
    were not fitted to. With `merge.task_cores`, the shapes with a core per task are added: every rank r (their bytes
    grow with r² too), the highest per K, each searched and judged by the loss of the task adapters it would ship
    (not fitted to the examples: no cross-fitting); the shapes
    without cores stay candidates (where the cores' bytes cost a whole rank, one more rank can be worth more).

    Raises:
        ValueError: If the budget holds no merged adapter even at rank 1.
    """
    if config.merge.svd_rank != AUTO_RANK:
        return [config]
    folds = config.scoring.cross_fit_folds or (2 if config.combination_type in DATA_TYPES else 1)
    largest = max(adapter_rank(peft_model, n) for n in names)
    shapes: list[D2CMergeConfig] = []
    for cores in (False, True) if config.merge.task_cores else (False,):
        by_clusters: dict[int, D2CMergeConfig] = {}
        rank = 1
        while rank <= AUTO_RANK_GROWTH * largest:
            shape = dataclasses.replace(
                config,
                merge=dataclasses.replace(config.merge, svd_rank=rank, task_cores=cores),
                # task adapters are not fitted to the examples: a cored shape scores them on all of them
                scoring=dataclasses.replace(config.scoring, cross_fit_folds=1 if cores else folds),
            )
            try:
                by_clusters[resolve_num_clusters(peft_model, names, shape)] = shape  # ranks rise: the highest per K
            except ValueError:  # not even one merged adapter of this rank fits
                break
            rank = rank + 1 if cores else 2 * rank
        taken = {(len(names), shape.merge.svd_rank) for shape in shapes}  # K = N has no cores: the same adapters
        shapes += [by_clusters[k] for k in sorted(by_clusters) if (k, by_clusters[k].merge.svd_rank) not in taken]
    if not shapes:
        raise ValueError(
            f"`storage_budget`={config.storage_budget!r} holds no merged adapter of these adapters' modules even at "
            "rank 1; raise the budget."
        )
    return shapes


def _shape_stats(peft_model, searched: list[_Searched]) -> list[dict[str, Any]]:
    """What `merge.svd_rank="auto"` compared: per shape its K, rank, bytes, final clusters, objective and cost."""
    return [
        {
            "num_clusters": shape.run.num_clusters,
            "rank": shape.run.config.merge.svd_rank,
            "task_cores": shape.run.config.merge.task_cores,
            "bytes": partition_bytes(peft_model, shape.state.clusters, shape.run.config),
            "clusters": [list(c) for c in shape.state.clusters],
            "objective": shape.objective,
            "forward_passes": shape.scorer.forward_passes,
            "seconds": shape.seconds,
        }
        for shape in searched
    ]


@dataclasses.dataclass
class _Searched:
    """One shape's run after its search: what the final stages of the chosen one need, and what it scored."""

    run: _Run
    merger: AdapterMerger
    scorer: LossScorer
    start: list[list[str]]
    start_kind: str
    state: SearchState
    trace: list[list[int]]
    objective: float | None  # the mean loss of its final merges, when shapes are compared
    seconds: float


def _search_shape(peft_model, run: _Run, merger, scorer, group, checkpoint, *, compare: bool) -> _Searched:
    """Stages 2-3 for one shape: the layer inputs, the start and the search; with `compare`, the mean loss of the
    final merges too (the shapes' objective), and the temporary merges removed (every shape uses the same names)."""
    started = time.perf_counter()
    checkpoint_dir, weights_digest, score_fn = checkpoint
    attach_layer_inputs(merger, scorer)  # a data-aware merge's (`regmean`) layer inputs, before any merge
    rng = np.random.default_rng(run.config.seed)
    trace: list[list[int]] = []  # [history records, forward passes so far] after every step (any-time view)
    checkpointer = _checkpointer(peft_model, run, scorer, rng, group, checkpoint_dir, weights_digest, score_fn, trace)
    start, start_kind, state = _start(peft_model, run, rng, checkpointer)
    state = _search(run, state, scorer, rng, group, checkpointer, trace)
    objective = None
    if compare:  # the mean few-shot loss of what would serve the tasks (with task cores: their adapters)
        objective = float(np.mean(scorer([(tuple(sorted(c)), t) for c in state.clusters for t in c])))
        merger.cleanup()
    return _Searched(run, merger, scorer, start, start_kind, state, trace, objective, time.perf_counter() - started)


def _checkpointer(peft_model, run: _Run, scorer, rng, group, checkpoint_dir, weights_digest, score_fn, trace):
    """The search's checkpoint writer, fingerprinted by everything that decides the run (None without a
    `checkpoint_dir`, or for a baseline, which has no search to resume)."""
    if checkpoint_dir is None or run.plan is None:
        return None
    fingerprint = run_fingerprint(
        run.config,
        run.names,
        run.examples,
        weights_digest,
        score_fn=score_fn,
        tokenized=scorer.tokenized,
        model_digest=base_model_digest(peft_model),
    )
    return SearchCheckpointer(checkpoint_dir, fingerprint, group, scorer, rng, run.config.checkpoint_every, trace)


def _start(peft_model, run: _Run, rng, checkpointer):
    """Stage 3, its start: the start partition, how it was made, and the search state to go on from. A run that its
    checkpoint holds takes all three from it (with the generator, cache, counters and trace): no start is computed."""
    resumed = checkpointer.resume() if checkpointer is not None else None
    if resumed is not None:  # a checkpoint older than the start's kind: the plan's `init` made it
        return resumed.start, resumed.start_kind or run.plan.init, resumed.state
    start, start_kind = start_partition(peft_model, run.names, run.num_clusters, run.config, rng)
    if checkpointer is not None:
        checkpointer.begin(start, start_kind)
    return start, start_kind, SearchState(clusters=[list(c) for c in start])


def _search(run: _Run, state, scorer, rng, group, checkpointer, trace):
    """Stage 3: the D2C search on from `state` (the start's, or a resumed run's), or the baseline's partition as it
    is. Returns the final state."""
    if run.plan is None:
        return state
    return _run_search(state, run.plan, scorer, rng, run.config, checkpointer, group, trace)


def _final_merges(peft_model, run: _Run, clusters, merger, scorer):
    """Stage 4: every task's few-shot loss under the search's merges, then the K merged adapters the result ships
    (at the allocated ranks with `rank_allocation="spectrum"`, whose own losses are then reported)."""
    config, names, merged_names = run.config, run.names, run.merged_names
    final = [(clusters[_index_of(clusters, n)], n) for n in names]
    task_losses = dict(zip(names, scorer(final), strict=True))
    fewshot_losses = [task_losses[n] for n in names]
    merger.cleanup()
    check_partition_fits(peft_model, clusters, config)  # `cat` grows with the clusters: check before merging
    if config.merge.rank_allocation != "spectrum":
        for name, members in zip(merged_names, clusters, strict=True):
            merger.merge(members, name)
        return task_losses, fewshot_losses, None
    budget = parse_size(config.storage_budget) if is_bytes_budget(config.storage_budget) else None
    merged_sizes = merge_with_allocated_ranks(merger, clusters, merged_names, budget)
    # The shipped adapters are not the uniform-rank merges the search scored: their own losses are reported.
    shipped = scorer.scores_under({n: merged_names[_index_of(clusters, n)] for n in names})
    task_losses = {n: shipped[n] for n in names}
    return task_losses, [shipped[n] for n in names], merged_sizes


def _task_adapter_names(config: D2CMergeConfig, names: Sequence[str]) -> dict[str, str]:
    """The name of every task's own adapter with `merge.task_cores` (none without)."""
    if not config.merge.task_cores:
        return {}
    return {name: f"{config.merged_adapter_prefix}_task_{name}" for name in names}


def _task_cores(peft_model, run: _Run, clusters, scorer, task_adapter_names: dict[str, str]):
    """Stage 4b (`merge.task_cores`): the merged adapters rewritten in their members' shared basis, the cores and
    adapters of the tasks of clusters of two or more (`engine.merge.task_cores`), and every task's few-shot loss under
    the adapter that serves it. Returns (cores, task -> its adapter, task -> loss)."""
    cores = fit_task_cores(peft_model, clusters, run.merged_names)
    routing = {name: run.merged_names[_index_of(clusters, name)] for name in run.names}
    served = {task: name for task, name in task_adapter_names.items() if task in cores}
    add_task_adapters(peft_model, cores, served, routing)
    return cores, served, scorer.scores_under({task: served.get(task, routing[task]) for task in run.names})


def _fit_router(peft_model, tokenizer, run: _Run):
    """Stage 5: the prompt router for requests without a task label (none without a tokenizer or for one task)."""
    started = time.perf_counter()
    if not run.config.fit_router or tokenizer is None or len(run.names) < 2:
        return None, 0, time.perf_counter() - started
    prompts = {n: [example.prompt for example in run.examples[n]] for n in run.names}
    scoring = run.config.scoring
    router = fit_prompt_router(
        peft_model, tokenizer, prompts, batch_size=scoring.batch_size, use_chat_template=scoring.use_chat_template
    )
    return router, router.stats["forward_passes"], time.perf_counter() - started


def _work_stats(merger, scorer, group, trace) -> dict[str, Any]:
    """The search's and merges' cost, as `D2CResult.stats` reports it."""
    return {
        "num_merges": merger.num_merges,
        "forward_passes": scorer.forward_passes,
        "cache_hits": scorer.cache_hits,
        "cache_misses": scorer.cache_misses,
        "num_refills": merger.num_refills,
        "merge_seconds": merger.merge_seconds,
        "forward_seconds": scorer.forward_seconds,
        "num_processes": group.num_processes,
        "trace": trace,
        "layer_input_bytes": merger.layer_input_bytes,  # the `regmean` layer inputs held for the run
    }


def _result(peft_model, tokenizer, run: _Run, start, state, task_losses, stats, sources, prompt_router) -> D2CResult:
    """Stage 6: the fitted result (clusters, routing, losses, history, provenance)."""
    clusters, names, merged_names = state.clusters, run.names, run.merged_names
    assignment = {n: i for i, members in enumerate(clusters) for n in members}
    return D2CResult(
        clusters=[list(c) for c in clusters],
        assignment={n: assignment[n] for n in names},
        merged_adapter_names=merged_names,
        routing={n: merged_names[assignment[n]] for n in names},
        task_losses=task_losses,
        history=state.history,
        config=run.config,
        initial_clusters=[list(c) for c in start],
        base_model=_base_model_name(peft_model, names[0]),
        sources={n: dict(sources.get(n, {})) for n in names},
        data_sources={n: dict(run.data_sources[n]) for n in names if n in run.data_sources},
        stats=stats,
        model=peft_model,
        tokenizer=tokenizer,
        prompt_router=prompt_router,
    )


def _run_search(
    state: SearchState,
    plan: SearchPlan,
    scorer: LossScorer,
    rng: np.random.Generator,
    config: D2CMergeConfig,
    checkpointer: SearchCheckpointer | None,
    group,
    trace: list[list[int]],
) -> SearchState:
    """The plan's steps of the one D2C loop from `state`; with `plan.rule="paper"` and p = 1 Algorithm 1 exactly, the
    draws and decisions of `benchmarks/reference_d2c.py`."""
    disable = (
        not config.show_progress
        or not group.is_main_process
        or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    )
    steps = plan.num_iterations
    with tqdm(total=steps, initial=state.iteration, desc="D2C search", unit="step", disable=disable) as bar:

        def on_step(current: SearchState) -> None:
            bar.update(min(current.iteration, steps) - bar.n)
            trace.append([len(current.history), scorer.forward_passes])
            logger.debug("step %d: %s", current.iteration, current.history[-1])
            if checkpointer is not None and current.iteration % checkpointer.every == 0:
                checkpointer.save(current)

        state = d2c_search(
            state.clusters,
            scorer,
            rng,
            num_iterations=steps,
            patience=plan.patience,
            state=state,
            on_step=on_step,
            proposals_per_step=plan.proposals_per_step,
            objective=plan.objective,
            # every process counts every process's passes, so all of them stop at the same step
            cost=lambda: scorer.scoring_passes,
            max_cost=plan.max_forward_passes,
        )
    if checkpointer is not None:
        checkpointer.save(state)  # a finished search resumes straight to its final merges
    return state


def _call_digest(config: D2CMergeConfig, names: list[str], examples: dict, weights_digest: str) -> str:
    """What every process of a launch must agree on before a run: settings, adapters and their weights, examples."""
    payload = json.dumps(
        [config.to_dict(), names, weights_digest, {t: [e.to_dict() for e in items] for t, items in examples.items()}],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _index_of(clusters: list[list[str]], name: str) -> int:
    return next(i for i, members in enumerate(clusters) if name in members)


def _base_model_name(peft_model: PeftModel, adapter_name: str) -> str | None:
    name = peft_model.peft_config[adapter_name].base_model_name_or_path
    if not name:
        name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    return name or None
