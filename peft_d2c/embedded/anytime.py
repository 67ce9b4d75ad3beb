"""The any-time view of a D2C run: the mean few-shot loss of the partition the search would return if it were
stopped after each number of forward passes (`anytime_curve`), and the memoised scorer that rebuilds it for
searches whose records do not carry the total loss (`AnytimeScorer`). Used by `peft_d2c.embedded.benchmark`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import D2CMergeConfig
from ..data.examples import normalize_task_examples
from ..engine.merge.merging import AdapterMerger
from ..engine.scoring.layer_inputs import attach_layer_inputs
from ..engine.scoring.loss import LossScorer
from ..engine.search.loop import Move, apply_move
from ..result import D2CResult

__all__ = ["AnytimeScorer", "anytime_curve"]


def anytime_curve(result: D2CResult, total_of: Callable[[list[list[str]]], float]) -> list[list[float]]:
    """`[[forward passes, mean few-shot loss], ...]` of a D2C run: the loss of the partition the search would
    return if stopped then, from 0 passes.

    Records with `total_loss` (the partition objective) give it directly; for the others the partition is rebuilt
    from the moves and scored by `total_of(clusters)` at every tenth step and the last one.
    """
    n = len(result.assignment)
    fp_after = {records: passes for records, passes in result.stats["trace"]}
    history = result.history
    clusters = [list(c) for c in result.initial_clusters]
    points = [[0, total_of(clusters) / n]]
    every = max(1, len(history) // 10)
    for index, record in enumerate(history):
        if record["accepted"]:
            move = Move(record["source"], record["target"], record["task"])
            clusters[move.source], clusters[move.target] = map(list, apply_move(clusters, move))
        if "total_loss" in record:
            current = record["total_loss"]
        elif index % every == every - 1 or index == len(history) - 1:
            current = total_of(clusters)
        else:
            continue
        if index + 1 in fp_after:
            points.append([fp_after[index + 1], current / n])
    if points[-1][0] < result.stats["forward_passes"]:  # the end: the returned partition, all passes counted
        points.append([result.stats["forward_passes"], sum(result.task_losses.values()) / n])
    return points


class AnytimeScorer:
    """Total few-shot loss of a partition, memoised over the whole benchmark run; its passes are not counted."""

    def __init__(self, peft_model, tokenizer, fewshot: dict, combination_type: str, prefix: str = "anytime") -> None:
        config = D2CMergeConfig(num_clusters=1, combination_type=combination_type, merged_adapter_prefix=prefix)
        examples = normalize_task_examples(fewshot)
        examples = {task: items[: config.scoring.examples_per_task] for task, items in examples.items()}
        self.model = peft_model
        self.merger = AdapterMerger(peft_model, config)
        self.scorer = LossScorer.for_config(peft_model, tokenizer, examples, self.merger)

    def __call__(self, clusters: Sequence[Sequence[str]]) -> float:
        self.model.eval()
        # A `regmean` merge's layer inputs, collected when first needed after `close`: a cell's run holds its own
        # copy while it searches, and two copies of every adapter's layer inputs at once (4.8 GB each on the validation
        # collection when they were Gram matrices) is what made two benchmark processes run out of memory.
        attach_layer_inputs(self.merger, self.scorer)
        return sum(self.scorer([(tuple(sorted(c)), t) for c in clusters for t in c]))

    def close(self) -> None:
        """Remove the temporary merged adapters and the layer inputs from the model; the memoised losses are kept."""
        self.merger.cleanup()
        self.merger.layer_inputs.clear()
