"""`peft-d2c benchmark`: the command line of the embedded benchmark (`peft_d2c.embedded.benchmark`).

peft-d2c benchmark --seeds 3 --plot docs/img/benchmark.png
python -m peft_d2c.cli benchmark --model tiny      # the same without the entry point script
"""

from __future__ import annotations

import argparse
import os

from ..embedded.benchmark import DEFAULT_ITERATIONS, format_table, run_benchmark


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peft-d2c benchmark` ."""
    parser.add_argument(
        "--model", choices=["smollm2", "tiny"], default="smollm2", help="Base model (default: smollm2)."
    )
    parser.add_argument("--clusters", type=int, nargs="+", default=[2, 4], help="Values of K (default: 2 4).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per cell (default: 3).")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="D2C iterations T (default: 100).")
    parser.add_argument("--json", default="benchmark_results/benchmark.json", help="Results file (written per cell).")
    parser.add_argument("--plot", default=None, help="PNG of score vs storage (+ a task x cluster loss heatmap).")
    parser.add_argument("--resume", action="store_true", help="Keep the cells already in --json and run the rest.")
    parser.add_argument("--cache-dir", default=None, help="Model and adapter cache (default: ~/.cache/peft_d2c).")
    parser.add_argument("--no-fetch", action="store_true", help="Never download the base model.")


def run_benchmark_command(args: argparse.Namespace) -> int:
    """`peft-d2c benchmark`: run, print the table (and where the files are)."""
    data = run_benchmark(
        model=args.model,
        clusters=args.clusters,
        seeds=args.seeds,
        iterations=args.iterations,
        json_path=args.json,
        plot_path=args.plot,
        resume=args.resume,
        cache_dir=args.cache_dir,
        fetch=not args.no_fetch,
        show_progress=not getattr(args, "quiet", False),
    )
    print(format_table(data))
    print(f"\nResults: {os.path.abspath(args.json)}" + (f"; plot: {os.path.abspath(args.plot)}" if args.plot else ""))
    print(f"Wall time: {data['seconds'] / 60:.1f} min")
    return 0
