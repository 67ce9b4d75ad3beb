"""engine/merge/layer_merge.py: the one seam to PEFT's private merge helpers, checked against the closed-form update.

The expected updates are computed here from the raw LoRA factors and the adapters' configs (ΔW = Σ w_i·s_i·B_i·A_i
with s_i = lora_alpha / r), never through PEFT's merge code.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraModel
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CWarning
from peft_d2c import testing as tiny
from peft_d2c.engine.merge import layer_merge
from peft_d2c.engine.merge.lora import lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger, merge_weights_for

MEMBERS = ["copy", "reverse", "sort"]
DETERMINISTIC_TYPES = ["linear", "ties", "magnitude_prune", "svd", "ties_svd", "magnitude_prune_svd"]


@pytest.fixture
def fresh_helper_check():
    """Forget the once-per-process verdict before and after the test (a patched PEFT must not leak out)."""
    layer_merge.peft_helpers_verified.cache_clear()
    yield
    layer_merge.peft_helpers_verified.cache_clear()


def closed_form_updates(model, members, weights) -> dict[str, torch.Tensor]:
    """Σ w_i·(alpha_i / r_i)·B_i·A_i per LoRA layer, in float64, from the raw factors."""
    updates = {}
    for name, layer in lora_layers(model):
        total = 0
        for member, weight in zip(members, weights, strict=True):
            config = model.peft_config[member]
            a = layer.lora_A[member].weight.double()
            b = layer.lora_B[member].weight.double()
            total = total + weight * (config.lora_alpha / config.r) * (b @ a)
        updates[name] = total
    return updates


def merged_update(model, name: str, layer) -> torch.Tensor:
    config = model.peft_config[name]
    return (config.lora_alpha / config.r) * (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double())


def assert_matches_closed_form(model, merged_name, members, weights, rtol=1e-5):
    expected = closed_form_updates(model, members, weights)
    for name, layer in lora_layers(model):
        got = merged_update(model, merged_name, layer)
        error = torch.linalg.norm(got - expected[name]) / torch.linalg.norm(expected[name])
        assert error < rtol, f"{merged_name} at {name}: relative error {error:.2e}"


def svd_config(**kwargs) -> D2CMergeConfig:
    # svd_rank = the members' total rank (3 x 8): the rank-r SVD is then exact, so the closed form applies.
    return D2CMergeConfig(num_clusters=1, combination_type="svd", **kwargs, merge={"svd_rank": 24, "cache_size": 2})


class TestInstalledPeft:
    def test_installed_peft_helpers_pass_the_check(self, fresh_helper_check):
        with warnings.catch_warnings():
            warnings.simplefilter("error", D2CWarning)
            assert layer_merge.peft_helpers_verified() is True

    def test_svd_merge_and_refill_equal_the_exact_weighted_sum(self, tiny_peft_model, fresh_helper_check):
        merger = AdapterMerger(tiny_peft_model, svd_config())
        weights = merge_weights_for("svd", 3)
        merger.merge(MEMBERS, "merged")
        assert_matches_closed_form(tiny_peft_model, "merged", MEMBERS, weights)
        other = ["first", "last", "shift"]
        merger.refill(other, "merged")  # the in-place path: PEFT's helper through `peft_merge_layer`
        assert_matches_closed_form(tiny_peft_model, "merged", other, weights)

    @pytest.mark.parametrize("combination_type", DETERMINISTIC_TYPES)
    @pytest.mark.parametrize("density", [0.5, 1.0])
    def test_own_implementation_equals_peft_for_every_deterministic_type(
        self, tiny_peft_model, combination_type, density
    ):
        """`own_merge_layer` (the fallback) computes what PEFT's helpers compute, type by type."""
        weights = merge_weights_for(combination_type, 3)
        lora_model = tiny_peft_model.base_model
        for _, layer in lora_layers(tiny_peft_model):
            target_a = torch.zeros(8, layer.in_features)
            target_b = torch.zeros(layer.out_features, 8)
            settings = {"rank": 8, "density": density, "majority_sign_method": "total"}
            theirs = layer_merge.peft_merge_layer(
                lora_model, combination_type, MEMBERS, weights, layer, target_a, target_b, **settings
            )
            ours = layer_merge.own_merge_layer(combination_type, MEMBERS, weights, layer, **settings)
            if combination_type.endswith("svd"):  # factors are unique only up to signs: compare the products
                torch.testing.assert_close(ours[1] @ ours[0], theirs[1] @ theirs[0], rtol=1e-4, atol=1e-6)
            else:
                torch.testing.assert_close(ours, theirs)


