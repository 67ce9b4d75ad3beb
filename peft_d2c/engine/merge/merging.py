"""The merger: clusters of source adapters merged through PEFT, with a bounded LRU of temporary merged adapters.

Also the weights `add_weighted_adapter` needs per combination type and the seed of each cluster's merge. Merging k
identical copies of an adapter must give that adapter back, whatever the combination type; PEFT weighs members
differently per type, so the weights that achieve this differ too (`merge_weights_for`). Every merge is seeded from
its members (`merge_seed`), so random merges (`dare_*`) are reproducible and cacheable. The merger creates merged
adapters with PEFT's `add_weighted_adapter` and refills evicted ones in place with the same per-layer arithmetic
(`layer_merge`, `update_layers`). May import `peft_d2c.config`, `peft_d2c.combination_types` and the merge modules
`budget`, `layer_merge`, `lora`, `merge_methods`, `regmean`, `task_cores` and `update_layers`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, reshape_weight_task_tensors

from ...combination_types import DATA_TYPES, RANDOM_TYPES, UPDATE_TYPES
from ...config import D2CMergeConfig
from .budget import merged_rank_of
from .layer_merge import own_merge_layer, peft_helpers_verified, peft_merge_layer
from .lora import adapter_rank, check_new_adapter_name, lora_factors, lora_layers, union_target_modules
from .merge_methods import widest_dtype
from .regmean import layer_input_bytes
from .task_cores import write_task_update
from .update_layers import bias_merge_type, merged_lora_config, update_merge_into

logger = logging.getLogger(__name__)

Members = tuple[str, ...]
# A live merge: its members, the cross-fitting fold whose layer inputs it was fitted to (None: all examples'), and the
# task whose adapter in the cluster's joint basis it holds instead of the merge (`merge.task_cores`; None: the merge).
MergeKey = tuple[Members, int | None, str | None]


# Types whose members all get weight 1 (a disjoint mean after pruning, or TSV-M's sum of orthogonalised directions).
_WEIGHT_ONE_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd", "core_ties", "knots_ties", "tsv_m")


def merge_weights_for(combination_type: str, cluster_size: int, override: float | None = None) -> list[float]:
    """Weights for `add_weighted_adapter` such that merging k identical copies of an adapter gives that adapter.

    PEFT treats the weights differently per combination type (`peft/tuners/lora/model.py`):
    - `cat`, `svd`, `dare_linear_svd`, `magnitude_prune_svd` sum w_i·ΔW_i: w_i = 1/k is the mean update.
    - `ties`, `ties_svd`, `dare_ties`, `dare_ties_svd` take a disjoint mean after pruning: w_i = 1.
    - `linear`, `dare_linear`, `magnitude_prune` sum √w_i·A_i and √w_i·B_i separately: w_i = 1/k² gives
      mean(B)·mean(A), which is exact for identical copies (w_i = 1/k would give k·ΔW).
    - peft-d2c's update-space types (`peft_d2c.engine.merge.merge_methods`): `core_ta` sums w_i·ΔW_i (w_i = 1/k, the
      mean); `core_ties` and `knots_ties` take TIES' disjoint mean (w_i = 1); `tsv_m` sums its members'
      orthogonalised singular directions, each scaled by w_i (w_i = 1, as in TSV-M).

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
    if cluster_size == 1 or combination_type in _WEIGHT_ONE_TYPES:
        return [1.0] * cluster_size
    if combination_type in ("linear", "dare_linear", "magnitude_prune"):
        return [1.0 / cluster_size**2] * cluster_size
    return [1.0 / cluster_size] * cluster_size


