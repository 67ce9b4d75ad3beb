"""The conflict collection (issue 38): pairs of tasks with the same inputs and different outputs. Here the shipped
task files, checked against transformations written again by hand, the build script's reproducibility and the
recipe; the SmolLM2 adapters are trained by `peft-d2c benchmark --collection conflict`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peft_d2c.embedded import DEFAULT_RECIPE, load_embedded_tasks
from peft_d2c.embedded.benchmark import COLLECTIONS
from peft_d2c.embedded.conflict import (
    CONFLICT_PAIRS,
    CONFLICT_RECIPE,
    CONFLICT_TASK_NAMES,
    CONFLICT_TASKS_DIR,
    load_conflict_tasks,
)
from peft_d2c.embedded.validation import VALIDATION_RECIPES

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "fewshot", "test")
NAMED_PAIRS = CONFLICT_PAIRS[-2:]

# Each task's answer from the words of its prompt, written again here (not imported from the build script).
BY_HAND = {
    "first_word": lambda w: w[0],
    "last_word": lambda w: w[-1],
    "reverse": lambda w: " ".join(reversed(w)),
    "rotate": lambda w: " ".join([*w[1:], w[0]]),
    "capitalise": lambda w: " ".join(x[:1].upper() + x[1:] for x in w),
    "hyphenate": lambda w: "-".join(w),
    "drop_first": lambda w: " ".join(w[1:]),
    "drop_last": lambda w: " ".join(w[:-1]),
    "initials": lambda w: " ".join(x[0] for x in w),
    "middle_word": lambda w: w[len(w) // 2],
    "count": lambda w: {2: "two", 3: "three", 4: "four", 5: "five"}[len(w)],
    "double_first": lambda w: w[0] + " " + w[0],
    "named_reverse": lambda w: " ".join(reversed(w)),
    "named_sort": lambda w: " ".join(sorted(w)),
    "named_drop_first": lambda w: " ".join(w[1:]),
    "named_last_two": lambda w: " ".join(w[-2:]),
}


def words_of(task: str, prompt: str) -> list[str]:
    if task.startswith("named_"):
        return prompt.split(": ", 1)[1].split("\n")[0].split()
    if prompt.startswith("("):
        return prompt[1:-1].split()
    return prompt.rsplit(" ", 1)[0].split()  # the words, then the pair's closing symbol


@pytest.fixture(scope="module")
def splits():
    return {split: load_conflict_tasks(split) for split in SPLITS}


def test_sixteen_tasks_in_eight_pairs_and_a_benchmark_collection(splits):
    assert list(splits["test"]) == list(CONFLICT_TASK_NAMES) == [t for pair in CONFLICT_PAIRS for t in pair]
    assert len(CONFLICT_TASK_NAMES) == 16 and "conflict" in COLLECTIONS


def test_answers_are_the_transformation_of_the_prompts_words(splits):
    for split in SPLITS:
        for task, examples in splits[split].items():
            for e in examples:
                assert e["completion"] == " " + BY_HAND[task](words_of(task, e["prompt"])), (task, e)


def test_a_pair_shares_its_inputs_and_prompts_and_wants_other_answers(splits):
    for a, b in CONFLICT_PAIRS:
        for split in SPLITS:
            inputs_a = [words_of(a, e["prompt"]) for e in splits[split][a]]
            assert inputs_a == [words_of(b, e["prompt"]) for e in splits[split][b]], (a, b, split)
        same_prompt = [x["prompt"] == y["prompt"] for x, y in zip(splits["test"][a], splits["test"][b], strict=True)]
        differ = [
            x["completion"] != y["completion"] for x, y in zip(splits["test"][a], splits["test"][b], strict=True)
        ]
        # unnamed pairs: the very same prompt must be answered differently; named pairs: the prompt says the task
        assert all(same_prompt) == ((a, b) not in NAMED_PAIRS), (a, b)
        if (a, b) not in NAMED_PAIRS:  # (reversed and sorted words may coincide: that pair's prompts differ anyway)
            assert all(differ), (a, b)


def test_pairs_never_share_a_prompt_form_and_splits_are_disjoint(splits):
    prompts = {t: {e["prompt"] for s in SPLITS for e in splits[s][t]} for t in CONFLICT_TASK_NAMES}
    for i, (a, _) in enumerate(CONFLICT_PAIRS):
        for c, _ in CONFLICT_PAIRS[i + 1 :]:
            assert not prompts[a] & prompts[c], (a, c)
    for task in CONFLICT_TASK_NAMES:
        assert not {e["prompt"] for e in splits["test"][task]} & {e["prompt"] for e in splits["train"][task]}
        assert splits["fewshot"][task] == splits["train"][task][:10]
        assert (len(splits["train"][task]), len(splits["test"][task])) == (200, 30)
    embedded = {e["prompt"] for xs in load_embedded_tasks("train").values() for e in xs}
    assert not embedded & set().union(*prompts.values())


def test_answers_have_several_words(splits):
    lengths = [len(e["completion"].split()) for xs in splits["test"].values() for e in xs]
    assert max(lengths) == 3 and sum(n > 1 for n in lengths) > len(lengths) / 3


def test_the_recipe_is_unlike_the_other_collections():
    for other in (DEFAULT_RECIPE, *VALIDATION_RECIPES):
        assert (CONFLICT_RECIPE.target_modules, CONFLICT_RECIPE.lora_alpha) != (other.target_modules, other.lora_alpha)
    assert CONFLICT_RECIPE.target_modules == ("k_proj", "o_proj", "up_proj", "down_proj")


@pytest.mark.slow
def test_build_script_reproduces_the_shipped_files(tmp_path):
    script = REPO_ROOT / "scripts" / "build_conflict_tasks.py"
    subprocess.run([sys.executable, str(script), "--output-dir", str(tmp_path)], check=True, capture_output=True)
    shipped = sorted(p.relative_to(CONFLICT_TASKS_DIR) for p in Path(CONFLICT_TASKS_DIR).rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == shipped
    for path in shipped:
        assert (tmp_path / path).read_bytes() == Path(CONFLICT_TASKS_DIR, path).read_bytes(), path
