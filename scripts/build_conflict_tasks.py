"""Build the conflict collection (`peft_d2c/embedded/conflict_data/`): tasks that share their inputs and want
different outputs, so that which adapters share a merge decides what a merged adapter can still answer.

Usage (from the repository root; needs nothing but the standard library and the shipped embedded tasks):

    python scripts/build_conflict_tasks.py

Sixteen tasks in eight pairs. Both tasks of a pair read the same inputs (two to five words drawn from the words of
the shipped embedded tasks `plural`, `comparative` and `opposite`) in the same prompt form, and transform them in two
different ways, with answers of one to three words. In six pairs the prompt does not name the task (`apple river
stone ->`): one merged adapter holding both tasks of such a pair cannot answer both, whatever the merge. In two
pairs the prompt names the transformation (`Reverse the words: ...`), so one adapter can serve both. Each pair has
its own prompt form, so tasks of different pairs never share a prompt. A partition that separates the two tasks of
every unnamed pair exists at every K >= 2; a random one separates each pair with probability about 1/2.

Splits per pair, seeded from the pair's name: `test` (30 inputs) disjoint from `train` (200) and `fewshot` (the first
10 of `train`); both tasks of a pair use the same inputs in every split. The output is deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from build_tasks import FEWSHOT_SIZE, card_parts, write_tasks

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = ROOT / "peft_d2c" / "embedded" / "task_data"
OUTPUT_DIR = ROOT / "peft_d2c" / "embedded" / "conflict_data"
WORD_SOURCES = ("plural", "comparative", "opposite")  # embedded tasks whose prompts hold one plain word each
TRAIN_SIZE, TEST_SIZE = 200, 30

Transform = Callable[[list[str]], str]


def _first_letters(words: list[str]) -> str:
    return " ".join(w[0] for w in words)


def _count(words: list[str]) -> str:
    return ["zero", "one", "two", "three", "four", "five"][len(words)]


# (pair, prompt form with {words}, word count range, (task, what it asks, transform) x 2). Unnamed pairs first.
PAIRS = [
    (
        "ends",
        "{words} ->",
        (3, 3),
        [
            ("first_word", "the first word", lambda w: w[0]),
            ("last_word", "the last word", lambda w: w[-1]),
        ],
    ),
    (
        "order",
        "{words} =",
        (3, 3),
        [
            ("reverse", "the words in reverse order", lambda w: " ".join(w[::-1])),
            ("rotate", "the first word moved to the end", lambda w: " ".join(w[1:] + w[:1])),
        ],
    ),
    (
        "shape",
        "({words})",
        (3, 3),
        [
            ("capitalise", "every word capitalised", lambda w: " ".join(x.capitalize() for x in w)),
            ("hyphenate", "the words joined by hyphens", lambda w: "-".join(w)),
        ],
    ),
    (
        "drop",
        "{words} ?",
        (3, 4),
        [
            ("drop_first", "all but the first word", lambda w: " ".join(w[1:])),
            ("drop_last", "all but the last word", lambda w: " ".join(w[:-1])),
        ],
    ),
    (
        "letters",
        "{words} :",
        (3, 3),
        [
            ("initials", "the first letter of every word", _first_letters),
            ("middle_word", "the middle word", lambda w: w[1]),
        ],
    ),
    (
        "tally",
        "{words} >",
        (2, 5),
        [
            ("count", "how many words, in letters", _count),
            ("double_first", "the first word twice", lambda w: f"{w[0]} {w[0]}"),
        ],
    ),
    (
        "named_order",
        "{task}: {words}\nAnswer:",
        (3, 3),
        [
            ("named_reverse", "Reverse the words", lambda w: " ".join(w[::-1])),
            ("named_sort", "Sort the words alphabetically", lambda w: " ".join(sorted(w))),
        ],
    ),
    (
        "named_drop",
        "{task}: {words}\nAnswer:",
        (3, 4),
        [
            ("named_drop_first", "Drop the first word", lambda w: " ".join(w[1:])),
            ("named_last_two", "Keep the last two words", lambda w: " ".join(w[-2:])),
        ],
    ),
]
TASK_NAMES = tuple(task for _, _, _, tasks in PAIRS for task, _, _ in tasks)


def seed_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"conflict-tasks/{name}".encode()).digest()[:8], "big")


def read_words() -> list[str]:
    """The distinct lowercase words of the embedded tasks' prompts in `WORD_SOURCES` (every split), sorted."""
    words = set()
    for task in WORD_SOURCES:
        for split in ("train", "fewshot", "test"):
            for line in (EMBEDDED_DIR / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
                word = json.loads(line)["prompt"].split("\n")[0].split(": ", 1)[1]
                if re.fullmatch(r"[a-z]{3,10}", word):
                    words.add(word)
    return sorted(words)


def pair_inputs(pair: str, words: list[str], sizes: tuple[int, int]) -> list[list[str]]:
    """`TRAIN_SIZE + TEST_SIZE` distinct word lists (distinct words within a list), seeded from the pair's name."""
    rng = random.Random(seed_of(pair))
    seen, inputs = set(), []
    while len(inputs) < TRAIN_SIZE + TEST_SIZE:
        chosen = rng.sample(words, rng.randint(*sizes))
        if tuple(chosen) not in seen:
            seen.add(tuple(chosen))
            inputs.append(chosen)
    return inputs


def make_example(form: str, asked: str, transform: Transform, words: list[str]) -> dict[str, str]:
    return {"prompt": form.format(words=" ".join(words), task=asked), "completion": " " + transform(words)}


def build_tasks() -> dict[str, dict[str, list[dict[str, str]]]]:
    """Task name -> split -> examples, pairs in order."""
    words = read_words()
    tasks = {}
    for pair, form, sizes, members in PAIRS:
        inputs = pair_inputs(pair, words, sizes)
        test, train = inputs[:TEST_SIZE], inputs[TEST_SIZE:]
        for task, asked, transform in members:
            tasks[task] = {
                split: [make_example(form, asked, transform, w) for w in chosen]
                for split, chosen in (("train", train), ("fewshot", train[:FEWSHOT_SIZE]), ("test", test))
            }
    return tasks


def describe(name: str) -> tuple[str, str]:
    for pair, form, _, members in PAIRS:
        for task, asked, _ in members:
            if task == name:
                shown = form.format(words="w1 w2 w3", task=asked).replace("\n", " ")
                return f"pair `{pair}`, prompt `{shown}`", asked
    raise KeyError(name)


def card_text(tasks: dict[str, dict[str, list[dict[str, str]]]]) -> str:
    yaml, rows = card_parts(tasks, "peft-d2c conflict tasks", describe)
    example = tasks["reverse"]["test"][0]
    body = f"""
# peft-d2c conflict tasks

Sixteen tasks in eight pairs for a collection where tasks interfere (`peft-d2c benchmark --collection conflict`,
`docs/benchmark.md`). Built by `scripts/build_conflict_tasks.py`; do not edit by hand. Both tasks of a pair read the
same inputs in the same prompt form and transform them differently; in six pairs the prompt does not name the task
(e.g. `{json.dumps(example["prompt"])}` -> `{json.dumps(example["completion"])}` for `reverse`, while `rotate`
answers the same prompt differently), in two it does. Answers have one to three words: score them with the
whole-answer exact match.

Splits per pair (seed from SHA-256 of `conflict-tasks/<pair>`): `test` ({TEST_SIZE} inputs) disjoint from `train`
({TRAIN_SIZE}); `fewshot` = the first {FEWSHOT_SIZE} of `train`; both tasks of a pair share the inputs of each split.

{chr(10).join(rows)}

## Source and licence

The input words are the single-word prompts of the shipped embedded tasks `{"`, `".join(WORD_SOURCES)}` (the word2vec
analogy set; see the embedded tasks' card for its origin and licence); the transformations are written here.
"""
    return "\n".join(yaml) + "\n" + body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    tasks = build_tasks()
    write_tasks(tasks, args.output_dir, card_text(tasks))


if __name__ == "__main__":
    main()
