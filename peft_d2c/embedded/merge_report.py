"""The merge axis of the embedded benchmark: the same clustering methods with several merges (`combination_type`),
from results JSON files alone.

- `with_merge_labels`: a results dict in which every cell names its merge (files written before the merge axis
  hold one merge, named once for the whole file);
- `combine_runs`: several results files of the same model and tasks as one (e.g. one run per merge);
- `split_by_merge`: one results dict per merge, each shaped like a single-merge run (references in every one), for
  the tables and plots of `peft_d2c.embedded.benchmark_report`;
- `merge_rows`: per (K, clustering method, merge) the held-out exact match over seeds, paired by seed against a
  reference merge (`ties` when present), with forward passes, seconds per cell and the share of the search's time
  spent merging;
- `task_keep_rows`: per task and K, the held-out exact match each merge keeps of the single-task LoRA's;
- `format_report`, `plot_report`: Markdown and PNGs of all of it (the single-merge tables when there is one merge).
"""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Sequence
from typing import Any

from .benchmark_report import (
    REFERENCE_METHODS,
    format_anytime_table,
    format_table,
    mean_of,
    method_order,
    plot_benchmark,
    t_interval,
)

__all__ = [
    "combine_runs",
    "format_merge_tables",
    "format_report",
    "merge_rows",
    "plot_report",
    "split_by_merge",
    "task_keep_rows",
    "with_merge_labels",
]

# The merge of files written before merges were recorded (PEFT's `ties`, the default then).
_OLD_DEFAULT_MERGE = "ties"


