"""The cross-fitted search objective (issue 38, part 3): a `regmean` merge scored on few-shot examples its layer
inputs did not come from.

The references are the test's own: fold membership by the documented rule (example i in fold i mod F), layer inputs
captured by hand one example at a time, the dense RegMean of test_regmean, and the model's own `labels=` loss one
example at a time (tests/recompute.py).
"""

from __future__ import annotations

import pytest
import torch
from recompute import captured_layer_inputs, task_loss
from test_regmean import dense_regmean, mean_gram

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.data.examples import Example
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
from peft_d2c.engine.scoring.loss import LossScorer, tokenize_example

ALPHA = 0.7


def _scorer(model, tokenizer, examples, folds, cache_size=8, prefix="d2c"):
    config = D2CMergeConfig(
        num_clusters=2,
        scoring={"cross_fit_folds": folds},
        merge={"regmean_alpha": ALPHA, "cache_size": cache_size},
        merged_adapter_prefix=prefix,
    )
    merger = AdapterMerger(model, config)
    scorer = LossScorer.for_config(model, tokenizer, _typed(examples), merger)
    model.eval()
    attach_layer_inputs(merger, scorer)
    return merger, scorer


def _typed(examples):
    return {task: [Example(**e) for e in items] for task, items in examples.items()}


def _in_fold(examples, fold, folds, inside=True):
    return [e for i, e in enumerate(examples) if (i % folds == fold) == inside]


