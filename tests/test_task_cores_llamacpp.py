"""Task adapters (issue 38 part 5, `merge.task_cores`) answered by a real llama.cpp runtime, against PyTorch.

Four embedded tasks (SmolLM2-135M) merged into one adapter with a core per task; the export writes one plain LoRA
per task (`write_task_adapter`, no model involved), converted to GGUF. llama.cpp on the float32 copy of the PyPI GGUF
base answers every held-out item with its task's file; PyTorch answers with the task adapter the run built in the
model (`add_task_adapter`). The criteria are those of tests/test_export_llamacpp.py on the same base.
"""

from __future__ import annotations

import json

import pytest
from test_export_llamacpp import TASKS, base_gguf_file, compare, dequantised_f32_gguf, passes

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.embedded import load_embedded_peft_model, load_embedded_tasks
from peft_d2c.export import export_d2c_folder

pytest.importorskip("llama_cpp", reason="needs the `llamacpp` extra (llama-cpp-python)")

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


def test_llamacpp_answers_with_each_tasks_own_adapter_as_pytorch_does(tmp_path):
    model, tokenizer, _, _ = load_embedded_peft_model(tasks=TASKS, show_progress=False)
    fewshot, test = load_embedded_tasks("fewshot", tasks=TASKS), load_embedded_tasks("test", tasks=TASKS)
    config = D2CMergeConfig(num_clusters=1, method="random", fit_router=False, merge={"task_cores": True})
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    manifest = export_d2c_folder(result.save_pretrained(tmp_path / "result"), tmp_path / "gguf", format="gguf",
                                 base_gguf=base_gguf_file())  # fmt: skip
    assert {t: e["adapter"] for t, e in manifest["tasks"].items()} == result.task_adapters
    files = {name: str(tmp_path / "gguf" / record["file"]) for name, record in manifest["adapters"].items()}
    assert len(files) == len(TASKS)  # one file per task, not one per cluster
    report = compare(model, tokenizer, test, result.serving_routing, files, dequantised_f32_gguf(base_gguf_file()))
    assert passes(report) == dict.fromkeys(passes(report), True), json.dumps(report, indent=1)
