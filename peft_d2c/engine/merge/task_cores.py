"""Per-task cores: each cluster's merged adapter becomes a shared low-rank basis, and every task of the cluster gets
its own small r x r core in that basis (`merge.task_cores`, issue 38 part 5).

In every module the members' updates ΔW_t = s_t·B_t·A_t (out x in) share a rank-r basis: U (out x r), the top left
singular vectors of the concatenation [ΔW_1 .. ΔW_k], and V (in x r), the top right singular vectors of the stack
[ΔW_1; ..; ΔW_k] (`merge_methods.concat_left_svd` / `stack_right_basis`: from the factors, never an out x in
matrix). Task t is served by U·C_t·V^T with C_t = U^T·ΔW_t·V, the closest update to ΔW_t (Frobenius) whose columns
and rows lie in the basis. The cluster's merged adapter is written in the same basis, as its own projection
U·(U^T·ΔW_merge·V)·V^T rotated to its singular vectors (B = U'·Σ, A = V'^T), so the K merged adapters remain
ordinary PEFT LoRAs of rank r and the cores are stored relative to their factors: task t's adapter is the plain LoRA
(B_merge·K_t, A_merge), K_t = Σ^-1·U'^T·ΔW_t·V'. A core costs r² numbers per module and task (float32), r / (in +
out) of a rank-r adapter: 0.4-1.0% per task at rank 8 on SmolLM2-135M's projections. A one-member cluster gets no
core. May import `merge_methods`, `lora`, `layer_merge` and `update_layers`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .layer_merge import parameter_like, set_factors
from .lora import check_new_adapter_name, lora_factors, lora_layers, to_float64
from .merge_methods import concat_left_svd, stack_right_basis, widest_dtype
from .update_layers import merged_biases

# Bytes of one stored core entry (cores are kept and saved in float32 whatever the adapters' dtype: they are small,
# and K_t = Σ^-1·C_t spans the merged adapter's whole range of singular values).
CORE_ELEMENT_BYTES = 4
# A merged direction whose singular value is below this share of the largest is stored at this share instead, so the
# basis direction survives in B (and in half precision) for the cores to use; the change to the merge is at most this
# share of its largest singular value in that direction.
SINGULAR_VALUE_FLOOR = 1e-3

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names

TaskCores = dict[str, dict[str, torch.Tensor]]  # task -> {LoRA module name: K_t (r x r, float32)}


def joint_basis(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` basis the updates B_i·A_i of `pairs` share: U (out x rank) and V (in x rank) with orthonormal
    columns, the top left singular vectors of [B_1·A_1 .. B_k·A_k] and the top right ones of their vertical stack;
    zero columns where the updates span fewer than `rank` directions."""
    u, _ = concat_left_svd(pairs)
    v, _ = stack_right_basis(pairs)
    return _columns(u, rank), _columns(v, rank)


def _columns(basis: torch.Tensor, rank: int) -> torch.Tensor:
    out = basis.new_zeros(basis.shape[0], rank)
    kept = min(rank, basis.shape[1])
    out[:, :kept] = basis[:, :kept]
    return out


