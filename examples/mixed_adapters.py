"""D2C on adapters that differ the way published LoRAs do, on the real SmolLM2-135M-Instruct (docs/faq.md records
the last run).

Four embedded tasks get adapters of four recipes (ranks 4 / 8 / 16, `lora_alpha != r`, `lora_dropout` 0.05 / 0.1,
another set of target modules), plus two copies whose configs say what Hub adapters often say: rslora, and another
base model. The script shows what works (a `cat` merge across ranks, deterministic despite dropout) and what is
refused before any work, with the message.

    python examples/mixed_adapters.py            # ~4 min the first time on 2 cores (trains 5 adapters), then ~1 min
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

import torch

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.embedded import DEFAULT_RECIPE, default_cache_dir, load_embedded_base_model, load_embedded_tasks
from peft_d2c.embedded.adapters import train_task_adapter
from peft_d2c.evaluation.heldout import evaluate_routing
from peft_d2c.hub import load_adapters
from peft_d2c.testing import edited_adapter_copy

TASKS = ["capital_world", "currency", "plural", "past_tense"]
RECIPES = {
    "capital_world": replace(DEFAULT_RECIPE, r=4, lora_alpha=8, lora_dropout=0.05),
    "currency": replace(DEFAULT_RECIPE, r=8, lora_alpha=32, lora_dropout=0.1),
    "plural": replace(DEFAULT_RECIPE, r=16, lora_alpha=16, lora_dropout=0.1),
    "past_tense": replace(DEFAULT_RECIPE, r=8, lora_alpha=16, lora_dropout=0.05),
}
OTHER_TARGETS = replace(DEFAULT_RECIPE, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def attempt(label: str, model, examples, config, tokenizer) -> object | None:
    started = time.perf_counter()
    try:
        result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer)
    except Exception as error:
        print(f"- {label}: refused before any work ({type(error).__name__}): {str(error).splitlines()[0]}")
        return None
    print(f"- {label}: {result.clusters} in {time.perf_counter() - started:.0f} s")
    return result


def main() -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    root = default_cache_dir() / "mixed-adapters-v1"
    base, tokenizer, info = load_embedded_base_model()  # the base the adapters are trained on
    train = load_embedded_tasks("train", tasks=TASKS)
    dirs = {}
    for task in [*TASKS, "plural_other_targets"]:
        folder = root / task
        recipe = OTHER_TARGETS if task == "plural_other_targets" else RECIPES[task]
        if not (folder / "adapter_model.safetensors").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            train_task_adapter(
                base, tokenizer, train[task.split("_other")[0]], seed=1, output_dir=folder, recipe=recipe
            )
        dirs[task] = str(folder)
    dirs["currency_rslora"] = edited_adapter_copy(dirs["currency"], str(root / "currency_rslora"), use_rslora=True)
    dirs["plural_base"] = edited_adapter_copy(
        dirs["plural"], str(root / "plural_base"), base_model_name_or_path="HuggingFaceTB/SmolLM2-135M"
    )

    fewshot = load_embedded_tasks("fewshot", tasks=TASKS)
    test = load_embedded_tasks("test", tasks=TASKS)
    print(
        f"Base model: {info['model_id']} ({info['source']}); recipes: "
        + ", ".join(f"{t} r={r.r} alpha={r.lora_alpha} dropout={r.lora_dropout}" for t, r in RECIPES.items())
    )

    model = load_adapters(load_embedded_base_model()[0], [dirs[t] for t in TASKS], names=TASKS)
    cat = D2CMergeConfig(num_clusters=2, num_iterations=20, combination_type="cat", show_progress=False)
    runs = []
    for torch_seed in (1, 2):  # dropout 0.05-0.1 in every config: the run must not depend on torch's global seed
        torch.manual_seed(torch_seed)
        runs.append(attempt(f"cat across ranks 4/8/16 (torch seed {torch_seed})", model, fewshot, cat, tokenizer))
        if runs[-1] is not None and torch_seed == 1:
            scores = evaluate_routing(model, tokenizer, test, runs[-1].routing)
            mean = sum(s["exact_match"] for s in scores.values()) / len(scores)
            print(
                f"  held-out exact match of the merged adapters: {100 * mean:.1f}% "
                + str({t: round(100 * s["exact_match"], 1) for t, s in scores.items()})
            )
        for name in runs[-1].merged_adapter_names if runs[-1] else []:
            model.delete_adapter(name)
    if all(runs):
        same = runs[0].history == runs[1].history and runs[0].task_losses == runs[1].task_losses
        print(f"  identical history and losses for both torch seeds: {same}")
    attempt("ties across ranks 4/8/16", model, fewshot, replace(cat, combination_type="ties"), tokenizer)
    for extra, label in (
        ("currency_rslora", "an rslora adapter"),
        ("plural_base", "an adapter of another base model"),
        ("plural_other_targets", "an adapter on other target modules"),
    ):
        task = extra.split("_")[0]
        names = [t for t in TASKS if t != task] + [extra]
        other = load_adapters(load_embedded_base_model()[0], [dirs[n] for n in names], names=names)
        examples = {n: fewshot[task if n == extra else n] for n in names}
        attempt(f"{label} with `cat`", other, examples, cat, tokenizer)


if __name__ == "__main__":
    main()
