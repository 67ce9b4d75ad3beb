"""Writing rank-r update-space merges into a merged adapter's layers: the members' factors, scalings and LoRA biases
in, batched over the layers of one shape, the maths of `engine.merge.merge_methods` (and `engine.merge.regmean`, the
data-aware type), the merged factors out in the members' dtype and device. May import `peft_d2c.config` and the merge
modules `layer_merge`, `lora`, `merge_methods` and `regmean`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ...combination_types import DATA_TYPES
from .layer_merge import parameter_like, set_factors
from .lora import lora_factors
from .merge_methods import merge_biases, merge_updates, widest_dtype
from .regmean import LayerInput, RegMeanSystem, regmean_merge


def update_merge_into(
    combination_type: str,
    members: Sequence[str],
    weights: Sequence[float],
    layers: Sequence[LoraLayer],
    adapter_name: str,
    *,
    rank: int,
    density: float,
    majority_sign_method: str,
    layer_inputs: Mapping[LoraLayer, Sequence[LayerInput]] | None = None,
    regmean_alpha: float = 0.9,
) -> None:
    """Merge `members` with a rank-r update-space type (`peft_d2c.combination_types.UPDATE_TYPES`) into the existing adapter
    `adapter_name` of every layer in `layers` (its factors, and its LoRA bias if it has one, are overwritten).

    Each member's update is s_i·B_i·A_i with its own scaling s_i as PEFT applies it in that layer (`layer.scaling`:
    alpha/r, alpha/sqrt(r) for rslora, `rank_pattern` / `alpha_pattern`), and its LoRA bias (`lora_bias=True`) is
    s_i·b_i; the maths is `peft_d2c.engine.merge.merge_methods`, one batched call per group of layers with the same
    shapes (the same projection in every block). The merged factors are for scaling 1 (`lora_alpha = r`); a merged bias
    where no member has one is zero. A member that does not adapt a layer adds a zero update there; a layer of
    `adapter_name` no member adapts is zeroed, and a merge of lower rank than `adapter_name`'s is zero-padded to it
    (a temporary slot built for wider merges: the same outputs). The data-aware
    types (`combination_types.DATA_TYPES`: `regmean`, `peft_d2c.engine.merge.regmean`) take `layer_inputs`: per layer,
    every member's layer-input factor (`regmean.LayerInput`), in the order of `members`, and `regmean_alpha`; they
    merge one layer at a time in model order, and the layers fed the same input share one solve.

    Raises:
        NotImplementedError: For a convolutional LoRA layer.
    """
    in_order: list[tuple[LoraLayer, list]] = []  # (layer, its present members), in model order
    unadapted: list[LoraLayer] = []  # layers of `adapter_name` no member adapts (a slot wider than the merge)
    for layer in layers:
        if lora_factors(layer, adapter_name) is None:
            continue
        if isinstance(layer.get_base_layer(), torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Conv3d):
            raise NotImplementedError("peft-d2c's update-space merges do not handle convolutional LoRA layers.")
        present = []
        for member, weight in zip(members, weights, strict=True):
            factors = lora_factors(layer, member)
            if factors is not None:
                bias = layer.lora_B[member].bias if member in layer.lora_B else None
                present.append((member, weight, factors, bias))
        if present:
            in_order.append((layer, present))
        else:
            unadapted.append(layer)
    if not in_order:
        raise ValueError(f"None of {list(members)} adapts a layer of {adapter_name!r}.")
    for layer in unadapted:
        _write_zeros(layer, adapter_name)
    if combination_type in DATA_TYPES and layer_inputs is None:
        raise ValueError(f"combination_type={combination_type!r} needs the layer inputs of its members.")
    settings = {"rank": rank, "density": density, "majority_sign_method": majority_sign_method}
    with torch.no_grad():
        if combination_type in DATA_TYPES:
            _regmean_layers(
                in_order, members, weights, adapter_name, layer_inputs, rank=rank, alpha=regmean_alpha,
                bias_type=bias_merge_type(combination_type),
            )  # fmt: skip
            return
        # Layers are batched only where every tensor can be stacked: same shapes, device and dtype (a model spread
        # over devices, or with layers in different dtypes, merges each layer where it lives, in its own dtype).
        groups: dict[tuple, list[tuple[LoraLayer, list]]] = {}
        for layer, present in in_order:
            key = tuple(
                (m, a.shape, b.shape, a.device, a.dtype, b.dtype, bias is not None) for m, _, (a, b), bias in present
            )
            groups.setdefault(key, []).append((layer, present))
        for entries in groups.values():
            _merge_group(combination_type, entries, adapter_name, **settings)


def _stacked_pairs(entries, first, compute: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per member of `first`, its `(B, s·A)` stacked over the layers of `entries`, in the `compute` dtype. The
    scalings are folded in float32 (or float64): scaling a bf16 factor in bf16 would round it once more."""
    pairs = []
    for index, (member, _, _, _) in enumerate(first):
        scalings = [float(layer.scaling[member]) for layer, _ in entries]
        b = torch.stack([present[index][2][1].to(compute) for _, present in entries])
        a = torch.stack(
            [present[index][2][0].to(compute) * s for (_, present), s in zip(entries, scalings, strict=True)]
        )
        pairs.append((b, a))
    return pairs


