"""Tables and plots of the embedded benchmark (`peft_d2c.embedded.benchmark`), from its results JSON alone.

- `summarize`: per (method, K) mean ± std over seeds of held-out exact match, held-out loss, the mean few-shot loss
  reached, forward passes and wall time per cell;
- `paired_differences`: each D2C method minus the best baseline of the same K (the baseline with the best mean),
  paired by seed, with a 95% t interval;
- `anytime_rows`: the mean few-shot loss reached against forward passes spent, per D2C method and K;
- `format_table`, `format_anytime_table`, `plot_benchmark`: Markdown and PNGs of the above.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from ..evaluation.plots import plot_anytime, plot_loss_heatmap, plot_score_vs_storage

REFERENCE_METHODS = ["zero-shot", "single-task LoRAs"]
BASELINES = ["random", "kmeans", "kmeans_svd"]
# The settings of a D2C search that `--search`, `--proposals-per-step`, `--patience` set, with the values of the
# paper's Algorithm 1 (the default search; `search=None` is `"paper"`).
PAPER_SEARCH = {"search": "paper", "proposals_per_step": 1, "patience": None}
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
_T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
ANYTIME_BUDGETS = [0, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1500, 2000]


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t interval of `values` (`(mean, low, high)`; the interval is the mean itself
    for a single value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean, mean
    df = len(values) - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def method_order(data: dict[str, Any]) -> list[str]:
    """The methods of a results dict in table order: references, baselines, then the rest as first met."""
    methods = list(dict.fromkeys(r["method"] for r in data["results"]))
    return sorted(methods, key=lambda m: (REFERENCE_METHODS + BASELINES + [m]).index(m))


def mean_of(cells: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of `key` over the cells that have it (not `None`), or `None` if none has."""
    values = [c[key] for c in cells if c.get(key) is not None]
    return statistics.mean(values) if values else None


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of every (method, K): rows `{method, num_clusters, storage, score, std, whole_score,
    loss, fewshot_loss, forward_passes, seconds, n}` (references first, then by K; `score` is the first word's exact
    match, `whole_score` the whole answer's, None for cells written before it was recorded)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in data["results"]:
        groups.setdefault((r["method"], r["num_clusters"]), []).append(r)
    order = method_order(data)
    rows = []
    for (method, k), cells in sorted(
        groups.items(), key=lambda kv: (-1 if kv[0][0] in REFERENCE_METHODS else kv[0][1], order.index(kv[0][0]))
    ):
        scores = [c["heldout_score"] for c in cells]
        rows.append(
            {
                "method": method,
                "num_clusters": k,
                "storage": cells[0]["storage_fraction"],
                "score": statistics.mean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "whole_score": mean_of(cells, "heldout_whole_score"),
                "loss": statistics.mean(c["heldout_loss"] for c in cells),
                "fewshot_loss": mean_of(cells, "fewshot_loss"),
                "forward_passes": mean_of(cells, "forward_passes"),
                "seconds": statistics.mean(c["seconds"] for c in cells),
                "n": len(cells),
            }
        )
    return rows


def paired_differences(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every D2C method minus the best baseline of its K, paired by seed: rows `{method, num_clusters, baseline,
    diff, low, high, wins, n, fewshot_diff, whole_diff, whole_low, whole_high}` (first-word exact match as a fraction,
    which also picks the best baseline; `whole_*` the same for the whole-answer exact match, None where a cell
    predates it; `fewshot_diff` in nats)."""
    cells = {(r["method"], r["num_clusters"], r["seed"]): r for r in data["results"]}
    rows = []
    for k in sorted({r["num_clusters"] for r in data["results"] if r["method"] not in REFERENCE_METHODS}):
        means = {}
        for method in BASELINES:
            scores = [r["heldout_score"] for (m, kk, _), r in cells.items() if m == method and kk == k]
            if scores:
                means[method] = statistics.mean(scores)
        if not means:
            continue
        baseline = max(means, key=lambda m: (means[m], -BASELINES.index(m)))
        for method in method_order(data):
            if not method.startswith("d2c"):
                continue
            seeds = sorted(s for (m, kk, s) in cells if m == method and kk == k and (baseline, k, s) in cells)
            if not seeds:
                continue
            diffs = [cells[(method, k, s)]["heldout_score"] - cells[(baseline, k, s)]["heldout_score"] for s in seeds]
            fewshot = [
                cells[(method, k, s)]["fewshot_loss"] - cells[(baseline, k, s)]["fewshot_loss"]
                for s in seeds
                if cells[(method, k, s)].get("fewshot_loss") is not None
                and cells[(baseline, k, s)].get("fewshot_loss") is not None
            ]
            mean, low, high = t_interval(diffs)
            pairs = [(cells[(method, k, s)].get("heldout_whole_score"), cells[(baseline, k, s)].get("heldout_whole_score"))
                     for s in seeds]  # fmt: skip
            whole = (None, None, None)
            if all(a is not None and b is not None for a, b in pairs):
                whole = t_interval([a - b for a, b in pairs])
            rows.append(
                {
                    "method": method,
                    "num_clusters": k,
                    "baseline": baseline,
                    "diff": mean,
                    "low": low,
                    "high": high,
                    "wins": sum(d > 0 for d in diffs),
                    "n": len(diffs),
                    "fewshot_diff": statistics.mean(fewshot) if fewshot else None,
                    **dict(zip(("whole_diff", "whole_low", "whole_high"), whole, strict=True)),
                }
            )
    return rows


def _is_paper(settings: dict[str, Any] | None, iterations: int | None) -> bool:
    """Whether a D2C method's settings are the exact Algorithm 1 from a random start at the run's T."""
    if not settings or settings.get("method") != "d2c" or (settings.get("init") or "random") != "random":
        return False
    steps = settings.get("num_iterations", iterations)
    paper = {**settings, "search": settings.get("search") or "paper"}
    if ((settings.get("scoring") or {}).get("cross_fit_folds") or 1) != 1:  # a cross-fitted objective
        return False
    return steps == iterations and all(paper.get(k, v) == v for k, v in PAPER_SEARCH.items())


def paired_against_paper(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every other D2C method from a random start minus the exact paper mode, paired by seed (the same start):
    rows `{method, num_clusters, paper, loss_diff, loss_low, loss_high, lower, n, pass_ratio, em_diff, em_low,
    em_high, heldout_diff, heldout_low, heldout_high}` (`loss_*` in nats of the mean few-shot loss; `lower`: seeds
    where the method ends lower; `pass_ratio`: mean forward passes over the paper's; `heldout_*`: the held-out
    completion loss)."""
    methods = data.get("methods", {})
    paper = next((m for m in methods if _is_paper(methods[m], data.get("iterations"))), None)
    if paper is None:
        return []
    cells = {(r["method"], r["num_clusters"], r["seed"]): r for r in data["results"]}
    rows = []
    for k in sorted({kk for (m, kk, _) in cells if m == paper}):
        for method in method_order(data):
            settings = methods.get(method, {})
            if method == paper or settings.get("method") != "d2c" or (settings.get("init") or "random") != "random":
                continue
            seeds = sorted(s for (m, kk, s) in cells if m == method and kk == k and (paper, k, s) in cells)
            if not seeds:
                continue
            pairs = [(cells[(method, k, s)], cells[(paper, k, s)]) for s in seeds]
            loss = t_interval([a["fewshot_loss"] - b["fewshot_loss"] for a, b in pairs])
            em = t_interval([a["heldout_score"] - b["heldout_score"] for a, b in pairs])
            heldout = t_interval([a["heldout_loss"] - b["heldout_loss"] for a, b in pairs])
            rows.append(
                {
                    "method": method,
                    "num_clusters": k,
                    "paper": paper,
                    **dict(zip(("loss_diff", "loss_low", "loss_high"), loss, strict=True)),
                    "lower": sum(a["fewshot_loss"] < b["fewshot_loss"] for a, b in pairs),
                    "n": len(pairs),
                    "pass_ratio": statistics.mean(a["forward_passes"] for a, _ in pairs)
                    / statistics.mean(b["forward_passes"] for _, b in pairs),
                    "em_diff": em[0],
                    "em_low": em[1],
                    "em_high": em[2],
                    "heldout_diff": heldout[0],
                    "heldout_low": heldout[1],
                    "heldout_high": heldout[2],
                }
            )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _points(diff: float, low: float, high: float, n: int) -> str:
    """A paired difference of two shares in points, with its interval where there is more than one seed."""
    interval = f"[{100 * low:+.1f}, {100 * high:+.1f}]" if n > 1 else "(one seed: no interval)"
    return f"{100 * diff:+.1f} {interval}"


def format_table(data: dict[str, Any]) -> str:
    """Markdown: the table in the shape of the paper's Table 1 (held-out exact match % of the first word, mean ± std
    over seeds, and of the whole answer, plus the mean few-shot loss reached, forward passes and seconds per cell), then the paired differences."""
    base = data.get("base_model", {}).get("model_id", data["model"])
    lines = [
        f"| method | K | storage | {base} EM % | whole-answer EM % | held-out loss | few-shot loss | forward passes "
        "| s / cell | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summarize(data):
        k = "-" if row["method"] in REFERENCE_METHODS else str(row["num_clusters"])
        lines.append(
            f"| {row['method']} | {k} | {100 * row['storage']:.1f}% | {100 * row['score']:.1f}"
            + (f" ± {100 * row['std']:.1f}" if row["n"] > 1 else "")
            + f" | {_fmt(None if row['whole_score'] is None else 100 * row['whole_score'], '.1f')}"
            + f" | {row['loss']:.3f} | {_fmt(row['fewshot_loss'], '.3f')} | "
            f"{_fmt(row['forward_passes'], '.0f')} | {row['seconds']:.0f} | {row['n']} |"
        )
    paired = paired_differences(data)
    if paired:
        lines += [
            "",
            "| method | K | minus best baseline | EM points (95% t interval) | seeds better | few-shot loss diff "
            "| whole-answer EM points (95% t interval) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in paired:
            lines.append(
                f"| {row['method']} | {row['num_clusters']} | {row['baseline']} | "
                + _points(row["diff"], row["low"], row["high"], row["n"])
                + f" | {row['wins']} of {row['n']} | {_fmt(row['fewshot_diff'], '+.3f')} | "
                + (
                    "-"
                    if row["whole_diff"] is None
                    else _points(row["whole_diff"], row["whole_low"], row["whole_high"], row["n"])
                )
                + " |"
            )
    against = paired_against_paper(data)
    if against:
        lines += [
            "",
            "| method | K | minus the paper's search (same start) | few-shot loss diff, nats (95% t interval) "
            "| seeds lower | forward passes / paper's | EM points (95% t interval) | held-out loss diff, nats |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in against:
            loss = f"{row['loss_diff']:+.3f} [{row['loss_low']:+.3f}, {row['loss_high']:+.3f}]"
            lower = f"{row['lower']} of {row['n']}"
            lines.append(
                f"| {row['method']} | {row['num_clusters']} | {row['paper']} | {loss} | {lower} | "
                f"{row['pass_ratio']:.2f}x | {100 * row['em_diff']:+.1f} [{100 * row['em_low']:+.1f}, "
                f"{100 * row['em_high']:+.1f}] | {row['heldout_diff']:+.3f} [{row['heldout_low']:+.3f}, "
                f"{row['heldout_high']:+.3f}] |"
            )
    return "\n".join(lines)


def value_at(curve: Sequence[Sequence[float]], budget: float) -> float:
    """The value of an any-time curve `[(cost, value), ...]` (sorted by cost) once `budget` is spent: the last point
    with cost <= budget (the first point if none; the final value after the run ended)."""
    value = curve[0][1]
    for cost, point in curve:
        if cost > budget:
            break
        value = point
    return value


def anytime_rows(data: dict[str, Any], budgets: Sequence[int] = ANYTIME_BUDGETS) -> list[dict[str, Any]]:
    """Per D2C method and K, the mean over seeds (those every method of that K has a curve for) of the few-shot
    loss reached within each forward-pass budget: rows `{method, num_clusters, budgets, losses, end_passes, n}` (budgets up to the longest run's total; a run
    that ended earlier keeps its final loss)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in data["results"]:
        if r.get("anytime"):
            groups.setdefault((r["method"], r["num_clusters"]), []).append(r)
    for k in {kk for _, kk in groups}:  # the same seeds for every method of a K, so the means compare
        common = set.intersection(*({c["seed"] for c in cells} for (_, kk), cells in groups.items() if kk == k))
        for key in [key for key in groups if key[1] == k]:
            groups[key] = [c for c in groups[key] if c["seed"] in common]
    groups = {key: cells for key, cells in groups.items() if cells}
    order = method_order(data)
    rows = []
    largest = max((c["anytime"][-1][0] for cells in groups.values() for c in cells), default=0)
    for (method, k), cells in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        # every method on the same budgets, up to the longest run (a finished run keeps its final loss)
        used = sorted({b for b in budgets if b <= largest} | {max(c["anytime"][-1][0] for c in cells)})
        losses = [statistics.mean(value_at(c["anytime"], b) for c in cells) for b in used]
        rows.append(
            {
                "method": method,
                "num_clusters": k,
                "budgets": used,
                "losses": losses,
                "end_passes": statistics.mean(c["anytime"][-1][0] for c in cells),
                "n": len(cells),
            }
        )
    return rows


def format_anytime_table(data: dict[str, Any], budgets: Sequence[int] = ANYTIME_BUDGETS) -> str:
    """Markdown: mean few-shot loss reached (rows: D2C method and K) after each number of forward passes."""
    rows = anytime_rows(data, budgets)
    if not rows:
        return ""
    columns = sorted({b for r in rows for b in r["budgets"] if b in budgets})
    lines = [
        "| method | K | seeds | " + " | ".join(f"{b} fp" for b in columns) + " | end (fp) |",
        "|---|---|---|" + "---|" * (len(columns) + 1),
    ]
    for r in rows:
        by_budget = dict(zip(r["budgets"], r["losses"], strict=True))
        cells = [f"{by_budget[b]:.3f}" if b in by_budget else "" for b in columns]
        lines.append(
            f"| {r['method']} | {r['num_clusters']} | {r['n']} | " + " | ".join(cells) + f" | {r['losses'][-1]:.3f} "
            f"({r['end_passes']:.0f}) |"
        )
    return "\n".join(lines)


def plot_benchmark(data: dict[str, Any], path: str) -> list[str]:
    """Score vs storage for every method (the Pareto view), the task x cluster loss heatmap of the first D2C run
    (largest K) as `<stem>_heatmap.png`, and the any-time curves per K as `<stem>_anytime_k<K>.png`."""
    rows = summarize(data)
    series = {
        method: [(100 * r["storage"], 100 * r["score"], 100 * r["std"]) for r in rows if r["method"] == method]
        for method in dict.fromkeys(r["method"] for r in rows)
    }
    plot_score_vs_storage(
        series,
        path,
        xlabel="storage (% of the single-task adapters kept)",
        ylabel="held-out exact match (%)",
        title=f"D2C vs baselines — {data.get('base_model', {}).get('model_id', data['model'])}",
    )
    written = [path]
    heatmaps = sorted((r for r in data["results"] if "heatmap" in r), key=lambda r: -r["num_clusters"])
    heatmap = heatmaps[0]["heatmap"] if heatmaps else None
    if heatmap is not None:
        heat_path = os.path.splitext(path)[0] + "_heatmap.png"
        written.append(plot_loss_heatmap(heatmap["tasks"], heatmap["clusters"], heatmap["losses"], heat_path))
    anytime = anytime_rows(data, budgets=range(0, 100001, 10))
    for k in sorted({r["num_clusters"] for r in anytime}):
        curves = {
            f"{r['method']} ({r['n']} seeds)": list(zip(r["budgets"], r["losses"], strict=True))
            for r in anytime
            if r["num_clusters"] == k
        }
        written.append(
            plot_anytime(
                curves,
                os.path.splitext(path)[0] + f"_anytime_k{k}.png",
                xlabel="forward passes spent",
                ylabel="mean few-shot loss of the partition held (nats)",
                title=f"Any-time view, K = {k} (mean over seeds)",
            )
        )
    return written
