"""The only place that calls PEFT's merge (`add_weighted_adapter`) or reads LoRA weights.

It checks the source adapters before any work, picks merge weights per combination type, seeds every merge from
its members (so `dare_*` merges are reproducible and cacheable), keeps temporary merged adapters in a bounded LRU,
and computes the inner products of the adapters' full updates for the K-means baselines.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import PeftType

from .config import EQUAL_RANK_TYPES, D2CMergeConfig
from .errors import UnsupportedAdapterError

logger = logging.getLogger(__name__)

Members = tuple[str, ...]

# LoraConfig features whose merges PEFT gets silently wrong (peft issue 3761) or drops.
_UNMERGEABLE_FLAGS = {
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


def merge_weights_for(combination_type: str, cluster_size: int, override: float | None = None) -> list[float]:
    """Weights for `add_weighted_adapter` such that merging k identical copies of an adapter gives that adapter.

    PEFT treats the weights differently per combination type (`peft/tuners/lora/model.py`):
    - `cat`, `svd`, `dare_linear_svd`, `magnitude_prune_svd` sum w_i·ΔW_i: w_i = 1/k is the mean update.
    - `ties`, `ties_svd`, `dare_ties`, `dare_ties_svd` take a disjoint mean after pruning: w_i = 1.
    - `linear`, `dare_linear`, `magnitude_prune` sum √w_i·A_i and √w_i·B_i separately: w_i = 1/k² gives
      mean(B)·mean(A), which is exact for identical copies (w_i = 1/k would give k·ΔW).

    A single-member cluster always gets weight 1 (PEFT then copies the adapter), unless `override` is given.

    Args:
        combination_type (`str`): A PEFT combination type.
        cluster_size (`int`): k, the number of merged adapters.
        override (`float`, *optional*): Use this weight for every member instead.

    Returns:
        `list[float]`: one weight per member.

    Example:
        ```python
        >>> merge_weights_for("cat", 4)
        [0.25, 0.25, 0.25, 0.25]
        >>> merge_weights_for("linear", 2)
        [0.25, 0.25]
        ```
    """
    if override is not None:
        return [float(override)] * cluster_size
    if cluster_size == 1 or combination_type in ("ties", "ties_svd", "dare_ties", "dare_ties_svd"):
        return [1.0] * cluster_size
    if combination_type in ("linear", "dare_linear", "magnitude_prune"):
        return [1.0 / cluster_size**2] * cluster_size
    return [1.0 / cluster_size] * cluster_size


def merge_seed(seed: int, members: Sequence[str]) -> int:
    """Seed of the merge of `members`: stable across processes and Python runs (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}|{'|'.join(sorted(members))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def lora_layers(peft_model: PeftModel) -> Iterator[tuple[str, LoraLayer]]:
    """Yield `(module name, layer)` for every LoRA layer of the model."""
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


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


def adapter_rank(peft_model: PeftModel, adapter_name: str) -> int:
    """The largest rank of `adapter_name` (its `r`, or the maximum of its `rank_pattern`)."""
    config = peft_model.peft_config[adapter_name]
    return max([config.r, *config.rank_pattern.values()]) if config.rank_pattern else config.r


def check_source_adapters(peft_model: PeftModel, adapter_names: Sequence[str], combination_type: str) -> None:
    """Check that PEFT can merge `adapter_names` faithfully with `combination_type`, before any work.

    Raises:
        ValueError: If an adapter does not exist, adapters adapt different modules, or ranks differ where the
            combination type needs equal ranks.
        UnsupportedAdapterError: If an adapter is not a plain LoRA (DoRA, rslora, lora_bias and other variants are
            merged wrongly by PEFT, peft issue 3761).
    """
    for name in adapter_names:
        if name not in peft_model.peft_config:
            raise ValueError(f"Adapter {name!r} is not loaded in the model; loaded: {sorted(peft_model.peft_config)}.")
        config = peft_model.peft_config[name]
        if config.peft_type != PeftType.LORA:
            raise UnsupportedAdapterError(f"Adapter {name!r} is a {config.peft_type} adapter; only LoRA is supported.")
        for flag, feature in _UNMERGEABLE_FLAGS.items():
            if getattr(config, flag, None):
                raise UnsupportedAdapterError(
                    f"Adapter {name!r} uses {feature}; PEFT cannot merge it faithfully (peft issue 3761). "
                    "Use plain LoRA adapters."
                )
    for module_name, layer in lora_layers(peft_model):
        for name in adapter_names:
            if name in getattr(layer, "lora_variant", {}):
                variant = type(layer.lora_variant[name]).__name__
                raise UnsupportedAdapterError(
                    f"Adapter {name!r} uses the LoRA variant {variant} (module {module_name!r}); PEFT cannot merge it "
                    "faithfully (peft issue 3761). Use plain LoRA adapters."
                )
    reference = adapter_modules(peft_model, adapter_names[0])
    for name in adapter_names[1:]:
        modules = adapter_modules(peft_model, name)
        if modules != reference:
            different = sorted(modules ^ reference)[:3]
            raise ValueError(
                f"Adapters {adapter_names[0]!r} and {name!r} adapt different modules (e.g. {different}); D2C merges "
                "adapters trained on the same target modules."
            )
    if combination_type in EQUAL_RANK_TYPES:
        ranks = {name: adapter_rank(peft_model, name) for name in adapter_names}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; use "
                "`cat` or an `*svd` combination type instead."
            )