def _scaled_pair(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s·B, A) of `adapter` in `layer` in float64, or None where it does not adapt the layer."""
    factors = lora_factors(layer, adapter)
    if factors is None:
        return None
    a, b = factors
    return layer.scaling[adapter] * to_float64(b), to_float64(a)


@torch.no_grad()
def fit_task_cores(peft_model: PeftModel, clusters: Sequence[Sequence[str]], merged_names: Sequence[str]) -> TaskCores:
    """Rewrite each merged adapter in its members' joint basis and return every member's core (module docstring).

    Args:
        peft_model (`PeftModel`): Holds the source adapters and the merged adapters (update-space merges, scaling
            1), which are rewritten in place; the source adapters are only read.
        clusters (`Sequence[Sequence[str]]`): Source adapter names per cluster.
        merged_names (`Sequence[str]`): The merged adapter of each cluster.

    A one-member cluster is left as it is, without a core: its merged adapter is its task's own update truncated to
    rank r, which is what the task's core in its own basis would give.

    Returns:
        `TaskCores`: per task of a cluster of two or more, per LoRA module the merged adapter adapts, K_t (r x r float32, on the device of the
        maths), so that the task's adapter is (B_merge·K_t, A_merge) with the merged adapter's scaling (zero where the
        task does not adapt the module).
    """
    cores: TaskCores = {task: {} for members in clusters if len(members) > 1 for task in members}
    for members, merged in zip(clusters, merged_names, strict=True):
        if len(members) == 1:  # the merge of one member is already its best rank-r update in its own basis
            continue
        for module, layer in lora_layers(peft_model):
            factors = lora_factors(layer, merged)
            if factors is None:
                continue
            a_m, b_m = factors
            rank = a_m.shape[0]
            pairs = {t: pair for t in members if (pair := _scaled_pair(layer, t)) is not None}
            u, v = joint_basis(list(pairs.values()), rank)
            scaled_b, merged_a = _scaled_pair(layer, merged)
            p, s, qh = torch.linalg.svd((u.T @ scaled_b) @ (merged_a @ v))  # the merge projected into the basis
            u, v = u @ p, v @ qh.T  # the same basis, rotated to the projected merge's singular vectors
            # tensors only, no `.item()`: the maths also runs on `meta`, where no value can be read
            s = torch.maximum(s, (SINGULAR_VALUE_FLOOR * s[:1]).clamp(min=torch.finfo(s.dtype).tiny))
            scaling = layer.scaling[merged]
            set_factors(layer, merged, v.T.to(a_m), (u * (s / scaling)).to(b_m))
            for t in members:
                core = u.new_zeros(rank, rank)
                if t in pairs:
                    b_t, a_t = pairs[t]
                    core = ((u.T @ b_t) @ (a_t @ v)) / s[:, None]
                cores[t][module] = core.float()
    return cores


@torch.no_grad()
def write_task_update(
    layers: Sequence,
    members: Sequence[str],
    task: str,
    adapter_name: str,
    rank: int,
    *,
    bias_type: str = "core_ta",
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> None:
    """Write into the existing adapter `adapter_name` the update that serves `task` in a cluster of `members`:
    U·C_t·V^T in every layer (A = V^T, B = U·C_t, for scaling 1), the update its task adapter (B_merge·K_t, A_merge)
    has once the cluster is merged and `fit_task_cores` has run; no merge needed, as the basis comes from the
    members' updates alone. Zero where `task` does not adapt a layer; the rank-`rank` factors are zero-padded to the
    adapter's own rank, and a LoRA bias is the merged adapter's, which the task adapter copies: merged as
    `update_layers` merges it (`merged_biases` of `bias_type`, `update_layers.bias_merge_type`, with `weights`,
    default: their mean, `density` and `majority_sign_method`). The D2C search scores these with `merge.task_cores`:
    the adapters that will serve the tasks.
    """
    weights = weights if weights is not None else [1 / len(members)] * len(members)
    weight_of = dict(zip(members, weights, strict=True))
    for layer in layers:
        target = lora_factors(layer, adapter_name)
        if target is None:
            continue
        pairs = {t: pair for t in members if (pair := _scaled_pair(layer, t)) is not None}
        new_a, new_b = (
            torch.zeros_like(target[0], dtype=torch.float64),
            torch.zeros_like(target[1], dtype=torch.float64),
        )
        if task in pairs:
            u, v = joint_basis(list(pairs.values()), rank)
            b_t, a_t = pairs[task]
            new_a[:rank] = v.T
            new_b[:, :rank] = u @ ((u.T @ b_t) @ (a_t @ v))
        # the merged adapter's dtype (its members' widest), which the task adapter has
        dtype = widest_dtype([t.dtype for m in pairs for t in lora_factors(layer, m)]) if pairs else target[0].dtype
        set_factors(layer, adapter_name, new_a.to(dtype), new_b.to(dtype))
        if adapter_name in layer.lora_B and layer.lora_B[adapter_name].bias is not None:
            target_bias = layer.lora_B[adapter_name].bias
            # the members that adapt the layer, as `update_layers` merges them
            present = [(t, weight_of[t], pair, layer.lora_B[t].bias) for t, pair in pairs.items()]
            biases = merged_biases(
                bias_type, [(layer, present)], new_b[None], torch.float64, density, majority_sign_method
            )
            bias = biases[0] if biases is not None else torch.zeros_like(target_bias)
            layer.lora_B[adapter_name].bias = parameter_like(target_bias, bias.to(dtype))


@torch.no_grad()
def add_task_adapter(peft_model: PeftModel, merged_name: str, cores: Mapping[str, torch.Tensor], name: str) -> str:
    """Add task adapter `name`: the plain PEFT LoRA (B_merge·K_t, A_merge) of `merged_name`'s config, rank and
    modules (its LoRA bias, if any, copied), from the task's `cores` (module -> K_t). Returns `name`.

    Raises:
        ValueError: If `name` is taken or not a valid adapter name, or `cores` misses a module the merged adapter
            adapts.
    """
    check_new_adapter_name(peft_model, name)
    modules = [(module, layer) for module, layer in lora_layers(peft_model) if lora_factors(layer, merged_name)]
    missing = [module for module, _ in modules if module not in cores]
    if missing:
        raise ValueError(f"The task cores for {merged_name!r} lack modules {missing[:3]}; they belong to another run.")
    peft_model.add_adapter(name, dataclasses.replace(peft_model.peft_config[merged_name], inference_mode=True))
    for module, layer in modules:
        a_m, b_m = lora_factors(layer, merged_name)
        core = cores[module].to(device=b_m.device, dtype=torch.float32)
        set_factors(layer, name, a_m.detach().clone(), (b_m.detach().float() @ core).to(b_m.dtype))
        if merged_name in layer.lora_B and layer.lora_B[merged_name].bias is not None:
            layer.lora_B[name].bias.data.copy_(layer.lora_B[merged_name].bias.data)
        for container in (layer.lora_dropout, layer.lora_A, layer.lora_B):  # PEFT builds them in training mode
            if name in container:
                container[name].train(layer.training)
    return name


def add_task_adapters(
    peft_model: PeftModel, cores: TaskCores, task_adapters: Mapping[str, str], routing: Mapping[str, str]
) -> None:
    """`add_task_adapter` for every task of `task_adapters` (task -> adapter name to create), from the merged
    adapter `routing` names for it and its cores.

    Raises:
        ValueError: If a task has no cores.
    """
    missing = sorted(set(task_adapters) - set(cores))
    if missing:
        raise ValueError(f"No task cores for tasks {missing}; the cores file is missing or of another run.")
    for task, name in task_adapters.items():
        add_task_adapter(peft_model, routing[task], cores[task], name)


def serving_routing(routing: Mapping[str, str], task_adapters: Mapping[str, str]) -> dict[str, str]:
    """Task -> the adapter that answers it: its own task adapter where it has one, else its cluster's merged adapter
    (`routing`)."""
    return {task: task_adapters.get(task, merged) for task, merged in routing.items()}


def core_bytes(ranks: Sequence[int]) -> int:
    """Bytes of one task's cores, for merged adapters of these ranks in its modules (one rank per module)."""
    return sum(rank * rank for rank in ranks) * CORE_ELEMENT_BYTES


