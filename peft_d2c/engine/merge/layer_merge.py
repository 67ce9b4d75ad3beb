"""The merge arithmetic of one LoRA layer, and the one seam to PEFT's private merge helpers.

`add_weighted_adapter` computes each layer of a merged adapter with two private methods of `LoraModel`
(`_generalized_task_arithmetic_weighted_adapter` for the factor-space types, `_svd_generalized_..._adapter` for the
`*svd` types). Refilling a temporary merged adapter in place needs the same numbers without rebuilding the modules,
so `peft_merge_layer` calls those helpers, and nothing else in peft-d2c does. Private methods can change meaning
between releases (PEFT 0.21 stopped applying the LoRA scaling twice in the SVD helper), so `peft_helpers_verified`
checks them once per process on a tiny merge against the closed-form update ΔW = Σ w_i·s_i·B_i·A_i computed here
from the raw factors. When they disagree, peft-d2c warns (`D2CWarning`) and uses `own_merge_layer`, which
computes every combination type from PEFT's public `merge_utils` functions as the PEFT documentation describes.
The update-space types write their layers through `update_layers`. May import `peft_d2c.config`,
`peft_d2c.errors` and the merge module `lora` (which reads the factors) only.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence

import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties

from ...combination_types import SVD_TYPES
from ...errors import D2CWarning
from .lora import lora_factors

logger = logging.getLogger(__name__)

FACTOR_SPACE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _combine(combination_type: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign: str):
    """PEFT's public `merge_utils` function for one combination type (the `_svd` suffix dropped)."""
    kind = combination_type.removesuffix("_svd")
    if kind in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if kind == "ties":
        return ties(tensors, weights, density, sign)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, sign)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"No per-layer merge for combination_type={combination_type!r}.")


def parameter_like(old: torch.nn.Parameter, value: torch.Tensor) -> torch.nn.Parameter:
    """A new parameter holding `value` (its device and dtype), trainable like `old`."""
    return torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)


def set_factors(layer: LoraLayer, adapter: str, new_a: torch.Tensor, new_b: torch.Tensor) -> None:
    """Make `(new_a, new_b)` the factors of `adapter` in `layer`, with their device and dtype.

    New parameters rather than `.data =`: PEFT creates a new adapter on a `meta` base layer on the CPU, and a
    parameter cannot take data of another device."""
    if adapter in layer.lora_A:
        layer.lora_A[adapter].weight = parameter_like(layer.lora_A[adapter].weight, new_a)
        layer.lora_B[adapter].weight = parameter_like(layer.lora_B[adapter].weight, new_b)
    else:
        layer.lora_embedding_A[adapter] = parameter_like(layer.lora_embedding_A[adapter], new_a)
        layer.lora_embedding_B[adapter] = parameter_like(layer.lora_embedding_B[adapter], new_b)


@torch.no_grad()  # it reads the adapters' parameters themselves: no autograd graph
def own_merge_layer(
    combination_type: str,
    members: Sequence[str],
    weights: Sequence[float],
    layer: LoraLayer,
    *,
    rank: int,
    density: float,
    majority_sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged `(A, B)` of one layer, computed by peft-d2c from the members' factors (PEFT's documented maths).

    Factor-space types combine A and B separately, each member scaled by √(w_i·s_i) (the sign on A only). The
    `*svd` types combine the full updates w_i·s_i·B_i·A_i and keep the top `rank` singular directions (A = V_r^T,
    B = U_r·S_r, for a merged adapter whose scaling is 1).

    Raises:
        NotImplementedError: For a convolutional LoRA layer (the language models D2C merges have none).
    """
    if isinstance(layer.get_base_layer(), torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Conv3d):
        raise NotImplementedError("peft-d2c's own merge does not handle convolutional LoRA layers.")
    present = [(m, w, f) for m, w in zip(members, weights, strict=True) if (f := lora_factors(layer, m)) is not None]
    if not present:
        raise ValueError(f"None of {list(members)} adapts this layer.")
    dtype = present[0][2][0].dtype
    if combination_type in SVD_TYPES:
        deltas = [(b.flatten(1) @ a.flatten(1)) * layer.scaling[m] for m, _, (a, b) in present]
        values = torch.tensor([w for _, w, _ in present], device=deltas[0].device)
        delta = _combine(combination_type, deltas, values, density, majority_sign_method)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        return vh[:rank, :].contiguous(), (u[:, :rank] @ torch.diag(s[:rank])).contiguous()
    weights_a, weights_b = [], []
    for adapter, weight, _ in present:
        scaled = weight * layer.scaling[adapter]
        weights_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))  # the sign on one factor only
        weights_b.append(math.sqrt(abs(scaled)))
    merged = []
    for index, factor_weights in ((0, weights_a), (1, weights_b)):
        tensors = [factors[index] for _, _, factors in present]
        values = torch.tensor(factor_weights, device=tensors[0].device)
        merged.append(_combine(combination_type, tensors, values, density, majority_sign_method).to(dtype))
    return merged[0], merged[1]


def peft_merge_layer(
    lora_model: LoraModel,
    combination_type: str,
    members: Sequence[str],
    weights: Sequence[float],
    layer: LoraLayer,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    *,
    rank: int,
    density: float,
    majority_sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged `(A, B)` of one layer as `add_weighted_adapter` computes it: the only call of PEFT's private merge
    helpers in peft-d2c. Check `peft_helpers_verified()` before trusting it."""
    if combination_type in SVD_TYPES:
        return lora_model._svd_generalized_task_arithmetic_weighted_adapter(
            combination_type,
            list(members),
            list(weights),
            rank,
            layer,
            target_a,
            target_b,
            density,
            majority_sign_method,
        )
    return lora_model._generalized_task_arithmetic_weighted_adapter(
        combination_type, list(members), list(weights), layer, density, majority_sign_method
    )


