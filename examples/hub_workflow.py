"""The full Hub workflow of peft-d2c: adapters in from a Hub collection, few-shot data from Hub datasets, D2C, and the
merged adapters pushed out with model cards.

Runs against any Hub endpoint: the real Hub (default), a private Hub (`--endpoint` or `HF_ENDPOINT`), or the local test
server of the test suite. Example:

    python examples/hub_workflow.py \\
        --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --collection my-org/word-task-loras-0123456789abcdef01234567 \\
        --data-spec data_spec.yaml \\
        --clusters 4 --repo-id my-org/word-tasks-d2c

`data_spec.yaml` names one task per adapter (the adapter names are the repo names, made safe), e.g.

    defaults: {num_examples: 10, seed: 0}
    tasks:
      lora-capital: {path: my-org/word-tasks, name: capital, prompt_template: "Country: {country}\\nCapital:",
                     completion_template: " {capital}"}

The token comes from `--token`, `HF_TOKEN` or the cached login; it is never printed or saved.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co).")
    parser.add_argument("--no-xet", action="store_true", help="Upload through plain HTTP/LFS (servers without Xet).")
    parser.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the cached login).")
    parser.add_argument("--base-model", required=True, help="Base model: Hub id or local folder.")
    parser.add_argument("--base-model-id", help="Hub id of the base model for the cards (needed for a local folder).")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--collection", help="Hub collection slug holding the single-task LoRA repos.")
    sources.add_argument("--adapters", nargs="+", help="Adapter repo ids ('owner/name[/subfolder][@rev]') or folders.")
    parser.add_argument("--data-spec", required=True, help="YAML task data spec (one task per adapter name).")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--clusters", "-k", type=int, help="K, the number of merged adapters.")
    budget.add_argument("--storage-budget", type=float, help="Fraction of the adapters to keep, e.g. 0.125.")
    parser.add_argument("--iterations", "-t", type=int, default=100, help="D2C iterations T (default: 100).")
    parser.add_argument("--combination-type", default="ties", help="PEFT merge type (default: ties).")
    parser.add_argument("--density", type=float, default=0.5, help="Density of ties/dare merges (default: 0.5).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the run (default: 0).")
    parser.add_argument("--repo-id", required=True, help="Target repo (or prefix of the cluster repos).")
    parser.add_argument("--layout", choices=["subfolders", "repos"], default="subfolders")
    parser.add_argument(
        "--private", action="store_true", default=None, help="Create the repos as private (default: the account's)."
    )
    parser.add_argument("--output", default="d2c_hub_output", help="Local folder for the saved result.")
    parser.add_argument("--check", action="store_true", help="Reload the pushed collection and compare logits.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # huggingface_hub reads these when it is first imported, so set them before importing anything that uses it.
    if args.endpoint:
        os.environ["HF_ENDPOINT"] = args.endpoint
    if args.no_xet:
        os.environ["HF_HUB_DISABLE_XET"] = "1"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c.data.spec import load_task_examples
    from peft_d2c.hub import load_adapters, load_d2c_collection, push_d2c_folder

    token = args.token
    print(f"Base model: {args.base_model}")
    tokenizer = AutoTokenizer.from_pretrained(args.base_model, token=token)
    model = load_adapters(
        AutoModelForCausalLM.from_pretrained(args.base_model, token=token),
        args.collection or args.adapters,
        token=token,
    )
    print(f"Loaded {len(model.peft_config)} adapters: {', '.join(model.peft_config)}")

    examples = load_task_examples(args.data_spec, token=token)
    print(f"Few-shot data: {sum(map(len, examples.values()))} examples for {len(examples)} tasks")

    config = D2CMergeConfig(
        num_clusters=args.clusters,
        storage_budget=args.storage_budget,
        num_iterations=args.iterations,
        combination_type=args.combination_type,
        merge={"density": args.density},
        seed=args.seed,
        show_progress=sys.stderr.isatty(),
    )
    result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer)
    result.data_sources = dict(examples.data_sources)
    for i, members in enumerate(result.clusters):
        print(f"  {result.merged_adapter_names[i]}: {', '.join(members)}")

    result.save_pretrained(args.output)
    base_model_id = args.base_model_id or (None if os.path.isdir(args.base_model) else args.base_model)
    pushed = push_d2c_folder(
        args.output,
        args.repo_id,
        base_model_id=base_model_id,
        private=args.private,
        token=token,
        layout=args.layout,
    )
    for repo_id, url in zip(pushed.repo_ids, pushed.commit_urls, strict=True):
        print(f"Pushed {repo_id}: {url}")

    if args.check:
        target = pushed.repo_ids if args.layout == "repos" else args.repo_id
        reloaded, router = load_d2c_collection(
            AutoModelForCausalLM.from_pretrained(args.base_model, token=token), target, token=token
        )
        ids = tokenizer(next(iter(examples.values()))[0]["prompt"], return_tensors="pt")["input_ids"]
        worst = 0.0
        with torch.no_grad():
            for task in router.tasks:
                with router.task(task) as name:
                    got = reloaded(input_ids=ids).logits
                want = result.model(input_ids=ids, adapter_names=[name]).logits
                worst = max(worst, (got - want).abs().max().item())
        print(
            f"Check: reloaded {len(router.adapters)} adapters for {len(router)} tasks, max logit difference {worst:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
