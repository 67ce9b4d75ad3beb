"""Benchmark: peft-d2c's search against a straightforward Algorithm 1, on the same adapters, examples and seed.

Single process, the tiny model (perturbed copies of the 6 tiny task adapters) or SmolLM2-135M with the embedded
task adapters:

    python benchmarks/bench_search.py --model tiny --num-adapters 16 --num-clusters 4 --iterations 200
    python benchmarks/bench_search.py --model smollm2 --num-adapters 16 --num-clusters 4 --iterations 200

Each implementation runs in its own worker process (so peak memory is its own) and the table reports forward
passes, merges, wall time of the search, the time spent inside model forward passes and in merges, peak RSS, and
the ratio peft-d2c / reference. `--impls d2c` skips the reference; `--processes 2` runs the peft-d2c worker under
`accelerate launch --multi_gpu --num_processes 2` (CPU gloo processes on a machine without GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------- assets


def tiny_assets(cache_dir: Path, num_adapters: int) -> tuple[str, dict[str, str], dict[str, list[dict[str, str]]]]:
    """Base folder, `num_adapters` adapter folders (noisy copies of the 6 trained tiny adapters) and their examples."""
    from peft_d2c import testing as tiny

    root = cache_dir / "tiny"
    families = list(tiny.TASK_FAMILIES)
    if not (root / "base" / "config.json").exists() or not all((root / f).exists() for f in families):
        tiny.build_tiny_assets(str(root))
    dirs, examples = {}, {}
    for i in range(num_adapters):
        family = families[i % len(families)]
        name = f"{family}_{i}"
        target = root / "copies" / name
        if not (target / "adapter_config.json").exists():
            tiny.perturbed_copy(str(root / family), str(target), noise=0.05, seed=i)
        dirs[name] = str(target)
        examples[name] = tiny.make_examples(family, 10, seed=7)
    return str(root / "base"), dirs, examples


def load_model(args):
    """(peft_model, tokenizer, examples) for the benchmark's model."""
    if args.model == "tiny":
        from peft_d2c import testing as tiny

        base_dir, dirs, examples = tiny_assets(Path(args.cache_dir), args.num_adapters)
        return tiny.load_peft_model(base_dir, dirs), tiny.make_tokenizer(), examples
    from peft_d2c.embedded import EMBEDDED_TASK_NAMES, load_embedded_peft_model, load_embedded_tasks

    tasks = list(EMBEDDED_TASK_NAMES)[: args.num_adapters]
    model, tokenizer, _, _ = load_embedded_peft_model(tasks=tasks, show_progress=False)
    return model, tokenizer, load_embedded_tasks("fewshot", tasks=tasks)


# ---------------------------------------------------------------------------------------------------------- worker