def bias_merge_type(combination_type: str) -> str:
    """The rule the merged LoRA bias of an update-space `combination_type` follows (`merge_biases`): the data-aware
    types take the members' weighted mean (`core_ta`), the others their own rule."""
    return "core_ta" if combination_type in DATA_TYPES else combination_type


def _regmean_layers(
    in_order, members, weights, adapter_name, layer_inputs, *, rank: int, alpha: float, bias_type: str
) -> None:
    """RegMean of every layer of `in_order` (`update_merge_into`), one layer at a time in model order: every member's
    inputs count, the members that adapt the layer bring their updates, and consecutive layers fed the same input
    (q, k, v) share one `RegMeanSystem`, so the model's device holds one layer input's factors at a time. A LoRA bias
    is merged as the weighted mean of the members' (scaled) biases."""
    system, system_key = None, None
    for layer, present in in_order:
        source_dtype = widest_dtype([t.dtype for _, _, factors, _ in present for t in factors])
        compute = torch.promote_types(source_dtype, torch.float32)
        entries = [(layer, present)]
        pairs = _stacked_pairs(entries, present, compute)  # (B, s·A) with a batch of one layer
        adapting = {m: (b[0], a[0]) for (m, _, _, _), (b, a) in zip(present, pairs, strict=True)}
        inputs = list(layer_inputs[layer])
        device = present[0][2][0].device
        key = (tuple(id(f) for f in inputs), device, compute)
        if key != system_key:  # a new layer input: drop the last one's system before building this one's
            system = None  # (so the device never holds two)
            system = RegMeanSystem(inputs, weights, alpha, device=device, dtype=compute)
            system_key = key
        new_a, new_b = regmean_merge(
            [adapting.get(m) for m in members], inputs, weights, rank=rank, alpha=alpha, system=system
        )
        biases = merged_biases(bias_type, entries, new_b[None], compute, 1.0, "total")
        _write_group(entries, adapter_name, new_a[None], new_b[None], biases, source_dtype)


def _merge_group(combination_type, entries, adapter_name, *, rank, density, majority_sign_method) -> None:
    """One batched merge of layers whose members have the same shapes, device and dtype (see `update_merge_into`)."""
    first = entries[0][1]
    weights = [weight for _, weight, _, _ in first]
    source_dtype = widest_dtype([t.dtype for _, _, factors, _ in first for t in factors])
    compute = torch.promote_types(source_dtype, torch.float32)
    new_a, new_b = merge_updates(
        combination_type,
        _stacked_pairs(entries, first, compute),
        weights,
        rank=rank,
        density=density,
        majority_sign_method=majority_sign_method,
    )
    biases = merged_biases(combination_type, entries, new_b, compute, density, majority_sign_method)
    _write_group(entries, adapter_name, new_a, new_b, biases, source_dtype)