def merge_seed(seed: int, members: Sequence[str]) -> int:
    """Seed of the merge of `members`: stable across processes and Python runs (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}|{'|'.join(sorted(members))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


# Types that prune each member's A and B factors by magnitude on their own before combining them.
_PRUNED_TYPES = ("ties", "magnitude_prune")


class AdapterMerger:
    """Merges clusters of source adapters through PEFT and keeps a bounded LRU of temporary merged adapters.

    At most `config.merge.cache_size` temporary adapters ("slots") exist in the model at any time. An evicted
    cluster's slot stays in the model and is refilled in place with the next cluster's merge, using PEFT's own
    per-layer merge functions: the values are those `add_weighted_adapter` computes, without rebuilding every LoRA
    module (which dominates the cost of a merge on real models). For `ties` and `magnitude_prune`, each source
    adapter's magnitude-pruned factors are kept for the run (one extra copy of the source LoRA weights at most), since
    PEFT prunes every member on its own. `dare_*` merges, whose random masks depend on the module construction, and
    slots of another rank (`cat` of clusters of other sizes) use a full PEFT merge. The update-space types
    (`combination_types.UPDATE_TYPES`) create a plain rank-r LoRA with PEFT's `add_adapter` and write its factors with
    `layer_merge.update_merge_into`, for full merges and refills alike; their slots hold any merge of at most their
    rank on a subset of their modules (zero-padded factors, zero layers elsewhere: the same outputs), so with
    `sources` every slot is made once, as wide as the merge of all sources, and never rebuilt (building a LoRA
    with PEFT walks every module of the model: 0.5 s on SmolLM2-135M with 40 adapters loaded, a quarter of a merge).

    Args:
        peft_model (`PeftModel`): The model holding the source adapters; merged adapters are added to it.
        config (`D2CMergeConfig`): Merge settings (combination type, density, weights, seed, name prefix).
        sources (`Sequence[str]`, *optional*): The adapters whose clusters will be merged. Update-space slots are then
            built for the merge of all of them (the highest merged rank, the union of their modules, a LoRA bias if
            any has one); without it each slot is built for the cluster it first holds.

    Attributes:
        num_merges (`int`): How many merges were run, full or refilled (for tests and benchmarks).
        num_refills (`int`): How many of them refilled an existing slot.
        merge_seconds (`float`): Wall time spent merging.
    """

    def __init__(self, peft_model: PeftModel, config: D2CMergeConfig, sources: Sequence[str] | None = None) -> None:
        self.peft_model = peft_model
        self.config = config
        # Update-space slots are padded (`_fits`): built once as wide as the merge of every source.
        self._widest = sorted(sources) if sources and config.combination_type in UPDATE_TYPES else None
        self._widest_config: LoraConfig | None = None
        self.num_merges = 0
        self.num_refills = 0
        self.merge_seconds = 0.0
        self._live: OrderedDict[MergeKey, str] = OrderedDict()
        self._free_slots: list[str] = []  # in the model, holding an evicted merge, ready to be refilled
        self._unused_names = [self.temporary_name(i) for i in reversed(range(config.merge.cache_size))]
        self._pinned: set[MergeKey] = set()
        # The LoRA layers never change during a run (adapters only add entries inside them); walking every module of
        # the model for each refill would cost more than the merge arithmetic of a small adapter.
        self._layers = list(lora_layers(peft_model))
        # (layer index, adapter, "A" or "B") -> the factor pruned by magnitude (see `_pruned_factors`).
        self._prune_cache: dict[tuple[int, str, str], torch.Tensor] = {}
        self._modules_cache: dict[tuple[str, ...], frozenset[str]] = {}
        # adapter -> per LoRA layer, its inputs on its task's examples (`layer_inputs.input_factors`).
        self.layer_inputs: dict[str, list[torch.Tensor]] = {}
        # Cross-fitted scoring (`LossScorer(folds=)`): fold -> adapter -> per LoRA layer, its inputs on its task's
        # examples outside that fold, so a merge scored on a fold's examples was not fitted to them.
        self.fold_inputs: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._can_refill = config.combination_type not in RANDOM_TYPES  # DARE masks depend on the module build
        # PEFT's private per-layer helpers, checked once per process against the closed-form update.
        self._trust_peft = peft_helpers_verified()

    def temporary_name(self, index: int) -> str:
        return f"{self.config.merged_adapter_prefix}_tmp{index}"

    def check_names(self, final_names: Sequence[str]) -> None:
        """Validate every name this merger may create (temporary and final) before any merge."""
        for name in [*final_names, *(self.temporary_name(i) for i in range(self.config.merge.cache_size))]:
            check_new_adapter_name(self.peft_model, name)

    def _weights(self, members: Sequence[str], weights: Mapping[str, float] | None) -> list[float]:
        """The merge weight of every member of sorted `members`: `weights[m]`, or the config's rule."""
        if weights is None:
            return merge_weights_for(self.config.combination_type, len(members), self.config.merge.weight)
        if set(weights) != set(members):
            raise ValueError(f"`weights` must name exactly the members {list(members)}, got {sorted(weights)}.")
        return [float(weights[m]) for m in members]

    def merge(
        self,
        members: Sequence[str],
        adapter_name: str,
        weights: Mapping[str, float] | None = None,
        *,
        fold: int | None = None,
    ) -> str:
        """Merge `members` into a new adapter `adapter_name` with PEFT's `add_weighted_adapter`.

        The merge runs inside `torch.random.fork_rng()` seeded from (config seed, sorted members), so `dare_*`
        masks are the same every time the same cluster is merged, and torch's global generator is left untouched.
        `weights` (member -> weight) replaces the weights of `merge_weights_for` (e.g. tuned ones). A data-aware
        type merges with the layer inputs of `fold` (`fold_inputs`) when one is given, else with all examples'.
        """
        members = sorted(members)
        check_new_adapter_name(self.peft_model, adapter_name)
        config = self.config
        weights = self._weights(members, weights)
        started = time.perf_counter()
        try:
            with torch.random.fork_rng():
                torch.manual_seed(merge_seed(config.seed, members))
                if config.combination_type in UPDATE_TYPES:
                    # A fresh rank-r LoRA (scaling 1) from PEFT's `add_adapter`; every layer is then written here.
                    configs = [self.peft_model.peft_config[m] for m in members]
                    targets = union_target_modules(self.peft_model, members)
                    new_config = merged_lora_config(configs, self.rank_of(members), targets)
                    self.peft_model.add_adapter(adapter_name, new_config)
                    self._write_layers(
                        members, adapter_name, config.combination_type, weights, self.rank_of(members), fold
                    )
                else:
                    self.peft_model.add_weighted_adapter(
                        members,
                        weights,
                        adapter_name,
                        combination_type=config.combination_type,
                        svd_rank=config.merge.svd_rank,
                        density=config.merge.density,
                        majority_sign_method=config.merge.majority_sign_method,
                    )
                # PEFT's rule for its own types: one adapter is merged with `linear`. The update-space types never go
                # through PEFT's helpers (their layers were written above, at their own rank): nothing to recompute.
                peft_type = config.combination_type not in UPDATE_TYPES
                combination_type = "linear" if peft_type and len(members) == 1 else config.combination_type
                if not self._trust_peft and peft_type and combination_type != "cat":
                    # PEFT's layers were computed by its unverified private helpers: recompute them here.
                    torch.manual_seed(merge_seed(config.seed, members))
                    self._write_layers(members, adapter_name, combination_type, weights, self.rank_of(members))
        except BaseException:
            # A failed merge may leave its config registered; a retry with the same name would then do nothing.
            if adapter_name in self.peft_model.peft_config:
                self.peft_model.delete_adapter(adapter_name)
            raise
        finally:
            self.merge_seconds += time.perf_counter() - started
        self._match_layer_modes(adapter_name)
        self._match_source_dtype(adapter_name, members)
        self.num_merges += 1
        return adapter_name

    def _match_source_dtype(self, adapter_name: str, members: Sequence[str]) -> None:
        """Give the merged adapter's factors the dtype of its members' factors in every layer (the widest of them).

        PEFT's `*svd` merges come back in float32 whatever the sources' dtype, and `add_adapter` creates factors in
        the base layer's dtype: left so, a merge of bf16 adapters would cost twice the bytes of a source, or a merge
        of float32 adapters on a bf16 base would lose their precision.
        """
        for _, layer in self._layers:
            target = lora_factors(layer, adapter_name)
            sources = [f for m in members if (f := lora_factors(layer, m)) is not None]
            if target is None or not sources:
                continue
            dtype = widest_dtype([t.dtype for factors in sources for t in factors])
            for tensor in target:
                if tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)

    def _match_layer_modes(self, adapter_name: str) -> None:
        """Put the modules PEFT just built for `adapter_name` in the train/eval mode of their LoRA layer.

        `add_weighted_adapter` creates the merged adapter's `lora_dropout` modules in training mode even in an eval
        model: with source adapters saved with `lora_dropout > 0`, every loss under the merge would be random.
        """
        for _, layer in self._layers:
            for container in (layer.lora_dropout, layer.lora_A, layer.lora_B):
                if adapter_name in container:
                    container[adapter_name].train(layer.training)

    def rank_of(self, members: Sequence[str]) -> int:
        """Rank of the adapter PEFT creates for `members` (see `peft_d2c.engine.merge.budget.merged_rank`)."""
        return merged_rank_of(self.peft_model, members, self.config)

    def refill(
        self,
        members: Sequence[str],
        adapter_name: str,
        weights: Mapping[str, float] | None = None,
        *,
        fold: int | None = None,
        task: str | None = None,
    ) -> str:
        """Overwrite the weights of the existing merged adapter `adapter_name` with the merge of `members`.

        Runs the same per-layer computations as `add_weighted_adapter` (PEFT's own functions, with the same weights
        and settings), so the result equals a fresh merge of `members`; only the module construction is skipped.
        `weights` and `fold` as in `merge`. With `task` (an update-space type), the adapter gets instead the update
        that serves `task` with `merge.task_cores` (`task_cores.write_task_update`: no merge computed).

        Raises:
            ValueError: If `adapter_name` has another rank than the merge of `members`, or uses a random type.
        """
        members = sorted(members)
        config = self.config
        if not self._can_refill:
            raise ValueError(f"combination_type={config.combination_type!r} merges cannot refill an adapter.")
        new_rank = self.rank_of(members)
        slot_rank = self.peft_model.peft_config[adapter_name].r
        if slot_rank < new_rank or (slot_rank != new_rank and config.combination_type not in UPDATE_TYPES):
            raise ValueError(
                f"Adapter {adapter_name!r} has rank {self.peft_model.peft_config[adapter_name].r}, "
                f"the merge of {members} needs {new_rank}."
            )
        combination_type = config.combination_type
        if len(members) == 1 and combination_type not in UPDATE_TYPES:
            combination_type = "linear"  # PEFT's rule
        weights = self._weights(members, weights)
        started = time.perf_counter()
        if task is None:
            self._write_layers(members, adapter_name, combination_type, weights, new_rank, fold)
        else:
            if combination_type not in UPDATE_TYPES or task not in members:
                raise ValueError(f"Task {task!r} must be one of {members}, merged with an update-space type.")
            write_task_update(
                [layer for _, layer in self._layers],
                members,
                task,
                adapter_name,
                new_rank,
                bias_type=bias_merge_type(combination_type),
                weights=weights,
                density=config.merge.density,
                majority_sign_method=config.merge.majority_sign_method,
            )
        self.merge_seconds += time.perf_counter() - started
        self.num_merges += 1
        self.num_refills += 1
        return adapter_name

    def _write_layers(
        self,
        members: Sequence[str],
        adapter_name: str,
        combination_type: str,
        weights: Sequence[float],
        rank: int,
        fold: int | None = None,
    ) -> None:
        """Compute every layer of the merge of `members` and write it into the adapter `adapter_name`."""
        config = self.config
        lora_model = self.peft_model.base_model
        settings = {
            "rank": rank,
            "density": config.merge.density,
            "majority_sign_method": config.merge.majority_sign_method,
        }
        if combination_type in UPDATE_TYPES:  # every layer at once, batched over layers of the same shapes
            layers = [layer for _, layer in self._layers]
            if combination_type in DATA_TYPES:
                settings.update(
                    layer_inputs=self._member_inputs(members, fold), regmean_alpha=config.merge.regmean_alpha
                )
            update_merge_into(combination_type, members, weights, layers, adapter_name, **settings)
            return
        with torch.no_grad():
            for layer_index, (_, layer) in enumerate(self._layers):
                target = lora_factors(layer, adapter_name)
                if target is None:
                    continue
                target_a, target_b = target
                if combination_type == "cat":
                    new_a, new_b = _cat_factors(layer, members, weights, target_a, target_b)
                elif combination_type in _PRUNED_TYPES and config.merge.density < 1:
                    new_a, new_b = self._pruned_factors(layer_index, layer, members, weights)
                elif self._trust_peft:
                    new_a, new_b = peft_merge_layer(
                        lora_model, combination_type, members, weights, layer, target_a, target_b, **settings
                    )
                else:
                    new_a, new_b = own_merge_layer(combination_type, members, weights, layer, **settings)
                target_a.data, target_b.data = new_a.to(target_a.dtype), new_b.to(target_b.dtype)

    def _member_inputs(self, members: Sequence[str], fold: int | None = None) -> dict[LoraLayer, list[torch.Tensor]]:
        """Per LoRA layer, every member's layer-input factor (`layer_inputs`, or `fold_inputs[fold]`), in the order
        of `members`."""
        inputs = self.layer_inputs if fold is None else self.fold_inputs.get(fold, {})
        missing = [m for m in members if m not in inputs]
        if missing:
            raise ValueError(
                f"combination_type={self.config.combination_type!r} needs the layer inputs of {missing} on their "
                "tasks' examples; `merge_adapters_d2c` collects them when it gets a `tokenizer`."
            )
        return {layer: [inputs[m][i] for m in members] for i, (_, layer) in enumerate(self._layers)}

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
                sign_mask = calculate_majority_sign_mask(stacked, method=self.config.merge.majority_sign_method)
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
            self._prune_cache[key] = prune(tensor, self.config.merge.density, method="magnitude")
        return self._prune_cache[key]

    def adapter_for(self, members: Sequence[str], fold: int | None = None, task: str | None = None) -> str:
        """Name of a live adapter equal to the merge of `members`, merging (and evicting the oldest) when needed.

        A single member is served by the source adapter itself: PEFT's merge of one adapter copies it (to float
        precision; RegMean of one member is the member whatever its inputs), unless `merge_weight` rescales it, or an
        update-space type truncates it (`svd_rank` below its rank): then the truncated merge that will ship is what
        gets scored. With `fold`, the merge is fitted to that fold's layer inputs (`merge`). With `task` (one of
        `members`), the adapter that serves `task` in this cluster (`merge_key`).
        """
        key = self.merge_key(members, fold, task)
        members, fold, task = key
        if len(members) == 1 and self.config.merge.weight is None and not self._truncates(members[0]):
            return members[0]
        if key in self._live:
            self._live.move_to_end(key)
            return self._live[key]
        if len(self._live) >= self.config.merge.cache_size:
            evictable = next((k for k in self._live if k not in self._pinned), None)
            if evictable is None:
                raise RuntimeError(
                    f"`merge_cache_size`={self.config.merge.cache_size} is too small for one scoring batch; raise it."
                )
            self._free_slots.append(self._live.pop(evictable))
        name = self._take_slot(key)
        if name is None:
            if not self._unused_names:  # every slot is in the model: drop a free one of the wrong kind
                self._delete_slot(self._free_slots.pop(0))
            name = self._unused_names.pop()
            try:
                if self._widest is None and task is None:
                    self.merge(members, name, fold=fold)
                else:
                    self._add_slot(name, members)
                    self.refill(members, name, fold=fold, task=task)
            except BaseException:
                if name in self.peft_model.peft_config:
                    self._delete_slot(name)  # a slot built but not filled: never serve it
                else:
                    self._unused_names.append(name)
                raise
        self._live[key] = name
        return name

    def merge_key(self, members: Sequence[str], fold: int | None = None, task: str | None = None) -> MergeKey:
        """The live adapter that serves `task` in the cluster `members` (fitted to `fold`'s layer inputs): with
        `merge.task_cores` and two or more members the task's own update in the cluster's joint basis (`refill`),
        else the cluster's merge, whatever the task (task None)."""
        members = tuple(sorted(members))
        own = task is not None and self.config.merge.task_cores and len(members) > 1
        return members, fold, task if own else None

    def _truncates(self, adapter: str) -> bool:
        """Whether the merge of `adapter` alone has a lower rank than the adapter (update-space types only: PEFT
        merges one adapter with `linear`, which copies it)."""
        return self.config.combination_type in UPDATE_TYPES and self.rank_of([adapter]) < adapter_rank(
            self.peft_model, adapter
        )

    def _add_slot(self, name: str, members: Sequence[str]) -> None:
        """Build the empty update-space slot `name` for `members`' merge, or, with `sources`, as the merge of every
        source would be: their highest merged rank, the union of their modules, a LoRA bias if any has one (`_fits`
        every cluster of them)."""
        if self._widest is None:
            config = self._slot_config(members)
        else:
            if self._widest_config is None:  # the same for every slot of the run
                self._widest_config = self._slot_config(self._widest)
            config = copy.deepcopy(self._widest_config)  # PEFT keeps the object it gets
        self.peft_model.add_adapter(name, config)
        self._match_layer_modes(name)

    def _slot_config(self, members: Sequence[str]) -> LoraConfig:
        configs = [self.peft_model.peft_config[m] for m in members]
        return merged_lora_config(configs, self.rank_of(members), union_target_modules(self.peft_model, members))

    def _fits(self, slot: str, members: Sequence[str]) -> bool:
        """Whether the slot `slot` can hold the merge of `members`: the same rank, LoRA bias or not and modules; an
        update-space slot also any merge of lower rank, without a bias or on fewer modules, zero-padded
        (`update_layers.update_merge_into`), as its zeros add exactly nothing to any output."""
        config = self.peft_model.peft_config[slot]
        rank = self.rank_of(members)
        bias = any(self.peft_model.peft_config[m].lora_bias for m in members)
        modules, slot_modules = self._modules_of(members), self._modules_of((slot,))
        if self.config.combination_type in UPDATE_TYPES:
            return config.r >= rank and (config.lora_bias or not bias) and modules <= slot_modules
        return config.r == rank and config.lora_bias == bias and modules == slot_modules

    def _take_slot(self, key: MergeKey) -> str | None:
        """Refill a free slot that fits (`_fits`) with the merge of `key`, or return None if there is none."""
        if not self._can_refill or not self._free_slots:
            return None
        members, fold, task = key
        for index, name in enumerate(self._free_slots):
            if self._fits(name, members):
                del self._free_slots[index]
                try:
                    return self.refill(members, name, fold=fold, task=task)
                except BaseException:
                    self._delete_slot(name)  # half-refilled: never serve it
                    raise
        return None

    def _modules_of(self, adapters: Sequence[str]) -> frozenset[str]:
        """The modules any of `adapters` adapts (memoised: source adapters and slots never change their modules)."""
        key = tuple(adapters)
        if key not in self._modules_cache:
            self._modules_cache[key] = frozenset(
                name for name, layer in self._layers if any(lora_factors(layer, a) is not None for a in adapters)
            )
        return self._modules_cache[key]

    def pin(self, keys: Sequence[MergeKey]) -> None:
        """Protect these merges, `(members, fold, task)` keys (`MergeKey`), from eviction until `unpin` (they are
        scored in one batch)."""
        self._pinned = {self.merge_key(*key) for key in keys}

    def unpin(self) -> None:
        self._pinned = set()

    @property
    def layer_input_bytes(self) -> int:
        """Bytes of the layer inputs held for the data-aware types (all examples' and every fold's, shared tensors
        counted once; `regmean.layer_input_bytes`): the memory a `regmean` run keeps for its whole length."""
        return layer_input_bytes(self.layer_inputs, *self.fold_inputs.values())

    @property
    def num_live(self) -> int:
        """Number of temporary merged adapters currently in the model (live merges and free slots)."""
        return len(self._live) + len(self._free_slots)

    def _delete_slot(self, name: str) -> None:
        self.peft_model.delete_adapter(name)
        self._modules_cache.pop((name,), None)  # the name may come back on other modules
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
