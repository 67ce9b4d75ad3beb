"""engine/merge/merge_methods.py and the update-space combination types (issue 13): rank-r merges in update space.

Every expected value is computed here independently: dense updates ΔW_i = s_i·B_i·A_i built from the raw factors and
the adapters' configs (s_i = alpha/r, alpha/sqrt(r) for rslora, rank_pattern / alpha_pattern), dense SVDs of the
full d x d matrices (which the library never forms), PEFT's public `merge_utils.ties` for the TIES steps, and plain
torch forward passes for the merged models.

Which methods give k identical copies back: `core_ta` (w = 1/k, the mean) always; `core_ties` and `knots_ties` at
density 1 (at density < 1 they return the copy pruned, like PEFT's `ties`); `tsv_m` never (each copy keeps only r/k
singular directions and the orthogonalised copies add up).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.merge_utils import prune as peft_prune
from peft.utils.merge_utils import ties as peft_ties

from peft_d2c import D2CMergeConfig, UnsupportedAdapterError, merge_adapters_d2c
from peft_d2c.combination_types import DATA_TYPES, UPDATE_TYPES
from peft_d2c.engine.merge import merge_methods
from peft_d2c.engine.merge.budget import merged_rank
from peft_d2c.engine.merge.lora import check_source_adapters, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger, merge_weights_for
from peft_d2c.evaluation.generation import completion_loss
from peft_d2c.testing import random_layer_inputs

# The update-space types that are functions of the members' factors alone (`regmean` also takes layer inputs).
FACTOR_UPDATE_TYPES = [t for t in UPDATE_TYPES if t not in DATA_TYPES]

DTYPE = torch.float64
TIES_TYPES = ["core_ties", "knots_ties"]
IDENTITY_TYPES = ["core_ta", "core_ties", "knots_ties"]  # give k identical copies back (the TIES ones at density 1)


def random_pairs(k: int, out: int = 40, inp: int = 30, rank: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(out, rank, generator=generator, dtype=DTYPE),
            torch.randn(rank, inp, generator=generator, dtype=DTYPE),
        )
        for _ in range(k)
    ]


def dense(pairs):
    return [b @ a for b, a in pairs]


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def product(merged) -> torch.Tensor:
    new_a, new_b = merged
    return new_b @ new_a


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.detach() - y.detach()) / torch.linalg.norm(y.detach()))


class TestCoreSvd:
    @pytest.mark.parametrize("shape", [(40, 12, 30), (9, 16, 30), (30, 16, 7), (50, 3, 50)])
    def test_qr_core_svd_equals_dense_svd(self, shape):
        """The QR-core SVD of b @ a has the singular values and vectors of a dense SVD of the product."""
        out, m, inp = shape
        generator = torch.Generator().manual_seed(1)
        b = torch.randn(out, m, generator=generator, dtype=DTYPE)
        a = torch.randn(m, inp, generator=generator, dtype=DTYPE)
        u, s, vh = merge_methods.low_rank_svd(b, a)
        u_d, s_d, vh_d = torch.linalg.svd(b @ a, full_matrices=False)
        p = min(out, m, inp)
        assert s.shape == (p,)
        torch.testing.assert_close(s, s_d[:p], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(u @ torch.diag(s) @ vh, b @ a, rtol=1e-10, atol=1e-10)
        # Singular vectors agree up to sign (random matrices have distinct singular values).
        torch.testing.assert_close((u.T @ u_d[:, :p]).abs().diagonal(), torch.ones(p, dtype=DTYPE))
        torch.testing.assert_close((vh @ vh_d[:p].T).abs().diagonal(), torch.ones(p, dtype=DTYPE))

    def test_concat_and_stack_bases_span_every_member(self):
        pairs = random_pairs(3)
        u, s = merge_methods.concat_left_svd(pairs)
        v, _ = merge_methods.stack_right_basis(pairs)
        torch.testing.assert_close(s, torch.linalg.svd(torch.cat(dense(pairs), dim=1))[1][:12])
        for update in dense(pairs):
            torch.testing.assert_close(u @ (u.T @ update @ v) @ v.T, update)

    def test_batched_merge_equals_one_layer_at_a_time(self):
        layers = [random_pairs(3, seed=seed) for seed in range(4)]
        batched = [(torch.stack([p[i][0] for p in layers]), torch.stack([p[i][1] for p in layers])) for i in range(3)]
        for kind in FACTOR_UPDATE_TYPES:
            new_a, new_b = merge_methods.merge_updates(kind, batched, [1.0, 1.0, 1.0], rank=4, density=0.5)
            for index, pairs in enumerate(layers):
                single = merge_methods.merge_updates(kind, pairs, [1.0, 1.0, 1.0], rank=4, density=0.5)
                torch.testing.assert_close(new_b[index] @ new_a[index], product(single))

    def test_prune_keeps_what_peft_prune_keeps(self):
        tensor = torch.randn(3, 20, 30, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
        pruned = merge_methods.prune_magnitude(tensor, 0.3)
        for index in range(3):
            torch.testing.assert_close(pruned[index], peft_prune(tensor[index], 0.3, method="magnitude"))


class TestTaskArithmetic:
    def test_total_rank_within_r_recovers_the_sum_exactly(self):
        pairs = random_pairs(3, rank=4)
        weights = [0.5, -1.0, 2.0]
        merged = merge_methods.merge_updates("core_ta", pairs, weights, rank=12)
        expected = sum(w * d for w, d in zip(weights, dense(pairs), strict=True))
        assert relative(product(merged), expected) < 1e-10

    def test_total_rank_above_r_gives_the_best_rank_r_approximation(self):
        pairs = random_pairs(4, rank=4)
        weights = merge_weights_for("core_ta", 4)
        new_a, new_b = merge_methods.merge_updates("core_ta", pairs, weights, rank=6)
        assert new_a.shape == (6, 30) and new_b.shape == (40, 6)
        expected = sum(w * d for w, d in zip(weights, dense(pairs), strict=True))
        _, s, _ = torch.linalg.svd(expected)
        error = torch.linalg.norm(new_b @ new_a - expected)
        assert math.isclose(float(error), float(torch.linalg.norm(s[6:])), rel_tol=1e-9)  # the discarded values
        torch.testing.assert_close(new_b @ new_a, best_rank(expected, 6))


# (members, their rank, merged rank): truncating (total rank 12 > 6), exact (8 = 8) and zero-padded (8 < 10).
CANONICAL_CASES = [(3, 4, 6), (2, 4, 8), (2, 4, 10)]


class TestCanonicalFactors:
    @pytest.mark.parametrize("kind", FACTOR_UPDATE_TYPES)
    @pytest.mark.parametrize("k,member_rank,rank", CANONICAL_CASES)
    def test_directions_are_orthogonal_sorted_and_every_prefix_is_the_best_truncation(
        self, kind, k, member_rank, rank
    ):
        """Rank allocation (`rank_budget`) and export cut the merged factors by position, so every type must return
        A = V^T (orthonormal rows) and B = U·S (orthogonal columns) with the rank-1 pieces largest first: then the
        first j directions are the best rank-j approximation of the merged update (Eckart-Young, checked with a dense
        SVD). On main at 710cc18 `tsv_m` returned its directions grouped by member, and a rank-7 cut of a shipped
        q_proj kept an error of 19.2 where the best rank-7 error was 2.6."""
        pairs = random_pairs(k, rank=member_rank, seed=11)
        new_a, new_b = merge_methods.merge_updates(kind, pairs, merge_weights_for(kind, k), rank=rank, density=0.5)
        assert new_a.shape == (rank, 30) and new_b.shape == (40, rank)
        norms = torch.linalg.vector_norm(new_b, dim=0)
        used = norms > 1e-10 * norms.max()
        expected_gram = torch.diag(used.to(DTYPE))
        torch.testing.assert_close(new_a @ new_a.T, expected_gram, rtol=0, atol=1e-10)  # orthonormal (or zero) rows
        torch.testing.assert_close(new_b.T @ new_b, torch.diag(norms**2), rtol=0, atol=1e-9 * float(norms.max()) ** 2)
        pieces = norms * torch.linalg.vector_norm(new_a, dim=1)  # the norm of each rank-1 piece B[:, i]·A[i]
        assert bool((pieces[:-1] >= pieces[1:] * (1 - 1e-12)).all()), pieces
        merged = new_b @ new_a
        for j in range(1, rank + 1):
            assert relative(new_b[:, :j] @ new_a[:j], best_rank(merged, j)) < 1e-9, j


class TestIdenticalCopies:
    @pytest.mark.parametrize("kind", IDENTITY_TYPES)
    @pytest.mark.parametrize("k", [2, 4])
    def test_identical_copies_give_the_adapter_back(self, kind, k):
        (pair,) = random_pairs(1)
        merged = merge_methods.merge_updates(kind, [pair] * k, merge_weights_for(kind, k), rank=4, density=1.0)
        assert relative(product(merged), pair[0] @ pair[1]) < 1e-9

    def test_tsv_m_does_not_give_identical_copies_back(self):
        """TSV-M keeps r/k directions per copy and orthogonalises the duplicates: documented, not a bug."""
        (pair,) = random_pairs(1)
        merged = merge_methods.merge_updates("tsv_m", [pair] * 2, merge_weights_for("tsv_m", 2), rank=4)
        assert relative(product(merged), pair[0] @ pair[1]) > 0.1


def dense_core_ties(pairs, weights, rank, density):
    """TIES on U^T ΔW_i V with U, V the singular vectors of dense SVDs of the concatenated / stacked full updates,
    as many as each matrix's numerical rank (`torch.linalg.matrix_rank`), then truncation."""
    updates = [d.double() for d in dense(pairs)]
    concatenated, stacked = torch.cat(updates, dim=1), torch.cat(updates, dim=0)
    u = torch.linalg.svd(concatenated)[0][:, : int(torch.linalg.matrix_rank(concatenated))]
    v = torch.linalg.svd(stacked)[2][: int(torch.linalg.matrix_rank(stacked))].T
    cores = [u.T @ update @ v for update in updates]
    merged = peft_ties(cores, torch.tensor(weights, dtype=torch.float64), density, "total")
    return best_rank(u @ merged @ v.T, rank)


