"""Write a self-contained example workspace: a base model folder, one LoRA folder per task, and JSONL task data.

The other examples read nothing but these plain files, as they would read your own adapters:

    OUT/base/                       the base model and its tokenizer (`save_pretrained`)
    OUT/adapters/<task>/            one PEFT LoRA adapter per task
    OUT/data/<task>/fewshot.jsonl   ten {"prompt", "completion"} rows per task (what D2C sees)
    OUT/data/<task>/test.jsonl      held-out rows of the same task

By default it exports the embedded default (SmolLM2-135M-Instruct and the adapters of the embedded tasks, trained
into `~/.cache/peft_d2c/` on first use); `--tiny` exports the tiny random model of the test suite instead (seconds).

    python examples/make_workspace.py example_workspace --tasks capital_world comparative past_tense plural
    python examples/make_workspace.py tiny_workspace --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


def write_jsonl(path: str, rows: list[dict[str, str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")


def export(out: str, *, tiny: bool, tasks: list[str] | None) -> list[str]:
    """Fill `out` (see the module docstring) and return the task names."""
    base_dir = os.path.join(out, "base")
    if tiny:
        from peft_d2c import testing
        from peft_d2c.embedded import default_cache_dir
        from peft_d2c.embedded.mainjob import load_quick_assets

        _, _, _, fewshot, test = load_quick_assets(None)  # builds the tiny model and adapters into the cache once
        root = os.path.join(default_cache_dir(), "tiny-v1")
        names = tasks or list(testing.TASK_FAMILIES)
        adapter_dirs = {task: os.path.join(root, task) for task in names}
        shutil.copytree(os.path.join(root, "base"), base_dir, dirs_exist_ok=True)
    else:
        from peft_d2c.embedded import build_embedded_adapters, load_embedded_base_model, load_embedded_tasks

        base, tokenizer, info = load_embedded_base_model()
        adapter_dirs = build_embedded_adapters(base, tokenizer, info, tasks=tasks)
        names = list(adapter_dirs)
        fewshot, test = load_embedded_tasks("fewshot", tasks=names), load_embedded_tasks("test", tasks=names)
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    for task in names:
        shutil.copytree(adapter_dirs[task], os.path.join(out, "adapters", task), dirs_exist_ok=True)
        write_jsonl(os.path.join(out, "data", task, "fewshot.jsonl"), fewshot[task])
        write_jsonl(os.path.join(out, "data", task, "test.jsonl"), test[task])
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="Folder to write (created; existing files are overwritten).")
    parser.add_argument("--tiny", action="store_true", help="Export the tiny random test model instead of SmolLM2.")
    parser.add_argument("--tasks", nargs="+", help="Only these tasks (default: all).")
    args = parser.parse_args(argv)
    names = export(args.out, tiny=args.tiny, tasks=args.tasks)
    print(f"Wrote {args.out}: base model, {len(names)} adapters ({', '.join(names)}) and their data.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
