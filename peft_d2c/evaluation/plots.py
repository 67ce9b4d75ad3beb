"""Plots of a D2C run, a budget sweep and the benchmark (needs the `plots` extra: `pip install 'peft-d2c[plots]'`).

- `plot_loss_history`: the task loss of every proposed move over the iterations, accepted moves marked;
- `plot_loss_heatmap`: task x cluster few-shot loss, each task's own cluster outlined;
- `plot_cluster_membership`: which tasks each merged adapter serves;
- `plot_score_vs_storage`: score against storage for one or more series (the sweep and the benchmark use it);
- `plot_anytime`: best value reached against cost spent (the benchmark's few-shot loss vs forward passes);
- `plot_run`: the first three for a `D2CResult`, written next to its results.

Every function writes a PNG and returns its path; matplotlib runs with the non-interactive Agg backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot():
    try:
        import matplotlib  # optional dependency (the `plots` extra)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'peft-d2c[plots]'.") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (the `plots` extra)

    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_history(history: Sequence[Mapping[str, Any]], path: str) -> str:
    """Loss of the moved task before and after every proposed move; accepted moves are marked in red.

    Args:
        history (`Sequence[dict]`): `D2CResult.history` (records with `iteration`, `loss_before`, `loss_after`,
            `accepted`).
        path (`str`): The PNG to write.

    Returns:
        `str`: `path`.

    Example:
        ```python
        >>> plot_loss_history(result.history, "d2c_output/loss_history.png")  # doctest: +SKIP
        ```
    """
    plt = _pyplot()
    steps = [h.get("iteration", i) for i, h in enumerate(history)]
    before = [h.get("loss_before") for h in history]
    after = [h.get("loss_after") for h in history]
    accepted = [i for i, h in enumerate(history) if h.get("accepted")]
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        ax.plot(steps, before, ".", color="0.6", label="task loss in its cluster")
        ax.plot(steps, after, "x", color="tab:blue", alpha=0.6, label="task loss after the proposed move")
        ax.plot(
            [steps[i] for i in accepted], [after[i] for i in accepted], "o", color="tab:red", label="accepted move"
        )
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no proposed moves (baseline, K = 1 or K = N)", ha="center", va="center")
    ax.set_xlabel("iteration")
    ax.set_ylabel("few-shot loss of the moved task")
    ax.set_title(f"D2C search: {len(accepted)} of {len(history)} moves accepted")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss_heatmap(
    tasks: Sequence[str], clusters: Sequence[Sequence[str]], losses: Sequence[Sequence[float]], path: str
) -> str:
    """Task (rows) x cluster (columns) few-shot loss; each task's own cluster is outlined in red.

    Args:
        tasks (`Sequence[str]`): Row labels.
        clusters (`Sequence[Sequence[str]]`): Members of each cluster (columns).
        losses (`Sequence[Sequence[float]]`): `losses[t][c]`, e.g. from `peft_d2c.evaluation.heldout.loss_matrix`.
        path (`str`): The PNG to write.

    Returns:
        `str`: `path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(clusters), 0.9 + 0.35 * len(tasks)))
    image = ax.imshow(losses, cmap="viridis_r", aspect="auto")
    ax.set_yticks(range(len(tasks)), list(tasks), fontsize=7)
    ax.set_xticks(range(len(clusters)), [f"cluster {i}" for i in range(len(clusters))], fontsize=8)
    for t, task in enumerate(tasks):
        own = next((i for i, members in enumerate(clusters) if task in members), None)
        if own is not None:
            ax.add_patch(plt.Rectangle((own - 0.5, t - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    fig.colorbar(image, ax=ax, label="few-shot loss")
    ax.set_title("task x cluster loss (red: the task's cluster)", fontsize=9)
    return _save(fig, path)


def plot_cluster_membership(clusters: Sequence[Sequence[str]], merged_names: Sequence[str], path: str) -> str:
    """A task x merged-adapter grid: a filled cell where the merged adapter serves the task.

    Returns:
        `str`: `path`.
    """
    plt = _pyplot()
    tasks = [t for members in clusters for t in members]
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(clusters), 0.9 + 0.3 * len(tasks)))
    for c, members in enumerate(clusters):
        for task in members:
            ax.add_patch(plt.Rectangle((c - 0.4, tasks.index(task) - 0.4), 0.8, 0.8, color=f"C{c % 10}"))
    ax.set_xlim(-0.5, len(clusters) - 0.5)
    ax.set_ylim(len(tasks) - 0.5, -0.5)
    ax.set_xticks(
        range(len(clusters)), [f"{n}\n({len(m)})" for n, m in zip(merged_names, clusters, strict=True)], fontsize=8
    )
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_title("cluster membership", fontsize=9)
    return _save(fig, path)


def _finish_series_plot(fig, ax, path: str, *, xlabel: str, ylabel: str, title: str, legend: bool) -> str:
    """Labels, optional title, grid and (for several series) legend of a line plot, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_score_vs_storage(
    series: Mapping[str, Sequence[Sequence[float]]],
    path: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
) -> str:
    """Score against storage, one line per series.

    Args:
        series (`Mapping[str, Sequence]`): label -> points `(storage, score)` or `(storage, score, error)`.
        path (`str`): The PNG to write.
        xlabel, ylabel, title (`str`): Axis labels and title.
        log_x (`bool`): A logarithmic storage axis (budgets that halve from point to point).

    Returns:
        `str`: `path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points = sorted(tuple(p) for p in points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        errors = [p[2] for p in points] if all(len(p) > 2 for p in points) else None
        style = {"marker": "o", "capsize": 3} if len(points) > 1 else {"marker": "s", "ls": "none"}
        ax.errorbar(xs, ys, yerr=errors, label=label, **style)
    if log_x:  # ticks at the points themselves, in plain percent
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    return _finish_series_plot(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, legend=len(series) > 1)


def plot_anytime(
    series: Mapping[str, Sequence[Sequence[float]]], path: str, *, xlabel: str, ylabel: str, title: str = ""
) -> str:
    """Any-time curves: the best value reached against the cost spent, one step line per series.

    Args:
        series (`Mapping[str, Sequence]`): label -> points `(cost, value)`, drawn as a step function (the value
            holds until the next point).
        path (`str`): The PNG to write.
        xlabel, ylabel, title (`str`): Axis labels and title.

    Returns:
        `str`: `path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points = sorted(tuple(p) for p in points)
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", label=label, marker=".")
    return _finish_series_plot(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, legend=len(series) > 1)


def plot_sweep(sweep: Mapping[str, Any], path: str) -> str:
    """The score-vs-storage curve of `peft_d2c.evaluation.sweep.run_sweep`; a sweep over byte budgets adds the best
    single merge (K = 1) of each budget as a second curve."""
    method = (sweep.get("config") or {}).get("method", "d2c")
    points = sweep["points"]
    # The whole answer where every point has it (the stricter score), else the sweep's metric.
    key = "whole_score" if points and all("whole_score" in p for p in points) else "score"
    metric = "held-out whole-answer exact match" if key == "whole_score" else sweep["metric"]
    singles = [p["single"] for p in points if p.get("single")]
    label = f"{method}, the bytes decide K x rank" if singles else method
    series = {label: [(100 * p["storage_fraction"], p[key]) for p in points]}
    if singles:
        series["one merge (K = 1)"] = [(100 * s["storage_fraction"], s[key]) for s in singles]
    path = plot_score_vs_storage(
        series,
        path,
        xlabel="storage (% of the source adapters' bytes)",
        ylabel=metric + (" (higher is better)" if sweep["higher_is_better"] else " (lower is better)"),
        title=f"Budget sweep over {sweep['num_adapters']} adapters",
        log_x=bool(singles),
    )
    return path


def plot_run(
    result, directory: str | os.PathLike, *, loss_matrix: Sequence[Sequence[float]] | None = None
) -> list[str]:
    """Write the plots of a run next to its results: `loss_history.png`, `cluster_membership.png` and, given the
    task x cluster `loss_matrix` (tasks in `result.routing` order), `loss_heatmap.png`.

    Returns:
        `list[str]`: the written files.

    Example:
        ```python
        >>> from peft_d2c.evaluation.heldout import loss_matrix
        >>> matrix = loss_matrix(result.model, tok, examples, result.merged_adapter_names)  # doctest: +SKIP
        >>> plot_run(result, "d2c_output", loss_matrix=matrix)  # doctest: +SKIP
        ```
    """
    directory = os.fspath(directory)
    written = [
        plot_loss_history(result.history, os.path.join(directory, "loss_history.png")),
        plot_cluster_membership(
            result.clusters, result.merged_adapter_names, os.path.join(directory, "cluster_membership.png")
        ),
    ]
    if loss_matrix is not None:
        written.append(
            plot_loss_heatmap(
                list(result.routing), result.clusters, loss_matrix, os.path.join(directory, "loss_heatmap.png")
            )
        )
    return written