class _TinyLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(7, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _helper_errors() -> dict[str, float]:
    """Relative error of PEFT's helpers against the closed form on a tiny two-adapter merge, per helper."""
    generator = torch.Generator().manual_seed(0)
    configs = {"one": (2, 6.0), "two": (3, 2.0)}  # (r, lora_alpha): scalings 3 and 2/3, so a doubled scaling shows
    model = None
    for name, (r, alpha) in configs.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(_TinyLinear(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    layer = model.base_model.model.proj
    factors = {}
    with torch.no_grad():
        for name, (r, _) in configs.items():
            layer.lora_A[name].weight.copy_(torch.randn(r, 7, generator=generator, dtype=torch.float64).float())
            layer.lora_B[name].weight.copy_(torch.randn(5, r, generator=generator, dtype=torch.float64).float())
            factors[name] = (layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double())
    weights = [0.7, 0.4]
    scalings = [alpha / r for r, alpha in configs.values()]
    (a_a, b_a), (a_b, b_b) = factors["one"], factors["two"]
    # svd: the exact weighted sum of the full updates (total rank 5 = the merged rank: no truncation error).
    expected_svd = weights[0] * scalings[0] * b_a @ a_a + weights[1] * scalings[1] * b_b @ a_b
    # linear needs equal ranks: merge "one" with itself, factors combined separately with √(w·s) each.
    c = [math.sqrt(w * scalings[0]) for w in weights]
    expected_linear = ((c[0] + c[1]) * b_a) @ ((c[0] + c[1]) * a_a)
    errors = {}
    lora_model = model.base_model
    for kind, members, rank, expected in (
        ("svd", ["one", "two"], 5, expected_svd),
        ("linear", ["one", "one"], 2, expected_linear),
    ):
        target_a = torch.zeros(rank, 7)
        target_b = torch.zeros(5, rank)
        with torch.no_grad():
            new_a, new_b = peft_merge_layer(
                lora_model,
                kind,
                members,
                weights,
                layer,
                target_a,
                target_b,
                rank=rank,
                density=1.0,
                majority_sign_method="total",
            )
        # PEFT gives every merged adapter lora_alpha = r, scaling 1: its update is B·A.
        actual = new_b.double() @ new_a.double()
        errors[kind] = float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))
    return errors


@functools.cache
def peft_helpers_verified() -> bool:
    """Whether PEFT's private merge helpers compute the documented update (checked once per process, ~10 ms).

    Returns `False`, with a `D2CWarning`, when they do not exist any more or disagree with the closed form; callers
    then merge with `own_merge_layer`.
    """
    missing = [
        name
        for name in (
            "_generalized_task_arithmetic_weighted_adapter",
            "_svd_generalized_task_arithmetic_weighted_adapter",
        )
        if not hasattr(LoraModel, name)
    ]
    if missing:
        problem = f"has no {missing}"
    else:
        try:
            with torch.random.fork_rng(devices=[]):
                errors = _helper_errors()
        except Exception as error:  # any failure of a private API means: do not rely on it
            errors = {"error": math.inf}
            logger.info("Checking PEFT's merge helpers failed: %s: %s", type(error).__name__, error)
        wrong = {kind: err for kind, err in errors.items() if not err < 1e-5}
        if not wrong:
            return True
        problem = f"computes another update than ΔW = Σ w_i·s_i·B_i·A_i (relative errors {wrong})"
    warnings.warn(
        f"PEFT {peft.__version__}'s private merge helper {problem}; peft-d2c merges every layer with its own "
        "implementation instead (same maths, slower refills). Please report this to peft-d2c.",
        D2CWarning,
        stacklevel=2,
    )
    return False
