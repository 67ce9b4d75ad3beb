"""Reading LoRA adapters out of a `PeftModel`: layers, factors, ranks, the checks before any merge, digests.

Owns every read of LoRA weights and every check that an adapter can be merged (PEFT variants that merge wrongly,
different target modules, unequal ranks, names PEFT would mishandle). It never changes the model. May import
`peft_d2c.config` and `peft_d2c.errors` only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import PeftType

from ...combination_types import DATA_TYPES, EQUAL_RANK_TYPES, SVD_TYPES, UPDATE_TYPES
from ...errors import D2CWarning, UnsupportedAdapterError
from ...names import check_adapter_name

logger = logging.getLogger(__name__)

# LoraConfig features whose merges PEFT gets silently wrong (peft issue 3761) or drops.
UNMERGEABLE_FLAGS = {
    "use_dora": "DoRA",
    "use_rslora": "rank-stabilised LoRA (rslora)",
    "lora_bias": "a LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "modules_to_save": "modules_to_save (full copies of modules are not merged)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication",
}
# Flags the update-space types (`combination_types.UPDATE_TYPES`) merge exactly: each update with its own scaling, the bias folded.
EXACT_IN_UPDATE_SPACE = ("use_rslora", "lora_bias")


def lora_layers(peft_model: PeftModel) -> Iterator[tuple[str, LoraLayer]]:
    """Yield `(module name, layer)` for every LoRA layer of the model."""
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_factors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The `(A, B)` weights of `adapter_name` in one LoRA layer (linear/conv or embedding), or `None` if it does not
    adapt this layer."""
    if adapter_name in layer.lora_A:
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if adapter_name in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    return None


def check_peft_model(model: object) -> None:
    """Refuse anything but a `PeftModel` with LoRA adapters whose layers are not merged into the base weights."""
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"`peft_model` must be a peft.PeftModel with LoRA adapters loaded, got {type(model).__name__}. "
            "Wrap the base model with `PeftModel.from_pretrained(base, adapter_dir, adapter_name=...)`."
        )
    if not isinstance(model.base_model, LoraModel):
        raise UnsupportedAdapterError(
            f"peft-d2c merges LoRA adapters; this PeftModel holds {type(model.base_model).__name__} adapters."
        )
    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError("Some adapters are merged into the base weights; call `peft_model.unmerge_adapter()` first.")


def adapter_modules(peft_model: PeftModel, adapter_name: str) -> set[str]:
    """Names of the modules that `adapter_name` adapts."""
    return {
        name
        for name, layer in lora_layers(peft_model)
        if adapter_name in layer.lora_A or adapter_name in layer.lora_embedding_A
    }


def union_target_modules(peft_model: PeftModel, adapter_names: Sequence[str]) -> list[str]:
    """`target_modules` for a merged adapter that adapts exactly the modules any of `adapter_names` adapts.

    The short form (module name suffixes such as `["q_proj", "v_proj"]`, as users write them) when those suffixes
    select exactly that union in the base model; otherwise every module's full name (adapters restricted to some
    layers, say), which PEFT matches exactly as well.
    """
    prefix = "base_model.model."
    modules = {  # one walk over the model's modules (a walk per adapter costs seconds with dozens loaded)
        name.removeprefix(prefix)
        for name, layer in lora_layers(peft_model)
        if any(lora_factors(layer, n) is not None for n in adapter_names)
    }
    suffixes = {name.rsplit(".", 1)[-1] for name in modules}
    selected = {
        name for name, _ in peft_model.base_model.model.named_modules() if name and name.rsplit(".", 1)[-1] in suffixes
    }
    return sorted(suffixes) if selected == modules else sorted(modules)


def adapter_rank(peft_model: PeftModel, adapter_name: str) -> int:
    """The largest rank of `adapter_name` (its `r`, or the maximum of its `rank_pattern`)."""
    config = peft_model.peft_config[adapter_name]
    return max([config.r, *config.rank_pattern.values()]) if config.rank_pattern else config.r