def save_task_cores(cores: TaskCores, path: str) -> None:
    """Write `cores` to the safetensors file `path` (tensors `core_<i>`, their (task, module) in the metadata, so
    any task or module name is kept as it is)."""
    entries = [(task, module) for task in sorted(cores) for module in sorted(cores[task])]
    tensors = {f"core_{i}": cores[task][module].cpu().contiguous() for i, (task, module) in enumerate(entries)}
    save_file(tensors, path, metadata={"entries": json.dumps(entries)})


def load_task_cores(path: str) -> TaskCores:
    """Read the cores `save_task_cores` wrote."""
    with safe_open(path, framework="pt") as f:
        entries = json.loads(f.metadata()["entries"])
        cores: TaskCores = {}
        for i, (task, module) in enumerate(entries):
            cores.setdefault(task, {})[module] = f.get_tensor(f"core_{i}")
    return cores


def write_task_adapter(merged_folder: str, cores: Mapping[str, torch.Tensor], output_folder: str) -> None:
    """Write the task adapter of `cores` as a plain PEFT adapter folder, from the saved merged adapter it is built on
    (`merged_folder`: its `adapter_config.json` and `adapter_model.safetensors`), without loading a model: the same
    (B_merge·K_t, A_merge) as `add_task_adapter`, for servers that take one PEFT LoRA per request (vLLM) or per
    file (llama.cpp).

    Raises:
        ValueError: If `cores` misses a module the merged adapter adapts.
    """
    weights = load_file(os.path.join(merged_folder, ADAPTER_WEIGHTS))
    out = {}
    for key, tensor in weights.items():
        suffix = next((s for s in (".lora_B.weight", ".lora_embedding_B") if key.endswith(s)), None)
        if suffix is not None:  # PEFT saves a module's factors under its name in the model, the adapter name left out
            module = key.removesuffix(suffix)
            if module not in cores:
                raise ValueError(
                    f"The task cores lack module {module!r} of {merged_folder!r}; they are of another run."
                )
            tensor = (tensor.float() @ cores[module].float()).to(tensor.dtype)
        out[key] = tensor.contiguous()
    os.makedirs(output_folder, exist_ok=True)
    save_file(out, os.path.join(output_folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(os.path.join(merged_folder, ADAPTER_CONFIG), os.path.join(output_folder, ADAPTER_CONFIG))
