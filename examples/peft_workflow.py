"""peft-d2c as one line inside an ordinary PEFT workflow.

Everything before and after `merge_adapters_d2c` is plain transformers / PEFT / datasets code: load a base model,
load one LoRA per task under the task's name, read ten examples per task, then serve each task with the merged
adapter the result routes it to. Uses a workspace written by `examples/make_workspace.py`:

    python examples/make_workspace.py example_workspace
    python examples/peft_workflow.py example_workspace --clusters 4
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", help="Folder with base/, adapters/<task>/ and data/<task>/fewshot.jsonl.")
    parser.add_argument("--clusters", "-k", type=int, default=4, help="K, the number of merged adapters to keep.")
    parser.add_argument("--iterations", "-t", type=int, default=100, help="D2C iterations T (default: 100).")
    parser.add_argument("--output", default="d2c_output", help="Where the merged adapters are saved.")
    args = parser.parse_args(argv)

    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_d2c import D2CMergeConfig, merge_adapters_d2c

    # --- an ordinary PEFT setup: one base model, one LoRA adapter per task, named after the task
    base_dir = os.path.join(args.workspace, "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapter_root = os.path.join(args.workspace, "adapters")
    tasks = sorted(os.listdir(adapter_root))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(adapter_root, tasks[0]), adapter_name=tasks[0]
    )
    for task in tasks[1:]:
        model.load_adapter(os.path.join(adapter_root, task), adapter_name=task)
    data_files = {task: os.path.join(args.workspace, "data", task, "fewshot.jsonl") for task in tasks}
    fewshot = datasets.load_dataset("json", data_files=data_files)  # one split per task
    task_examples = {task: list(fewshot[task]) for task in tasks}  # rows with "prompt" and "completion"

    # --- the one line: cluster the N adapters into K groups and merge each group
    result = merge_adapters_d2c(
        model,
        task_examples,
        D2CMergeConfig(num_clusters=args.clusters, num_iterations=args.iterations),
        tokenizer=tokenizer,
    )

    for name, members in zip(result.merged_adapter_names, result.clusters, strict=True):
        print(f"{name}: {', '.join(members)}")

    # --- serve: each task runs under the merged adapter the routing gives it
    model.eval()
    for task in tasks:
        model.set_adapter(result.routing[task])
        prompt = task_examples[task][0]["prompt"]
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"[{task} -> {result.routing[task]}] {prompt!r} -> {answer!r}")

    saved = result.save_pretrained(args.output)  # PEFT adapter folders + routing.json + the config and history
    print(f"Saved {len(result.merged_adapter_names)} merged adapters to {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
