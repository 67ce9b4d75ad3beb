"""The validation collection (issue 22): other tasks than the embedded 16, adapters of other recipes, its own
benchmark. The real SmolLM2 adapters are trained by `peft-d2c benchmark --collection validation`; here the shipped
task files, the recipes, and per-task recipes trained on the tiny Llama."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from peft import PeftConfig

from peft_d2c import testing as tiny
from peft_d2c.embedded import DEFAULT_RECIPE, AdapterRecipe, load_embedded_tasks
from peft_d2c.embedded.adapters import build_task_adapters
from peft_d2c.embedded.benchmark import run_benchmark
from peft_d2c.embedded.validation import (
    VALIDATION_RECIPES,
    VALIDATION_TASK_NAMES,
    VALIDATION_TASKS_DIR,
    load_validation_tasks,
    validation_recipe,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "fewshot", "test")


@pytest.fixture(scope="module")
def splits():
    return {split: load_validation_tasks(split) for split in SPLITS}


class TestValidationTasks:
    def test_twelve_tasks_none_of_them_embedded(self, splits):
        assert list(splits["test"]) == list(VALIDATION_TASK_NAMES) and len(VALIDATION_TASK_NAMES) == 12
        embedded = load_embedded_tasks("train")
        embedded_prompts = {e["prompt"] for examples in embedded.values() for e in examples}
        for split in SPLITS:
            for task, examples in splits[split].items():
                assert not {e["prompt"] for e in examples} & embedded_prompts, task
                assert all(e["prompt"].startswith("Q: ") and e["prompt"].endswith("?\nA:") for e in examples), task

    def test_splits_are_disjoint_and_fewshot_comes_from_train(self, splits):
        for task in VALIDATION_TASK_NAMES:
            test_prompts = {e["prompt"] for e in splits["test"][task]}
            assert not test_prompts & {e["prompt"] for e in splits["train"][task]}, task
            assert splits["fewshot"][task] == splits["train"][task][:10]
            assert 8 <= len(splits["test"][task]) <= 40 and len(splits["train"][task]) <= 200

    def test_answers_are_known_facts(self, splits):
        """Spot checks against facts written here, not read from the files' source."""
        pairs = {(e["prompt"], e["completion"]) for split in SPLITS for t in splits[split].values() for e in t}
        facts = [
            ("Q: Which country has the ISO code FRA?\nA:", " France"),
            ("Q: What is the two-letter ISO code of Germany?\nA:", " DE"),
            ("Q: Which language has the code fr?\nA:", " French"),
            ("Q: Which country has the capital Paris?\nA:", " France"),
        ]
        for fact in facts:
            assert fact in pairs, fact

    @pytest.mark.slow
    def test_build_script_reproduces_the_shipped_files(self, tmp_path):
        script = REPO_ROOT / "scripts" / "build_validation_tasks.py"
        subprocess.run([sys.executable, str(script), "--output-dir", str(tmp_path)], check=True, capture_output=True)
        shipped = sorted(
            p.relative_to(VALIDATION_TASKS_DIR) for p in Path(VALIDATION_TASKS_DIR).rglob("*") if p.is_file()
        )
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == shipped
        for path in shipped:
            assert (tmp_path / path).read_bytes() == Path(VALIDATION_TASKS_DIR, path).read_bytes(), path


class TestRecipes:
    def test_recipes_are_unlike_the_embedded_one_and_mixed_like_a_hub_collection(self):
        assert DEFAULT_RECIPE not in VALIDATION_RECIPES
        assert {r.r for r in VALIDATION_RECIPES} == {16, 4}
        assert {r.lora_alpha / r.r for r in VALIDATION_RECIPES} == {2.0, 1.0}
        assert any(r.use_rslora for r in VALIDATION_RECIPES) and not all(r.use_rslora for r in VALIDATION_RECIPES)
        assert all(r.lora_dropout > 0 for r in VALIDATION_RECIPES)
        assert len({r.target_modules for r in VALIDATION_RECIPES}) >= 2
        assert any("down_proj" in r.target_modules for r in VALIDATION_RECIPES)
        assert [validation_recipe(t) for t in VALIDATION_TASK_NAMES[:5]] == [
            *VALIDATION_RECIPES,
            VALIDATION_RECIPES[0],
        ]

    def test_the_rslora_field_leaves_existing_recipe_hashes_alone(self):
        """Adapters cached before `use_rslora` existed stay valid: a recipe without it hashes as it did then."""
        before = {k: v for k, v in asdict(DEFAULT_RECIPE).items() if k != "use_rslora"}
        before["target_modules"] = list(before["target_modules"])
        expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
        assert DEFAULT_RECIPE.recipe_hash() == expected
        assert AdapterRecipe(use_rslora=True).recipe_hash() != expected

    def test_each_task_is_trained_with_its_own_recipe(self, tmp_path):
        base = tiny.make_base_model()
        tokenizer = tiny.make_tokenizer()
        recipes = {
            "copy": AdapterRecipe(r=4, lora_alpha=4, target_modules=("q_proj", "v_proj"), max_steps=2, batch_size=2),
            "sort": AdapterRecipe(
                r=16, lora_alpha=16, target_modules=("down_proj",), use_rslora=True, max_steps=2, batch_size=2
            ),
        }
        train = {task: tiny.make_examples(task, 8, seed=1) for task in recipes}
        dirs = build_task_adapters(
            base, tokenizer, {"base_key": "tiny"}, train, recipes, cache_dir=tmp_path, show_progress=False
        )
        for task, recipe in recipes.items():
            assert Path(dirs[task]) == tmp_path / "adapters" / "tiny" / recipe.recipe_hash() / task
            config = PeftConfig.from_pretrained(dirs[task])
            assert (config.r, config.lora_alpha, config.use_rslora) == (recipe.r, recipe.lora_alpha, recipe.use_rslora)
            assert set(config.target_modules) == set(recipe.target_modules)


def test_the_tiny_model_has_no_validation_collection(tmp_path):
    with pytest.raises(ValueError, match="smollm2"):
        run_benchmark(model="tiny", collection="validation", json_path=str(tmp_path / "b.json"))