def reference_factor_merge(kind: str, tensors, weights, density: float) -> torch.Tensor:
    """TIES / magnitude pruning of one factor written out from the papers (not PEFT's `merge_utils`): keep each
    tensor's top int(density·n) magnitudes, then (TIES) elect the sign of the summed pruned tensors per entry and
    average the weighted entries that agree with it, or (magnitude_prune) sum the weighted pruned tensors."""
    pruned = []
    for tensor in tensors:
        flat = tensor.double().flatten()
        keep = torch.zeros_like(flat)
        order = flat.abs().argsort(descending=True)[: int(density * flat.numel())]
        keep[order] = flat[order]
        pruned.append(keep.view_as(tensor))
    weighted = [w * t for w, t in zip(weights, pruned, strict=True)]
    if kind == "magnitude_prune":
        return sum(weighted)
    elected = torch.where(sum(pruned) >= 0, 1.0, -1.0).double()
    agree = [(t.sign() == elected).double() for t in pruned]
    total = sum(w * a for w, a in zip(weighted, agree, strict=True))
    return total / sum(agree).clamp(min=1.0)


@pytest.mark.parametrize("combination_type", ["ties", "magnitude_prune"])
def test_pruned_factor_merges_equal_a_reference_written_from_the_papers(tiny_peft_model, combination_type):
    """PEFT's helpers, `own_merge_layer` and the merger's memoised pruning, each against `reference_factor_merge`
    (A and B merged separately with ±√(w_i·s_i), the sign on A, as PEFT documents)."""
    weights = merge_weights_for(combination_type, 3)
    merger = AdapterMerger(tiny_peft_model, D2CMergeConfig(num_clusters=1, combination_type=combination_type))
    merger.merge(MEMBERS, "merged")
    settings = {"rank": 8, "density": 0.5, "majority_sign_method": "total"}
    for name, layer in lora_layers(tiny_peft_model):
        scaled = [w * float(layer.scaling[m]) for m, w in zip(MEMBERS, weights, strict=True)]
        weights_a = [abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in scaled]
        weights_b = [abs(x) ** 0.5 for x in scaled]
        expected = (
            reference_factor_merge(combination_type, [layer.lora_A[m].weight for m in MEMBERS], weights_a, 0.5),
            reference_factor_merge(combination_type, [layer.lora_B[m].weight for m in MEMBERS], weights_b, 0.5),
        )
        target_a, target_b = torch.zeros(8, layer.in_features), torch.zeros(layer.out_features, 8)
        candidates = {
            "merger": (layer.lora_A["merged"].weight, layer.lora_B["merged"].weight),
            "own": layer_merge.own_merge_layer(combination_type, MEMBERS, weights, layer, **settings),
            "peft": layer_merge.peft_merge_layer(
                tiny_peft_model.base_model, combination_type, MEMBERS, weights, layer, target_a, target_b, **settings
            ),
        }
        for source, (got_a, got_b) in candidates.items():
            torch.testing.assert_close(got_a.double(), expected[0], rtol=1e-5, atol=1e-7, msg=f"{source} A {name}")
            torch.testing.assert_close(got_b.double(), expected[1], rtol=1e-5, atol=1e-7, msg=f"{source} B {name}")


def scaling_applied_twice(original):
    """What PEFT 0.20's SVD helper computed: the LoRA scaling applied once more on top of `get_delta_weight`."""

    def helper(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs):
        weights = [w * target.scaling[a] for a, w in zip(adapters, weights, strict=True)]
        return original(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs)

    return helper