def with_merge_labels(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a results dict with `combination_types` (the file's merges, in order) and every cell's
    `combination_type` (for old files, the file's single `combination_type`)."""
    data = copy.deepcopy(data)
    single = data.pop("combination_type", _OLD_DEFAULT_MERGE)
    for cell in data["results"]:
        cell.setdefault("combination_type", single)
    found = list(dict.fromkeys(cell["combination_type"] for cell in data["results"]))
    data["combination_types"] = list(dict.fromkeys([*data.get("combination_types", []), *found])) or [single]
    return data


def combine_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs on the same model and tasks: their cells (a cell of the same method, K,
    seed and merge, or a reference, is taken from the first run that has it) and the union of their methods.

    Raises:
        ValueError: If the runs are on other models or tasks, or name a method with other settings.
    """
    runs = [with_merge_labels(run) for run in runs]
    first = runs[0]
    combined = {**first, "methods": dict(first.get("methods", {})), "results": []}
    seen = set()
    for run in runs:
        for key in ("model", "tasks", "iterations"):
            if run.get(key) != first.get(key):
                raise ValueError(f"Results files differ in `{key}`: {first.get(key)!r} vs {run.get(key)!r}.")
        for label, settings in run.get("methods", {}).items():
            if combined["methods"].setdefault(label, settings) != settings:
                raise ValueError(f"Results files run `{label}` with other settings; rename it in one of them.")
        for cell in run["results"]:
            if cell["method"] in REFERENCE_METHODS:
                key = (cell["method"],)
            else:
                key = (cell["method"], cell["num_clusters"], cell["seed"], cell["combination_type"])
            if key not in seen:
                seen.add(key)
                combined["results"].append(cell)
        merges = [*combined["combination_types"], *run["combination_types"]]
        combined["combination_types"] = list(dict.fromkeys(merges))
    return combined


def split_by_merge(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{merge: results dict}` with that merge's cells and the references (which merge nothing)."""
    data = with_merge_labels(data)
    references = [c for c in data["results"] if c["method"] in REFERENCE_METHODS]
    return {
        merge: {
            **data,
            "combination_type": merge,
            "results": references
            + [c for c in data["results"] if c["method"] not in REFERENCE_METHODS and c["combination_type"] == merge],
        }
        for merge in data["combination_types"]
    }


def _reference_merge(merges: Sequence[str]) -> str:
    return _OLD_DEFAULT_MERGE if _OLD_DEFAULT_MERGE in merges else merges[0]


def merge_rows(data: dict[str, Any], reference: str | None = None) -> list[dict[str, Any]]:
    """Per (K, clustering method, merge): rows `{num_clusters, method, merge, n, score, std, reference, diff, low,
    high, wins, pairs, forward_passes, seconds, merge_share}`.

    `score`/`std` are over the merge's own seeds; `diff` (with a 95% t interval, `wins` of `pairs`) is the merge
    minus `reference` (default `ties` if present) on the seeds both have, in exact match as a fraction;
    `merge_share` is the mean fraction of a D2C search's seconds spent merging (`None` for the baselines).
    """
    data = with_merge_labels(data)
    merges = data["combination_types"]
    reference = reference or _reference_merge(merges)
    cells = {
        (c["num_clusters"], c["method"], c["combination_type"], c["seed"]): c
        for c in data["results"]
        if c["method"] not in REFERENCE_METHODS
    }
    order = method_order(data)
    rows = []
    for k, method in sorted({key[:2] for key in cells}, key=lambda km: (km[0], order.index(km[1]))):
        for merge in merges:
            seeds = sorted(s for (kk, m, t, s) in cells if (kk, m, t) == (k, method, merge))
            if not seeds:
                continue
            own = [cells[(k, method, merge, s)] for s in seeds]
            scores = [c["heldout_score"] for c in own]
            paired = [s for s in seeds if (k, method, reference, s) in cells]
            diffs = [
                cells[(k, method, merge, s)]["heldout_score"] - cells[(k, method, reference, s)]["heldout_score"]
                for s in paired
            ]
            diff, low, high = t_interval(diffs) if diffs else (None, None, None)
            stats = [c["search_stats"] for c in own if c.get("search_stats", {}).get("seconds")]
            shares = [s.get("merge_seconds", 0.0) / s["seconds"] for s in stats]
            rows.append(
                {
                    "num_clusters": k,
                    "method": method,
                    "merge": merge,
                    "n": len(seeds),
                    "score": statistics.mean(scores),
                    "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                    "reference": reference,
                    "diff": diff,
                    "low": low,
                    "high": high,
                    "wins": sum(d > 0 for d in diffs),
                    "pairs": len(diffs),
                    "forward_passes": mean_of(own, "forward_passes"),
                    "seconds": statistics.mean(c["seconds"] for c in own),
                    "merge_share": statistics.mean(shares) if method.startswith("d2c") and shares else None,
                }
            )
    return rows


def task_keep_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: `{task, single, kept: {K: {merge: exact match}}, n: {K: cells}}`, the task's held-out exact match
    under each merge, averaged over the clustering cells (method, seed) that every merge of that K has, next to
    the single-task LoRA's (`single`; `None` if the run has no single-task cell)."""
    data = with_merge_labels(data)
    merges = data["combination_types"]
    single = next((c for c in data["results"] if c["method"] == "single-task LoRAs"), None)
    cells = {
        (c["num_clusters"], c["method"], c["seed"], c["combination_type"]): c
        for c in data["results"]
        if c["method"] not in REFERENCE_METHODS and "per_task" in c
    }
    common: dict[int, list[tuple[str, int]]] = {}
    for k in sorted({key[0] for key in cells}):
        runs = {(m, s) for (kk, m, s, _) in cells if kk == k}
        common[k] = sorted(r for r in runs if all((k, *r, merge) in cells for merge in merges))
    tasks = data.get("tasks") or sorted({t for c in cells.values() for t in c["per_task"]})
    rows = []
    for task in tasks:
        kept = {
            k: {
                merge: statistics.mean(cells[(k, *r, merge)]["per_task"][task]["exact_match"] for r in runs)
                for merge in merges
            }
            for k, runs in common.items()
            if runs
        }
        rows.append(
            {
                "task": task,
                "single": single["per_task"][task]["exact_match"] if single else None,
                "kept": kept,
                "n": {k: len(runs) for k, runs in common.items() if runs},
            }
        )
    return rows


def _pct(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(100 * value, spec)


def format_merge_tables(data: dict[str, Any]) -> str:
    """Markdown: held-out exact match of every clustering method with every merge (paired against the reference
    merge), the cost of each merge, and per task what each merge keeps of the single-task LoRA's score."""
    rows = merge_rows(data)
    if not rows:
        return ""
    merges = with_merge_labels(data)["combination_types"]
    reference = rows[0]["reference"]
    lines = [
        f"Held-out EM %, mean ± std over seeds (seeds); other merges: minus `{reference}` on the same seeds, "
        "95% t interval, seeds better.",
        "",
        "| K | method | " + " | ".join(f"`{m}`" for m in merges) + " |",
        "|---|---|" + "---|" * len(merges),
    ]
    by_key = {(r["num_clusters"], r["method"], r["merge"]): r for r in rows}
    for k, method in dict.fromkeys((r["num_clusters"], r["method"]) for r in rows):
        out = []
        for merge in merges:
            r = by_key.get((k, method, merge))
            if r is None:
                out.append("-")
                continue
            text = f"{_pct(r['score'])} ± {_pct(r['std'])} ({r['n']})"
            if merge != reference and r["pairs"]:
                interval = f" [{_pct(r['low'], '+.1f')}, {_pct(r['high'], '+.1f')}]" if r["pairs"] > 1 else ""
                text += f"; {_pct(r['diff'], '+.1f')}{interval}, {r['wins']}/{r['pairs']}"
            out.append(text)
        lines.append(f"| {k} | {method} | " + " | ".join(out) + " |")
    lines += [
        "",
        "| K | method | merge | forward passes | s / cell | merging, % of search time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"].startswith("d2c"):
            passes = "-" if r["forward_passes"] is None else f"{r['forward_passes']:.0f}"
            lines.append(
                f"| {r['num_clusters']} | {r['method']} | `{r['merge']}` | {passes} | {r['seconds']:.0f} | "
                f"{_pct(r['merge_share'], '.0f')} |"
            )
    tasks = task_keep_rows(data)
    ks = sorted(tasks[0]["kept"]) if tasks else []
    if ks:
        header = " | ".join(f"K={k} `{m}`" for k in ks for m in merges)
        lines += [
            "",
            "Per task, held-out EM % under each merge (mean over the clustering cells every merge has: "
            + ", ".join(f"{tasks[0]['n'][k]} at K={k}" for k in ks)
            + ") next to the single-task LoRA's.",
            "",
            f"| task | single-task | {header} |",
            "|---|---|" + "---|" * (len(ks) * len(merges)),
        ]
        for r in tasks:
            values = " | ".join(_pct(r["kept"][k][m], ".0f") for k in ks for m in merges)
            lines.append(f"| {r['task']} | {_pct(r['single'], '.0f')} | {values} |")
        if tasks[0]["single"] is not None:
            kept = " | ".join(
                _pct(
                    statistics.mean(r["kept"][k][m] for r in tasks) / statistics.mean(r["single"] for r in tasks),
                    ".0f",
                )
                for k in ks
                for m in merges
            )
            lines.append(f"| **mean EM kept, % of single-task** | 100 | {kept} |")
    return "\n".join(lines)


def format_report(data: dict[str, Any]) -> str:
    """Markdown of a whole run: per merge the benchmark table (and any-time table), then the merge tables when the
    run has more than one merge."""
    parts = split_by_merge(data)
    out = []
    for merge, sub in parts.items():
        if len(parts) > 1:
            out.append(f"### `{merge}` merges\n")
        out.append(format_table(sub))
        anytime = format_anytime_table(sub)
        if anytime:
            out.append("\nMean few-shot loss reached after a number of forward passes (fp):\n\n" + anytime)
        out.append("")
    if len(parts) > 1:
        out += ["### The merge axis\n", format_merge_tables(data)]
    return "\n".join(out).rstrip() + "\n"


def plot_report(data: dict[str, Any], path: str) -> list[str]:
    """`plot_benchmark` of the run (one merge), or of each merge as `<stem>_<merge>.png` (and its heatmap and
    any-time PNGs); returns the paths written."""
    parts = split_by_merge(data)
    if len(parts) == 1:
        return plot_benchmark(next(iter(parts.values())), path)
    stem, ext = os.path.splitext(path)
    return [p for merge, sub in parts.items() for p in plot_benchmark(sub, f"{stem}_{merge}{ext or '.png'}")]
