"""Held-out exact match of a saved D2C result, scored by lm-evaluation-harness next to peft-d2c's own evaluator.

    peft-d2c run                                                     # writes d2c_output/ (K = 4, the defaults)
    python benchmarks/lm_eval_check.py d2c_output --lm-eval /path/to/venv/bin/lm_eval --json lm_eval_check.json

For every merged adapter of the result, one `lm_eval` run (`--model hf`, `pretrained=` the cached base model,
`peft=` the saved adapter folder, no download) on local task YAMLs over the held-out `test.jsonl` files of the tasks
routed to it: greedy generation up to a newline (at most 8 new tokens, as peft-d2c's evaluator), the first word kept
by a regex filter, `exact_match` ignoring case and punctuation. peft-d2c's side loads the same saved adapter into a
fresh PeftModel and runs `evaluation.generation.generate_answers`. The output compares them per task and prompt by
prompt, and with the result's own `heldout.json`. lm-eval 0.4.13 is best installed in a separate virtual environment
(`python -m venv --system-site-packages venv && venv/bin/pip install "torch==2.13.0" "lm-eval==0.4.13"`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import tempfile
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_d2c.embedded import EMBEDDED_TASKS_DIR, load_embedded_base_model
from peft_d2c.evaluation.generation import generate_answers, normalize_answer

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion.strip()}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_lm_eval(lm_eval: str, base: str, adapter: str, tasks: list[str], workdir: str) -> dict[str, dict]:
    """`{task: {"exact_match": ..., "answers": [filtered first words, in file order]}}` from one lm_eval run."""
    include = os.path.join(workdir, "tasks")
    os.makedirs(include, exist_ok=True)
    for task in tasks:
        data = os.path.join(EMBEDDED_TASKS_DIR, task, "test.jsonl")
        with open(os.path.join(include, f"d2c_{task}.yaml"), "w", encoding="utf-8") as f:
            f.write(TASK_YAML.format(name=f"d2c_{task}", data=data))
    out = os.path.join(workdir, "out")
    cmd = [
        lm_eval,
        "--model", "hf",
        "--model_args", f"pretrained={base},peft={adapter},dtype=float32",
        "--tasks", ",".join(f"d2c_{t}" for t in tasks),
        "--include_path", include,
        "--batch_size", "16",
        "--device", "cpu",
        "--output_path", out,
        "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    results_file = sorted(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True))[-1]
    with open(results_file, encoding="utf-8") as f:
        results = json.load(f)["results"]
    scores = {}
    for task in tasks:
        samples_file = sorted(glob.glob(os.path.join(out, "**", f"samples_d2c_{task}_*.jsonl"), recursive=True))[-1]
        samples = sorted(read_jsonl(samples_file), key=lambda s: s["doc_id"])
        scores[task] = {
            "exact_match": results[f"d2c_{task}"]["exact_match,first_word"],
            "answers": [s["filtered_resps"][0] for s in samples],
            "raw": [s["resps"][0][0] for s in samples],
        }
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result_dir", help="A folder written by `peft-d2c run` (D2CResult.save_pretrained).")
    parser.add_argument("--lm-eval", default="lm_eval", help="The lm_eval executable (default: on PATH).")
    parser.add_argument("--json", default=None, help="Write the comparison here.")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with open(os.path.join(args.result_dir, "d2c_routing.json"), encoding="utf-8") as f:
        routing = json.load(f)
    routing = routing.get("routing", routing)
    heldout_file = os.path.join(args.result_dir, "heldout.json")
    ours_saved = None
    if os.path.isfile(heldout_file):
        with open(heldout_file, encoding="utf-8") as f:
            columns = json.load(f)["columns"]
        ours_saved = next(iter(c for name, c in columns.items() if "merged" in name or "D2C" in name), None)
    base = load_embedded_base_model(fetch=False)[2]["path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    by_adapter: dict[str, list[str]] = {}
    for task, adapter in routing.items():
        by_adapter.setdefault(adapter, []).append(task)
    rows = {}
    started = time.perf_counter()
    for adapter, tasks in sorted(by_adapter.items()):
        folder = os.path.abspath(os.path.join(args.result_dir, adapter))
        with tempfile.TemporaryDirectory() as workdir:
            theirs = run_lm_eval(args.lm_eval, base, folder, tasks, workdir)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
        for task in tasks:
            test = read_jsonl(os.path.join(EMBEDDED_TASKS_DIR, task, "test.jsonl"))
            answers = generate_answers(
                model, tokenizer, [e["prompt"] for e in test], adapter_names=["default"] * len(test)
            )
            ours = [normalize_answer(a) for a in answers]
            gold = [normalize_answer(e["completion"]) for e in test]
            ours_em = sum(o == g for o, g in zip(ours, gold, strict=True)) / len(test)
            their_first = [normalize_answer(a) for a in theirs[task]["answers"]]
            rows[task] = {
                "adapter": adapter,
                "prompts": len(test),
                "peft_d2c_em": ours_em,
                "lm_eval_em": theirs[task]["exact_match"],
                "saved_heldout_em": None if ours_saved is None else ours_saved[task]["exact_match"],
                "same_first_word": sum(o == t for o, t in zip(ours, their_first, strict=True)),
                "differences": [
                    {"prompt": e["prompt"], "peft_d2c": a, "lm_eval": r}
                    for e, a, r, o, t in zip(test, answers, theirs[task]["raw"], ours, their_first, strict=True)
                    if o != t
                ],
            }
        del model
    print("| task | adapter | prompts | peft-d2c EM | lm-eval EM | saved heldout.json EM | same first word |")
    print("|---|---|---|---|---|---|---|")
    for task, row in rows.items():
        saved = "-" if row["saved_heldout_em"] is None else f"{100 * row['saved_heldout_em']:.1f}"
        print(
            f"| {task} | {row['adapter']} | {row['prompts']} | {100 * row['peft_d2c_em']:.1f} | "
            f"{100 * row['lm_eval_em']:.1f} | {saved} | {row['same_first_word']}/{row['prompts']} |"
        )
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("peft_d2c_em", "lm_eval_em")}
    same = sum(r["same_first_word"] for r in rows.values())
    total = sum(r["prompts"] for r in rows.values())
    print(f"\nmean over tasks: peft-d2c {100 * mean['peft_d2c_em']:.2f}, lm-eval {100 * mean['lm_eval_em']:.2f}")
    print(f"same first word on {same} of {total} prompts; {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "mean": mean, "same_first_word": [same, total]}, f, indent=1)


if __name__ == "__main__":
    main()