class TestChangedPeft:
    def test_a_changed_svd_helper_is_refused_with_a_warning_and_merges_stay_exact(
        self, tiny_peft_model, monkeypatch, fresh_helper_check
    ):
        original = LoraModel._svd_generalized_task_arithmetic_weighted_adapter
        monkeypatch.setattr(
            LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", scaling_applied_twice(original)
        )
        with pytest.warns(D2CWarning, match="private merge helper .* own implementation"):
            merger = AdapterMerger(tiny_peft_model, svd_config())
        weights = merge_weights_for("svd", 3)
        merger.merge(MEMBERS, "merged")  # add_weighted_adapter runs the patched helper; peft-d2c recomputes
        assert_matches_closed_form(tiny_peft_model, "merged", MEMBERS, weights)
        other = ["first", "last", "shift"]
        merger.refill(other, "merged")
        assert_matches_closed_form(tiny_peft_model, "merged", other, weights)

    def test_the_check_would_catch_the_change_without_the_fallback(self, tiny_peft_model, monkeypatch):
        """Negative control: the patched helper really computes a wrong update (else the test above proves nothing)."""
        original = LoraModel._svd_generalized_task_arithmetic_weighted_adapter
        monkeypatch.setattr(
            LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", scaling_applied_twice(original)
        )
        tiny_peft_model.add_weighted_adapter(
            MEMBERS, merge_weights_for("svd", 3), "patched", combination_type="svd", svd_rank=24
        )
        with pytest.raises(AssertionError, match="relative error"):
            assert_matches_closed_form(tiny_peft_model, "patched", MEMBERS, merge_weights_for("svd", 3))

    def test_a_missing_helper_is_refused_too(self, monkeypatch, fresh_helper_check):
        monkeypatch.delattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter")
        with pytest.warns(D2CWarning, match="has no"):
            assert layer_merge.peft_helpers_verified() is False


# One-member merges with `svd_rank` below the source rank 8: the update-space types truncate the adapter to rank 4;
# PEFT merges one adapter with `linear` (its own rank) for the `*svd` types.
SINGLE_MEMBER_CASES = ["core_ta", "core_ties", "knots_ties", "tsv_m", "regmean", "svd", "ties_svd"]


@pytest.mark.parametrize("combination_type", SINGLE_MEMBER_CASES)
def test_fallback_single_member_merge_loads_and_equals_the_verified_path(tiny_assets, tmp_path, combination_type):
    """With PEFT's helpers distrusted (the merger's own `_trust_peft` switch, what a failed start-up check sets), a
    one-member merge with `svd_rank` saves an adapter that plain PEFT loads and that equals the verified path's. On
    main at 710cc18 the fallback rewrote a one-member update-space merge as PEFT's `linear` at the source rank under a
    rank-4 config: the saved adapter did not load."""
    merged = {}
    for trusted in (True, False):
        model = tiny.load_peft_model(*tiny_assets)
        config = D2CMergeConfig(num_clusters=1, combination_type=combination_type, merge={"svd_rank": 4})
        merger = AdapterMerger(model, config)
        merger._trust_peft = trusted
        merger.layer_inputs = tiny.random_layer_inputs(model, ["copy"])  # used by `regmean` only
        merger.merge(["copy"], "merged")
        folder = tmp_path / str(trusted)
        model.save_pretrained(str(folder), selected_adapters=["merged"])
        base = LlamaForCausalLM.from_pretrained(tiny_assets[0])
        reloaded = PeftModel.from_pretrained(base, str(folder / "merged"), adapter_name="merged")
        merged[trusted] = {name: merged_update(reloaded, "merged", layer) for name, layer in lora_layers(reloaded)}
        assert set(merged[trusted]) == {name for name, _ in lora_layers(model)}
    for name, update in merged[True].items():
        torch.testing.assert_close(merged[False][name], update, rtol=1e-5, atol=1e-7)
