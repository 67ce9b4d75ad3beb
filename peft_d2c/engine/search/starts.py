"""Where the D2C search starts: a balanced random partition, or K-means on the adapters' weights.

Every start is a partition of the adapter names into K non-empty clusters. `start_partition` is the `init` of the
run's `SearchPlan` for `method="d2c"`, or the partition of a baseline `method`.
"""

from __future__ import annotations

import numpy as np
from peft import PeftModel

from ...config import D2CMergeConfig
from ..merge.lora import delta_gram_matrix
from .loop import balanced_random_partition, kmeans_partition


def start_partition(
    peft_model: PeftModel, names: list[str], num_clusters: int, config: D2CMergeConfig, rng: np.random.Generator
) -> tuple[list[list[str]], str]:
    """The first partition of a run and how it was made (`"random"`, `"kmeans"` or `"kmeans_svd"`): `config.init`
    (None: `"random"`) for `method="d2c"`, else the baseline `config.method`'s.

    `"random"` draws a balanced partition from `rng`; `"kmeans"` / `"kmeans_svd"` cluster the adapters' full updates
    (`kmeans_partition`, seeded by `config.seed`, `config.svd_embedding_dim` components for `kmeans_svd`).
    """
    strategy = (config.init or "random") if config.method == "d2c" else config.method
    if strategy == "random":
        return balanced_random_partition(names, num_clusters, rng), "random"
    gram = delta_gram_matrix(peft_model, names)
    components = config.svd_embedding_dim if strategy == "kmeans_svd" else None
    return kmeans_partition(names, gram, num_clusters, seed=config.seed, svd_components=components), strategy
