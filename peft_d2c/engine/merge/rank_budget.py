"""One byte budget over every merged adapter and module: rank where it keeps the most (`rank_allocation="spectrum"`).

With `"uniform"` ranks every merged adapter has the rank R of one source in every module, and the truncation to R
throws away what a cluster's merged update holds beyond it (a 4+8+8 -> 8 merge dropped 44-47% of its Frobenius norm
on the embedded adapters), while a singleton or a nearly low-rank module has rank to spare. `"spectrum"` spends the
same total bytes (or all of a byte `storage_budget`) differently: each final cluster is first merged at the full rank
of its members (Σ r_i, lossless for the update-space types), the singular values σ of every module's merged update
are read off it, and `allocate_ranks` gives every (adapter, module) rank 1, then hands out one more rank at a time
to the largest σ² per byte over all of them until the budget is spent. The squared Frobenius error of the whole
truncation (Eckart-Young: the sum of the dropped σ²) is then as small as the budget allows, up to one rank unit of
the costliest module. The merged adapters are standard PEFT LoRAs whose `rank_pattern` / `alpha_pattern` give every
module its rank (scaling 1), which plain PEFT, llama.cpp (`export.llamacpp`) and vLLM (`max_lora_rank`) load. May
import `peft_d2c.config` and the merge modules `budget`, `layer_merge`, `lora` and `merging`.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Hashable, Mapping, Sequence

import torch
from peft import PeftModel

from .budget import partition_bytes
from .layer_merge import set_factors
from .lora import adapter_rank, lora_factors, lora_layers
from .merging import AdapterMerger


def allocate_ranks(
    spectra: Mapping[Hashable, Sequence[float]],
    costs: Mapping[Hashable, int],
    budget: int,
    fixed: Mapping[Hashable, int] | None = None,
) -> dict[Hashable, int]:
    """Ranks that keep the most squared singular values within `budget` bytes (pure; greedy by σ² per byte).

    Args:
        spectra (`Mapping`): Per key (an adapter and module), its singular values, decreasing.
        costs (`Mapping`): Per key, the bytes of one unit of rank ((in + out) x bytes per element).
        budget (`int`): Bytes for all keys together.
        fixed (`Mapping`, *optional*): Per key, bytes it takes whatever its rank (a LoRA bias: out x bytes per
            element); they come out of `budget` first.

    Returns:
        `dict`: key -> rank, at least 1 and at most its number of singular values; Σ (rank x cost + fixed) <=
            `budget`.

    Raises:
        ValueError: If `budget` cannot give every key rank 1.

    Example:
        ```python
        >>> allocate_ranks({"a": [3.0, 2.0, 1.0], "b": [2.5, 0.1]}, {"a": 10, "b": 10}, 40)
        {'a': 3, 'b': 1}
        ```
    """
    ranks = {key: 1 for key in spectra}
    fixed = fixed or {}
    spent = sum(costs[key] + fixed.get(key, 0) for key in spectra)
    if spent > budget:
        with_bias = " with its LoRA bias" if any(fixed.get(key, 0) for key in spectra) else ""
        raise ValueError(
            f"A budget of {budget} bytes cannot give every module of every merged adapter rank 1{with_bias} ({spent})."
        )
    # Max-heap of the next rank unit of every key, by energy per byte (ties: the key's order, for determinism).
    order = {key: index for index, key in enumerate(spectra)}
    heap = [(-(spectra[k][1] ** 2) / costs[k], order[k], k) for k in spectra if len(spectra[k]) > 1]
    heapq.heapify(heap)
    while heap:
        _, index, key = heapq.heappop(heap)
        if spent + costs[key] > budget:
            continue  # a cheaper module's next unit may still fit
        spent += costs[key]
        ranks[key] += 1
        if ranks[key] < len(spectra[key]):
            heapq.heappush(heap, (-(spectra[key][ranks[key]] ** 2) / costs[key], index, key))
    return ranks


def merge_with_allocated_ranks(
    merger: AdapterMerger, clusters: Sequence[Sequence[str]], names: Sequence[str], budget: int | None = None
) -> dict[str, dict[str, int]]:
    """Merge each cluster into `names[i]` with ranks from `allocate_ranks`, within `budget` bytes (default: what the
    uniform merges of these clusters take, `budget.partition_bytes`).

    Returns:
        `dict`: merged adapter -> `{"r": its largest rank, "bytes": its LoRA weight bytes}` (its LoRA biases included:
            every tensor of its safetensors; they are paid out of `budget` before any rank).
    """
    model: PeftModel = merger.peft_model
    config = merger.config
    if budget is None:
        budget = partition_bytes(model, clusters, config)
    layers = list(lora_layers(model))
    spectra, costs, fixed = {}, {}, {}
    for members, name in zip(clusters, names, strict=True):
        full_rank = sum(adapter_rank(model, m) for m in members)
        full = AdapterMerger(
            model, dataclasses.replace(config, merge=dataclasses.replace(config.merge, svd_rank=full_rank))
        )
        full.layer_inputs = merger.layer_inputs
        full.merge(members, name)  # lossless: the update-space types truncate at rank Σ r_i
        for module, layer in layers:
            factors = lora_factors(layer, name)
            if factors is None:
                continue
            a, b = factors
            # B = U·S from the truncation: its column norms are the singular values of the merged update.
            spectrum = torch.linalg.vector_norm(b.detach().double(), dim=0).tolist()
            kept = [s for s in spectrum if s > 0] or spectrum[:1]
            spectra[name, module] = kept
            costs[name, module] = (a.shape[1] + b.shape[0]) * a.element_size()
            # A LoRA bias (`lora_bias=True`) is stored whatever the rank: it is paid for before any rank unit.
            bias = layer.lora_B[name].bias if name in layer.lora_B else None
            fixed[name, module] = 0 if bias is None else bias.numel() * bias.element_size()
    ranks = allocate_ranks(spectra, costs, budget, fixed)
    report = {}
    for name in names:
        pattern = {}
        with torch.no_grad():
            for module, layer in layers:
                if (name, module) not in ranks:
                    continue
                rank = ranks[name, module]
                _truncate_layer(layer, name, rank)
                pattern[module.removeprefix("base_model.model.")] = rank
        largest = max(pattern.values())
        model.peft_config[name] = dataclasses.replace(
            model.peft_config[name],
            r=largest,
            lora_alpha=largest,
            rank_pattern={k: v for k, v in pattern.items() if v != largest},
            alpha_pattern={k: v for k, v in pattern.items() if v != largest},
        )
        report[name] = {
            "r": largest,
            "bytes": sum(ranks[name, m] * costs[name, m] + fixed[name, m] for m, _ in layers if (name, m) in ranks),
        }
    return report


def _truncate_layer(layer, name: str, rank: int) -> None:
    """Keep the first `rank` directions of adapter `name` in one LoRA layer (its factors are A = V^T, B = U·S, largest
    first: `merge_methods.merge_updates` returns them so for every type), with scaling 1 (`lora_alpha = r`). Linear
    layers and embeddings (`lora_embedding_A` / `lora_embedding_B`, `embed_tokens`) alike."""
    a, b = lora_factors(layer, name)
    set_factors(layer, name, a.data[:rank].clone(), b.data[:, :rank].clone())
    if name in layer.lora_A:  # an embedding's factors are bare parameters, without these attributes
        layer.lora_A[name].out_features = rank
        layer.lora_B[name].in_features = rank
    layer.r[name] = rank
    layer.lora_alpha[name] = rank
    layer.scaling[name] = 1.0