def check_source_adapters(peft_model: PeftModel, adapter_names: Sequence[str], combination_type: str) -> None:
    """Check that PEFT can merge `adapter_names` faithfully with `combination_type`, before any work.

    Raises:
        ValueError: If an adapter does not exist, adapters adapt different modules under one of PEFT's own
            combination types (the update-space types merge any mix), or ranks differ where the combination type needs
            equal ranks.
        UnsupportedAdapterError: If an adapter is not a plain LoRA (DoRA, rslora, lora_bias and other variants are
            merged wrongly by PEFT, peft issue 3761). rslora and lora_bias pass for the update-space types
            (`combination_types.UPDATE_TYPES`), which apply their scaling exactly; DoRA never does. Also if an adapter
            adapts an embedding (`embed_tokens`) under a data-aware type (`combination_types.DATA_TYPES`), whose
            layer inputs would be token ids there.
    """
    for name in adapter_names:
        if name not in peft_model.peft_config:
            raise ValueError(f"Adapter {name!r} is not loaded in the model; loaded: {sorted(peft_model.peft_config)}.")
        config = peft_model.peft_config[name]
        if config.peft_type != PeftType.LORA:
            raise UnsupportedAdapterError(f"Adapter {name!r} is a {config.peft_type} adapter; only LoRA is supported.")
        for flag, feature in UNMERGEABLE_FLAGS.items():
            if combination_type in UPDATE_TYPES and flag in EXACT_IN_UPDATE_SPACE:
                continue
            if getattr(config, flag, None):
                hint = (
                    f" or one of {list(UPDATE_TYPES)} as `combination_type`" if flag in EXACT_IN_UPDATE_SPACE else ""
                )
                raise UnsupportedAdapterError(
                    f"Adapter {name!r} uses {feature}; PEFT cannot merge it faithfully (peft issue 3761). "
                    f"Use plain LoRA adapters{hint}."
                )
    if combination_type not in (*SVD_TYPES, *UPDATE_TYPES):
        for name in adapter_names:
            if peft_model.peft_config[name].rank_pattern:
                # PEFT sizes the merged adapter from each config's `r`: a module with another rank gets the wrong
                # shape (`cat`) or is combined with factors of another rank (`ties`, `linear`, ...).
                raise UnsupportedAdapterError(
                    f"Adapter {name!r} has a `rank_pattern` (ranks per module); PEFT's {combination_type!r} merge "
                    "assumes one rank per adapter. Use an `*svd` combination type, which merges every module's full "
                    "update."
                )
    for module_name, layer in lora_layers(peft_model):
        for name in adapter_names:
            if name in getattr(layer, "lora_variant", {}):
                variant = type(layer.lora_variant[name]).__name__
                raise UnsupportedAdapterError(
                    f"Adapter {name!r} uses the LoRA variant {variant} (module {module_name!r}); PEFT cannot merge it "
                    "faithfully (peft issue 3761). Use plain LoRA adapters."
                )
    if combination_type in DATA_TYPES:
        for module_name, layer in lora_layers(peft_model):
            embedded = [name for name in adapter_names if name in layer.lora_embedding_A]
            if embedded:
                # RegMean weighs each member by the Gram of the layer's inputs; an embedding's inputs are token ids
                # (the hooks that collect them would fail half-way through a run): refuse before any work.
                raise UnsupportedAdapterError(
                    f"Adapters {embedded} adapt the embedding {module_name.removeprefix('base_model.model.')!r} "
                    f"(e.g. `embed_tokens` in `target_modules`), which combination_type={combination_type!r} cannot "
                    f"merge: it weighs every module by its layer inputs, token ids there. Use another "
                    f"`combination_type`: one of {[t for t in UPDATE_TYPES if t not in DATA_TYPES]}, or a PEFT type "
                    "such as 'ties' or 'cat' (equal target modules); or train the adapters without embed_tokens."
                )
    # An update-space merge is defined on any mix of target modules (a member that does not adapt a module adds a
    # zero update there; the merged adapter adapts the union); PEFT's own types are only checked on equal targets.
    reference = adapter_modules(peft_model, adapter_names[0])
    for name in adapter_names[1:] if combination_type not in UPDATE_TYPES else ():
        modules = adapter_modules(peft_model, name)
        if modules != reference:
            different = sorted(modules ^ reference)[:3]
            raise ValueError(
                f"Adapters {adapter_names[0]!r} and {name!r} adapt different modules (e.g. {different}); PEFT's "
                f"{combination_type!r} merge is checked only on adapters with the same target modules. Use one of "
                f"{list(UPDATE_TYPES)} as `combination_type`: those merge any mix of target modules (the merged "
                "adapter adapts their union)."
            )
    if combination_type in EQUAL_RANK_TYPES:
        ranks = {name: adapter_rank(peft_model, name) for name in adapter_names}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; use "
                "`cat` or an `*svd` combination type instead."
            )