def merged_biases(combination_type, entries, new_b, compute, density, majority_sign_method):
    """The merged LoRA biases of a batch of layers (`merge_biases` of the members' scaled biases, zero for a member
    without one), or None when no member has one. `entries`: `(layer, present)` pairs, `present` holding per member
    `(name, weight, factors, bias or None)`; `new_b` (layers, out, r) gives the shape and device of a zero bias."""
    first = entries[0][1]
    if all(bias is None for _, _, _, bias in first):
        return None
    vectors = []
    for index, (member, _, _, bias) in enumerate(first):
        if bias is None:
            vectors.append(new_b.new_zeros(new_b.shape[:-1]))
        else:
            vectors.append(
                torch.stack(
                    [present[index][3].to(compute) * float(layer.scaling[member]) for layer, present in entries]
                )
            )
    weights = [weight for _, weight, _, _ in first]
    return merge_biases(combination_type, vectors, weights, density=density, majority_sign_method=majority_sign_method)


def _write_group(entries, adapter_name, new_a, new_b, biases, source_dtype) -> None:
    """Write a batch of merged factors (and biases) into the adapter `adapter_name` of the layers of `entries`,
    zero-padded to its rank where it has a higher one (a slot built for wider merges: zero directions add nothing)."""
    for position, (layer, _) in enumerate(entries):
        # The merged adapter stays where its members live (the merge ran there) and takes their dtype, whatever
        # dtype PEFT gave the new adapter (the base layer's: bf16 under float32 sources, say): it costs the bytes of
        # a source.
        a, b = new_a[position].to(source_dtype), new_b[position].to(source_dtype)
        missing = lora_factors(layer, adapter_name)[0].shape[0] - a.shape[0]
        if missing > 0:
            a = torch.cat([a, a.new_zeros(missing, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
        set_factors(layer, adapter_name, a, b)
        target_bias = layer.lora_B[adapter_name].bias if adapter_name in layer.lora_B else None
        if target_bias is not None:
            bias = biases[position] if biases is not None else new_b.new_zeros(target_bias.shape)
            layer.lora_B[adapter_name].bias = parameter_like(target_bias, bias.to(source_dtype))


def _write_zeros(layer: LoraLayer, adapter_name: str) -> None:
    """Zero the factors (and LoRA bias) of `adapter_name` in `layer`: a layer no member of its merge adapts."""
    set_factors(layer, adapter_name, *(torch.zeros_like(t) for t in lora_factors(layer, adapter_name)))
    if adapter_name in layer.lora_B and layer.lora_B[adapter_name].bias is not None:
        layer.lora_B[adapter_name].bias = parameter_like(
            layer.lora_B[adapter_name].bias, torch.zeros_like(layer.lora_B[adapter_name].bias)
        )


def merged_lora_config(
    configs: Sequence[LoraConfig], rank: int, target_modules: Sequence[str] | None = None
) -> LoraConfig:
    """The `LoraConfig` of an update-space merge of adapters with these configs: an ordinary LoRA of rank `rank` and
    scaling 1 (`lora_alpha = rank`, no rslora, no rank or alpha pattern), with a LoRA bias if any member has one,
    on `target_modules` (the union of the members' modules, `lora.union_target_modules`; defaults to the first
    member's). Initialised like a fresh LoRA (never PiSSA / LoftQ, which would change the base weights); the merge
    then writes every factor."""
    extra = {} if target_modules is None else {"target_modules": list(target_modules), "layers_to_transform": None}
    return dataclasses.replace(
        configs[0],
        **extra,
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        lora_bias=any(config.lora_bias for config in configs),
        init_lora_weights=True,
        inference_mode=configs[0].inference_mode,
    )