def dense_knots_ties(pairs, weights, rank, density):
    """KnOTS-TIES as the paper writes it: a dense SVD [ΔW_1 .. ΔW_k] = U·S·Vh, each member's aligned block V_i^T
    is its own columns of Vh (not computed from U^T·ΔW_i as the library does), kept for the directions of the
    concatenation's numerical rank (`torch.linalg.matrix_rank`); TIES on the blocks, merged U·S·V^T, truncated."""
    updates = [d.double() for d in dense(pairs)]
    concatenated = torch.cat(updates, dim=1)
    m = int(torch.linalg.matrix_rank(concatenated))
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    u, s, vh = u[:, :m], s[:m], vh[:m]
    blocks = list(vh.split([d.shape[1] for d in updates], dim=1))
    merged = peft_ties(blocks, torch.tensor(weights, dtype=torch.float64), density, "total")
    return best_rank(u @ torch.diag(s) @ merged, rank)


def dense_tsv(pairs, weights, rank):
    """TSV-M with dense SVDs: top r/k directions per member (remaining slots to the largest next singular value),
    Procrustes orthogonalisation of the kept singular vectors."""
    svds = [torch.linalg.svd(w * update) for w, update in zip(weights, dense(pairs), strict=True)]
    kept = [rank // len(pairs)] * len(pairs)
    while sum(kept) < rank:
        kept[max(range(len(pairs)), key=lambda i: svds[i][1][kept[i]])] += 1
    u = torch.cat([svd[0][:, :n] for svd, n in zip(svds, kept, strict=True)], dim=1)
    s = torch.cat([svd[1][:n] for svd, n in zip(svds, kept, strict=True)])
    v = torch.cat([svd[2][:n].T for svd, n in zip(svds, kept, strict=True)], dim=1)

    def nearest_orthonormal(x):
        p, _, qh = torch.linalg.svd(x, full_matrices=False)
        return p @ qh

    return nearest_orthonormal(u) @ torch.diag(s) @ nearest_orthonormal(v).T


# The library's own precision per dtype of the source factors (the references always run in float64).
TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-4}


