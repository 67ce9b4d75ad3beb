"""RegMean in factored form (issue 22): the maths against dense least squares, the Grams against hand-captured layer
inputs, and the data-aware merge end to end on the tiny Llama (`combination_type="regmean"`)."""

from __future__ import annotations

import pytest
import torch

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.data.examples import Example
from peft_d2c.engine.layer_inputs import input_grams
from peft_d2c.engine.lora import lora_factors, lora_layers
from peft_d2c.engine.regmean import regmean_merge, shrink_off_diagonal
from peft_d2c.engine.scoring import pad_token_id_for, tokenize_example

OUT, IN = 9, 7


def members(seed: int, ranks=(2, 3, 2), tokens=(5, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(OUT, r, generator=g, dtype=torch.float64), torch.randn(r, IN, generator=g, dtype=torch.float64))
        for r in ranks
    ]
    inputs = [torch.randn(n, IN, generator=g, dtype=torch.float64) for n in tokens]
    return pairs, inputs


def dense_regmean(updates, grams, weights, alpha):
    """(Σ w_i ΔW_i G̃_i)(Σ w_j G̃_j)^-1 on dense matrices, G̃ = α G + (1 - α) diag(G) written out entry by entry."""

    def regularise(g):
        out = g.clone()
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                if i != j:
                    out[i, j] = alpha * g[i, j]
        return out

    left = sum(w * u @ regularise(g) for u, g, w in zip(updates, grams, weights, strict=True))
    right = sum(w * regularise(g) for g, w in zip(grams, weights, strict=True))
    return torch.linalg.solve(right.T, left.T).T


class TestRegMeanMaths:
    @pytest.mark.parametrize("alpha", [0.3, 0.9])
    def test_full_rank_equals_dense_least_squares(self, alpha):
        pairs, inputs = members(0)
        grams = [x.T @ x for x in inputs]
        weights = [0.5, 0.2, 0.3]
        new_a, new_b = regmean_merge(pairs, grams, weights, rank=7, alpha=alpha)
        expected = dense_regmean([b @ a for b, a in pairs], grams, weights, alpha)
        torch.testing.assert_close(new_b @ new_a, expected, rtol=1e-9, atol=1e-9)

    def test_member_without_the_layer_pulls_towards_zero(self):
        """A member that does not adapt the layer is a zero update whose inputs still count."""
        pairs, inputs = members(1)
        grams = [x.T @ x for x in inputs]
        new_a, new_b = regmean_merge([pairs[0], None, pairs[2]], grams, [1.0] * 3, rank=7, alpha=0.5)
        updates = [pairs[0][0] @ pairs[0][1], torch.zeros(OUT, IN, dtype=torch.float64), pairs[2][0] @ pairs[2][1]]
        torch.testing.assert_close(new_b @ new_a, dense_regmean(updates, grams, [1.0] * 3, 0.5), rtol=1e-9, atol=1e-9)

    def test_minimises_the_output_error_on_every_members_inputs(self):
        """alpha = 1 with more tokens than features: W* is the least-squares optimum, so any step away costs more."""
        pairs, inputs = members(2, tokens=(20, 20, 20))
        grams = [x.T @ x for x in inputs]
        new_a, new_b = regmean_merge(pairs, grams, [1.0] * 3, rank=7, alpha=1.0)
        merged = new_b @ new_a

        def error(w):
            return sum(((x @ w.T - x @ (b @ a).T) ** 2).sum() for x, (b, a) in zip(inputs, pairs, strict=True))

        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            step = 1e-3 * torch.randn(OUT, IN, generator=g, dtype=torch.float64)
            assert error(merged + step) > error(merged)
        assert error(merged) < error(pairs[0][0] @ pairs[0][1])

    def test_identical_members_give_the_member_back_whatever_the_inputs(self):
        pairs, inputs = members(4, ranks=(3, 3, 3))
        same = [pairs[0]] * 3
        new_a, new_b = regmean_merge(same, [x.T @ x for x in inputs], [1 / 3] * 3, rank=3, alpha=0.9)
        torch.testing.assert_close(new_b @ new_a, pairs[0][0] @ pairs[0][1], rtol=1e-9, atol=1e-9)

    def test_batched_layers_match_one_at_a_time(self):
        batch = [members(seed) for seed in (5, 6)]
        pairs = [
            (torch.stack([batch[0][0][i][0], batch[1][0][i][0]]), torch.stack([batch[0][0][i][1], batch[1][0][i][1]]))
            for i in range(3)
        ]
        grams = [torch.stack([batch[0][1][i].T @ batch[0][1][i], batch[1][1][i].T @ batch[1][1][i]]) for i in range(3)]
        new_a, new_b = regmean_merge(pairs, grams, [1.0] * 3, rank=4, alpha=0.9)
        # the form a run passes: per member, one (in, in) Gram per layer of the batch, never stacked
        listed_a, listed_b = regmean_merge(pairs, [list(g.unbind(0)) for g in grams], [1.0] * 3, rank=4, alpha=0.9)
        for position, (layer_pairs, layer_inputs) in enumerate(batch):
            one_a, one_b = regmean_merge(layer_pairs, [x.T @ x for x in layer_inputs], [1.0] * 3, rank=4, alpha=0.9)
            torch.testing.assert_close(new_b[position] @ new_a[position], one_b @ one_a, rtol=1e-8, atol=1e-8)
            torch.testing.assert_close(listed_b[position] @ listed_a[position], one_b @ one_a, rtol=1e-8, atol=1e-8)

    def test_truncation_is_the_best_rank_r_approximation(self):
        pairs, inputs = members(7)
        grams = [x.T @ x for x in inputs]
        full_a, full_b = regmean_merge(pairs, grams, [1.0] * 3, rank=7, alpha=0.9)
        new_a, new_b = regmean_merge(pairs, grams, [1.0] * 3, rank=2, alpha=0.9)
        s = torch.linalg.svdvals(full_b @ full_a)
        residual = torch.linalg.norm(full_b @ full_a - new_b @ new_a)
        torch.testing.assert_close(residual, torch.linalg.norm(s[2:]), rtol=1e-8, atol=1e-10)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_meta_inputs_keep_device_dtype_and_shape(self, dtype):
        pairs = [
            (torch.empty(3, 12, 4, device="meta", dtype=dtype), torch.empty(3, 4, 10, device="meta", dtype=dtype))
            for _ in range(2)
        ]
        grams = [torch.empty(3, 10, 10, device="meta") for _ in range(2)]
        new_a, new_b = regmean_merge(
            [pairs[0], None, pairs[1]], [grams[0], grams[1], grams[0]], [1 / 3] * 3, rank=4, alpha=0.9
        )
        assert (new_a.device.type, new_a.dtype, tuple(new_a.shape)) == ("meta", dtype, (3, 4, 10))
        assert (new_b.device.type, new_b.dtype, tuple(new_b.shape)) == ("meta", dtype, (3, 12, 4))

    def test_shrink_off_diagonal_keeps_the_diagonal(self):
        g = torch.arange(9.0).view(3, 3)
        torch.testing.assert_close(
            shrink_off_diagonal(g, 0.5), torch.tensor([[0.0, 0.5, 1.0], [1.5, 4.0, 2.5], [3.0, 3.5, 8.0]])
        )


