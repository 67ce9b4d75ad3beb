"""Independent recomputation of D2C losses for the tests: fresh `add_weighted_adapter` merges and plain PEFT forwards.

Nothing here uses peft-d2c's tokenisation, batching, merger or scorer: examples are tokenised with direct tokenizer
calls, each example is scored alone through the model's own `labels=` loss, and clusters are merged by PEFT.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import torch

_counter = itertools.count()


def example_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """prompt ids (with special tokens) + completion ids (none) + EOS, and the number of prompt tokens."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, len(prompt_ids)


def task_loss(model, adapter: str, tokenizer, examples) -> float:
    """Mean completion-token cross-entropy of `examples` under `adapter`, pooled over tokens, one example at a time."""
    model.set_adapter(adapter)
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, start = example_ids(tokenizer, example["prompt"], example["completion"])
            labels = [-100] * start + ids[start:]
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            count = len(ids) - start  # every completion token has a predicting position
            total += loss.item() * count
            tokens += count
    return total / tokens


def cluster_loss(model, members, task, tokenizer, examples, combination_type="ties", density=0.5) -> float:
    """Loss of `task` under a fresh PEFT merge of `members` (weight 1 each, as documented for ties; a single member
    is the adapter itself)."""
    members = sorted(members)
    if len(members) == 1:
        return task_loss(model, members[0], tokenizer, examples[task])
    name = f"recompute_{next(_counter)}"
    model.add_weighted_adapter(members, [1.0] * len(members), name, combination_type=combination_type, density=density)
    try:
        return task_loss(model, name, tokenizer, examples[task])
    finally:
        model.delete_adapter(name)


def captured_layer_inputs(model, rows, adapter: str) -> list[torch.Tensor]:
    """Every LoRA layer's inputs (float64, tokens x in) under `adapter` on the tokenised `rows`, one example at a time
    (no padding), recorded by hooks of the test's own: the reference for peft-d2c's layer inputs."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    captured = [[] for _ in layers]
    handles = [
        layer.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0][0].double()))
        for layer, seen in zip(layers, captured, strict=True)
    ]
    try:
        with torch.inference_mode():
            for row in rows:
                model(input_ids=torch.tensor([row.input_ids]), adapter_names=[adapter])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(seen) for seen in captured]


def replay(initial_clusters, history):
    """The partition before each history record, replaying the accepted moves from the start partition."""
    clusters = [list(c) for c in initial_clusters]
    for record in history:
        yield [list(c) for c in clusters]
        if record["accepted"]:
            clusters[record["source"]].remove(record["task"])
            clusters[record["target"]].append(record["task"])


def load_reference():
    """`reference_d2c` of benchmarks/reference_d2c.py: the independent implementation of the paper's Algorithm 1."""
    path = Path(__file__).parents[1] / "benchmarks" / "reference_d2c.py"
    spec = importlib.util.spec_from_file_location("reference_d2c", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_d2c


def dense_regmean(updates, grams, weights, alpha):
    """(Σ w_i ΔW_i G̃_i)(Σ w_j G̃_j)^-1 on dense matrices, G̃ = α G + (1 - α) diag(G) written out entry by entry."""

    def regularise(g):
        out = g.clone()
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                if i != j:
                    out[i, j] = alpha * g[i, j]
        return out

    left = sum(w * u @ regularise(g) for u, g, w in zip(updates, grams, weights, strict=True))
    right = sum(w * regularise(g) for g, w in zip(grams, weights, strict=True))
    return torch.linalg.solve(right.T, left.T).T