class TestAgainstDenseReferences:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
    @pytest.mark.parametrize("kind,reference", [("core_ties", dense_core_ties), ("knots_ties", dense_knots_ties)])
    def test_ties_types_equal_the_dense_computation(self, kind, reference, density, dtype):
        pairs = [(b.to(dtype), a.to(dtype)) for b, a in random_pairs(3, rank=4, seed=3)]
        weights = [1.0, 1.0, 1.0]
        merged = merge_methods.merge_updates(kind, pairs, weights, rank=4, density=density)
        assert merged[0].dtype == dtype
        expected = reference([(b.double(), a.double()) for b, a in pairs], weights, 4, density)
        assert relative(product(merged).double(), expected) < TOLERANCES[dtype]

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("kind", TIES_TYPES)
    @pytest.mark.parametrize("k", [2, 3])
    def test_identical_copies_pruned_like_peft_ties_in_every_dtype(self, kind, k, dtype):
        """k copies of one adapter at density 0.5 give PEFT's TIES of k copies of the adapter's own coefficients:
        the copy itself pruned in the shared basis. In float32 the concatenation of copies has numerically-zero
        singular directions; a tolerance below float32 resolution (main at 898e22c: 1e-10) divided their rounding
        noise by a tiny singular value, and that noise won the pruning: 37% off the float64 merge."""
        (pair,) = random_pairs(1)
        copies = [(pair[0].to(dtype), pair[1].to(dtype))] * k
        merged = product(merge_methods.merge_updates(kind, copies, [1.0] * k, rank=4, density=0.5)).double()
        reference = product(merge_methods.merge_updates(kind, [pair] * k, [1.0] * k, rank=4, density=0.5))
        assert relative(merged, reference) < TOLERANCES[dtype]
        dense_reference = (dense_core_ties if kind == "core_ties" else dense_knots_ties)([pair] * k, [1.0] * k, 4, 0.5)
        assert relative(reference, dense_reference) < 1e-8

    @pytest.mark.parametrize("kind", FACTOR_UPDATE_TYPES)
    def test_merges_depend_on_the_updates_not_on_their_factors_or_member_order(self, kind):
        """Independent of how the library chooses its bases: re-factoring each member (B·G, G^-1·A, the same
        update) and reordering the members leave every merged update unchanged (TSV-M's orthogonalisation is also
        order-free up to the choice of kept directions, which depends on the singular values only)."""
        pairs = random_pairs(3, rank=4, seed=8)
        generator = torch.Generator().manual_seed(9)
        refactored = []
        for b, a in pairs:
            g = torch.randn(4, 4, generator=generator, dtype=DTYPE) + 3 * torch.eye(4, dtype=DTYPE)
            refactored.append((b @ g, torch.linalg.solve(g, a)))
        weights = merge_weights_for(kind, 3)
        merged = product(merge_methods.merge_updates(kind, pairs, weights, rank=4, density=0.5))
        again = product(merge_methods.merge_updates(kind, refactored[::-1], weights[::-1], rank=4, density=0.5))
        assert relative(again, merged) < 1e-8

    @pytest.mark.parametrize("k,rank", [(3, 4), (2, 4), (4, 8), (5, 3)])
    def test_tsv_m_equals_the_dense_computation(self, k, rank):
        pairs = random_pairs(k, rank=4, seed=4)
        weights = [1.0] * k
        new_a, new_b = merge_methods.merge_updates("tsv_m", pairs, weights, rank=rank)
        assert new_a.shape == (rank, 30) and new_b.shape == (40, rank)
        assert relative(new_b @ new_a, dense_tsv(pairs, weights, rank)) < 1e-8

    def test_biases_merge_by_each_types_rule(self):
        generator = torch.Generator().manual_seed(5)
        biases = [torch.randn(10, generator=generator, dtype=DTYPE) for _ in range(3)]
        weights = [0.2, 0.3, 0.5]
        for kind in ("core_ta", "tsv_m"):
            expected = sum(w * b for w, b in zip(weights, biases, strict=True))
            torch.testing.assert_close(merge_methods.merge_biases(kind, biases, weights), expected)
        for kind in TIES_TYPES:
            expected = peft_ties(biases, torch.tensor(weights, dtype=DTYPE), 0.5, "total")
            torch.testing.assert_close(merge_methods.merge_biases(kind, biases, weights, density=0.5), expected)


