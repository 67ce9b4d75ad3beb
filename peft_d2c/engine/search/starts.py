"""Where the D2C search starts: a random partition, K-means on the adapters' weights, or the lower-loss of the two.

Every start is a partition of the adapter names into K non-empty clusters. `start_partition` is start 1 (the
`init` of the config, or the partition of a baseline `method`); `restart_starts` adds starts 2..R of `restarts`.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from peft import PeftModel

from ...config import D2CMergeConfig
from ..merge.lora import delta_gram_matrix
from .loop import BatchScoreFn, balanced_random_partition, kmeans_partition, partition_losses, total_loss

logger = logging.getLogger(__name__)


def start_partition(
    peft_model: PeftModel,
    names: list[str],
    num_clusters: int,
    config: D2CMergeConfig,
    rng: np.random.Generator,
    score_fn: BatchScoreFn,
) -> tuple[list[list[str]], str]:
    """The first partition of a run and how it was made (`"random"`, `"kmeans"` or `"kmeans_svd"`): `config.init`
    for `method="d2c"`, else the baseline `config.method`'s.

    `"random"` draws a balanced partition from `rng`; `"kmeans"` / `"kmeans_svd"` cluster the adapters' full updates
    (`kmeans_partition`, seeded by `config.seed`); `"lowest_loss"` draws the random one (leaving `rng` exactly as
    the kept `init` leaves it: the run then equals the run with that `init`), builds the `kmeans_svd` one and keeps
    the one whose total few-shot loss under `score_fn` is lower (the random one on a tie). Those 2N losses are cached
    by the scorer, so the search does not pay for the kept start's again.
    """
    strategy = config.search_defaults_for(len(names))[0] if config.method == "d2c" else config.method
    if strategy == "random":
        return balanced_random_partition(names, num_clusters, rng), "random"
    gram = delta_gram_matrix(peft_model, names)
    components = config.svd_embedding_dim if strategy in ("kmeans_svd", "lowest_loss") else None
    by_weights = kmeans_partition(names, gram, num_clusters, seed=config.seed, svd_components=components)
    if strategy != "lowest_loss":
        return by_weights, strategy
    # Weight-space clusters only where the data prefer them: on independently trained adapters (each from its own
    # random A) they had a higher few-shot loss than random partitions (docs/benchmark.md, `kmeans_svd` rows); on
    # noisy copies of a few adapters a far lower one (docs/performance.md).
    # Drawn from a copy, then again from `rng` only if kept: the generator ends as the kept `init` would leave it.
    random_start = balanced_random_partition(names, num_clusters, copy.deepcopy(rng))
    losses = [total_loss(partition_losses(p, score_fn)) for p in (random_start, by_weights)]
    logger.info("start partition: random %.4f, kmeans_svd %.4f (total few-shot loss)", *losses)
    if losses[1] < losses[0]:
        return by_weights, "kmeans_svd"
    return balanced_random_partition(names, num_clusters, rng), "random"


def restart_starts(
    peft_model: PeftModel, names: list[str], num_clusters: int, config: D2CMergeConfig
) -> list[list[list[str]]]:
    """Starts 2..R of `restarts`: the `kmeans_svd` partition (unless start 1 already considered it), then balanced
    random partitions, each from its own generator seeded by (seed, r), so start 1 stays the single-start run's."""
    starts: list[list[list[str]]] = []
    init = config.search_defaults_for(len(names))[0]
    for r in range(1, config.restarts):
        if r == 1 and init not in ("kmeans_svd", "lowest_loss"):
            gram = delta_gram_matrix(peft_model, names)
            components = config.svd_embedding_dim
            starts.append(kmeans_partition(names, gram, num_clusters, seed=config.seed, svd_components=components))
        else:
            starts.append(balanced_random_partition(names, num_clusters, np.random.default_rng([config.seed, r])))
    return starts
