"""The bytes decide K and the rank (issue 38, part 4): `merge.svd_rank="auto"` with a byte `storage_budget`.

The shapes a budget allows are computed here from the adapters' tensor shapes (rank x (in + out) float32 elements per
adapted module), not with peft-d2c's budget functions; the shipped adapters are measured from their tensors.
"""

from __future__ import annotations

import pytest
import torch

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.cli.commands import _parse_budgets
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.evaluation.estimate import estimate_run
from peft_d2c.evaluation.sweep import run_sweep, save_sweep


def bytes_per_rank(model, adapter: str) -> int:
    """float32 bytes of one unit of rank on every module `adapter` adapts: (in + out) x 4 per module."""
    total = 0
    for _, layer in lora_layers(model):
        factors = lora_factors(layer, adapter)
        if factors is not None:
            a, b = factors
            total += (a.shape[1] + b.shape[0]) * 4
    return total


def shipped_bytes(model, names) -> int:
    total = 0
    for _, layer in lora_layers(model):
        for name in names:
            factors = lora_factors(layer, name)
            if factors is not None:
                total += sum(t.numel() * t.element_size() for t in factors)
    return total


class TestAutoShape:
    def test_every_shape_the_budget_allows_is_searched_and_the_lowest_objective_ships(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, tmp_path
    ):
        model = tiny_peft_model
        before = sorted(model.peft_config)
        tasks = sorted(tiny_task_examples)
        per_rank = bytes_per_rank(model, tasks[0])  # every tiny adapter adapts the same modules at rank 8
        budget = 2 * 8 * per_rank  # two source adapters' bytes
        # Powers of two up to 4 x 8: K = min(N, budget // (r x per_rank)), the highest rank kept per K.
        expected = {}
        for rank in (1, 2, 4, 8, 16, 32):
            k = min(len(tasks), budget // (rank * per_rank))
            if k >= 1:
                expected[k] = rank
        assert expected == {6: 2, 4: 4, 2: 8, 1: 16}  # the arithmetic above, spelled out
        config = D2CMergeConfig(storage_budget=budget, merge={"svd_rank": "auto"}, num_iterations=4, seed=1)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        shapes = result.stats["shapes"]
        assert {s["num_clusters"]: s["rank"] for s in shapes} == expected
        for shape in shapes:
            assert shape["bytes"] == shape["num_clusters"] * shape["rank"] * per_rank <= budget
            assert sorted(t for c in shape["clusters"] for t in c) == tasks
            assert len(shape["clusters"]) == shape["num_clusters"]
        best = min(shapes, key=lambda s: s["objective"])
        # what ships is the best shape: its K adapters at its rank, its partition, within the budget
        assert len(result.merged_adapter_names) == best["num_clusters"]
        assert sorted(map(sorted, result.clusters)) == sorted(map(sorted, best["clusters"]))
        assert {model.peft_config[n].r for n in result.merged_adapter_names} == {best["rank"]}
        assert result.config.merge.svd_rank == best["rank"] and result.config.scoring.cross_fit_folds == 2
        assert shipped_bytes(model, result.merged_adapter_names) == best["bytes"] <= budget
        # the objective of the winner is the mean of the task losses the result reports (cross-fitted)
        assert best["objective"] == pytest.approx(sum(result.task_losses.values()) / len(tasks), rel=1e-9)
        # nothing but the K merged adapters was added, and no temporary merge was left behind
        assert sorted(model.peft_config) == sorted([*before, *result.merged_adapter_names])
        assert all(torch.isfinite(torch.tensor(s["objective"])) for s in shapes)
        result.save_pretrained(tmp_path)
        card = (tmp_path / "README.md").read_text()
        assert f"chose K = {best['num_clusters']} merged adapters of rank {best['rank']}" in card

    @pytest.mark.parametrize(
        "settings, message",
        [
            ({"num_clusters": 2}, "storage_budget` in bytes"),
            ({"storage_budget": 0.5}, "storage_budget` in bytes"),
            ({"storage_budget": "1MB", "combination_type": "ties_svd"}, "update-space merge"),
            ({"storage_budget": "1MB", "merge": {"svd_rank": "auto", "rank_allocation": "spectrum"}}, "uniform"),
        ],
    )
    def test_refuses_a_budget_that_cannot_decide_the_shape(self, settings, message):
        settings = {"merge": {"svd_rank": "auto"}, **settings}
        with pytest.raises(ValueError, match=message):
            D2CMergeConfig(**settings)

    def test_a_checkpoint_and_a_budget_below_rank_one_are_refused_before_any_work(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, tmp_path
    ):
        model = tiny_peft_model
        per_rank = bytes_per_rank(model, "copy")
        config = D2CMergeConfig(storage_budget=4 * per_rank, merge={"svd_rank": "auto"})
        with pytest.raises(ValueError, match="checkpoint_dir"):
            merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer, checkpoint_dir=tmp_path)
        one = D2CMergeConfig(storage_budget=per_rank, merge={"svd_rank": "auto"}, num_iterations=1)
        result = merge_adapters_d2c(model, tiny_task_examples, one, tokenizer=tiny_tokenizer)
        [shape] = result.stats["shapes"]  # one adapter of rank 1 is all that fits: one shape, still recorded
        assert (shape["num_clusters"], shape["rank"], shape["bytes"]) == (1, 1, per_rank)
        for name in result.merged_adapter_names:
            model.delete_adapter(name)
        tiny = D2CMergeConfig(storage_budget=per_rank - 1, merge={"svd_rank": "auto"})
        with pytest.raises(ValueError, match="even at rank 1"):
            merge_adapters_d2c(model, tiny_task_examples, tiny, tokenizer=tiny_tokenizer)
        assert not list(tmp_path.iterdir())
        assert sorted(model.peft_config) == sorted(tiny_task_examples)

    def test_the_estimate_asks_for_one_shape(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        config = D2CMergeConfig(storage_budget="1MB", merge={"svd_rank": "auto"})
        with pytest.raises(ValueError, match="one shape at a time"):
            estimate_run(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)


class TestBudgetSweep:
    def test_each_byte_budget_decides_the_shape_next_to_the_best_single_merge(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, tmp_path
    ):
        model = tiny_peft_model
        before = sorted(model.peft_config)
        per_rank = bytes_per_rank(model, "copy")
        sources = 6 * 8 * per_rank
        heldout = {family: tiny.make_examples(family, 4, seed=11) for family in tiny_task_examples}
        config = D2CMergeConfig(num_clusters=1, num_iterations=2)
        sweep = run_sweep(
            model,
            tiny_task_examples,
            config,
            tokenizer=tiny_tokenizer,
            heldout_examples=heldout,
            budgets=[1 / 6, 1 / 3],
        )
        assert sweep["source_bytes"] == sources
        for point, fraction, single_rank in zip(sweep["points"], (1 / 6, 1 / 3), (8, 16), strict=True):
            budget = int(fraction * sources)
            assert point["budget_fraction"] == fraction
            assert point["storage_bytes"] == point["k"] * point["rank"] * per_rank <= budget
            assert (point["k"], point["rank"]) in {(s["num_clusters"], s["rank"]) for s in point["shapes"]}
            assert 0 <= point["whole_score"] <= point["score"] <= 1  # a whole answer right has its first word right
            # the best single merge: K = 1 at the highest power-of-two rank the budget holds
            assert point["single"]["rank"] == single_rank
            assert point["single"]["storage_bytes"] == single_rank * per_rank <= budget
        assert sorted(model.peft_config) == before  # every run's merged adapters were deleted once measured
        with pytest.raises(ValueError, match="not both"):
            run_sweep(model, tiny_task_examples, config, tokenizer=tiny_tokenizer, num_clusters=[1], budgets=[0.5])
        with pytest.raises(ValueError, match="fractions in"):
            run_sweep(model, tiny_task_examples, config, tokenizer=tiny_tokenizer, budgets=[1.5])
        written = save_sweep(sweep, tmp_path)
        assert any(path.endswith(".png") for path in written) and any(path.endswith(".json") for path in written)

    def test_the_command_line_reads_budgets_as_fractions(self):
        assert _parse_budgets("1/64, 1/8,0.25") == [1 / 64, 1 / 8, 0.25]
        assert _parse_budgets(None) is None
        with pytest.raises(ValueError, match="--budgets"):
            _parse_budgets("1/0")
