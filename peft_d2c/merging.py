"""The only place that calls PEFT's merge (`add_weighted_adapter`) or reads LoRA weights.

It checks the source adapters before any work, picks merge weights per combination type, seeds every merge from
its members (so `dare_*` merges are reproducible and cacheable), keeps temporary merged adapters in a bounded LRU,
and computes the inner products of the adapters' full updates for the K-means baselines.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import PeftType
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, reshape_weight_task_tensors

from .config import EQUAL_RANK_TYPES, D2CMergeConfig
from .errors import UnsupportedAdapterError

logger = logging.getLogger(__name__)

Members = tuple[str, ...]

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
        for flag, feature in UNMERGEABLE_FLAGS.items():
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
                pair = lora_factors(layer, name)
                if pair is None:
                    factors.append(None)
                    continue
                a, b = pair
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


# Combination types whose merge draws random masks from torch's global generator while PEFT builds the adapter
# (its layers' initialisation consumes the same generator first): a refilled slot could not reproduce those masks,
# so these types always take a full PEFT merge.
_RANDOM_TYPES = ("dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
# Types that prune each member's A and B factors by magnitude on their own before combining them.
_PRUNED_TYPES = ("ties", "magnitude_prune")


class AdapterMerger:
    """Merges clusters of source adapters through PEFT and keeps a bounded LRU of temporary merged adapters.

    At most `config.merge_cache_size` temporary adapters ("slots") exist in the model at any time. An evicted
    cluster's slot stays in the model and is refilled in place with the next cluster's merge, using PEFT's own
    per-layer merge functions: the values are those `add_weighted_adapter` computes, without rebuilding every LoRA
    module (which dominates the cost of a merge on real models). For `ties` and `magnitude_prune`, each source
    adapter's magnitude-pruned factors are kept for the run (one extra copy of the source LoRA weights at most), since
    PEFT prunes every member on its own. `dare_*` merges, whose random masks depend on the module construction, and
    slots of another rank (`cat` of clusters of other sizes) use a full PEFT merge.

    Args:
        peft_model (`PeftModel`): The model holding the source adapters; merged adapters are added to it.
        config (`D2CMergeConfig`): Merge settings (combination type, density, weights, seed, name prefix).

    Attributes:
        num_merges (`int`): How many merges were run, full or refilled (for tests and benchmarks).
        num_refills (`int`): How many of them refilled an existing slot.
        merge_seconds (`float`): Wall time spent merging.
    """

    def __init__(self, peft_model: PeftModel, config: D2CMergeConfig) -> None:
        self.peft_model = peft_model
        self.config = config
        self.num_merges = 0
        self.num_refills = 0
        self.merge_seconds = 0.0
        self._live: OrderedDict[Members, str] = OrderedDict()
        self._free_slots: list[str] = []  # in the model, holding an evicted merge, ready to be refilled
        self._unused_names = [self.temporary_name(i) for i in reversed(range(config.merge_cache_size))]
        self._pinned: set[Members] = set()
        # The LoRA layers never change during a run (adapters only add entries inside them); walking every module of
        # the model for each refill would cost more than the merge arithmetic of a small adapter.
        self._layers = list(lora_layers(peft_model))
        # (layer index, adapter, "A" or "B") -> the factor pruned by magnitude (see `_pruned_factors`).
        self._prune_cache: dict[tuple[int, str, str], torch.Tensor] = {}
        lora_model = peft_model.base_model
        self._can_refill = config.combination_type not in _RANDOM_TYPES and all(
            hasattr(lora_model, attr)
            for attr in (
                "_generalized_task_arithmetic_weighted_adapter",
                "_svd_generalized_task_arithmetic_weighted_adapter",
            )
        )

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
        started = time.perf_counter()
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
        finally:
            self.merge_seconds += time.perf_counter() - started
        self.num_merges += 1
        return adapter_name

    def merged_rank(self, members: Sequence[str]) -> int:
        """Rank of the adapter PEFT creates for `members` (sum of ranks for `cat`, else the source or SVD rank)."""
        ranks = [adapter_rank(self.peft_model, m) for m in members]
        combination_type = "linear" if len(members) == 1 else self.config.combination_type
        if combination_type == "cat":
            return sum(ranks)
        if combination_type in _SVD_TYPES:
            return self.config.svd_rank or max(ranks)
        return ranks[0]

    def refill(self, members: Sequence[str], adapter_name: str) -> str:
        """Overwrite the weights of the existing merged adapter `adapter_name` with the merge of `members`.

        Runs the same per-layer computations as `add_weighted_adapter` (PEFT's own functions, with the same weights
        and settings), so the result equals a fresh merge of `members`; only the module construction is skipped.

        Raises:
            ValueError: If `adapter_name` has another rank than the merge of `members`, or uses a random type.
        """
        members = sorted(members)
        config = self.config
        if not self._can_refill:
            raise ValueError(f"combination_type={config.combination_type!r} merges cannot refill an adapter.")
        new_rank = self.merged_rank(members)
        if self.peft_model.peft_config[adapter_name].r != new_rank:
            raise ValueError(
                f"Adapter {adapter_name!r} has rank {self.peft_model.peft_config[adapter_name].r}, "
                f"the merge of {members} needs {new_rank}."
            )
        combination_type = "linear" if len(members) == 1 else config.combination_type  # PEFT's rule
        weights = merge_weights_for(config.combination_type, len(members), config.merge_weight)
        lora_model = self.peft_model.base_model
        started = time.perf_counter()
        with torch.no_grad():
            for layer_index, (_, layer) in enumerate(self._layers):
                target = lora_factors(layer, adapter_name)
                if target is None:
                    continue
                target_a, target_b = target
                if combination_type == "cat":
                    new_a, new_b = _cat_factors(layer, members, weights, target_a, target_b)
                elif combination_type in _SVD_TYPES:
                    new_a, new_b = lora_model._svd_generalized_task_arithmetic_weighted_adapter(
                        combination_type,
                        members,
                        weights,
                        new_rank,
                        layer,
                        target_a,
                        target_b,
                        config.density,
                        config.majority_sign_method,
                    )
                elif combination_type in _PRUNED_TYPES and config.density < 1:
                    new_a, new_b = self._pruned_factors(layer_index, layer, members, weights)
                else:
                    new_a, new_b = lora_model._generalized_task_arithmetic_weighted_adapter(
                        combination_type, members, weights, layer, config.density, config.majority_sign_method
                    )
                target_a.data, target_b.data = new_a, new_b
        self.merge_seconds += time.perf_counter() - started
        self.num_merges += 1
        self.num_refills += 1
        return adapter_name

    def _pruned_factors(self, layer_index: int, layer: LoraLayer, members: Sequence[str], weights: Sequence[float]):
        """`ties` / `magnitude_prune` of one layer's A and B factors, as PEFT computes them, with pruning memoised.

        PEFT prunes every member's factor on its own (top-k magnitudes) before combining them, so an adapter's
        pruned factors are the same in every cluster it joins: they are computed once per run and reused. The
        remaining steps are PEFT's `merge_utils` functions, applied exactly as `ties` / `magnitude_prune` apply them.
        """
        factors_a, factors_b, weights_a, weights_b = [], [], [], []
        for adapter, weight in zip(members, weights, strict=True):
            if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
                continue
            scaled = weight * layer.scaling[adapter]
            sign = 1 if scaled >= 0 else -1
            weights_a.append(math.sqrt(abs(scaled)) * sign)  # the sign goes on one factor only, as in PEFT
            weights_b.append(math.sqrt(abs(scaled)))
            factors_a.append(self._pruned(layer_index, layer, adapter, "A"))
            factors_b.append(self._pruned(layer_index, layer, adapter, "B"))
        dtype = factors_a[0].dtype
        merged = []
        for factors, factor_weights in ((factors_a, weights_a), (factors_b, weights_b)):
            stacked = torch.stack(factors, dim=0)
            weighted = stacked * reshape_weight_task_tensors(stacked, torch.tensor(factor_weights).to(stacked.device))
            if self.config.combination_type == "ties":
                sign_mask = calculate_majority_sign_mask(stacked, method=self.config.majority_sign_method)
                merged.append(disjoint_merge(weighted, sign_mask).to(dtype))
            else:
                merged.append(weighted.sum(dim=0).to(dtype))
        return merged[0], merged[1]

    def _pruned(self, layer_index: int, layer: LoraLayer, adapter: str, factor: str) -> torch.Tensor:
        key = (layer_index, adapter, factor)
        if key not in self._prune_cache:
            if adapter in layer.lora_A:
                tensor = (layer.lora_A if factor == "A" else layer.lora_B)[adapter].weight.data
            else:
                tensor = (layer.lora_embedding_A if factor == "A" else layer.lora_embedding_B)[adapter].data
            self._prune_cache[key] = prune(tensor, self.config.density, method="magnitude")
        return self._prune_cache[key]

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
        if len(self._live) >= self.config.merge_cache_size:
            evictable = next((k for k in self._live if k not in self._pinned), None)
            if evictable is None:
                raise RuntimeError(
                    f"`merge_cache_size`={self.config.merge_cache_size} is too small for one scoring batch; raise it."
                )
            self._free_slots.append(self._live.pop(evictable))
        name = self._take_slot(key)
        if name is None:
            if not self._unused_names:  # every slot is in the model: drop a free one of the wrong kind
                self._delete_slot(self._free_slots.pop(0))
            name = self._unused_names.pop()
            try:
                self.merge(key, name)
            except BaseException:
                self._unused_names.append(name)
                raise
        self._live[key] = name
        return name

    def _take_slot(self, key: Members) -> str | None:
        """Refill a free slot of the right rank with the merge of `key`, or return None if there is none."""
        if not self._can_refill or not self._free_slots:
            return None
        rank = self.merged_rank(key)
        for index, name in enumerate(self._free_slots):
            if self.peft_model.peft_config[name].r == rank:
                del self._free_slots[index]
                try:
                    return self.refill(key, name)
                except BaseException:
                    self._delete_slot(name)  # half-refilled: never serve it
                    raise
        return None

    def pin(self, keys: Sequence[Members]) -> None:
        """Protect these clusters' adapters from eviction until `unpin` (they are scored in one batch)."""
        self._pinned = {tuple(sorted(k)) for k in keys}

    def unpin(self) -> None:
        self._pinned = set()

    @property
    def num_live(self) -> int:
        """Number of temporary merged adapters currently in the model (live merges and free slots)."""
        return len(self._live) + len(self._free_slots)

    def _delete_slot(self, name: str) -> None:
        self.peft_model.delete_adapter(name)
        self._unused_names.append(name)

    def cleanup(self) -> None:
        """Delete every temporary merged adapter from the model."""
        for name in [*self._live.values(), *self._free_slots]:
            self._delete_slot(name)
        self._live.clear()
        self._free_slots.clear()
        self._prune_cache.clear()


def _cat_factors(layer: LoraLayer, members: Sequence[str], weights: Sequence[float], target_a, target_b):
    """The `cat` merge of one layer, as `add_weighted_adapter` computes it: stacked weighted A's, stacked B's."""
    loras_a, loras_b = [], []
    for adapter, weight in zip(members, weights, strict=True):
        lora_a, lora_b = lora_factors(layer, adapter)
        loras_a.append(lora_a.data * weight * layer.scaling[adapter])
        loras_b.append(lora_b.data)
    new_a, new_b = torch.zeros_like(target_a.data), torch.zeros_like(target_b.data)
    stacked_a, stacked_b = torch.cat(loras_a, dim=0), torch.cat(loras_b, dim=1)
    new_a[: stacked_a.shape[0], :] = stacked_a
    new_b[:, : stacked_b.shape[1]] = stacked_b
    return new_a, new_b
