"""The GPU check (issue 19): the merge maths and the main job where PEFT users run them, with what it measured.

Two parts, both printed as one JSON object (and written to `--out`):

1. **Merge maths.** Every update-space merge type (`UPDATE_TYPES`) on three members of SmolLM2-135M's `q_proj`
   shape (30 layers, 576 x 576, r = 8) made on `--device` in `--dtype`: the merged factors' device and dtype, the
   relative Frobenius error of the merged update against a float64 CPU merge of exactly the same values, and the
   median seconds per merge.
2. **Main job.** The embedded default (SmolLM2-135M and its 16 task adapters; `--quick`: the tiny random Llama and
   its six synthetic tasks) searched, merged and scored on `--device`, three ways: everything in float32 (the
   reference), everything in `--dtype` (the model moved with `.to(dtype)`: adapters in `--dtype` too), and a
   `--dtype` base with float32 adapters (what PEFT's `autocast_adapter_dtype=True` gives a QLoRA-style load). For
   each: clusters, mean few-shot loss, held-out exact match of the routed merged adapters, merged adapters' dtype
   and bytes, seconds; and whether the clusters equal the float32 reference's.

Run through `scripts/gpu_check.sh` on a CUDA machine (it refuses to run without one). `--device cpu` runs the same
code on the CPU (the tests do that with `--quick`), which checks the script, not a GPU. The embedded default needs
its cache (`peft-d2c run` once, or `PEFT_D2C_CACHE` pointing at a copy), since a GPU box may have no network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.combination_types import DATA_TYPES, UPDATE_TYPES
from peft_d2c.embedded.mainjob import load_embedded_assets, load_quick_assets
from peft_d2c.engine.merge import merge_methods
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.merging import merge_weights_for
from peft_d2c.engine.merge.regmean import regmean_merge
from peft_d2c.evaluation.heldout import evaluate_routing

LAYERS, WIDTH, RANK, MEMBERS = 30, 576, 8, 3  # SmolLM2-135M's q_proj: 30 layers of 576 x 576, r = 8


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def merge(kind: str, pairs, inputs, weights):
    """One update-space merge of the `LAYERS` layers: `merge_methods.merge_updates`, or RegMean (one layer at a time,
    as a run merges) with the members' layer inputs."""
    if kind in DATA_TYPES:
        merged = [
            regmean_merge([(b[i], a[i]) for b, a in pairs], [x[i] for x in inputs], weights, rank=RANK, alpha=0.9)
            for i in range(LAYERS)
        ]
        return torch.stack([a for a, _ in merged]), torch.stack([b for _, b in merged])
    return merge_methods.merge_updates(kind, pairs, weights, rank=RANK, density=0.5)


def merge_maths(device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Every update-space type on `device` / `dtype` against a float64 CPU merge of the same values."""
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (
            (torch.randn(LAYERS, WIDTH, RANK, generator=generator) * 0.02).to(dtype),
            (torch.randn(LAYERS, RANK, WIDTH, generator=generator) * 0.02).to(dtype),
        )
        for _ in range(MEMBERS)
    ]
    inputs = [torch.randn(LAYERS, 200, WIDTH, generator=generator) for _ in range(MEMBERS)]  # for `regmean`: ~200
    inputs = [x / x.shape[1] ** 0.5 for x in inputs]  # few-shot tokens' layer inputs, as a run keeps them (CPU)
    on_device = [(b.to(device), a.to(device)) for b, a in pairs], inputs
    in_float64 = [(b.double(), a.double()) for b, a in pairs], [x.double() for x in inputs]
    rows = {}
    for kind in UPDATE_TYPES:
        weights = merge_weights_for(kind, MEMBERS)
        merge(kind, *on_device, weights)  # warm-up (kernels, cuBLAS)
        seconds = []
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            new_a, new_b = merge(kind, *on_device, weights)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        ref_a, ref_b = merge(kind, *in_float64, weights)
        update = new_b.double().cpu() @ new_a.double().cpu()
        reference = ref_b @ ref_a
        rows[kind] = {
            "device": str(new_a.device),
            "dtype": str(new_a.dtype).removeprefix("torch."),
            "shapes": [list(new_a.shape), list(new_b.shape)],
            "relative_error_vs_float64": float((update - reference).norm() / reference.norm()),
            "median_seconds": statistics.median(seconds),
        }
    return rows


def load_assets(quick: bool, cache_dir: str | None):
    if quick:
        return load_quick_assets(cache_dir)
    return load_embedded_assets(cache_dir, fetch=False, show_progress=False)


def prepare(model, device: torch.device, base_dtype: torch.dtype, adapter_dtype: torch.dtype):
    model.to(device=device, dtype=base_dtype)
    if adapter_dtype != base_dtype:  # PEFT's autocast_adapter_dtype: float32 adapters on a half-precision base
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(adapter_dtype)
    return model


def main_job(device: torch.device, dtype: torch.dtype, quick: bool, steps: int | None, cache_dir: str | None) -> dict:
    """The main job three ways on `device`: float32, all `dtype`, and a `dtype` base with float32 adapters."""
    runs = {}
    settings = {
        "float32": (torch.float32, torch.float32),
        f"{dtype_name(dtype)}": (dtype, dtype),
        f"{dtype_name(dtype)} base, float32 adapters": (dtype, torch.float32),
    }
    for label, (base_dtype, adapter_dtype) in settings.items():
        model, tokenizer, source_info, fewshot, test = load_assets(quick, cache_dir)
        model = prepare(model, device, base_dtype, adapter_dtype)
        config = D2CMergeConfig(num_clusters=2 if quick else 4, num_iterations=steps, seed=0, show_progress=False)
        synchronize(device)
        started = time.perf_counter()
        result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
        synchronize(device)
        search_seconds = time.perf_counter() - started
        heldout = evaluate_routing(model, tokenizer, test, result.routing)
        first_layer = next(layer for _, layer in lora_layers(model))
        merged_a, merged_b = lora_factors(first_layer, result.merged_adapter_names[0])
        merged_bytes = {
            name: sum(
                f.numel() * f.element_size() for _, layer in lora_layers(model) for f in lora_factors(layer, name)
            )
            for name in result.merged_adapter_names
        }
        runs[label] = {
            "base_model": source_info.get("model_id"),
            "clusters": result.clusters,
            "mean_fewshot_loss": statistics.fmean(result.task_losses.values()),
            "heldout_exact_match": statistics.fmean(row["exact_match"] for row in heldout.values()),
            "merged_adapter_device_dtype": [
                str(merged_a.device),
                dtype_name(merged_a.dtype),
                dtype_name(merged_b.dtype),
            ],
            "merged_adapter_bytes": merged_bytes,
            "search_and_merge_seconds": search_seconds,
        }
        del model
        if device.type == "cuda":
            runs[label]["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.empty_cache()
    reference = runs["float32"]
    for run in runs.values():
        run["same_clusters_as_float32"] = sorted(map(sorted, run["clusters"])) == sorted(
            map(sorted, reference["clusters"])
        )
        run["seconds_vs_float32"] = run["search_and_merge_seconds"] / reference["search_and_merge_seconds"]
    return runs


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--steps", type=int, default=None, help="T of the search (default: D2CMergeConfig's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per merge type")
    parser.add_argument("--cache-dir", default=os.environ.get("PEFT_D2C_CACHE"))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; nothing was run.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else args.device,
        "dtype": args.dtype,
        "merge_maths": merge_maths(device, dtype, args.repeats),
        "main_job": main_job(device, dtype, args.quick, args.steps, args.cache_dir),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