class TestLayerInputs:
    def test_grams_are_the_token_mean_of_the_inputs_each_adapter_sees(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        model = tiny_peft_model
        model.eval()
        tasks = sorted(model.peft_config)[:2]
        tokenized = {
            t: [tokenize_example(tiny_tokenizer, Example(**e)) for e in tiny_task_examples[t][:3]] for t in tasks
        }
        grams = input_grams(model, tokenized, pad_token_id=pad_token_id_for(tiny_tokenizer), batch_size=2)
        layers = list(lora_layers(model))
        # Independent capture: one example at a time (no padding), every layer's input recorded by its own hook.
        for task in tasks:
            captured = {name: [] for name, _ in layers}
            handles = [
                layer.register_forward_pre_hook(lambda m, args, seen=captured[name]: seen.append(args[0][0].double()))
                for name, layer in layers
            ]
            try:
                with torch.inference_mode():
                    for row in tokenized[task]:
                        model(input_ids=torch.tensor([row.input_ids]), adapter_names=[task])
            finally:
                for handle in handles:
                    handle.remove()
            for index, (name, _) in enumerate(layers):
                x = torch.cat(captured[name])
                expected = x.T @ x / x.shape[0]
                torch.testing.assert_close(grams[task][index].double(), expected, rtol=1e-4, atol=1e-5)
        # q and v of one block read the same hidden states: one Gram object serves both.
        names = [name for name, _ in layers]
        q = names.index(next(n for n in names if n.endswith("layers.0.self_attn.q_proj")))
        v = names.index(next(n for n in names if n.endswith("layers.0.self_attn.v_proj")))
        assert grams[tasks[0]][q] is grams[tasks[0]][v]


class TestRegMeanEndToEnd:
    def test_merged_layers_equal_regmean_of_the_collected_grams(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        model = tiny_peft_model
        config = D2CMergeConfig(num_clusters=2, method="random", combination_type="regmean", regmean_alpha=0.7, seed=1)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        names = sorted(result.assignment)
        # q/v/o adapters: per block, q and v share one input (the normed hidden states), o reads the attention output;
        # both are hidden-wide, float32: 2 Grams of hidden^2 * 4 bytes per block and adapter, held for the run.
        shape = model.base_model.model.config
        expected_bytes = len(names) * shape.num_hidden_layers * 2 * shape.hidden_size**2 * 4
        assert result.stats["layer_input_bytes"] == expected_bytes
        tokenized = {
            t: [tokenize_example(tiny_tokenizer, Example(**e)) for e in tiny_task_examples[t][:10]] for t in names
        }
        model.eval()
        grams = input_grams(model, tokenized, pad_token_id=pad_token_id_for(tiny_tokenizer), batch_size=7)
        cluster = sorted(result.clusters[0])
        merged = result.merged_adapter_names[0]
        checked = 0
        for index, (_, layer) in enumerate(lora_layers(model)):
            if lora_factors(layer, merged) is None:
                continue
            pairs = []
            for m in cluster:
                a, b = lora_factors(layer, m)
                pairs.append((b.double(), a.double() * layer.scaling[m]))
            rank = model.peft_config[merged].r
            new_a, new_b = regmean_merge(
                pairs,
                [grams[m][index].double() for m in cluster],
                [1 / len(cluster)] * len(cluster),
                rank=rank,
                alpha=0.7,
            )
            a, b = lora_factors(layer, merged)
            torch.testing.assert_close((b @ a).double() * layer.scaling[merged], new_b @ new_a, rtol=2e-4, atol=2e-5)
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
