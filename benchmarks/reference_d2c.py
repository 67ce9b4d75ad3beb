"""A straightforward implementation of Algorithm 1 of arXiv 2601.17441, kept for benchmarks and tests only.

Every iteration merges the source cluster with PEFT, scores task t's examples under it, deletes the merge, then
merges the target cluster with t moved in, scores, and deletes it: two merges and two forward passes per iteration,
nothing cached, nothing batched across merges. It uses peft-d2c's own tokenisation (`tokenize_example`), loss
(`completion_loss_sums`), merge (`AdapterMerger.merge`) and start partition (`balanced_random_partition`), and draws
each proposal (source, target, task) from the generator in the same order as `peft_d2c.engine.search.loop.d2c_search`,
so with the same seed it finds the same clusters: only the search machinery differs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from peft import PeftModel

from peft_d2c import D2CMergeConfig
from peft_d2c.combination_types import DATA_TYPES
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.layer_inputs import input_factors
from peft_d2c.engine.scoring.loss import completion_loss_sums, pad_token_id_for, tokenize_example
from peft_d2c.engine.search.loop import balanced_random_partition

TEMPORARY_NAME = "reference_tmp"


def reference_d2c(
    peft_model: PeftModel,
    tokenizer,
    task_examples: Mapping[str, Sequence[Any]],
    config: D2CMergeConfig,
    *,
    adapter_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run Algorithm 1 naively from a balanced random start.

    Args:
        peft_model (`PeftModel`): The model with the source adapters loaded.
        tokenizer: The base model's tokenizer.
        task_examples (`Mapping[str, Sequence]`): Few-shot examples per task (= adapter name).
        config (`D2CMergeConfig`): `num_clusters`, `num_iterations`, `seed`, merge and tokenisation settings are
            used (`init` must be `"random"`; `proposals_per_step`, caching and batching settings are ignored).
        adapter_names (`Sequence[str]`, *optional*): Order of the adapters for the start partition (defaults to
            the model's adapters that have examples, in load order, as `merge_adapters_d2c` does).

    Returns:
        `dict`: `clusters`, `history` (the records of `d2c_search`) and `stats` (`num_merges`, `forward_passes`,
        `seconds`).
    """
    if config.init not in (None, "random") or config.method != "d2c":  # None: random for the paper's search
        raise ValueError("The reference implements D2C from a random start only.")
    examples = normalize_task_examples(task_examples)
    names = list(adapter_names) if adapter_names is not None else [n for n in peft_model.peft_config if n in examples]
    examples = {name: examples[name][: config.scoring.examples_per_task] for name in names}
    merger = AdapterMerger(peft_model, config)
    pad_token_id = pad_token_id_for(tokenizer)
    if config.combination_type in DATA_TYPES:  # `regmean` merges with every adapter's layer inputs on its task
        tokenized = {
            task: [
                tokenize_example(
                    tokenizer,
                    e,
                    use_chat_template=config.scoring.use_chat_template,
                    max_length=config.scoring.max_length,
                )
                for e in examples[task]
            ]
            for task in names
        }
        merger.layer_inputs = input_factors(
            peft_model, tokenized, pad_token_id=pad_token_id, batch_size=config.scoring.batch_size
        )
    started = time.perf_counter()
    stats = {"num_merges": 0, "forward_passes": 0}

    def loss(members: Sequence[str], task: str) -> float:
        merger.merge(members, TEMPORARY_NAME)
        stats["num_merges"] += 1
        try:
            rows = [
                tokenize_example(
                    tokenizer,
                    example,
                    use_chat_template=config.scoring.use_chat_template,
                    max_length=config.scoring.max_length,
                )
                for example in examples[task]
            ]
            sums, counts, passes = completion_loss_sums(
                peft_model,
                rows,
                [TEMPORARY_NAME] * len(rows),
                pad_token_id=pad_token_id,
                batch_size=config.scoring.batch_size,
            )
            stats["forward_passes"] += passes
        finally:
            peft_model.delete_adapter(TEMPORARY_NAME)
        total = 0.0
        for value in sums:
            total += value
        return total / max(sum(counts), 1)

    was_training = peft_model.training
    peft_model.eval()
    try:
        rng = np.random.default_rng(config.seed)
        k = config.resolve_num_clusters(len(names))
        clusters = balanced_random_partition(names, k, rng)
        history = []
        if k > 1 and any(len(c) > 1 for c in clusters):
            for iteration in range(config.num_iterations):
                eligible = [i for i, c in enumerate(clusters) if len(c) >= 2]
                source = int(eligible[rng.integers(len(eligible))])
                others = [i for i in range(k) if i != source]
                target = int(others[rng.integers(len(others))])
                task = clusters[source][int(rng.integers(len(clusters[source])))]
                loss_before = loss(clusters[source], task)
                clusters[source].remove(task)
                clusters[target] = sorted([*clusters[target], task])
                loss_after = loss(clusters[target], task)
                accepted = loss_after < loss_before
                if not accepted:  # move t back
                    clusters[target].remove(task)
                    clusters[source] = sorted([*clusters[source], task])
                history.append(
                    {
                        "iteration": iteration,
                        "task": task,
                        "source": source,
                        "target": target,
                        "loss_before": loss_before,
                        "loss_after": loss_after,
                        "accepted": accepted,
                    }
                )
    finally:
        peft_model.train(was_training)
    stats["seconds"] = time.perf_counter() - started
    return {"clusters": clusters, "history": history, "stats": stats}
