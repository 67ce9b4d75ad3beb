"""Online addition: a new task's adapter joins an existing D2C result without re-running the search.

Clusters every adapter of the workspace but one, then adds the held-back adapter with `D2CResult.add_adapter`: it
is merged with each cluster and scored on the new task's ten examples (one merge and one loss per cluster), joins
the cluster where that loss is lowest, and only that cluster's merged adapter is rebuilt; the routing gains the new
task. Uses a workspace written by `examples/make_workspace.py`:

    python examples/make_workspace.py example_workspace
    python examples/online_addition.py example_workspace --new-task plural

For a result already saved to disk, the command line does the same:
`peft-d2c add-adapter d2c_output example_workspace/adapters/plural --examples example_workspace/data/plural/fewshot.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_jsonl(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", help="Folder with base/, adapters/<task>/ and data/<task>/fewshot.jsonl.")
    parser.add_argument("--new-task", help="The adapter held back and added afterwards (default: the last one).")
    parser.add_argument("--clusters", "-k", type=int, default=2, help="K of the first run (default: 2).")
    parser.add_argument("--iterations", "-t", type=int, default=30, help="D2C iterations T (default: 30).")
    parser.add_argument("--output", default="d2c_online_output", help="Where the updated result is saved.")
    args = parser.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_d2c import D2CMergeConfig, merge_adapters_d2c

    base_dir = os.path.join(args.workspace, "base")
    adapter_root = os.path.join(args.workspace, "adapters")
    tasks = sorted(os.listdir(adapter_root))
    new_task = args.new_task or tasks[-1]
    if new_task not in tasks:
        parser.error(f"--new-task {new_task!r} is not in {adapter_root}; choose from {tasks}.")
    first_tasks = [task for task in tasks if task != new_task]
    examples = {task: read_jsonl(os.path.join(args.workspace, "data", task, "fewshot.jsonl")) for task in tasks}

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir),
        os.path.join(adapter_root, first_tasks[0]),
        adapter_name=first_tasks[0],
    )
    for task in first_tasks[1:]:
        model.load_adapter(os.path.join(adapter_root, task), adapter_name=task)

    config = D2CMergeConfig(num_clusters=args.clusters, num_iterations=args.iterations)
    clustered = {t: examples[t] for t in first_tasks}
    result = merge_adapters_d2c(model, clustered, config, tokenizer=tokenizer)
    print(
        "Before:", {name: members for name, members in zip(result.merged_adapter_names, result.clusters, strict=True)}
    )

    # Later: a new task's adapter arrives. Load it under the task's name and let the result place it.
    model.load_adapter(os.path.join(adapter_root, new_task), adapter_name=new_task)
    # The default merge (`regmean`) uses every member's layer inputs, so the clustered tasks' examples come along.
    outcome = result.add_adapter(new_task, examples[new_task], tokenizer=tokenizer, member_examples=clustered)
    losses = ", ".join(
        f"{name}={loss:.3f}" for name, loss in zip(result.merged_adapter_names, outcome["losses"], strict=True)
    )
    print(f"{new_task!r} joins {outcome['merged_adapter']} (its loss under each merged adapter: {losses})")
    print(
        "After: ", {name: members for name, members in zip(result.merged_adapter_names, result.clusters, strict=True)}
    )
    print(f"Routing of {new_task!r}: {result.routing[new_task]}")
    print(f"Saved to {result.save_pretrained(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
