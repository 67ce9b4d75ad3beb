"""Which prompt features tell tasks apart when the prompt does not name its task (issue 37, bare prompts).

    OMP_NUM_THREADS=1 python benchmarks/routing_bare.py --json benchmark_results/routing_bare.json

The embedded and validation prompts name their task ("Country: X\\nCapital:", "Q: What is the singular of X?\\nA:").
Here every prompt is cut to its input: the part between the longest prefix and suffix shared by all of its task's
prompts, followed by " ->" ("Germany ->", "hands ->"), as on a collection whose prompts are a bare input. Tasks whose
inputs are of the same kind (countries, codes, words) then differ only in which inputs they draw: no router can be
sure of them, and the accuracy below measures how much of the task is left in the input alone.

For each collection, with the 10 few-shot prompts per task as the fit and the held-out prompts as the test, the task
accuracy of: nearest centroid on the router's features (`prompt_router`: mean over tokens of a hidden state, unit
length, minus the fit's mean, unit length) at several layers, on the last token's hidden state instead of the mean,
and a logistic-regression probe (scikit-learn) on the same features; for the named prompts and the bare ones. The
features come from the base model alone (SmolLM2-135M), adapters off.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from peft_d2c.embedded.benchmark import _load
from peft_d2c.engine.scoring.loss import pad_token_id_for
from peft_d2c.engine.scoring.tokenization import padded_batch, prompt_token_ids


def bare(prompts_by_task: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every prompt cut to what differs between its task's prompts (at word boundaries), plus " ->"."""
    out = {}
    for task, prompts in prompts_by_task.items():
        prefix = os.path.commonprefix(prompts)
        suffix = os.path.commonprefix([p[::-1] for p in prompts])[::-1]
        # Cut at word boundaries: letters every input shares (the "-ly" of adverbs) stay with the input.
        while prefix and prefix[-1].isalnum():
            prefix = prefix[:-1]
        while suffix and suffix[0].isalnum():
            suffix = suffix[1:]
        out[task] = [p[len(prefix) : len(p) - len(suffix)].strip() + " ->" for p in prompts]
    return out


@torch.no_grad()
def hidden_features(model, tokenizer, prompts: list[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt and layer (embeddings, then every block; the last after the final norm, as transformers returns
    it): the mean over the prompt's tokens and the last token's hidden state, float32 [N, layers + 1, hidden]."""
    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    means, lasts = [None] * len(prompts), [None] * len(prompts)
    model.eval()
    with model.disable_adapter():
        for start in range(0, len(prompts), batch_size):
            batch = list(range(start, min(start + batch_size, len(prompts))))
            input_ids, mask = padded_batch([encoded[i] for i in batch], pad_token_id_for(tokenizer))
            states = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            stacked = torch.stack(states, dim=1).float()  # [B, L + 1, T, H]
            weights = mask.float()[:, None, :, None]
            mean = (stacked * weights).sum(2) / weights.sum(2)
            for row, i in enumerate(batch):
                means[i] = mean[row]
                lasts[i] = stacked[row, :, len(encoded[i]) - 1]
    return torch.stack(means), torch.stack(lasts)


def router_features(train: torch.Tensor, test: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The router's normalisation: unit length, minus the fit's mean unit vector, unit length."""
    unit = torch.nn.functional.normalize
    mean = unit(train, dim=-1).mean(0)
    return unit(unit(train, dim=-1) - mean, dim=-1).numpy(), unit(unit(test, dim=-1) - mean, dim=-1).numpy()


def accuracies(train: torch.Tensor, labels: np.ndarray, test: torch.Tensor, test_labels: np.ndarray) -> dict:
    x, y = router_features(train, test)
    centroids = np.stack([x[labels == i].mean(0) for i in range(labels.max() + 1)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    centroid = float(((y @ centroids.T).argmax(1) == test_labels).mean())
    probe = LogisticRegression(max_iter=3000).fit(x, labels)
    return {"centroid": centroid, "probe": float((probe.predict(y) == test_labels).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collections", nargs="+", default=["embedded", "validation"])
    parser.add_argument("--json", default="benchmark_results/routing_bare.json")
    args = parser.parse_args()
    out = {}
    for collection in args.collections:
        started = time.perf_counter()
        model, tokenizer, _, fewshot, test = _load("smollm2", collection, None, True, False)
        tasks = sorted(fewshot)
        named = {
            t: [e["prompt"] for e in fewshot[t][:10]] + [e["prompt"] for e in test[t]] for t in tasks
        }  # one prefix / suffix per task, over both splits
        cut = bare(named)
        forms = {"named": named, "bare": cut}
        result = {"tasks": len(tasks), "examples": {t: cut[t][:2] for t in tasks}}
        layers = model.get_base_model().config.num_hidden_layers
        for form, prompts in forms.items():
            fit = [p for t in tasks for p in prompts[t][:10]]
            held = [p for t in tasks for p in prompts[t][10:]]
            labels = np.array([i for i, t in enumerate(tasks) for _ in prompts[t][:10]])
            held_labels = np.array([i for i, t in enumerate(tasks) for _ in prompts[t][10:]])
            fit_mean, fit_last = hidden_features(model, tokenizer, fit)
            held_mean, held_last = hidden_features(model, tokenizer, held)
            rows = {}
            for layer in sorted({layers // 4, layers // 2, 3 * layers // 4, layers}):
                rows[f"mean, layer {layer}"] = accuracies(fit_mean[:, layer], labels, held_mean[:, layer], held_labels)
                rows[f"last token, layer {layer}"] = accuracies(
                    fit_last[:, layer], labels, held_last[:, layer], held_labels
                )
            both = torch.cat([fit_mean[:, layers // 2], fit_mean[:, layers]], dim=-1)
            held_both = torch.cat([held_mean[:, layers // 2], held_mean[:, layers]], dim=-1)
            rows[f"mean, layers {layers // 2} + {layers}"] = accuracies(both, labels, held_both, held_labels)
            result[form] = {"held_out_prompts": len(held), "accuracy": rows}
            for name, acc in rows.items():
                print(f"{collection} {form:5s} {name:24s} centroid {acc['centroid']:.3f}  probe {acc['probe']:.3f}")
        result["seconds"] = time.perf_counter() - started
        out[collection] = result
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
