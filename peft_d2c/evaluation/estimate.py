"""`estimate_run`: a short timing probe before a long D2C run (what `peft-d2c estimate` prints)."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Any

import numpy as np

from ..config import AUTO_RANK
from ..data.examples import normalize_task_examples
from ..engine.merge.budget import adapter_bytes, resolve_num_clusters
from ..engine.merge.lora import check_source_adapters, resolve_adapter_names
from ..engine.merge.merging import AdapterMerger
from ..engine.runtime.state import ModelState
from ..engine.scoring.layer_inputs import attach_layer_inputs
from ..engine.scoring.loss import LossScorer
from ..engine.search.loop import balanced_random_partition
from ..engine.search.plan import SearchPlan
from ..sizes import format_size

logger = logging.getLogger(__name__)


def estimate_run(peft_model, task_examples, config, *, tokenizer, probe_evaluations: int = 4) -> dict[str, Any]:
    """Time a few merge + loss evaluations and extrapolate to the whole run.

    The run's search is the one it would plan (`SearchPlan.for_run`, the same rule, T and p). One evaluation is the
    merge of a cluster and the loss of one task's examples under it. Per proposal (times `proposals_per_step`) a
    `search="paper"` step asks for two (the task in its cluster and in the target cluster), a `"partition"` step for
    every task of the two clusters after the move (2N/K for balanced clusters, at most N). Repeated requests are
    cached, so while the clusters stay about balanced the count is an upper bound. The final task losses add N; the
    K final merges are timed separately. A cross-fitted run (`scoring.cross_fit_folds` F) merges a cluster F times per
    evaluation, which the probe's timing includes.

    Args:
        peft_model (`PeftModel`): The model with the N source adapters.
        task_examples (`Mapping[str, Sequence[dict]]`): Few-shot examples per task.
        config (`D2CMergeConfig`): The run to estimate.
        tokenizer: The base model's tokenizer.
        probe_evaluations (`int`, defaults to 4): How many evaluations to time.

    Returns:
        `dict`: `num_adapters`, `num_clusters`, `search_plan` (`SearchPlan.to_dict()`, None for a baseline),
        `max_evaluations`, `seconds_per_evaluation`, `seconds_per_merge`,
        `expected_seconds` (an upper bound), `probe_evaluations`, `layer_input_bytes` (the `regmean` layer inputs the
        run holds from start to end, `AdapterMerger.layer_input_bytes`), `predicted_layer_input_bytes`
        (the same predicted before collecting them, what a run checks against `memory_limit`) and `peak_bytes` (the
        process's expected peak resident memory: the probe's peak, which held every layer input and merged and
        scored the largest cluster, plus the run's live merged adapters; from a fresh process it is the run's).

    Example:
        ```python
        >>> estimate_run(model, examples, D2CMergeConfig(num_clusters=4), tokenizer=tok)["expected_seconds"]  # doctest: +SKIP
        812.4
        ```
    """
    if config.merge.svd_rank == AUTO_RANK:
        raise ValueError(
            "`merge.svd_rank='auto'` runs one search per shape the budget allows: estimate one shape at a time "
            "(`merge.svd_rank` set to a rank); the run costs about the sum of its shapes."
        )
    examples = normalize_task_examples(task_examples)
    names = resolve_adapter_names(peft_model, examples, None)
    examples = {n: examples[n][: config.scoring.examples_per_task] for n in names}
    k = resolve_num_clusters(peft_model, names, config)
    plan = SearchPlan.for_run(config, len(names), k) if config.method == "d2c" else None  # the run's own search
    config = config.resolved_for(plan)
    check_source_adapters(peft_model, names, config.combination_type)
    merger = AdapterMerger(peft_model, config)
    merger.check_names([])
    rng = np.random.default_rng(config.seed)
    snapshot = ModelState.capture(peft_model)
    try:
        peft_model.eval()
        scorer = LossScorer.for_config(peft_model, tokenizer, examples, merger)
        # A data-aware merge's layer inputs (one pass per task, like the run's), predicted first as a run predicts them.
        predicted_input_bytes = attach_layer_inputs(merger, scorer)
        started = time.perf_counter()
        for _ in range(probe_evaluations):
            clusters = balanced_random_partition(names, k, rng)
            members = max(clusters, key=len)
            scorer([(members, members[int(rng.integers(len(members)))])])
            merger.cleanup()
        per_evaluation = (time.perf_counter() - started) / max(1, probe_evaluations)
        per_merge = merger.merge_seconds / max(1, merger.num_merges)
        # The probe did the run's heaviest work (every layer input held, the largest cluster merged and scored); a
        # run keeps up to `merge_cache_size` merged adapters live on top of that.
        live_adapters = config.merge.cache_size * max(adapter_bytes(peft_model, n) for n in names)
        peak_bytes = peak_rss_bytes() + live_adapters
    finally:
        try:
            merger.cleanup()
        finally:  # the model gets its state back even if removing a temporary adapter fails
            snapshot.restore(peft_model)
    n = len(names)
    steps = plan.num_iterations if plan is not None and 1 < k < n else 0
    per_proposal = 2 if plan is None or plan.rule == "paper" else min(n, 2 * math.ceil(n / k))
    evaluations = steps * (plan.proposals_per_step if plan else 1) * per_proposal + n
    return {
        "num_adapters": len(names),
        "num_clusters": k,
        "method": config.method,
        "search_plan": None if plan is None else plan.to_dict(),
        "num_iterations": steps,
        "max_evaluations": evaluations,
        "probe_evaluations": probe_evaluations,
        "seconds_per_evaluation": per_evaluation,
        "seconds_per_merge": per_merge,
        "expected_seconds": evaluations * per_evaluation + k * per_merge,
        "layer_input_bytes": merger.layer_input_bytes,  # held for the whole run (0 unless `regmean`)
        "predicted_layer_input_bytes": predicted_input_bytes,  # what a run checks against `memory_limit`
        "peak_bytes": peak_bytes,
    }


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far, in bytes (`getrusage`; Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def format_estimate(estimate: dict[str, Any]) -> str:
    """The lines `peft-d2c estimate` prints for an `estimate_run` result."""
    lines = [
        f"N={estimate['num_adapters']} adapters, K={estimate['num_clusters']}, method={estimate['method']}"
        + (f" ({estimate['search_plan']['rule']} search)" if estimate.get("search_plan") else "")
        + f", T={estimate['num_iterations']}",
        f"at most {estimate['max_evaluations']} evaluations (merge + loss), "
        f"{estimate['seconds_per_evaluation']:.3f} s each in the probe",
        f"expected run time: at most {estimate['expected_seconds']:.1f} s",
    ]
    if estimate["layer_input_bytes"]:
        lines.append(f"regmean layer inputs held for the run: {format_size(estimate['layer_input_bytes'])}")
    lines.append(f"expected peak memory (resident set): {format_size(estimate['peak_bytes'])}")
    return "\n".join(lines)
