"""End to end on the real SmolLM2-135M-Instruct: 4 embedded tasks, their adapters, D2C at K=2, save, reload, generate.

Uses `default_cache_dir()` like the main job, so a cold run fetches and converts the model and trains four adapters
(a few minutes on 2 cores) and a warm run reuses them.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from peft_d2c import D2CMergeConfig, D2CResult, merge_adapters_d2c
from peft_d2c.embedded import load_embedded_base_model, load_embedded_peft_model, load_embedded_tasks
from peft_d2c.evaluation.generation import generate_answers
from peft_d2c.evaluation.heldout import evaluate_routing

TASKS = ["capital_world", "comparative", "past_tense", "plural"]


@pytest.mark.slow
def test_pipeline_on_smollm2_with_four_tasks(tmp_path):
    model, tokenizer, source_info, _ = load_embedded_peft_model(tasks=TASKS, show_progress=False)
    fewshot = load_embedded_tasks("fewshot", tasks=TASKS)
    config = D2CMergeConfig(num_clusters=2, num_iterations=6, seed=0, show_progress=False)
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)

    assert sorted(m for c in result.clusters for m in c) == sorted(TASKS)
    assert len(result.clusters) == 2 and all(result.clusters) and len(result.history) == 6
    assert all(0 < loss < 20 for loss in result.task_losses.values())
    test = load_embedded_tasks("test", tasks=TASKS, limit=8)
    scores = evaluate_routing(model, tokenizer, test, result.routing)
    assert set(scores) == set(TASKS) and all(0.0 <= s["exact_match"] <= 1.0 for s in scores.values())

    out = result.save_pretrained(tmp_path / "out")
    assert D2CResult.from_pretrained(out).routing == result.routing
    prompts = [test[t][0]["prompt"] for t in TASKS]
    expected = generate_answers(model, tokenizer, prompts, adapter_names=[result.routing[t] for t in TASKS])
    base, _, _ = load_embedded_base_model(fetch=False)
    name = result.merged_adapter_names[0]
    reloaded = PeftModel.from_pretrained(base, str(out), subfolder=name, adapter_name=name).eval()
    rows = [i for i, t in enumerate(TASKS) if result.routing[t] == name]
    got = generate_answers(reloaded, tokenizer, [prompts[i] for i in rows], adapter_names=[name] * len(rows))
    assert got == [expected[i] for i in rows] and all(isinstance(a, str) for a in got)
    assert torch.is_inference_mode_enabled() is False
