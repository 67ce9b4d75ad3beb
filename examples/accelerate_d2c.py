"""Cluster and merge LoRA adapters with D2C on several processes with Accelerate.

Every process runs the same search with the same seed; the scoring work of each step is split between the processes
and every process receives every loss, so all of them end with the clusters a single-process run finds. Only the
main process writes the result.

    # one process
    python examples/accelerate_d2c.py --proposals-per-step 4

    # two processes: two GPUs, or two CPU processes (gloo) on a machine without GPU
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_d2c.py --proposals-per-step 4

    # the embedded SmolLM2-135M with its 16 task adapters (trained and cached on first use)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_d2c.py --model smollm2 --num-clusters 4

On CPU, keep `--multi_gpu`: `accelerate launch --cpu` starts a single process. torchrun gives each process one
thread (OMP_NUM_THREADS=1) unless you set OMP_NUM_THREADS yourself. With `--proposals-per-step 1` (the paper's
Algorithm 1) a step has at most two losses to compute, which fit one forward pass, so extra processes only help
with `--proposals-per-step` 2 or more.
Re-running with the same `--checkpoint-dir` resumes an interrupted search.
"""

from __future__ import annotations

import argparse
import os
import time

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.engine.runtime.distributed import get_process_group


def load(model_name: str, cache_dir: str, group):
    """(peft_model, tokenizer, task examples) of the tiny test model or of the embedded SmolLM2.

    Whatever must be built on first use (adapters, caches) is built by the main process while the others wait.
    """
    if model_name == "smollm2":
        from peft_d2c.embedded import load_embedded_peft_model, load_embedded_tasks

        if group.is_main_process:
            load_embedded_peft_model(show_progress=True)
        group.wait_for_everyone()
        model, tokenizer, _, _ = load_embedded_peft_model(fetch=False, show_progress=False)
        return model, tokenizer, load_embedded_tasks("fewshot", tasks=list(model.peft_config))
    from peft_d2c import testing as tiny

    root = os.path.join(cache_dir, "tiny-example")
    if group.is_main_process and not os.path.exists(os.path.join(root, "done")):
        tiny.build_tiny_assets(root)
        open(os.path.join(root, "done"), "w").close()
    group.wait_for_everyone()
    adapters = {family: os.path.join(root, family) for family in tiny.TASK_FAMILIES}
    examples = {family: tiny.make_examples(family, 10, seed=7) for family in tiny.TASK_FAMILIES}
    return tiny.load_peft_model(os.path.join(root, "base"), adapters), tiny.make_tokenizer(), examples


def main() -> None:
    parser = argparse.ArgumentParser(description="D2C clustering and merging on one or several processes.")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--num-clusters", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--proposals-per-step", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--output-dir", default="d2c_output")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/peft_d2c"))
    args = parser.parse_args()

    group = get_process_group()  # PartialState(cpu=True) under a multi-process launch without CUDA
    model, tokenizer, examples = load(args.model, args.cache_dir, group)
    model.to(group.device)
    config = D2CMergeConfig(
        num_clusters=args.num_clusters,
        num_iterations=args.iterations,
        proposals_per_step=args.proposals_per_step,
        seed=args.seed,
        show_progress=group.is_main_process,
    )
    started = time.perf_counter()
    result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer, checkpoint_dir=args.checkpoint_dir)
    seconds = time.perf_counter() - started
    if group.is_main_process:
        result.save_pretrained(args.output_dir)
        print(
            f"{group.num_processes} process(es), {seconds:.1f} s, forward passes on this process: "
            f"{result.stats['forward_passes']}, merges: {result.stats['num_merges']}"
        )
        for name, members in zip(result.merged_adapter_names, result.clusters, strict=True):
            print(f"  {name}: {', '.join(members)}")
        print(f"saved to {args.output_dir}")
    group.close()


if __name__ == "__main__":
    main()