def reserved_adapter_names(peft_model: torch.nn.Module) -> set[str]:
    """Names an adapter cannot take in this model: attributes of `nn.ModuleDict`, of PEFT's model classes and of
    the model itself (an adapter named `train` would shadow `nn.Module.train`), and its child modules."""
    names = set(dir(torch.nn.ModuleDict())) | set(dir(PeftModel)) | set(dir(LoraModel)) | set(dir(peft_model))
    return names | {name for name, _ in peft_model.named_children()}


def check_new_adapter_name(peft_model: PeftModel, name: str) -> None:
    """Refuse a name for a new adapter that PEFT would mishandle, before any merge (`names.check_adapter_name`
    with this model's loaded adapters and reserved attribute names).

    A `.` breaks `add_weighted_adapter` half-way, an existing name makes it silently do nothing, and a name that is
    an attribute of `nn.Module` (like `train`) cannot be a key of the LoRA `ModuleDict`s.
    """
    check_adapter_name(name, taken=peft_model.peft_config, reserved=reserved_adapter_names(peft_model))


def to_float64(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float64 on its own device (bf16 / fp16 adapters included), or on the CPU for Apple's `mps`,
    which has no float64."""
    device = "cpu" if tensor.device.type == "mps" else tensor.device
    return tensor.detach().to(device=device, dtype=torch.float64)


def delta_gram_matrix(peft_model: PeftModel, adapter_names: Sequence[str]) -> np.ndarray:
    """Inner products <ΔW_i, ΔW_j> of the adapters' full updates ΔW = B·A·scaling, summed over modules.

    Each entry is computed from r x r products, tr((B_i^T B_j)(A_j A_i^T)), so no full update is ever built; the
    result feeds `search.loop.gram_embedding`, which recovers exact K-means features from it.
    """
    n = len(adapter_names)
    gram = np.zeros((n, n), dtype=np.float64)
    with torch.no_grad():
        for _, layer in lora_layers(peft_model):
            factors = []
            for name in adapter_names:
                pair = lora_factors(layer, name)
                if pair is None:
                    factors.append(None)
                    continue
                a, b = pair
                scaling = float(layer.scaling[name])
                factors.append((to_float64(a).flatten(1), to_float64(b).flatten(1), scaling))
            for i in range(n):
                if factors[i] is None:
                    continue
                a_i, b_i, s_i = factors[i]
                for j in range(i, n):
                    if factors[j] is None:
                        continue
                    a_j, b_j, s_j = factors[j]
                    value = s_i * s_j * torch.sum((b_i.T @ b_j) * (a_i @ a_j.T)).item()
                    gram[i, j] += value
                    if i != j:
                        gram[j, i] += value
    return gram


def adapter_digest(peft_model: PeftModel, adapter_names: Sequence[str]) -> str:
    """SHA-256 of the LoRA weights and scalings of `adapter_names` (checkpoints use it to spot changed adapters)."""
    digest = hashlib.sha256()
    layers = list(lora_layers(peft_model))
    for name in adapter_names:
        digest.update(f"adapter:{name}".encode())
        for module_name, layer in layers:
            tensors = lora_factors(layer, name)
            if tensors is None:
                continue
            digest.update(f"{module_name}:{float(layer.scaling[name])!r}".encode())
            for tensor in tensors:
                flat = tensor.detach().reshape(-1).cpu().contiguous()
                digest.update(str(flat.dtype).encode())
                digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_adapter_names(
    peft_model: PeftModel, examples: Mapping[str, object], adapter_names: Sequence[str] | None
) -> list[str]:
    """The adapters a run clusters: `adapter_names` checked against the model and the examples, or by default every
    loaded adapter that has examples (in load order).

    Raises:
        TypeError: If `adapter_names` is a single string.
        ValueError: If examples name an unknown adapter, an adapter is listed twice, unknown or without examples, or
            no adapter is left.
    """
    loaded = list(peft_model.peft_config)
    unknown = sorted(set(examples) - set(loaded))
    if unknown:
        raise ValueError(f"Examples were given for tasks with no loaded adapter: {unknown}; loaded: {loaded}.")
    if adapter_names is None:
        names = [n for n in loaded if n in examples]
        skipped = [n for n in loaded if n not in examples]
        if skipped:
            logger.info("Leaving out adapters without examples: %s", skipped)
    else:
        if isinstance(adapter_names, str):
            raise TypeError("`adapter_names` must be a list of adapter names, not a single string.")
        names = list(adapter_names)
        if len(set(names)) != len(names):
            raise ValueError(f"`adapter_names` lists an adapter twice: {names}.")
        not_loaded = [n for n in names if n not in loaded]
        if not_loaded:
            raise ValueError(f"Unknown adapters in `adapter_names`: {not_loaded}; loaded: {loaded}.")
        without = [n for n in names if n not in examples]
        if without:
            raise ValueError(
                f"Adapters without examples: {without}; every clustered adapter needs its task's examples."
            )
    if not names:
        raise ValueError(f"No adapter to cluster: none of the loaded adapters {loaded} has examples.")
    return names


def base_model_digest(peft_model: PeftModel) -> str:
    """A cheap digest of the base model's weights and dtypes (not the LoRA weights): for each parameter its name,
    dtype, shape, sum and sum of squares (in float64) and its first elements. Checkpoints use it to spot a resumed
    run on another base model or dtype."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in peft_model.get_base_model().named_parameters():
            if "lora_" in name:
                continue
            flat = param.detach().reshape(-1)
            head = flat[:8].double().cpu().tolist()
            stats = (flat.double().sum().item(), flat.double().square().sum().item())
            digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|{stats!r}|{head!r}".encode())
    return digest.hexdigest()


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("./", "../", "~")) or os.path.exists(value)