def check_new_adapter_name(peft_model: PeftModel, name: str) -> None:
    """Refuse an adapter name that PEFT would mishandle, before any merge.

    A `.` breaks `add_weighted_adapter` half-way, an existing name makes it silently do nothing, and a name that is
    an attribute of `nn.Module` (like `train`) cannot be a key of the LoRA `ModuleDict`s.
    """
    if "." in name:
        raise ValueError(f"Adapter name {name!r} contains a '.', which PEFT cannot handle.")
    if name in peft_model.peft_config:
        raise ValueError(
            f"An adapter named {name!r} already exists in the model; choose another `merged_adapter_prefix` or "
            "delete it first."
        )
    if hasattr(torch.nn.ModuleDict(), name) or hasattr(peft_model, name):
        raise ValueError(f"Adapter name {name!r} clashes with a model attribute; choose another name.")


def delta_gram_matrix(peft_model: PeftModel, adapter_names: Sequence[str]) -> np.ndarray:
    """Inner products <ΔW_i, ΔW_j> of the adapters' full updates ΔW = B·A·scaling, summed over modules.

    Each entry is computed from r x r products, tr((B_i^T B_j)(A_j A_i^T)), so no full update is ever built; the
    result feeds `search.gram_embedding`, which recovers exact K-means features from it.
    """
    n = len(adapter_names)
    gram = np.zeros((n, n), dtype=np.float64)
    with torch.no_grad():
        for _, layer in lora_layers(peft_model):
            factors = []
            for name in adapter_names:
                if name in layer.lora_A:
                    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                elif name in layer.lora_embedding_A:
                    a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
                else:
                    factors.append(None)
                    continue
                scaling = float(layer.scaling[name])
                factors.append((a.detach().double().flatten(1), b.detach().double().flatten(1), scaling))
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


class AdapterMerger:
    """Merges clusters of source adapters through PEFT and keeps a bounded LRU of temporary merged adapters.

    Args:
        peft_model (`PeftModel`): The model holding the source adapters; merged adapters are added to it.
        config (`D2CMergeConfig`): Merge settings (combination type, density, weights, seed, name prefix).

    Attributes:
        num_merges (`int`): How many PEFT merges were run (for tests and benchmarks).
    """

    def __init__(self, peft_model: PeftModel, config: D2CMergeConfig) -> None:
        self.peft_model = peft_model
        self.config = config
        self.num_merges = 0
        self._live: OrderedDict[Members, str] = OrderedDict()
        self._free_names: list[str] = []
        self._next_name = 0
        self._pinned: set[Members] = set()

    def temporary_name(self, index: int) -> str:
        return f"{self.config.merged_adapter_prefix}_tmp{index}"

    def check_names(self, final_names: Sequence[str]) -> None:
        """Validate every name this merger may create (temporary and final) before any merge."""
        for name in [*final_names, *(self.temporary_name(i) for i in range(self.config.merge_cache_size))]:
            check_new_adapter_name(self.peft_model, name)

    def merge(self, members: Sequence[str], adapter_name: str) -> str:
        """Merge `members` into a new adapter `adapter_name` with PEFT's `add_weighted_adapter`.

        The merge runs inside `torch.random.fork_rng()` seeded from (config seed, sorted members), so `dare_*`
        masks are the same every time the same cluster is merged, and torch's global generator is left untouched.
        """
        members = sorted(members)
        check_new_adapter_name(self.peft_model, adapter_name)
        config = self.config
        weights = merge_weights_for(config.combination_type, len(members), config.merge_weight)
        try:
            with torch.random.fork_rng():
                torch.manual_seed(merge_seed(config.seed, members))
                self.peft_model.add_weighted_adapter(
                    members,
                    weights,
                    adapter_name,
                    combination_type=config.combination_type,
                    svd_rank=config.svd_rank,
                    density=config.density,
                    majority_sign_method=config.majority_sign_method,
                )
        except BaseException:
            # A failed merge may leave its config registered; a retry with the same name would then do nothing.
            if adapter_name in self.peft_model.peft_config:
                self.peft_model.delete_adapter(adapter_name)
            raise
        self.num_merges += 1
        return adapter_name

    def adapter_for(self, members: Sequence[str]) -> str:
        """Name of a live adapter equal to the merge of `members`, merging (and evicting the oldest) when needed.

        A single member is served by the source adapter itself: PEFT's merge of one adapter copies it (to float
        precision), unless `merge_weight` rescales it.
        """
        key = tuple(sorted(members))
        if len(key) == 1 and self.config.merge_weight is None:
            return key[0]
        if key in self._live:
            self._live.move_to_end(key)
            return self._live[key]
        while len(self._live) >= self.config.merge_cache_size:
            evictable = next((k for k in self._live if k not in self._pinned), None)
            if evictable is None:
                raise RuntimeError(
                    f"`merge_cache_size`={self.config.merge_cache_size} is too small for one scoring batch; raise it."
                )
            self._delete(evictable)
        if self._free_names:
            name = self._free_names.pop()
        else:
            name = self.temporary_name(self._next_name)
            self._next_name += 1
        self._live[key] = self.merge(key, name)
        return name

    def pin(self, keys: Sequence[Members]) -> None:
        """Protect these clusters' adapters from eviction until `unpin` (they are scored in one batch)."""
        self._pinned = {tuple(sorted(k)) for k in keys}

    def unpin(self) -> None:
        self._pinned = set()

    @property
    def num_live(self) -> int:
        """Number of temporary merged adapters currently in the model."""
        return len(self._live)

    def _delete(self, key: Members) -> None:
        name = self._live.pop(key)
        self.peft_model.delete_adapter(name)
        self._free_names.append(name)

    def cleanup(self) -> None:
        """Delete every temporary merged adapter from the model."""
        for key in list(self._live):
            self._delete(key)