class BiasedMLP(torch.nn.Module):
    """Two linear layers with biases (lora_bias needs a base bias), wide enough that rank 12 is not full rank."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(32, 24)
        self.down = torch.nn.Linear(24, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


# name -> LoraConfig kwargs; the expected scaling of each module is written out in `SCALINGS`.
SOURCES = {
    "rs": {"r": 4, "lora_alpha": 8, "use_rslora": True, "lora_bias": True},
    "pat": {"r": 4, "lora_alpha": 6, "rank_pattern": {"down": 2}, "alpha_pattern": {"down": 5}, "lora_bias": True},
    "plain": {"r": 4, "lora_alpha": 4},
}
SCALINGS = {  # alpha / sqrt(r) for rslora; the module's own alpha / r under rank_pattern / alpha_pattern
    "rs": {"up": 8 / math.sqrt(4), "down": 8 / math.sqrt(4)},
    "pat": {"up": 6 / 4, "down": 5 / 2},
    "plain": {"up": 1.0, "down": 1.0},
}


@pytest.fixture
def biased_model():
    torch.manual_seed(0)
    model = None
    for name, kwargs in SOURCES.items():
        config = LoraConfig(target_modules=["up", "down"], init_lora_weights=False, **kwargs)
        if model is None:
            model = get_peft_model(BiasedMLP(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in SOURCES:
                if layer.lora_B[name].bias is not None:
                    layer.lora_B[name].bias.copy_(torch.randn(layer.lora_B[name].bias.shape, generator=generator))
    model.eval()
    return model


def expected_merge(model, members, weights):
    """{module: (ΔW, Δb)} of Σ w_i·s_i·(B_i·A_i, b_i), from the raw factors and the scalings written in SCALINGS."""
    expected = {}
    for module in ("up", "down"):
        layer = getattr(model.base_model.model, module)
        delta, bias = 0, 0
        for member, weight in zip(members, weights, strict=True):
            s = SCALINGS[member][module]
            a, b = layer.lora_A[member].weight.double(), layer.lora_B[member].weight.double()
            delta = delta + weight * s * (b @ a)
            if layer.lora_B[member].bias is not None:
                bias = bias + weight * s * layer.lora_B[member].bias.double()
        expected[module] = (delta, bias)
    return expected


class TestRsloraAndBias:
    def test_scalings_are_the_documented_ones(self, biased_model):
        """The test's own scaling table agrees with what PEFT applies (so the expectations below are independent)."""
        for module in ("up", "down"):
            layer = getattr(biased_model.base_model.model, module)
            for member in SOURCES:
                assert math.isclose(layer.scaling[member], SCALINGS[member][module])

    def test_checks_allow_rslora_and_bias_only_for_update_types(self, biased_model):
        for kind in UPDATE_TYPES:
            check_source_adapters(biased_model, ["rs", "pat", "plain"], kind)
        for kind in ("ties", "svd", "cat"):
            with pytest.raises(UnsupportedAdapterError, match="core_ta"):
                check_source_adapters(biased_model, ["rs", "plain"], kind)

    def test_dora_stays_refused(self, biased_model):
        biased_model.add_adapter("dora", LoraConfig(r=4, target_modules=["up", "down"], use_dora=True))
        with pytest.raises(UnsupportedAdapterError, match="DoRA"):
            check_source_adapters(biased_model, ["plain", "dora"], "core_ta")

    @pytest.mark.parametrize("members", [["rs", "pat", "plain"], ["rs", "pat"], ["pat"]])
    def test_core_ta_equals_the_merged_full_updates(self, biased_model, members):
        """rslora, rank/alpha patterns and LoRA biases: the merged adapter's output is the base plus the mean of the
        members' scaled updates and biases, recomputed from the raw factors (total rank 12 = svd_rank: exact)."""
        config = D2CMergeConfig(num_clusters=1, combination_type="core_ta", merge={"svd_rank": 12})
        AdapterMerger(biased_model, config).merge(members, "merged")
        merged_config = biased_model.peft_config["merged"]
        assert (merged_config.r, merged_config.lora_alpha, merged_config.use_rslora) == (12, 12, False)
        weights = merge_weights_for("core_ta", len(members))
        expected = expected_merge(biased_model, members, weights)
        base = biased_model.base_model.model
        for module, (delta, bias) in expected.items():
            layer = getattr(base, module)
            got = layer.lora_B["merged"].weight.double() @ layer.lora_A["merged"].weight.double()
            assert relative(got, delta) < 1e-5
            torch.testing.assert_close(layer.lora_B["merged"].bias.double(), bias, rtol=1e-5, atol=1e-6)
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            hidden = x @ (base.up.base_layer.weight.double() + expected["up"][0]).T.float()
            hidden = torch.relu(hidden + base.up.base_layer.bias + expected["up"][1].float())
            reference = hidden @ (base.down.base_layer.weight.double() + expected["down"][0]).T.float()
            reference = reference + base.down.base_layer.bias + expected["down"][1].float()
            biased_model.set_adapter("merged")
            torch.testing.assert_close(biased_model(x), reference, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("kind", TIES_TYPES)
    def test_ties_types_merge_the_scaled_updates(self, biased_model, kind):
        """core_ties / knots_ties of rslora + bias adapters equal the dense TIES computation on s_i·B_i·A_i."""
        members = ["rs", "pat", "plain"]
        config = D2CMergeConfig(num_clusters=1, combination_type=kind, merge={"svd_rank": 4, "density": 0.5})
        AdapterMerger(biased_model, config).merge(members, "merged")
        reference = dense_core_ties if kind == "core_ties" else dense_knots_ties
        for module in ("up", "down"):
            layer = getattr(biased_model.base_model.model, module)
            pairs = [
                (layer.lora_B[m].weight.double(), SCALINGS[m][module] * layer.lora_A[m].weight.double())
                for m in members
            ]
            got = layer.lora_B["merged"].weight.double() @ layer.lora_A["merged"].weight.double()
            assert relative(got, reference(pairs, [1.0] * 3, 4, 0.5)) < 1e-4
            biases = [
                SCALINGS[m][module] * layer.lora_B[m].bias.double()
                if layer.lora_B[m].bias is not None
                else torch.zeros(layer.out_features, dtype=DTYPE)
                for m in members
            ]
            expected_bias = peft_ties(biases, torch.ones(3, dtype=DTYPE), 0.5, "total")
            torch.testing.assert_close(layer.lora_B["merged"].bias.double(), expected_bias, rtol=1e-5, atol=1e-6)


class TestMergedAdapters:
    @pytest.mark.parametrize("kind", UPDATE_TYPES)
    def test_merged_adapter_has_the_rank_and_file_size_of_a_source(self, tiny_peft_model, tmp_path, kind):
        model = tiny_peft_model
        merger = AdapterMerger(model, D2CMergeConfig(num_clusters=1, combination_type=kind))
        merger.layer_inputs = random_layer_inputs(model, ["copy", "reverse", "sort"])  # used by `regmean` only
        merger.merge(["copy", "reverse", "sort"], "merged")
        assert merged_rank([8, 8, 8], kind) == model.peft_config["copy"].r == model.peft_config["merged"].r
        assert model.peft_config["merged"].lora_alpha == model.peft_config["merged"].r
        model.save_pretrained(str(tmp_path), selected_adapters=["copy", "merged"])
        sizes = [os.path.getsize(tmp_path / name / "adapter_model.safetensors") for name in ("copy", "merged")]
        assert sizes[0] == sizes[1]

    @pytest.mark.parametrize("kind", UPDATE_TYPES)
    def test_refill_in_place_equals_a_fresh_merge(self, tiny_peft_model, kind):
        model = tiny_peft_model
        merger = AdapterMerger(model, D2CMergeConfig(num_clusters=2, combination_type=kind, merge={"cache_size": 2}))
        merger.layer_inputs = random_layer_inputs(
            model, ["copy", "reverse", "sort", "first"]
        )  # used by `regmean` only
        for cluster in (["copy", "reverse"], ["sort", "first"], ["copy", "sort", "first"]):
            name = merger.adapter_for(cluster)
        assert merger.num_refills == 1
        fresh = AdapterMerger(model, D2CMergeConfig(num_clusters=2, combination_type=kind, merged_adapter_prefix="f"))
        fresh.layer_inputs = merger.layer_inputs
        fresh.merge(["copy", "sort", "first"], "fresh")
        for _, layer in lora_layers(model):
            torch.testing.assert_close(layer.lora_A[name].weight, layer.lora_A["fresh"].weight)
            torch.testing.assert_close(layer.lora_B[name].weight, layer.lora_B["fresh"].weight)

    @pytest.mark.parametrize("kind", ["core_ta", "knots_ties"])
    def test_a_d2c_run_with_an_update_type(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, kind):
        """The run's merged adapters are the merges of their clusters, recomputed here from the raw factors by
        dense SVDs (core_ta: the best rank-8 approximation of the mean scaled update; knots_ties: the paper's
        dense KnOTS-TIES), and the losses the result reports are those of a fresh scoring of those adapters."""
        config = D2CMergeConfig(num_clusters=2, num_iterations=4, combination_type=kind, show_progress=False)
        result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        merged_clusters = [(n, c) for n, c in zip(result.merged_adapter_names, result.clusters, strict=True)]
        assert any(len(c) > 1 for _, c in merged_clusters)
        for name, cluster in merged_clusters:
            if len(cluster) == 1:
                continue
            merged = tiny_peft_model.peft_config[name]
            assert (merged.r, merged.lora_alpha, merged.use_rslora) == (8, 8, False)
            for module, layer in lora_layers(tiny_peft_model):
                pairs = [
                    (layer.lora_B[m].weight.double(), float(layer.scaling[m]) * layer.lora_A[m].weight.double())
                    for m in cluster
                ]
                if kind == "core_ta":
                    expected = best_rank(sum(b @ a for b, a in pairs) / len(pairs), 8)
                else:
                    expected = dense_knots_ties(pairs, [1.0] * len(pairs), 8, config.merge.density)
                got = layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()
                assert float(torch.linalg.norm(expected)) > 0.1
                assert relative(got, expected) < 1e-4, (name, module)
            for task in cluster:
                loss = completion_loss(tiny_peft_model, tiny_tokenizer, tiny_task_examples[task], adapter_name=name)
                assert result.task_losses[task] == pytest.approx(loss, rel=1e-4)

    def test_singleton_truncated_by_svd_rank_reports_the_loss_of_what_ships(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        """Six tasks in five clusters at svd_rank=1 (sources are rank 8): the singletons ship as rank-1 truncations,
        so their reported losses are those of the shipped adapters, not of the sources (on main at 898e22c the
        singletons were scored on their sources)."""
        config = D2CMergeConfig(
            num_clusters=5, num_iterations=2, combination_type="core_ta", show_progress=False, merge={"svd_rank": 1}
        )
        result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        singletons = [
            (n, c[0]) for n, c in zip(result.merged_adapter_names, result.clusters, strict=True) if len(c) == 1
        ]
        assert singletons
        for name, task in singletons:
            assert tiny_peft_model.peft_config[name].r == 1
            shipped = completion_loss(tiny_peft_model, tiny_tokenizer, tiny_task_examples[task], adapter_name=name)
            source = completion_loss(tiny_peft_model, tiny_tokenizer, tiny_task_examples[task], adapter_name=task)
            assert result.task_losses[task] == pytest.approx(shipped, rel=1e-6)
            assert abs(shipped - source) > 1e-2 * source