class TestCrossFittedLoss:
    def test_each_example_is_scored_under_the_merge_fitted_without_it(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        model, folds = tiny_peft_model, 2
        cluster = ("first", "last", "reverse")
        examples = {t: tiny_task_examples[t] for t in cluster}
        merger, scorer = _scorer(model, tokenizer := tiny_tokenizer, examples, folds)
        [loss] = scorer([(cluster, "last")])
        _, paper_scorer = _scorer(model, tokenizer, examples, None, prefix="paper")
        # a single member is the adapter itself, fold or not: the same loss as the paper's
        assert scorer([(("last",), "last")]) == pytest.approx(paper_scorer([(("last",), "last")]), rel=1e-6)

        layers = list(lora_layers(model))
        total = tokens = 0.0
        for fold in range(folds):
            # The merge the scorer used for this fold, checked layer by layer against the dense RegMean of Grams
            # captured by hand from the examples outside the fold.
            name = merger.adapter_for(cluster, fold)
            grams = {}
            for member in cluster:
                fit = _in_fold(examples[member], fold, folds, inside=False)
                rows = [tokenize_example(tokenizer, Example(**e)) for e in fit]
                grams[member] = [mean_gram(x) for x in captured_layer_inputs(model, rows, member)]
            checked = 0
            for index, (_, layer) in enumerate(layers):
                if lora_factors(layer, name) is None:
                    continue
                updates = []
                for member in cluster:
                    a, b = lora_factors(layer, member)
                    updates.append(b.double() @ a.double() * layer.scaling[member])
                expected = dense_regmean(updates, [grams[m][index] for m in cluster], [1 / 3] * 3, ALPHA)
                a, b = lora_factors(layer, name)
                rank = model.peft_config[name].r
                s = torch.linalg.svdvals(expected)  # the best rank-r approximation's error (Eckart-Young)
                residual = torch.linalg.norm((b @ a).double() * layer.scaling[name] - expected)
                torch.testing.assert_close(residual, torch.linalg.norm(s[rank:]), rtol=1e-3, atol=1e-5)
                checked += 1
            assert checked > 0
            # The fold's own examples scored under that merge, one at a time, by the model's labels= loss.
            held = _in_fold(examples["last"], fold, folds)
            count = sum(
                len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"]) + 1 for e in held
            )  # + EOS
            total += task_loss(model, name, tokenizer, held) * count
            tokens += count
        assert loss == pytest.approx(total / tokens, rel=1e-4)
        # ... which is not the paper's loss of the same cluster (the merge fitted to all ten, scored on them)
        [paper] = paper_scorer([(cluster, "last")])
        assert abs(loss - paper) > 1e-3

    def test_fold_inputs_hold_the_gram_of_the_examples_outside_the_fold(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        model, folds = tiny_peft_model, 3
        examples = {t: tiny_task_examples[t] for t in ("copy", "sort")}
        merger, _ = _scorer(model, tiny_tokenizer, examples, folds)
        assert sorted(merger.fold_inputs) == [0, 1, 2]
        for fold in range(folds):
            for task in examples:
                fit = _in_fold(examples[task], fold, folds, inside=False)
                assert len(fit) == 10 - len(range(fold, 10, folds))
                rows = [tokenize_example(tiny_tokenizer, Example(**e)) for e in fit]
                for kept, x in zip(
                    merger.fold_inputs[fold][task], captured_layer_inputs(model, rows, task), strict=True
                ):
                    torch.testing.assert_close(kept.double().T @ kept.double(), mean_gram(x), rtol=1e-4, atol=1e-5)

    def test_live_merges_stay_within_the_cache(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        model = tiny_peft_model
        merger, scorer = _scorer(model, tiny_tokenizer, tiny_task_examples, folds=3, cache_size=4)
        tasks = sorted(tiny_task_examples)
        pairs = [((a, b), t) for i, a in enumerate(tasks) for b in tasks[i + 1 :] for t in (a, b)]
        losses = scorer(pairs)
        assert len(losses) == 30 and all(loss == loss for loss in losses)
        assert merger.num_live <= 4
        assert merger.num_merges >= 15 * 3  # every pair merged once per fold at least


class TestCrossFitRun:
    def test_a_run_records_and_ships_what_it_ran(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, tmp_path):
        model = tiny_peft_model
        before = sorted(model.peft_config)
        config = D2CMergeConfig(num_clusters=2, num_iterations=6, scoring={"cross_fit_folds": 2}, seed=3)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        assert result.stats["search_plan"]["cross_fit_folds"] == 2
        assert result.config.scoring.cross_fit_folds == 2
        result.config.save_pretrained(tmp_path)
        assert D2CMergeConfig.from_pretrained(tmp_path).scoring.cross_fit_folds == 2
        result.save_pretrained(tmp_path / "result")
        card = (tmp_path / "result" / "README.md").read_text()
        assert "few-shot loss cross-fitted over 2 folds" in card
        # the temporary fold merges are gone; the K shipped merges are fitted to all ten examples
        assert sorted(model.peft_config) == sorted([*before, *result.merged_adapter_names])
        plain = merge_adapters_d2c(
            model,
            tiny_task_examples,
            D2CMergeConfig(num_clusters=2, num_iterations=0, merged_adapter_prefix="plain", seed=3),
            tokenizer=tiny_tokenizer,
        )
        # the layer inputs of every fold are held on top of all examples' ((F - 1) / F of the tokens each)
        assert result.stats["layer_input_bytes"] > plain.stats["layer_input_bytes"]

    @pytest.mark.parametrize(
        "settings, message",
        [
            ({"combination_type": "knots_ties", "scoring": {"cross_fit_folds": 2}}, "fitted to the few-shot examples"),
            ({"scoring": {"cross_fit_folds": 11}}, "examples per task"),
            ({"scoring": {"cross_fit_folds": 6, "examples_per_task": 5}}, "examples per task"),
            ({"scoring": {"cross_fit_folds": 3}, "merge": {"cache_size": 2}}, "cache_size"),
            ({"scoring": {"cross_fit_folds": 0}}, "cross_fit_folds"),
        ],
    )
    def test_refuses_what_cannot_change_the_loss_or_cannot_run(self, settings, message):
        with pytest.raises(ValueError, match=message):
            D2CMergeConfig(num_clusters=2, **settings)

    def test_a_custom_score_fn_is_refused(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        config = D2CMergeConfig(num_clusters=2, num_iterations=1, scoring={"cross_fit_folds": 2})
        with pytest.raises(ValueError, match="custom `score_fn`"):
            merge_adapters_d2c(
                tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer, score_fn=lambda *a: 0.0
            )
