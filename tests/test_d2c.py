"""merge_adapters_d2c on a tiny Llama with six real trained LoRAs: partitions, determinism, safety, saving."""

from __future__ import annotations

import math
import os

import pytest
import torch
from peft import PeftModel
from recompute import load_reference
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CResult, NonFiniteLossError, UnsupportedAdapterError, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.search.loop import canonical_partition
from peft_d2c.engine.search.plan import SearchPlan

# A custom score function without a tokenizer: a merge of the weights alone (`regmean` needs the examples' inputs).
WEIGHTS_ONLY = D2CMergeConfig(num_clusters=2, combination_type="knots_ties")
METHODS = [
    {"method": "d2c"},
    {"method": "d2c", "init": "kmeans"},
    {"method": "d2c", "init": "kmeans_svd"},
    {"method": "random"},
    {"method": "kmeans"},
    {"method": "kmeans_svd"},
]


def lora_weights(model, names):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k and any(f".{n}." in k for n in names)}


def batch_inputs(tokenizer):
    encoded = tokenizer(["a b c =", "h g f ="], return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class TestPartitions:
    @pytest.mark.parametrize("kwargs", METHODS)
    @pytest.mark.parametrize("k", [2, 4])
    def test_every_method_returns_a_valid_partition(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, kwargs, k
    ):
        steps = {"num_iterations": 15} if kwargs["method"] == "d2c" else {}  # a baseline refuses a T
        config = D2CMergeConfig(num_clusters=k, **steps, **kwargs)
        result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        names = sorted(tiny.TASK_FAMILIES)
        assert len(result.clusters) == k and all(result.clusters)
        assert sorted(m for c in result.clusters for m in c) == names
        assert result.merged_adapter_names == [f"d2c_{i}" for i in range(k)]
        assert all(n in tiny_peft_model.peft_config for n in result.merged_adapter_names)
        for task, merged in result.routing.items():
            assert task in result.clusters[result.merged_adapter_names.index(merged)]
            assert result.assignment[task] == result.merged_adapter_names.index(merged)
        assert set(result.task_losses) == set(names) and all(math.isfinite(v) for v in result.task_losses.values())
        assert (len(result.history) > 0) == (kwargs["method"] == "d2c")

    @pytest.mark.parametrize("k", [1, 6])
    def test_single_possible_partition_has_empty_history(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, k):
        result = merge_adapters_d2c(
            tiny_peft_model, tiny_task_examples, D2CMergeConfig(num_clusters=k), tokenizer=tiny_tokenizer
        )
        assert result.history == [] and len(result.clusters) == k

    def test_storage_budget_and_dataset_input(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        from datasets import Dataset

        rows = [{"task": t, **e} for t, items in tiny_task_examples.items() for e in items]
        config = D2CMergeConfig(storage_budget=0.5, num_iterations=5)
        result = merge_adapters_d2c(tiny_peft_model, Dataset.from_list(rows), config, tokenizer=tiny_tokenizer)
        assert len(result.clusters) == 3

    def test_adapter_subset_and_custom_score_fn(self, tiny_peft_model, tiny_task_examples):
        calls = []

        def score_fn(model, adapter_name, task, examples):
            calls.append((adapter_name, task, len(examples)))
            return float(len(adapter_name))  # any deterministic number

        subset = ["copy", "reverse", "sort"]
        examples = {t: tiny_task_examples[t] for t in subset}
        # No tokenizer: a merge of the weights alone (`regmean` needs the examples' layer inputs).
        config = D2CMergeConfig(
            num_clusters=2, num_iterations=5, combination_type="knots_ties", scoring={"examples_per_task": 4}
        )
        result = merge_adapters_d2c(tiny_peft_model, examples, config, score_fn=score_fn)
        assert sorted(result.routing) == subset
        assert calls and all(n == 4 for _, _, n in calls)


class TestDeterminism:
    @pytest.mark.parametrize("combination_type", ["ties", "dare_ties"])
    def test_same_seed_gives_same_clusters_and_weights(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, combination_type
    ):
        base_dir, adapter_dirs = tiny_assets
        config = D2CMergeConfig(num_clusters=3, num_iterations=20, combination_type=combination_type, seed=5)
        runs = []
        for _ in range(2):
            model = tiny.load_peft_model(base_dir, adapter_dirs)
            result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
            runs.append((result, lora_weights(model, result.merged_adapter_names)))
        (first, w1), (second, w2) = runs
        assert first.clusters == second.clusters and first.history == second.history
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


class TestPlantedPartition:
    @pytest.mark.parametrize("search,at_least", [(None, 3), ("partition", 4)])
    def test_d2c_recovers_groups_of_near_copies(self, tiny_assets, tiny_tokenizer, tmp_path, search, at_least):
        """Two noisy copies of each of three different adapters: the best 3-partition pairs the copies. The paper's
        rule (the default) finds it from 3 of these 5 random starts (measured 2026-12, T = 40 or 100: it keeps a
        move only if the moved task's own loss drops), the partition rule from 4."""
        base_dir, adapter_dirs = tiny_assets
        families = ["copy", "first", "shift"]
        dirs, examples = {}, {}
        for family in families:
            for j in range(2):
                name = f"{family}{j}"
                dirs[name] = tiny.perturbed_copy(adapter_dirs[family], str(tmp_path / name), noise=0.05, seed=j)
                examples[name] = tiny.make_examples(family, 10, seed=7)
        expected = canonical_partition([[f"{f}0", f"{f}1"] for f in families])
        recovered = 0
        for seed in range(5):
            model = tiny.load_peft_model(base_dir, dirs)
            config = D2CMergeConfig(num_clusters=3, num_iterations=40, seed=seed, search=search)
            result = merge_adapters_d2c(model, examples, config, tokenizer=tiny_tokenizer)
            recovered += canonical_partition(result.clusters) == expected
        assert recovered >= at_least


class TestDefaultSearch:
    """`search=None` is the paper's Algorithm 1, planned once (`SearchPlan`) and recorded in the result."""

    @staticmethod
    def run(tiny_assets, examples, tokenizer, **settings):
        config = D2CMergeConfig(num_clusters=3, seed=3, fit_router=False, **settings)
        return merge_adapters_d2c(tiny.load_peft_model(*tiny_assets), examples, config, tokenizer=tokenizer)

    def test_the_default_run_is_the_explicit_paper_search(self, tiny_assets, tiny_tokenizer, tiny_task_examples):
        default = self.run(tiny_assets, tiny_task_examples, tiny_tokenizer)
        paper = self.run(tiny_assets, tiny_task_examples, tiny_tokenizer, search="paper")
        assert len(default.history) == 100  # T = 100 at N = 6
        assert default.history == paper.history and default.clusters == paper.clusters
        assert default.initial_clusters == paper.initial_clusters and default.task_losses == paper.task_losses
        assert default.config == paper.config and default.stats["search_plan"] == paper.stats["search_plan"]
        # and it is Algorithm 1 exactly: the draws and decisions of the independent reference
        reference = load_reference()(
            tiny.load_peft_model(*tiny_assets), tiny_tokenizer, tiny_task_examples, default.config
        )
        assert default.clusters == reference["clusters"] and default.history == reference["history"]

    @pytest.mark.parametrize("settings", [{}, {"search": "partition", "patience": 4}, {"init": "kmeans_svd"}])
    def test_the_result_records_the_plan_that_ran(self, tiny_assets, tiny_tokenizer, tiny_task_examples, settings):
        config = D2CMergeConfig(num_clusters=3, seed=3, fit_router=False, **settings)
        plan = SearchPlan.for_run(config, len(tiny.TASK_FAMILIES), 3)
        result = self.run(tiny_assets, tiny_task_examples, tiny_tokenizer, **settings)
        assert result.stats["search_plan"] == plan.to_dict()
        assert result.config == config.resolved_for(plan)
        assert (result.config.search, result.config.num_iterations, result.config.init) == (
            plan.rule,
            plan.num_iterations,
            plan.init,
        )
        assert result.stats["start"] == plan.init and len(result.history) <= plan.num_iterations
        if plan.rule == "partition":
            assert all("total_loss" in record for record in result.history)

    def test_a_baseline_records_no_plan_and_keeps_its_config(self, tiny_assets, tiny_tokenizer, tiny_task_examples):
        result = self.run(tiny_assets, tiny_task_examples, tiny_tokenizer, method="kmeans")
        assert "search_plan" not in result.stats and result.history == []
        assert result.config == D2CMergeConfig(num_clusters=3, seed=3, fit_router=False, method="kmeans")


class TestNothingLost:
    def test_source_adapters_state_and_flags_are_restored(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        model = tiny_peft_model
        model.set_adapter("sort")  # PEFT marks it trainable
        model.train()
        names = list(tiny.TASK_FAMILIES)
        weights_before = lora_weights(model, names)
        grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
        modes_before = {n: m.training for n, m in model.named_modules()}
        config = D2CMergeConfig(num_clusters=3, num_iterations=20)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        assert model.active_adapter == "sort"
        assert all(torch.equal(v, lora_weights(model, names)[k]) for k, v in weights_before.items())
        assert {n: p.requires_grad for n, p in model.named_parameters() if n in grads_before} == grads_before
        assert {n: m.training for n, m in model.named_modules() if n in modes_before} == modes_before
        assert not any("tmp" in n for n in model.peft_config)
        merged_params = [
            p for n, p in model.named_parameters() if any(f".{m}." in n for m in result.merged_adapter_names)
        ]
        assert merged_params and not any(p.requires_grad for p in merged_params)

    @pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
    def test_temporary_adapters_removed_when_the_run_fails(self, tiny_peft_model, tiny_task_examples, exception):
        before = set(tiny_peft_model.peft_config)
        calls = []

        def failing_score(model, adapter_name, task, examples):
            calls.append(adapter_name)
            if len(calls) == 6:
                raise exception("stop")
            return 1.0 / len(calls)

        with pytest.raises(exception):
            merge_adapters_d2c(tiny_peft_model, tiny_task_examples, WEIGHTS_ONLY, score_fn=failing_score)
        assert any("tmp" in c for c in calls)
        assert set(tiny_peft_model.peft_config) == before

    def test_non_finite_loss_raises_and_cleans_up(self, tiny_peft_model, tiny_task_examples):
        before = set(tiny_peft_model.peft_config)
        with pytest.raises(NonFiniteLossError, match="nan"):
            merge_adapters_d2c(tiny_peft_model, tiny_task_examples, WEIGHTS_ONLY, score_fn=lambda *a: float("nan"))
        assert set(tiny_peft_model.peft_config) == before

    def test_loss_cache_hits_when_a_cluster_repeats(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples):
        config = D2CMergeConfig(num_clusters=2, num_iterations=60, seed=0, search="paper")
        result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        # Every proposal asks for two losses; repeated (cluster, task) pairs must come from the cache.
        assert result.stats["cache_hits"] > 0
        assert result.stats["cache_misses"] < 2 * 60 + len(tiny.TASK_FAMILIES)
        assert result.stats["num_merges"] <= result.stats["cache_misses"] + 2


BAD_INPUTS = [
    ("not a peft model", {}, TypeError, "must be a peft.PeftModel"),
    ("K too large", {"config": D2CMergeConfig(num_clusters=7)}, ValueError, "between 1 and the number of adapters"),
    (
        "unknown adapter in examples",
        {"examples": {"nope": [{"prompt": "a", "completion": "b"}]}},
        ValueError,
        "no loaded adapter",
    ),
    (
        "adapter without examples",
        {"adapter_names": ["copy", "reverse"], "drop": "reverse"},
        ValueError,
        "without examples",
    ),
    ("unknown adapter name", {"adapter_names": ["copy", "nope"]}, ValueError, "Unknown adapters"),
    ("empty completion", {"patch": {"copy": [{"prompt": "a =", "completion": "  "}]}}, ValueError, "empty completion"),
    ("no examples", {"patch": {"copy": []}}, ValueError, "has no examples"),
    ("missing key", {"patch": {"copy": [{"prompt": "a ="}]}}, ValueError, "completion"),
    ("no tokenizer", {"tokenizer": None}, ValueError, "tokenizer"),
    ("name clash", {"config": D2CMergeConfig(num_clusters=2, merged_adapter_prefix="copy")}, None, None),
    ("config type", {"config": {"num_clusters": 2}}, TypeError, "D2CMergeConfig"),
]


class TestBadInput:
    @pytest.mark.parametrize("case,change,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
    def test_bad_input_fails_before_any_work(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples, case, change, error, match
    ):
        model = tiny_peft_model
        examples = dict(change.get("examples", tiny_task_examples))
        examples.update(change.get("patch", {}))
        examples.pop(change.get("drop", None), None)
        kwargs = {"tokenizer": change.get("tokenizer", tiny_tokenizer), "adapter_names": change.get("adapter_names")}
        config = change.get("config", D2CMergeConfig(num_clusters=2))
        target = model
        if case == "not a peft model":
            target = model.get_base_model()
        if case == "name clash":
            # prefix "copy" makes merged names copy_0...; clash by pre-registering copy_0
            model.add_weighted_adapter(["copy"], [1.0], "copy_0")
            error, match = ValueError, "already exists"
        before = set(model.peft_config)
        with pytest.raises(error, match=match):
            merge_adapters_d2c(target, examples, config, **kwargs)
        assert set(model.peft_config) == before

    def test_dora_adapter_refused(self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path):
        from peft import get_peft_model

        base_dir, adapter_dirs = tiny_assets
        dora = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), tiny.lora_config(use_dora=True))
        dora.save_pretrained(str(tmp_path / "dora"))
        model = tiny.load_peft_model(base_dir, {**adapter_dirs, "dora": str(tmp_path / "dora")})
        examples = {**tiny_task_examples, "dora": tiny_task_examples["copy"]}
        with pytest.raises(UnsupportedAdapterError, match="DoRA"):
            merge_adapters_d2c(model, examples, D2CMergeConfig(num_clusters=2), tokenizer=tiny_tokenizer)


class TestSaveAndReload:
    def test_saved_adapters_reload_with_identical_logits(
        self, tiny_assets, tiny_peft_model, tiny_tokenizer, tiny_task_examples, tmp_path
    ):
        base_dir, _ = tiny_assets
        config = D2CMergeConfig(num_clusters=3, num_iterations=10)
        result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        out = result.save_pretrained(tmp_path / "out")
        assert sorted(os.listdir(out)) == sorted(
            [*result.merged_adapter_names, "README.md", "d2c_config.json", "d2c_result.json", "d2c_routing.json",
             "d2c_router.json", "d2c_router.safetensors"]
        )  # fmt: skip
        inputs = batch_inputs(tiny_tokenizer)
        for name in result.merged_adapter_names:
            tiny_peft_model.set_adapter(name)
            with torch.no_grad():
                expected = tiny_peft_model(**inputs).logits
            reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(out), subfolder=name)
            with torch.no_grad():
                got = reloaded.eval()(**inputs).logits
            assert torch.equal(got, expected)

        loaded = D2CResult.from_pretrained(out)
        assert loaded.clusters == result.clusters and loaded.routing == result.routing
        assert loaded.history == result.history and loaded.config == result.config
        assert loaded.task_losses == result.task_losses and loaded.base_model == result.base_model
        assert loaded.model is None
        assert loaded.adapter_for("copy") == result.routing["copy"]
        with pytest.raises(KeyError, match="known tasks"):
            loaded.adapter_for("nope")
        with pytest.raises(ValueError, match="holds no model"):
            loaded.save_pretrained(tmp_path / "again")
