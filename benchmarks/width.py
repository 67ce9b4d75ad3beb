"""peft-d2c at the width of the models people merge (issue 35): memory and time of the default `regmean` merge, and
of a D2C search, on a randomly initialised Llama with Llama-3-8B's (or Llama-3.2-1B's) width cut to a few layers.

What it builds: a `LlamaForCausalLM` with the real model's hidden size, heads, KV heads and MLP width, `--layers`
blocks and the tiny test tokenizer's 13-token vocabulary (the vocabulary changes only the embedding and the output
layer, not the layer inputs or the merges measured here); `--adapters` random LoRAs (r = 16, PEFT's default q/v
targets or every linear projection), and per task 10 examples of `--tokens-per-task` tokens in all (330: the team's
width probe). Everything in float32 on the CPU, on `--threads` threads (1 by default); `--device cuda --dtype
bfloat16` runs the same on a GPU (the model and adapters in bf16; the layer inputs stay float32 on the CPU).

What it prints (one JSON object, also written to `--out`):
- `layer_inputs`: bytes held per adapter and layer (all of the layer's distinct inputs), in all, on the model's
  device at any moment during a merge, and what the former Gram form held; seconds to collect them; all
  extrapolated to 32 layers.
- `merge`: seconds per cluster-layer of `regmean` merges of clusters of N/K adapters (the K clusters of a balanced
  partition, each merged once), and of one cluster-layer solved in the former Gram form (the in x in Cholesky) on the
  same inputs, for comparison.
- `search` (with `--steps S > 0`): a default D2C run (`merge_adapters_d2c`, `num_clusters=K`, T = S) with its
  seconds per step and where they went (merging, forward passes, layer inputs).
- `peak_rss_bytes`: this process's peak resident memory.

`--mode estimate` runs only `peft-d2c estimate`'s `estimate_run` (its predicted layer-input bytes and peak), `--mode
run` only the D2C run (`--steps` steps, at least 1): run each in its own process to compare the prediction with the
run's real peak.

Example (about 5 minutes on one thread):

    python benchmarks/width.py --width 8b --layers 2 --adapters 16 --targets qv --steps 3 --out width_8b.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge.lora import lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.merge.regmean import RegMeanSystem
from peft_d2c.engine.merge.task_cores import add_task_adapters, fit_task_cores, write_task_update
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs, layer_input_bytes
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.engine.search.loop import balanced_random_partition
from peft_d2c.evaluation.estimate import estimate_run, peak_rss_bytes
from peft_d2c.testing import SYMBOLS, make_tokenizer

WIDTHS = {  # hidden, MLP, attention heads, KV heads (the models' config.json)
    "8b": (4096, 14336, 32, 8),  # Llama-3-8B
    "1b": (2048, 8192, 32, 8),  # Llama-3.2-1B
}
TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
RANK, EXAMPLES = 16, 10
FULL_LAYERS = 32


def build_model(width: str, layers: int, adapters: int, targets: str, seed: int):
    hidden, mlp, heads, kv_heads = WIDTHS[width]
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    names = [f"task{i:02d}" for i in range(adapters)]
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS[targets], init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    with torch.no_grad():  # small random updates: finite losses, every adapter different
        for _, layer in lora_layers(model):
            for name in names:
                layer.lora_B[name].weight.mul_(0.01)
    return model.eval(), tokenizer, names


def task_examples(names: list[str], tokens_per_task: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """Per task 10 examples of random symbols, `tokens_per_task` tokens in all (BOS included), 3-token answers."""
    rng = np.random.default_rng(seed)
    symbols = tokens_per_task // EXAMPLES - 4  # BOS, "=" and the 2-symbol answer make up the rest
    examples = {}
    for name in names:
        examples[name] = [
            {
                "prompt": " ".join(rng.choice(SYMBOLS, symbols)) + " =",
                "completion": " " + " ".join(rng.choice(SYMBOLS, 2)),
            }
            for _ in range(EXAMPLES)
        ]
    return examples


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gram_form_seconds(inputs: list[torch.Tensor], alpha: float, device: str) -> float:
    """One cluster-layer's solve in the former Gram form: the in x in sum of the members' Grams, its Cholesky."""
    inputs = [f.to(device) for f in inputs]
    synchronize(device)
    started = time.perf_counter()
    total = sum(f.mT @ f for f in inputs) / len(inputs)
    diagonal = total.diagonal().clone()
    total.mul_(alpha).diagonal().copy_(diagonal)
    torch.linalg.cholesky(total)
    synchronize(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--tokens-per-task", type=int, default=330)
    parser.add_argument("--steps", type=int, default=0, help="D2C search steps to time (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a lent GPU: the same run in --dtype there)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=["measure", "estimate", "run"],
        default="measure",
        help="measure: layer inputs, merges and (--steps) a search; estimate: `estimate_run` only; run: the D2C run "
        "only (compare the peaks of an `estimate` and a `run` process)",
    )
    parser.add_argument("--task-cores", action="store_true", help="also time `merge.task_cores` on the merges")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, names = build_model(args.width, args.layers, args.adapters, args.targets, args.seed)
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    examples = task_examples(names, args.tokens_per_task, args.seed)
    report: dict = {"settings": vars(args), "build_seconds": time.perf_counter() - started}
    search_config = D2CMergeConfig(
        num_clusters=args.clusters,
        num_iterations=max(args.steps, 1),
        seed=args.seed,
        show_progress=False,
        fit_router=False,
    )
    if args.mode == "estimate":
        report["estimate"] = estimate_run(model, examples, search_config, tokenizer=tokenizer)
        return finish(report, args.out)
    if args.mode == "run":
        result = merge_adapters_d2c(model, examples, search_config, tokenizer=tokenizer)
        report["run"] = {k: v for k, v in result.stats.items() if isinstance(v, (int, float))}
        return finish(report, args.out)

    config = D2CMergeConfig(num_clusters=args.clusters, method="random", seed=args.seed, show_progress=False)
    merger = AdapterMerger(model, config)
    scorer = LossScorer.for_config(model, tokenizer, normalize_task_examples(examples), merger)
    tokens = [sum(len(row.input_ids) for row in rows) for rows in scorer.tokenized.values()]
    started = time.perf_counter()
    predicted = attach_layer_inputs(merger, scorer)  # predicted before they are collected, as a run does
    collect_seconds = time.perf_counter() - started
    held = layer_input_bytes(merger.layer_inputs)
    distinct = {id(f): f for f in merger.layer_inputs[names[0]]}.values()
    widths = [f.shape[-1] for f in distinct]
    per_adapter_layer = held / (args.adapters * args.layers)
    cluster_size = math.ceil(args.adapters / args.clusters)
    # During a merge the model's device holds one layer input's factors of every member and its scaled copy (V).
    device_bytes = 2 * cluster_size * max(min(m, w) * w for m in tokens for w in widths) * 4
    gram_bytes = sum(w * w * 4 for w in widths) / args.layers  # per adapter-layer, the former Gram form
    report["layer_inputs"] = {
        "tokens_per_task": [min(tokens), max(tokens)],
        "distinct_inputs_per_layer": len(widths) / args.layers,
        "bytes_per_adapter_layer": per_adapter_layer,
        "gram_form_bytes_per_adapter_layer": gram_bytes,
        "bytes_held": held,
        "predicted_bytes": predicted,
        "bytes_on_device_during_a_merge": device_bytes,
        "collect_seconds": collect_seconds,
        "collect_seconds_per_adapter_layer": collect_seconds / (args.adapters * args.layers),
        "extrapolated_32_layers_bytes": per_adapter_layer * args.adapters * FULL_LAYERS,
        "extrapolated_32_layers_gram_form_bytes": gram_bytes * args.adapters * FULL_LAYERS,
    }

    rng = np.random.default_rng(args.seed)
    clusters = balanced_random_partition(names, args.clusters, rng)
    seconds = []
    for index, members in enumerate(clusters):
        started = time.perf_counter()
        merger.merge(members, f"width_bench_{index}")
        synchronize(args.device)  # wait for a GPU's work (a no-op on the CPU)
        seconds.append(time.perf_counter() - started)
    merged_names = [f"width_bench_{index}" for index in range(len(clusters))]
    if args.task_cores:  # a core per task in its cluster's basis (issue 38 part 5), on these merges
        report["task_cores"] = time_task_cores(model, clusters, merged_names, args)
    for name in merged_names:
        model.delete_adapter(name)
    first = [merger.layer_inputs[m][0] for m in clusters[0]]
    gram_seconds = gram_form_seconds(first, config.merge.regmean_alpha, args.device)
    system_started = time.perf_counter()
    RegMeanSystem(first, [1 / len(first)] * len(first), config.merge.regmean_alpha, device=torch.device(args.device))
    synchronize(args.device)
    report["merge"] = {
        "cluster_sizes": [len(c) for c in clusters],
        "seconds_per_cluster_layer": [s / args.layers for s in seconds],
        "median_seconds_per_cluster_layer": float(np.median(seconds)) / args.layers,
        "token_space_system_seconds_first_input": time.perf_counter() - system_started,
        "gram_form_cholesky_seconds_first_input": gram_seconds,
        "extrapolated_32_layers_seconds_per_merge": float(np.median(seconds)) / args.layers * FULL_LAYERS,
    }
    merger.cleanup()
    report["rss_bytes_before_search"] = peak_rss_bytes()

    if args.steps > 0:
        config = D2CMergeConfig(
            num_clusters=args.clusters,
            num_iterations=args.steps,
            seed=args.seed,
            show_progress=False,
            fit_router=False,
        )
        result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer)
        stats = result.stats
        # The run's layer inputs are collected again (a fresh merger): their time is known from above.
        search = stats["seconds"] - collect_seconds
        report["search"] = {
            "search": result.stats["search_plan"]["rule"],
            "steps": args.steps,
            "seconds": stats["seconds"],
            "layer_input_seconds": collect_seconds,
            "merge_seconds": stats["merge_seconds"],
            "forward_seconds": stats["forward_seconds"],
            "num_merges": stats["num_merges"],
            "forward_passes": stats["forward_passes"],
            "seconds_per_step": search / args.steps,
            "merge_seconds_per_step": stats["merge_seconds"] / args.steps,
            "forward_seconds_per_step": stats["forward_seconds"] / args.steps,
        }
    return finish(report, args.out)


def time_task_cores(model, clusters, merged_names, args) -> dict:
    """Seconds to fit every task's core (`fit_task_cores`: the clusters' bases, the merges rewritten), to add the
    task adapters and to write one scored task update (`write_task_update`, what the search writes per (cluster,
    task)), and the bytes of one task's cores; the task adapters are removed again."""
    started = time.perf_counter()
    cores = fit_task_cores(model, clusters, merged_names)
    synchronize(args.device)
    fit_seconds = time.perf_counter() - started
    names = {task: f"width_task_{i}" for i, task in enumerate(cores)}
    routing = {task: merged_names[i] for i, members in enumerate(clusters) for task in members}
    started = time.perf_counter()
    add_task_adapters(model, cores, names, routing)
    synchronize(args.device)
    add_seconds = time.perf_counter() - started
    for name in names.values():
        model.delete_adapter(name)
    # What the search writes per scored (cluster, task) with task cores: the task's update in the cluster's basis (into
    # the first merged adapter, which is not used after this).
    layers = [layer for _, layer in lora_layers(model)]
    started = time.perf_counter()
    write_task_update(layers, clusters[0], clusters[0][0], merged_names[0], model.peft_config[merged_names[0]].r)
    synchronize(args.device)
    update_seconds = time.perf_counter() - started
    one = next(iter(cores.values()))
    return {
        "fit_seconds": fit_seconds,
        "fit_seconds_per_cluster_layer": fit_seconds / (len(clusters) * args.layers),
        "extrapolated_32_layers_fit_seconds": fit_seconds / args.layers * FULL_LAYERS,
        "add_task_adapters_seconds": add_seconds,
        "scored_task_update_seconds_per_layer": update_seconds / args.layers,
        "core_bytes_per_task": sum(core.numel() * core.element_size() for core in one.values()),
    }


def finish(report: dict, out: str | None) -> dict:
    """Add the process's peak memory (and the GPU's), print the report as JSON and write it to `out`."""
    report["peak_rss_bytes"] = peak_rss_bytes()
    if torch.cuda.is_available():
        report["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