class Meter:
    """Counts and times forward passes (hooks on the model) and merges (wrapping the merger's methods)."""

    def __init__(self, model) -> None:
        from peft_d2c.engine.merge.merging import AdapterMerger

        self.forward_passes = 0
        self.forward_seconds = 0.0
        self.merge_calls = 0
        self.merge_seconds = 0.0
        self._started = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)
        for method in ("merge", "refill"):
            setattr(AdapterMerger, method, self._timed(getattr(AdapterMerger, method)))
        cls = type(model)
        cls.delete_adapter = self._timed(cls.delete_adapter, count=False)

    def _pre(self, module, args):
        self._started = time.perf_counter()

    def _post(self, module, args, output):
        self.forward_passes += 1
        self.forward_seconds += time.perf_counter() - self._started

    def _timed(self, fn, count=True):
        meter = self

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                meter.merge_seconds += time.perf_counter() - started
                meter.merge_calls += count

        return wrapper


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(args) -> None:
    import torch

    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c.engine.runtime.distributed import get_process_group

    group = get_process_group()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"
    loaded = time.perf_counter()
    model, tokenizer, examples = load_model(args)
    load_seconds = time.perf_counter() - loaded
    config = D2CMergeConfig(  # the paper's search with `ties` merges: the settings docs/performance.md measured
        search="paper",
        combination_type="ties",
        num_clusters=args.num_clusters,
        num_iterations=args.iterations,
        seed=args.seed,
        proposals_per_step=args.proposals_per_step,
        scoring={"batch_size": args.batch_size},
        show_progress=False,
    )
    meter = Meter(model)
    rss_before = _rss_kib("VmRSS")
    try:  # reset the peak-RSS counter, so the peak below is the search's own (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    load_at_start = os.getloadavg()[0]
    cpu_started = time.process_time()
    started = time.perf_counter()
    if args.impl == "reference":
        sys.path.insert(0, str(HERE))
        from reference_d2c import reference_d2c

        outcome = reference_d2c(model, tokenizer, examples, config)
        clusters, history, merges = outcome["clusters"], outcome["history"], outcome["stats"]["num_merges"]
        cache_misses = None
    else:
        result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer)
        clusters, history, merges = result.clusters, result.history, result.stats["num_merges"]
        cache_misses = result.stats["cache_misses"]
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    report = {
        "impl": args.impl,
        "model": args.model,
        "num_adapters": len(examples),
        "num_clusters": args.num_clusters,
        "iterations": args.iterations,
        "proposals_per_step": args.proposals_per_step,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "processes": group.num_processes,
        "threads": torch.get_num_threads(),
        "clusters": clusters,
        "accepted": sum(h["accepted"] for h in history),
        "history": history,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average": [load_at_start, os.getloadavg()[0]],
        "load_seconds": load_seconds,
        "forward_passes": meter.forward_passes,
        "forward_seconds": meter.forward_seconds,
        "merges": merges,
        "merge_seconds": meter.merge_seconds,
        "distinct_losses": cache_misses,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": _rss_kib("VmHWM") / 1024,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    # Work per process: gather every process's counters on the main one.
    reports = group.map(lambda _: report, list(range(group.num_processes))) if group.num_processes > 1 else [report]
    if group.is_main_process:
        if len(reports) > 1:
            report["per_process"] = [
                {k: r[k] for k in ("forward_passes", "forward_seconds", "merges", "merge_seconds", "peak_rss_mib")}
                for r in reports
            ]
            report["wall_seconds"] = max(r["wall_seconds"] for r in reports)
            report["cpu_seconds"] = sum(r["cpu_seconds"] for r in reports)
        Path(args.output).write_text(json.dumps(report))
    group.close()


# ---------------------------------------------------------------------------------------------------- orchestrator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(args, impl: str, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "report.json")
        worker_args = [
            str(Path(__file__).resolve()),
            "--worker",
            "--impl",
            impl,
            "--output",
            output,
            "--model",
            args.model,
            "--num-adapters",
            str(args.num_adapters),
            "--num-clusters",
            str(args.num_clusters),
            "--iterations",
            str(args.iterations),
            "--seed",
            str(args.seed),
            "--proposals-per-step",
            str(args.proposals_per_step),
            "--cache-dir",
            args.cache_dir,
            "--threads",
            str(args.threads),
            "--batch-size",
            str(args.batch_size),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        if processes > 1:
            command = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                str(processes),
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                str(_free_port()),
                *worker_args,
            ]
        else:
            command = [sys.executable, *worker_args]
        subprocess.run(command, check=True, env=env)
        return json.loads(Path(output).read_text())


def table(reports: list[dict]) -> str:
    rows = [
        "| implementation | processes x threads | forward passes | merges | wall (s) | CPU (s) | in forward (s) "
        "| in merges (s) "
        "| outside forward | peak RSS (MiB) | search RSS growth (MiB) | load avg (start-end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        outside = 1 - r["forward_seconds"] / r["wall_seconds"] if r["wall_seconds"] else 0.0
        passes = r["forward_passes"]
        if "per_process" in r:
            passes = "+".join(str(p["forward_passes"]) for p in r["per_process"])
        rows.append(
            f"| {r['impl']} (p={r['proposals_per_step']}) | {r['processes']} x {r['threads']} | {passes} "
            f"| {r['merges']} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['forward_seconds']:.1f} | {r['merge_seconds']:.1f} "
            f"| {outside:.0%} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} "
            f"| {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--num-adapters", type=int, default=16)
    parser.add_argument("--num-clusters", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proposals-per-step", type=int, default=1)
    parser.add_argument("--impls", default="reference,d2c", help="comma-separated: reference, d2c")
    parser.add_argument("--processes", type=int, default=1, help="processes of the peft-d2c run (accelerate)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (config.scoring.batch_size)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/peft_d2c/bench"))
    parser.add_argument("--json", help="write every report to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    reports = []
    for impl in args.impls.split(","):
        processes = args.processes if impl == "d2c" else 1
        reports.append(run_worker(args, impl, processes))
        print(f"done: {impl} in {reports[-1]['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    print(
        f"\n{args.model}, N={reports[0]['num_adapters']}, K={args.num_clusters}, T={args.iterations}, "
        f"seed={args.seed}, batch_size={args.batch_size}\n"
    )
    print(table(reports))
    by_impl = {r["impl"]: r for r in reports}
    if {"reference", "d2c"} <= set(by_impl):
        ref, ours = by_impl["reference"], by_impl["d2c"]
        print(
            f"\npeft-d2c / reference: wall {ours['wall_seconds'] / ref['wall_seconds']:.3f} "
            f"({ref['wall_seconds'] / ours['wall_seconds']:.1f}x faster; CPU time "
            f"{ours['cpu_seconds'] / ref['cpu_seconds']:.3f}), forward passes "
            f"{ours['forward_passes'] / ref['forward_passes']:.3f}, merges {ours['merges'] / ref['merges']:.3f}"
        )
        if args.proposals_per_step == 1:
            same = ref["clusters"] == ours["clusters"]
            decisions = [h["accepted"] for h in ref["history"]] == [h["accepted"] for h in ours["history"]]
            print(f"identical clusters: {same}; identical accept/reject decisions: {decisions}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
