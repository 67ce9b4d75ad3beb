"""RegMean in factored form (issue 22): the maths against dense least squares, the Grams against hand-captured layer
inputs, and the data-aware merge end to end on the tiny Llama (`combination_type="regmean"`)."""

from __future__ import annotations

import pytest
import torch
from recompute import captured_layer_inputs, dense_regmean

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.data.examples import Example
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.regmean import RegMeanSystem, compress_rows, regmean_merge, shrink_off_diagonal
from peft_d2c.engine.scoring.layer_inputs import input_factors
from peft_d2c.engine.scoring.loss import pad_token_id_for, tokenize_example

OUT, IN = 9, 7


def members(seed: int, ranks=(2, 3, 2), tokens=(5, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(OUT, r, generator=g, dtype=torch.float64), torch.randn(r, IN, generator=g, dtype=torch.float64))
        for r in ranks
    ]
    inputs = [torch.randn(n, IN, generator=g, dtype=torch.float64) for n in tokens]
    return pairs, inputs


def factor(x: torch.Tensor) -> torch.Tensor:
    """A member's `LayerInput` as the run keeps it: its tokens scaled by 1/√m (F^T F = the token-mean Gram)."""
    return compress_rows(x) / x.shape[0] ** 0.5


def mean_gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


class TestRegMeanMaths:
    @pytest.mark.parametrize("alpha", [0.3, 0.9])
    @pytest.mark.parametrize("tokens", [(5, 4, 6), (2, 1, 3)], ids=["gram_space", "token_space"])
    def test_full_rank_equals_dense_least_squares(self, alpha, tokens):
        """15 tokens of width 7 solve in the in x in form, 6 tokens through the M x M (Woodbury) system: both are the
        dense regularised least squares."""
        pairs, inputs = members(0, tokens=tokens)
        weights = [0.5, 0.2, 0.3]
        system = RegMeanSystem([factor(x) for x in inputs], weights, alpha, dtype=torch.float64)
        assert system.token_space == (sum(tokens) < IN)
        new_a, new_b = regmean_merge(pairs, [factor(x) for x in inputs], weights, rank=7, alpha=alpha)
        expected = dense_regmean([b @ a for b, a in pairs], [mean_gram(x) for x in inputs], weights, alpha)
        torch.testing.assert_close(new_b @ new_a, expected, rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_wide_token_space_merge_equals_the_dense_gram_form(self, dtype):
        """At a real width (1024 inputs, 3 members of 40-70 tokens: M = 170 << 1024) the token-space solve gives the
        update of the dense in x in Gram form, in float32 as in float64."""
        g = torch.Generator().manual_seed(11)
        out, width = 96, 1024
        pairs = [
            (
                torch.randn(out, r, generator=g, dtype=torch.float64),
                torch.randn(r, width, generator=g, dtype=torch.float64),
            )
            for r in (8, 16, 4)
        ]
        inputs = [torch.randn(n, width, generator=g, dtype=torch.float64) for n in (40, 70, 60)]
        weights = [1 / 3] * 3
        expected = dense_regmean([b @ a for b, a in pairs], [mean_gram(x) for x in inputs], weights, 0.9)
        new_a, new_b = regmean_merge(
            [(b.to(dtype), a.to(dtype)) for b, a in pairs],
            [factor(x).to(dtype) for x in inputs],
            weights,
            rank=28,
            alpha=0.9,
        )
        assert new_a.dtype == dtype and RegMeanSystem([factor(x) for x in inputs], weights, 0.9).token_space
        tolerance = 1e-9 if dtype == torch.float64 else 1e-4
        error = torch.linalg.norm(new_b.double() @ new_a.double() - expected) / torch.linalg.norm(expected)
        assert error < tolerance

    @pytest.mark.parametrize("tokens", [(5, 4, 6), (2, 1, 2)], ids=["gram_space", "token_space"])
    def test_the_system_solves_with_the_inverse_of_the_regularised_sum(self, tokens):
        pairs, inputs = members(12, tokens=tokens)
        weights = [0.4, 1.0, 0.0]  # a zero weight: that member's inputs do not count
        system = RegMeanSystem([factor(x) for x in inputs], weights, 0.6, dtype=torch.float64)
        grams = [shrink_off_diagonal(mean_gram(x), 0.6) for x in inputs]
        dense = sum(w * g for g, w in zip(grams, weights, strict=True))
        right = torch.cat([weights[i] * grams[i] @ pairs[i][1].T for i in (0, 2)], dim=1)
        assert system.token_space == (sum(tokens) < IN)
        solution = system.member_solution([(0, pairs[0][1]), (2, pairs[2][1])])
        torch.testing.assert_close(solution, torch.linalg.solve(dense, right), rtol=1e-9, atol=1e-9)

    def test_float32_token_space_keeps_its_digits_on_outlier_features(self):
        """Activations of language models have a few features hundreds of times larger than the rest (and some the
        tokens barely reach): there D is tiny against U^T·U in some directions. The float32 merge stays within 1e-5
        of the float64 dense solution (Woodbury applied to the whole right-hand side: 3.3e-5, and 2.3e-5 after a step
        of iterative refinement; the split of `member_solution`: 1.4e-6)."""
        g = torch.Generator().manual_seed(5)
        out, width = 64, 768
        scales = torch.ones(width, dtype=torch.float64)
        scales[:6] = 300.0  # outlier features
        scales[6:40] = 1e-3  # features the tokens barely reach
        pairs = [
            (
                torch.randn(out, r, generator=g, dtype=torch.float64),
                torch.randn(r, width, generator=g, dtype=torch.float64),
            )
            for r in (8, 16, 4, 8)
        ]
        inputs = [
            (
                torch.randn(n, 24, generator=g, dtype=torch.float64)
                @ torch.randn(24, width, generator=g, dtype=torch.float64)
                + 0.1 * torch.randn(n, width, generator=g, dtype=torch.float64)
            )
            * scales
            for n in (90, 120, 60, 100)
        ]
        weights = [0.25] * 4
        expected = dense_regmean([b @ a for b, a in pairs], [mean_gram(x) for x in inputs], weights, 0.9)
        new_a, new_b = regmean_merge(
            [(b.float(), a.float()) for b, a in pairs],
            [factor(x).float() for x in inputs],
            weights,
            rank=36,
            alpha=0.9,
        )
        assert RegMeanSystem([factor(x) for x in inputs], weights, 0.9).token_space
        error = torch.linalg.norm(new_b.double() @ new_a.double() - expected) / torch.linalg.norm(expected)
        assert error < 1e-5

    def test_a_member_with_more_tokens_than_the_width_keeps_a_triangular_factor(self):
        """Tokens beyond the width: the kept factor is in x in (never larger than the Gram) with the same Gram, and
        mixed with a token-matrix member the merge is still the dense one."""
        pairs, inputs = members(13, tokens=(30, 3, 2))
        kept = factor(inputs[0])
        assert kept.shape == (IN, IN)
        torch.testing.assert_close(kept.T @ kept, mean_gram(inputs[0]), rtol=1e-10, atol=1e-10)
        new_a, new_b = regmean_merge(pairs, [factor(x) for x in inputs], [1.0] * 3, rank=7, alpha=0.8)
        expected = dense_regmean([b @ a for b, a in pairs], [mean_gram(x) for x in inputs], [1.0] * 3, 0.8)
        torch.testing.assert_close(new_b @ new_a, expected, rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("tokens", [(5, 4, 6), (2, 1, 3)], ids=["gram_space", "token_space"])
    def test_member_without_the_layer_pulls_towards_zero(self, tokens):
        """A member that does not adapt the layer is a zero update whose inputs still count."""
        pairs, inputs = members(1, tokens=tokens)
        new_a, new_b = regmean_merge(
            [pairs[0], None, pairs[2]], [factor(x) for x in inputs], [1.0] * 3, rank=7, alpha=0.5
        )
        updates = [pairs[0][0] @ pairs[0][1], torch.zeros(OUT, IN, dtype=torch.float64), pairs[2][0] @ pairs[2][1]]
        expected = dense_regmean(updates, [mean_gram(x) for x in inputs], [1.0] * 3, 0.5)
        torch.testing.assert_close(new_b @ new_a, expected, rtol=1e-9, atol=1e-9)

    def test_minimises_the_output_error_on_every_members_inputs(self):
        """alpha = 1 with more tokens than features: W* is the least-squares optimum, so any step away costs more."""
        pairs, inputs = members(2, tokens=(20, 20, 20))
        new_a, new_b = regmean_merge(pairs, [compress_rows(x) for x in inputs], [1.0] * 3, rank=7, alpha=1.0)
        merged = new_b @ new_a

        def error(w):
            return sum(((x @ w.T - x @ (b @ a).T) ** 2).sum() for x, (b, a) in zip(inputs, pairs, strict=True))

        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            step = 1e-3 * torch.randn(OUT, IN, generator=g, dtype=torch.float64)
            assert error(merged + step) > error(merged)
        assert error(merged) < error(pairs[0][0] @ pairs[0][1])

    @pytest.mark.parametrize("tokens", [(5, 4, 6), (2, 1, 3)], ids=["gram_space", "token_space"])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_identical_members_give_the_member_back_whatever_the_inputs(self, tokens, dtype):
        pairs, inputs = members(4, ranks=(3, 3, 3), tokens=tokens)
        same = [(pairs[0][0].to(dtype), pairs[0][1].to(dtype))] * 3
        new_a, new_b = regmean_merge(same, [factor(x).to(dtype) for x in inputs], [1 / 3] * 3, rank=3, alpha=0.9)
        tolerance = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close((new_b @ new_a).double(), pairs[0][0] @ pairs[0][1], rtol=tolerance, atol=tolerance)

    def test_truncation_is_the_best_rank_r_approximation(self):
        pairs, inputs = members(7)
        inputs = [factor(x) for x in inputs]
        full_a, full_b = regmean_merge(pairs, inputs, [1.0] * 3, rank=7, alpha=0.9)
        new_a, new_b = regmean_merge(pairs, inputs, [1.0] * 3, rank=2, alpha=0.9)
        s = torch.linalg.svdvals(full_b @ full_a)
        residual = torch.linalg.norm(full_b @ full_a - new_b @ new_a)
        torch.testing.assert_close(residual, torch.linalg.norm(s[2:]), rtol=1e-8, atol=1e-10)

    def test_refuses_what_it_cannot_solve(self):
        pairs, inputs = members(8, tokens=(1, 1, 1))
        with pytest.raises(ValueError, match="alpha < 1"):
            regmean_merge(pairs, [factor(x) for x in inputs], [1.0] * 3, rank=2, alpha=1.0)
        with pytest.raises(ValueError, match="non-negative"):
            regmean_merge(pairs, [factor(x) for x in inputs], [1.0, -0.5, 1.0], rank=2, alpha=0.9)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_meta_inputs_keep_device_dtype_and_shape(self, dtype):
        pairs = [(torch.empty(12, 4, device="meta", dtype=dtype), torch.empty(4, 10, device="meta", dtype=dtype))] * 2
        inputs = [torch.empty(6, 10, device="meta") for _ in range(2)]
        new_a, new_b = regmean_merge(
            [pairs[0], None, pairs[1]], [inputs[0], inputs[1], inputs[0]], [1 / 3] * 3, rank=4, alpha=0.9
        )
        assert (new_a.device.type, new_a.dtype, tuple(new_a.shape)) == ("meta", dtype, (4, 10))
        assert (new_b.device.type, new_b.dtype, tuple(new_b.shape)) == ("meta", dtype, (12, 4))

    def test_shrink_off_diagonal_keeps_the_diagonal(self):
        g = torch.arange(9.0).view(3, 3)
        torch.testing.assert_close(
            shrink_off_diagonal(g, 0.5), torch.tensor([[0.0, 0.5, 1.0], [1.5, 4.0, 2.5], [3.0, 3.5, 8.0]])
        )


class TestLayerInputs:
    def test_factors_hold_the_token_mean_gram_of_the_inputs_each_adapter_sees(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        model = tiny_peft_model
        model.eval()
        tasks = sorted(model.peft_config)[:2]
        tokenized = {
            t: [tokenize_example(tiny_tokenizer, Example(**e)) for e in tiny_task_examples[t][:3]] for t in tasks
        }
        factors = input_factors(model, tokenized, pad_token_id=pad_token_id_for(tiny_tokenizer), batch_size=2)
        layers = list(lora_layers(model))
        # Independent capture: one example at a time (no padding), every layer's input recorded by its own hook.
        for task in tasks:
            captured = captured_layer_inputs(model, tokenized[task], task)
            for index, x in enumerate(captured):
                kept = factors[task][index]
                # the tokens themselves (scaled) while they are fewer than the width, on the CPU, in float32
                assert kept.shape == (min(x.shape), x.shape[1]) and (kept.device.type, kept.dtype) == (
                    "cpu",
                    torch.float32,
                )
                torch.testing.assert_close(kept.double().T @ kept.double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        # q and v of one block read the same hidden states: one factor object serves both.
        names = [name for name, _ in layers]
        q = names.index(next(n for n in names if n.endswith("layers.0.self_attn.q_proj")))
        v = names.index(next(n for n in names if n.endswith("layers.0.self_attn.v_proj")))
        assert factors[tasks[0]][q] is factors[tasks[0]][v]


class TestRegMeanEndToEnd:
    def test_merged_layers_equal_the_dense_regmean_of_hand_captured_inputs(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        model = tiny_peft_model
        config = D2CMergeConfig(
            num_clusters=2, method="random", combination_type="regmean", seed=1, merge={"regmean_alpha": 0.7}
        )
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        names = sorted(result.assignment)
        tokenized = {
            t: [tokenize_example(tiny_tokenizer, Example(**e)) for e in tiny_task_examples[t][:10]] for t in names
        }
        # q/v/o adapters: per block, q and v share one input (the normed hidden states), o reads the attention output;
        # both are hidden-wide, float32: per block and adapter 2 factors of min(tokens, hidden) x hidden floats.
        shape = model.base_model.model.config
        tokens = {t: sum(len(row.input_ids) for row in tokenized[t]) for t in names}
        expected_bytes = sum(
            2 * shape.num_hidden_layers * min(m, shape.hidden_size) * shape.hidden_size * 4 for m in tokens.values()
        )
        assert result.stats["layer_input_bytes"] == expected_bytes
        # Every layer's inputs captured by hand, one example at a time (no padding), as dense token-mean Grams.
        model.eval()
        layers = list(lora_layers(model))
        grams = {t: [mean_gram(x) for x in captured_layer_inputs(model, tokenized[t], t)] for t in names}
        cluster = sorted(result.clusters[0])
        merged = result.merged_adapter_names[0]
        checked = 0
        for index, (_, layer) in enumerate(layers):
            if lora_factors(layer, merged) is None:
                continue
            updates = []
            for m in cluster:
                a, b = lora_factors(layer, m)
                updates.append(b.double() @ a.double() * layer.scaling[m])
            expected = dense_regmean(
                updates, [grams[m][index] for m in cluster], [1 / len(cluster)] * len(cluster), 0.7
            )
            a, b = lora_factors(layer, merged)
            rank = model.peft_config[merged].r
            if rank >= sum(model.peft_config[m].r for m in cluster):
                torch.testing.assert_close((b @ a).double() * layer.scaling[merged], expected, rtol=2e-4, atol=2e-5)
            else:  # truncated: the best rank-r approximation of the dense merge (Eckart-Young)
                s = torch.linalg.svdvals(expected)
                residual = torch.linalg.norm((b @ a).double() * layer.scaling[merged] - expected)
                torch.testing.assert_close(residual, torch.linalg.norm(s[rank:]), rtol=1e-3, atol=1e-5)
            checked += 1
        assert checked > 0
        assert result.task_losses and all(loss == loss for loss in result.task_losses.values())

    def test_a_custom_score_fn_needs_the_tokenizer_and_works_with_it(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        config = D2CMergeConfig(num_clusters=2, combination_type="regmean", num_iterations=2)
        with pytest.raises(ValueError, match="tokenizer="):
            merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, score_fn=lambda *a: 0.0)
        calls = []
        result = merge_adapters_d2c(
            tiny_peft_model,
            tiny_task_examples,
            config,
            tokenizer=tiny_tokenizer,
            score_fn=lambda model, adapter, task, examples: calls.append(adapter) or float(len(task)),
        )
        assert calls and result.task_losses == {t: float(len(t)) for t in result.assignment}