def _model_name(value: str) -> str:
    """The last component of a Hub id or a folder: what a local copy of a Hub model is usually named."""
    return os.path.basename(os.path.normpath(os.path.expanduser(value))).lower()


def check_base_models(peft_model: PeftModel, adapter_names: Sequence[str], *, allow_mixed: bool = False) -> None:
    """Refuse adapters trained on different base models (their `base_model_name_or_path`), before any work.

    Different Hub ids (e.g. a base model and its Instruct variant, which have the same shapes) or different local
    folders are refused; a local folder and a Hub id with the same model name (the folder is probably a download of
    that repo) only warn. Adapters that record no base model are not compared.

    Raises:
        ValueError: If two adapters name different base models and `allow_mixed` is `False`.
    """
    bases: dict[str, list[str]] = {}
    for name in adapter_names:
        base = peft_model.peft_config[name].base_model_name_or_path
        if base:
            key = os.path.realpath(os.path.expanduser(base)) if _is_local_path(base) else base
            bases.setdefault(key, []).append(name)
    if len(bases) < 2:
        return
    listing = "; ".join(f"{base!r}: {names}" for base, names in bases.items())
    local = [b for b in bases if _is_local_path(b)]
    hub = [b for b in bases if not _is_local_path(b)]
    same_model = len(hub) == 1 and len(local) == 1 and _model_name(hub[0]) == _model_name(local[0])
    if same_model or allow_mixed:
        warnings.warn(
            f"The adapters record different base models ({listing})"
            + (
                "; the local folder is taken to be a copy of the Hub model of the same name."
                if same_model and local
                else "; merging them anyway (`allow_mixed_base_models=True`)."
            ),
            D2CWarning,
            stacklevel=3,
        )
        return
    raise ValueError(
        f"The adapters were trained on different base models ({listing}); merging them would mix updates of "
        "different weights. Cluster adapters of one base model, or pass "
        "`D2CMergeConfig(allow_mixed_base_models=True)` if the bases really are the same weights."
    )
