"""How far a float32 `regmean` merge is from the float64 one, and how long it takes, on real layer inputs.

    OMP_NUM_THREADS=2 python benchmarks/regmean_precision.py --collection embedded --json benchmark_results/regmean_precision.json

The few-shot layer inputs of a bundled collection (SmolLM2-135M), collected as a run collects them; clusters of 2, 4
and 8 of its adapters (random draws, `--seed`); every LoRA layer of each cluster merged by `regmean.regmean_merge`
in float32 and in float64 (inputs and factors converted, the same system form). Prints, per cluster size, the
largest and the median relative Frobenius distance ‖ΔW_32 − ΔW_64‖ / ‖ΔW_64‖ over layers and clusters, which
systems were solved in token space (M x M, M the members' tokens) and in the in x in form, and the float32 seconds
per cluster merge (all layers).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.embedded.benchmark import _load
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.regmean import RegMeanSystem, regmean_merge
from peft_d2c.engine.scoring.layer_inputs import input_factors
from peft_d2c.engine.scoring.loss import pad_token_id_for, tokenize_example


def _merge(layers, inputs, members, dtype):
    """Every layer's merged update B·A of `members` in `dtype` (float64 out), and the forms of its systems."""
    updates, forms = [], []
    weights = [1 / len(members)] * len(members)
    for index, layer in enumerate(layers):
        pairs = []
        for m in members:
            factors = lora_factors(layer, m)
            pairs.append(None if factors is None else (factors[1].to(dtype), factors[0].to(dtype) * layer.scaling[m]))
        if all(p is None for p in pairs):
            continue
        rank = max(p[1].shape[0] for p in pairs if p is not None)
        member_inputs = [inputs[m][index].to(dtype) for m in members]
        system = RegMeanSystem(member_inputs, weights, 0.9, dtype=dtype)
        forms.append("token" if system.token_space else "gram")
        new_a, new_b = regmean_merge(pairs, member_inputs, weights, rank=rank, alpha=0.9, system=system)
        updates.append(new_b.double() @ new_a.double())
    return updates, forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", default="embedded", choices=["embedded", "validation", "conflict"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--clusters", type=int, default=3, help="random clusters per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmark_results/regmean_precision.json")
    args = parser.parse_args()
    peft_model, tokenizer, _, fewshot, _ = _load("smollm2", args.collection, None, True, False)
    peft_model.eval()
    fewshot = normalize_task_examples(fewshot)
    tokenized = {t: [tokenize_example(tokenizer, e, task=t) for e in items] for t, items in fewshot.items()}
    inputs = input_factors(peft_model, tokenized, pad_token_id=pad_token_id_for(tokenizer))
    layers = [layer for _, layer in lora_layers(peft_model)]
    rng = random.Random(args.seed)
    report = {"collection": args.collection, "seed": args.seed, "sizes": {}}
    with torch.no_grad():
        for size in args.sizes:
            errors, seconds, forms = [], [], []
            for _ in range(args.clusters):
                members = sorted(rng.sample(sorted(fewshot), size))
                started = time.perf_counter()
                single, kinds = _merge(layers, inputs, members, torch.float32)
                seconds.append(time.perf_counter() - started)
                double, _ = _merge(layers, inputs, members, torch.float64)
                forms += kinds
                errors += [
                    float(torch.linalg.norm(s - d) / torch.linalg.norm(d)) for s, d in zip(single, double, strict=True)
                ]
            report["sizes"][size] = {
                "max_relative_error": max(errors),
                "median_relative_error": statistics.median(errors),
                "systems": {form: forms.count(form) for form in sorted(set(forms))},
                "float32_seconds_per_merge": statistics.median(seconds),
            }
            print(size, json.dumps(report["sizes"][size]))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
