"""Devices and dtypes (issue 19): every merge, the scorer and the exports where PEFT users run them.

CI has no GPU, so three stand-ins run the real code here:
- `meta` tensors: a tensor made on the CPU while the inputs live elsewhere fails on them exactly as on CUDA
  ("Tensor on device cpu is not on the expected device meta!"), so every update-space merge runs on `meta` inputs
  and a model whose adapters sit on `meta`, and each output's shape, device and dtype is checked;
- bf16 and fp16 models (moved with `.to(dtype)` after loading, so the adapters are bf16 / fp16 too): every
  combination type end to end, merged adapters in the sources' dtype and bytes, and merged updates that agree with
  a float64 merge of the same bf16 / fp16 values;
- a model split across `meta` and the CPU, and across dtypes: each layer is merged where it lives, in its dtype.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.combination_types import COMBINATION_TYPES, DATA_TYPES, UPDATE_TYPES
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge import merge_methods
from peft_d2c.engine.merge.lora import delta_gram_matrix, lora_factors, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger, merge_weights_for
from peft_d2c.engine.merge.regmean import regmean_merge
from peft_d2c.engine.scoring.loss import LossScorer

HALF_DTYPES = [torch.bfloat16, torch.float16]
MEMBERS = ["copy", "reverse", "sort"]
# The update-space types that are functions of the members' factors alone (`regmean` also takes layer inputs).
FACTOR_UPDATE_TYPES = [t for t in UPDATE_TYPES if t not in DATA_TYPES]


def merger_for(model, config: D2CMergeConfig) -> AdapterMerger:
    """An `AdapterMerger`, holding stand-in layer inputs (`testing.random_layer_inputs`) when its type is data-aware."""
    merger = AdapterMerger(model, config)
    if config.combination_type in DATA_TYPES:
        merger.layer_inputs = tiny.random_layer_inputs(model, sorted(model.peft_config))
    return merger


def reference_update(kind, pairs, weights, merger, index):
    """The float64 merged update of one layer's `pairs`: `merge_updates`, or RegMean with the merger's layer inputs."""
    if kind in DATA_TYPES:
        inputs = [merger.layer_inputs[m][index].double() for m in MEMBERS]
        new_a, new_b = regmean_merge(pairs, inputs, weights, rank=8, alpha=merger.config.merge.regmean_alpha)
    else:
        new_a, new_b = merge_methods.merge_updates(kind, pairs, weights, rank=8, density=0.5)
    return new_b @ new_a


def meta_pairs(k: int, dtype: torch.dtype, batch: tuple[int, ...] = (3,)):
    return [
        (
            torch.empty(*batch, 12, 4, device="meta", dtype=dtype),
            torch.empty(*batch, 4, 10, device="meta", dtype=dtype),
        )
        for _ in range(k)
    ]


class TestMergeMathsOnMeta:
    @pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
    @pytest.mark.parametrize("kind", FACTOR_UPDATE_TYPES)  # regmean's own: tests/test_regmean.py
    def test_every_update_type_keeps_device_dtype_and_shape(self, kind, dtype):
        """Fails on main at 898e22c for core_ties, knots_ties and tsv_m (CPU weight tensor / CPU `arange`)."""
        new_a, new_b = merge_methods.merge_updates(kind, meta_pairs(3, dtype), [1.0] * 3, rank=4, density=0.5)
        assert (new_a.device.type, new_a.dtype, tuple(new_a.shape)) == ("meta", dtype, (3, 4, 10))
        assert (new_b.device.type, new_b.dtype, tuple(new_b.shape)) == ("meta", dtype, (3, 12, 4))

    @pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
    @pytest.mark.parametrize("kind", UPDATE_TYPES)
    def test_biases_keep_device_dtype_and_shape(self, kind, dtype):
        biases = [torch.empty(3, 12, device="meta", dtype=dtype) for _ in range(3)]
        merged = merge_methods.merge_biases(kind, biases, [1.0] * 3, density=0.5)
        assert (merged.device.type, merged.dtype, tuple(merged.shape)) == ("meta", dtype, (3, 12))


def meta_peft_model(dtype: torch.dtype):
    """The tiny Llama and three LoRAs built on `meta` in `dtype`: a model whose every tensor lives off the CPU."""
    with torch.device("meta"):
        model = get_peft_model(
            tiny.make_base_model().to(dtype), tiny.lora_config(), adapter_name=MEMBERS[0], autocast_adapter_dtype=False
        )
        for name in MEMBERS[1:]:
            model.add_adapter(name, tiny.lora_config())
    return model.to(dtype)


class TestMergerOnMeta:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("kind", UPDATE_TYPES)
    def test_merged_adapter_lives_with_its_sources(self, kind, dtype):
        """Merge, then refill the same slot: every factor of the merged adapter is on `meta`, in the sources'
        dtype, with the source rank. (PEFT's own `add_weighted_adapter` cannot merge on a `meta` base: it creates
        the new adapter on the CPU, so PEFT's types are checked in bf16 / fp16 below instead.)"""
        model = meta_peft_model(dtype)
        merger = merger_for(model, D2CMergeConfig(num_clusters=1, combination_type=kind, merge={"cache_size": 2}))
        first = merger.adapter_for(MEMBERS)
        merger.adapter_for(MEMBERS[:2])
        name = merger.adapter_for(MEMBERS[1:])  # evicts the first merge and refills its slot
        assert name == first and merger.num_refills == 1
        for _, layer in lora_layers(model):
            source_a, source_b = lora_factors(layer, MEMBERS[0])
            new_a, new_b = lora_factors(layer, name)
            for new, source in ((new_a, source_a), (new_b, source_b)):
                assert (new.device.type, new.dtype, new.shape) == ("meta", dtype, source.shape)


def half_model(tiny_assets, dtype: torch.dtype):
    base_dir, adapter_dirs = tiny_assets
    return tiny.load_peft_model(base_dir, adapter_dirs).to(dtype)


def merged_update(model, adapter: str, module: str) -> torch.Tensor:
    layer = dict(lora_layers(model))[module]
    a, b = lora_factors(layer, adapter)
    return float(layer.scaling[adapter]) * (b.double() @ a.double())


@pytest.mark.usefixtures("one_thread")
class TestHalfPrecisionEndToEnd:
    @pytest.mark.parametrize("dtype", HALF_DTYPES)
    @pytest.mark.parametrize("kind", COMBINATION_TYPES)
    def test_every_type_runs_and_ships_the_sources_dtype_and_bytes(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, kind, dtype
    ):
        model = half_model(tiny_assets, dtype)
        config = D2CMergeConfig(num_clusters=2, num_iterations=2, combination_type=kind, show_progress=False)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        assert all(torch.isfinite(torch.tensor(v)) for v in result.task_losses.values())
        result.save_pretrained(str(tmp_path / "out"))
        source_bytes = os.path.getsize(os.path.join(tiny_assets[1]["copy"], "adapter_model.safetensors"))
        for name in result.merged_adapter_names:
            path = tmp_path / "out" / name / "adapter_model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                assert {f.get_tensor(key).dtype for key in f.keys()} == {dtype}
            if kind != "cat" and len(result.clusters[result.merged_adapter_names.index(name)]) > 1:
                # The same rank in half the bytes per weight of the float32 files the adapters were saved as.
                assert abs(os.path.getsize(path) - source_bytes / 2) < 2_000

    @pytest.mark.parametrize("dtype", HALF_DTYPES)
    @pytest.mark.parametrize("kind", UPDATE_TYPES)
    def test_merged_update_matches_a_float64_merge_of_the_same_values(self, tiny_assets, kind, dtype):
        """The decompositions run in float32: the merged update of bf16 / fp16 sources equals the float64 merge of
        exactly those values up to the rounding of the result to the half dtype (not more)."""
        model = half_model(tiny_assets, dtype)
        merger = merger_for(model, D2CMergeConfig(num_clusters=1, combination_type=kind))
        merger.merge(MEMBERS, "merged")
        weights = merge_weights_for(kind, len(MEMBERS))
        resolution = torch.finfo(dtype).eps
        for index, (module, layer) in enumerate(lora_layers(model)):
            pairs = []
            for member in MEMBERS:
                a, b = lora_factors(layer, member)
                pairs.append((b.double(), float(layer.scaling[member]) * a.double()))
            expected = reference_update(kind, pairs, weights, merger, index)
            got = merged_update(model, "merged", module)
            assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 8 * resolution, module

    @pytest.mark.parametrize("dtype", HALF_DTYPES)
    def test_scorer_losses_agree_with_float32_scoring_of_the_same_weights(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, dtype
    ):
        """The scorer takes a half-precision model: its losses (cross-entropy in float32) are those of the float32
        model holding the same rounded weights, to the half dtype's activation rounding."""
        model = half_model(tiny_assets, dtype)
        reference = half_model(tiny_assets, dtype).float()
        config = D2CMergeConfig(num_clusters=2, combination_type="knots_ties", show_progress=False)
        examples = normalize_task_examples(tiny_task_examples)
        requests = [(tuple(MEMBERS), task) for task in MEMBERS] + [(("first",), "first")]
        losses = {}
        for name, candidate in (("half", model), ("float32", reference)):
            merger = AdapterMerger(candidate, config)
            losses[name] = LossScorer(candidate.eval(), tiny_tokenizer, examples, merger)(requests)
            merger.cleanup()
        for half, full in zip(losses["half"], losses["float32"], strict=True):
            assert abs(half - full) < 0.05 * max(1.0, full)

    @pytest.mark.parametrize("dtype", HALF_DTYPES)
    def test_kmeans_gram_is_exact_in_float64_for_half_adapters(self, tiny_assets, dtype):
        model = half_model(tiny_assets, dtype)
        gram = delta_gram_matrix(model, MEMBERS)
        for i, first in enumerate(MEMBERS):
            for j, second in enumerate(MEMBERS):
                expected = sum(
                    float(torch.sum(merged_update(model, first, module) * merged_update(model, second, module)))
                    for module, _ in lora_layers(model)
                )
                assert gram[i, j] == pytest.approx(expected, rel=1e-9)


class TestSplitModels:
    def test_layers_on_different_devices_merge_where_they_live(self, tiny_peft_model):
        """Block 0 stays on the CPU, block 1 moves to `meta`: one batched merge over both would stack a CPU and a
        `meta` tensor (fails on main at 898e22c). Each block's merged adapter stays on its block's device, and the
        CPU block's update equals the merge of that block alone."""
        model = tiny_peft_model
        model.base_model.model.model.layers[1].to("meta")
        for kind in UPDATE_TYPES:
            merger = merger_for(model, D2CMergeConfig(num_clusters=1, combination_type=kind))
            merger.merge(MEMBERS, kind)
            for index, (module, layer) in enumerate(lora_layers(model)):
                device = lora_factors(layer, MEMBERS[0])[0].device.type
                assert {t.device.type for t in lora_factors(layer, kind)} == {device}, module
                if device == "cpu":
                    pairs = [
                        (
                            lora_factors(layer, m)[1].double(),
                            float(layer.scaling[m]) * lora_factors(layer, m)[0].double(),
                        )
                        for m in MEMBERS
                    ]
                    expected = reference_update(kind, pairs, merge_weights_for(kind, 3), merger, index)
                    got = merged_update(model, kind, module)
                    assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-4  # float32

    def test_layers_in_different_dtypes_keep_their_dtype(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        """The adapters of block 0 in bf16, of block 1 in float32 (PEFT casts each LoRA's input to its dtype): a
        run merges each block in its own dtype."""
        model = tiny_peft_model
        for module, layer in lora_layers(model):
            if ".layers.0." in module:
                layer.lora_A.to(torch.bfloat16)
                layer.lora_B.to(torch.bfloat16)
        config = D2CMergeConfig(num_clusters=2, num_iterations=2, show_progress=False)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        merged = [n for n, c in zip(result.merged_adapter_names, result.clusters, strict=True) if len(c) > 1]
        assert merged
        for module, layer in lora_layers(model):
            expected = torch.bfloat16 if ".layers.0." in module else torch.float32
            for name in merged:
                assert {t.dtype for t in lora_factors(layer, name)} == {expected}, module
