"""Adapters and inputs as people publish them: dropout, mixed recipes and bases, wrong tokenizers, long examples.

Each case either works correctly (checked against values computed independently, see `recompute.py`) or is refused
before any work with an error that names the adapter or task and what to do.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from recompute import cluster_loss, replay
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CWarning, Example, UnsupportedAdapterError, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.scoring.loss import completion_loss_sums
from peft_d2c.engine.scoring.tokenization import tokenize_example

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(tiny.TASK_FAMILIES)


def fresh_adapter(base_dir: str, out_dir: str, seed: int, **lora_kwargs) -> str:
    """A LoRA with random (non-zero) A and B of any recipe, saved like a published adapter."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    kwargs = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"], **lora_kwargs}
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def dropout_model(tiny_assets, tmp_path):
    """The six tiny task adapters as if saved with lora_dropout=0.2 (the usual Hub values are 0.05-0.1)."""
    base_dir, adapter_dirs = tiny_assets
    dirs = {f: tiny.edited_adapter_copy(d, str(tmp_path / f), lora_dropout=0.2) for f, d in adapter_dirs.items()}
    return tiny.load_peft_model(base_dir, dirs)


class TestDropout:
    def test_seeded_run_ignores_the_global_rng(self, dropout_model, tiny_tokenizer, tiny_task_examples):
        """With dropout live, every loss was random: two runs with another torch seed before them disagreed."""
        config = D2CMergeConfig(num_clusters=3, num_iterations=12, seed=0)
        runs = []
        for torch_seed in (1, 2):
            torch.manual_seed(torch_seed)
            result = merge_adapters_d2c(dropout_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
            runs.append((result.history, result.task_losses, result.clusters))
            for name in result.merged_adapter_names:
                dropout_model.delete_adapter(name)
        assert runs[0] == runs[1]

    @pytest.mark.parametrize("mode", ["eval", "train"])
    def test_returned_adapters_follow_the_models_mode(self, dropout_model, tiny_tokenizer, tiny_task_examples, mode):
        model = dropout_model.train() if mode == "train" else dropout_model.eval()
        config = D2CMergeConfig(num_clusters=2, num_iterations=4)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        layers = [m for n, m in model.named_modules() if n.endswith("lora_dropout")]
        for name in result.merged_adapter_names:
            assert all(d[name].training == (mode == "train") for d in layers if name in d)
        if mode == "eval":
            model.set_adapter(result.merged_adapter_names[0])
            ids = torch.tensor([tiny_tokenizer("a b c =")["input_ids"]])
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


class TestHistoryIsRight:
    def test_every_record_matches_fresh_merges_and_plain_forwards(self, tiny_peft_model, tiny_tokenizer):
        """Each record's two losses, recomputed with a fresh PEFT merge and the model's own loss, and the decision
        recomputed from them (the paper's rule: keep the move only if the moved task's loss drops)."""
        examples = {f: tiny.make_examples(f, 4, seed=7) for f in FAMILIES}
        # `ties`: the fresh merges below are PEFT's own `add_weighted_adapter`.
        config = D2CMergeConfig(num_clusters=3, num_iterations=8, seed=1, search="paper", combination_type="ties")
        result = merge_adapters_d2c(tiny_peft_model, examples, config, tokenizer=tiny_tokenizer)
        assert result.history
        for clusters, record in zip(replay(result.initial_clusters, result.history), result.history, strict=True):
            task = record["task"]
            assert task in clusters[record["source"]]
            target = [*clusters[record["target"]], task]
            before = cluster_loss(tiny_peft_model, clusters[record["source"]], task, tiny_tokenizer, examples)
            after = cluster_loss(tiny_peft_model, target, task, tiny_tokenizer, examples)
            assert record["loss_before"] == pytest.approx(before, rel=1e-4)
            assert record["loss_after"] == pytest.approx(after, rel=1e-4)
            if abs(after - before) > 1e-4 * before:  # a decision within float noise is not re-decided here
                assert record["accepted"] == (after < before)
        final = list(replay(result.initial_clusters, [*result.history, {"accepted": False}]))[-1]
        assert sorted(map(sorted, final)) == sorted(map(sorted, result.clusters))


class TestMixedCollections:
    """Adapters that differ the way Hub ones do: each merges correctly or is refused before any work."""

    def model_with(self, tiny_assets, tmp_path, variants: dict[str, dict]):
        base_dir, adapter_dirs = tiny_assets
        dirs = {"copy": adapter_dirs["copy"], "sort": adapter_dirs["sort"]}
        for i, (name, kwargs) in enumerate(variants.items()):
            dirs[name] = fresh_adapter(base_dir, str(tmp_path / name), seed=i, **kwargs)
        return tiny.load_peft_model(base_dir, dirs), {
            n: tiny.make_examples("copy", 3, seed=i) for i, n in enumerate(dirs)
        }

    def run(self, model, examples, tokenizer, **config):
        config = D2CMergeConfig(num_clusters=2, num_iterations=3, **config)
        return merge_adapters_d2c(model, examples, config, tokenizer=tokenizer)

    def test_other_ranks_and_alphas_merge_with_cat(self, tiny_assets, tmp_path, tiny_tokenizer):
        variants = {"rank4": {"r": 4, "lora_alpha": 32}, "rank16": {"r": 16, "lora_alpha": 8, "lora_dropout": 0.1}}
        model, examples = self.model_with(tiny_assets, tmp_path, variants)
        result = self.run(model, examples, tiny_tokenizer, combination_type="cat")
        # cat is exact: each merged update is the mean of its members' updates B·A·(alpha/r), recomputed here.
        for merged, members in zip(result.merged_adapter_names, result.clusters, strict=True):
            for _, module in model.named_modules():
                if hasattr(module, "lora_A") and merged in module.lora_A:
                    expected = sum(
                        model.peft_config[m].lora_alpha
                        / model.peft_config[m].r
                        * module.lora_B[m].weight.double()
                        @ module.lora_A[m].weight.double()
                        for m in members
                    ) / len(members)
                    got = module.get_delta_weight(merged).double()
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    def test_other_ranks_are_refused_for_ties_naming_the_fix(self, tiny_assets, tmp_path, tiny_tokenizer):
        model, examples = self.model_with(tiny_assets, tmp_path, {"rank4": {"r": 4, "lora_alpha": 8}})
        before = set(model.peft_config)
        with pytest.raises(ValueError, match=r"equal rank.*rank4.*`cat`"):
            self.run(model, examples, tiny_tokenizer, combination_type="ties")
        assert set(model.peft_config) == before

    @pytest.mark.parametrize(
        ("variant", "error", "match"),
        [
            ({"use_rslora": True}, UnsupportedAdapterError, "odd.*rslora"),
            ({"target_modules": ["q_proj", "k_proj"]}, ValueError, "odd.*different modules"),
            ({"rank_pattern": {"q_proj": 4}}, UnsupportedAdapterError, "odd.*rank_pattern"),
        ],
        ids=["rslora", "other targets", "rank_pattern"],
    )
    def test_unmergeable_recipes_are_refused_before_any_work(
        self, tiny_assets, tmp_path, tiny_tokenizer, variant, error, match
    ):
        model, examples = self.model_with(tiny_assets, tmp_path, {"odd": variant})
        before = set(model.peft_config)
        with pytest.raises(error, match=match):
            self.run(model, examples, tiny_tokenizer, combination_type="ties")
        assert set(model.peft_config) == before

    def test_alpha_pattern_merges_with_each_modules_own_scaling(self, tiny_assets, tmp_path, tiny_tokenizer):
        model, examples = self.model_with(tiny_assets, tmp_path, {"patterned": {"alpha_pattern": {"q_proj": 64}}})
        result = self.run(model, examples, tiny_tokenizer, combination_type="cat")
        merged = result.routing["patterned"]
        members = result.clusters[result.merged_adapter_names.index(merged)]
        for _, module in model.named_modules():
            if hasattr(module, "lora_A") and merged in module.lora_A:
                expected = sum(module.get_delta_weight(m).double() for m in members) / len(members)
                torch.testing.assert_close(module.get_delta_weight(merged).double(), expected, rtol=1e-4, atol=1e-6)
        scalings = [
            m.scaling["patterned"] for _, m in model.named_modules() if "patterned" in getattr(m, "lora_A", {})
        ]
        assert 64 / 8 in scalings and 16 / 8 in scalings  # q_proj has its own alpha, the others the default


class TestBaseModels:
    def model_with_bases(self, tiny_assets, tmp_path, bases: dict[str, str]):
        base_dir, adapter_dirs = tiny_assets
        dirs = {
            f: tiny.edited_adapter_copy(adapter_dirs[f], str(tmp_path / f), base_model_name_or_path=b)
            for f, b in bases.items()
        }
        return tiny.load_peft_model(base_dir, dirs), {f: tiny.make_examples(f, 3, seed=7) for f in bases}

    def test_different_hub_ids_are_refused_naming_both(self, tiny_assets, tmp_path, tiny_tokenizer):
        bases = {"copy": "org/Model-135M", "sort": "org/Model-135M", "reverse": "org/Model-135M-Instruct"}
        model, examples = self.model_with_bases(tiny_assets, tmp_path, bases)
        with pytest.raises(ValueError, match=r"different base models.*Model-135M-Instruct.*reverse"):
            merge_adapters_d2c(model, examples, D2CMergeConfig(num_clusters=2), tokenizer=tiny_tokenizer)
        assert set(model.peft_config) == set(bases)

    def test_different_folders_are_refused_and_the_opt_out_warns(self, tiny_assets, tmp_path, tiny_tokenizer):
        one, two = tmp_path / "base-a", tmp_path / "base-b"
        one.mkdir(), two.mkdir()
        model, examples = self.model_with_bases(tiny_assets, tmp_path, {"copy": str(one), "sort": str(two)})
        with pytest.raises(ValueError, match="different base models"):
            merge_adapters_d2c(model, examples, D2CMergeConfig(num_clusters=1), tokenizer=tiny_tokenizer)
        with pytest.warns(D2CWarning, match="allow_mixed_base_models"):
            config = D2CMergeConfig(num_clusters=1, allow_mixed_base_models=True)
            merge_adapters_d2c(model, examples, config, tokenizer=tiny_tokenizer)

    def test_a_local_copy_of_the_same_hub_model_only_warns(self, tiny_assets, tmp_path, tiny_tokenizer):
        local = tmp_path / "Model-135M"
        local.mkdir()
        model, examples = self.model_with_bases(tiny_assets, tmp_path, {"copy": "org/Model-135M", "sort": str(local)})
        with pytest.warns(D2CWarning, match="copy of the Hub model"):
            merge_adapters_d2c(model, examples, D2CMergeConfig(num_clusters=1), tokenizer=tiny_tokenizer)


class TestInputs:
    def test_a_tokenizer_of_another_model_is_refused_before_any_work(self, tiny_peft_model, tiny_task_examples):
        """A bigger vocabulary used to fail with a bare IndexError inside the embedding (a device assert on GPU)."""
        tokenizer = tiny.make_tokenizer()
        tokenizer.add_tokens([f"extra{i}" for i in range(200)])  # ids beyond the model's embedding rows
        examples = {**tiny_task_examples, "copy": [{"prompt": "extra199 =", "completion": " a"}]}
        before = set(tiny_peft_model.peft_config)
        with pytest.raises(ValueError, match=r"task 'copy'.*embedding rows.*own tokenizer"):
            merge_adapters_d2c(tiny_peft_model, examples, D2CMergeConfig(num_clusters=2), tokenizer=tokenizer)
        assert set(tiny_peft_model.peft_config) == before

    def test_an_empty_prompt_scores_every_completion_token_and_warns(self, tiny_tokenizer):
        assert tiny_tokenizer("")["input_ids"] == [tiny_tokenizer.bos_token_id]  # this tokenizer adds BOS
        tokenizer = tiny.make_tokenizer()
        tokenizer._tokenizer.post_processor = None  # a tokenizer that adds no special tokens, like many Hub ones
        assert tokenizer("")["input_ids"] == []
        example = tiny.make_examples("copy", 1, seed=0)[0]
        with pytest.warns(D2CWarning, match="task 'copy'.*empty prompt"):
            tokenized = tokenize_example(tokenizer, Example("", example["completion"]), task="copy")
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        assert tokenized.completion_start == 1
        assert list(tokenized.input_ids[1:]) == [*completion, tokenizer.eos_token_id]

    def test_a_completion_longer_than_max_length_is_an_error_naming_the_task(self, tiny_tokenizer):
        example = Example("a b =", " a b c a b c")
        with pytest.raises(ValueError, match="task 'copy'.*max_length.*scored whole"):
            tokenize_example(tiny_tokenizer, example, max_length=4, task="copy")

    def test_batches_are_planned_by_tokens_and_give_the_same_losses(self, tiny_peft_model, tiny_tokenizer):
        rows = [tokenize_example(tiny_tokenizer, Example(" ".join(["a"] * n) + " =", " a")) for n in (30, 3, 3, 3)]
        adapters = ["copy"] * len(rows)
        tiny_peft_model.eval()
        whole = completion_loss_sums(tiny_peft_model, rows, adapters, pad_token_id=0, batch_size=32)
        split = completion_loss_sums(
            tiny_peft_model, rows, adapters, pad_token_id=0, batch_size=32, max_batch_tokens=40
        )
        assert whole[2] == 1 and split[2] == 2  # the long row alone, then the three short ones together
        assert split[1] == whole[1]
        torch.testing.assert_close(torch.tensor(split[0]), torch.tensor(whole[0]), rtol=1e-5, atol=1e-6)
