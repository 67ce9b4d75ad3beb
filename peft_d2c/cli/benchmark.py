"""`peft-d2c benchmark`: the command line of the embedded benchmark (`peft_d2c.embedded.benchmark`).

peft-d2c benchmark --seeds 3 --plot docs/img/benchmark.png
peft-d2c benchmark --search partition     # the partition rule next to the paper's Algorithm 1
peft-d2c benchmark --variant "partition T30: search=partition num_iterations=30"    # an extra D2C method
peft-d2c benchmark --combination-type ties knots_ties --methods random d2c    # the merge axis
peft-d2c benchmark --report run_ties.json run_knots.json     # the tables of finished runs, combined
python -m peft_d2c.cli benchmark --model tiny      # the same without the entry point script
"""

from __future__ import annotations

import argparse
import json
import os

from ..combination_types import COMBINATION_TYPES
from ..config import SEARCHES
from ..embedded.benchmark import COLLECTIONS, run_benchmark
from ..embedded.merge_report import combine_runs, format_report

_VARIANT_KEYS = {
    "search": str,
    "proposals_per_step": int,
    "patience": int,
    "num_iterations": int,
    "max_forward_passes": int,
    "init": str,
    "cross_fit_folds": int,
}
_SCORING_KEYS = ("cross_fit_folds",)


def parse_variant(text: str) -> tuple[str, dict]:
    """`"name: key=value key=value"` -> `(name, settings)` for `--variant` (keys: those of `_VARIANT_KEYS`)."""
    name, _, spec = text.partition(":")
    settings = {}
    for item in spec.split():
        key, _, value = item.partition("=")
        if key not in _VARIANT_KEYS or not value:
            raise argparse.ArgumentTypeError(
                f"`--variant` settings must be key=value with keys {sorted(_VARIANT_KEYS)}, got {item!r}."
            )
        if key in _SCORING_KEYS:  # a `ScoringSettings` field
            settings.setdefault("scoring", {})[key] = _VARIANT_KEYS[key](value)
        else:
            settings[key] = _VARIANT_KEYS[key](value)
    if not name.strip():
        raise argparse.ArgumentTypeError(f"`--variant` must start with a name and ':', got {text!r}.")
    return name.strip(), settings


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peft-d2c benchmark` ."""
    parser.add_argument(
        "--model", choices=["smollm2", "tiny"], default="smollm2", help="Base model (default: smollm2)."
    )
    parser.add_argument(
        "--collection",
        choices=COLLECTIONS,
        default="embedded",
        help="Task collection: the embedded 16, the validation 12 (other tasks and recipes), or the conflict 16 "
        "(pairs of tasks with the same inputs and different outputs; default: embedded).",
    )
    parser.add_argument("--clusters", type=int, nargs="+", default=[2, 4], help="Values of K (default: 2 4).")
    parser.add_argument("--seeds", type=int, default=2, help="Seeds per cell (default: 2; the doc's run used 10).")
    parser.add_argument("--first-seed", type=int, default=0, help="First seed (default: 0).")
    parser.add_argument(
        "--iterations", type=int, default=None, help="D2C iterations T (default: 100 paper, 30 partition, x N/16)."
    )
    parser.add_argument("--json", default="benchmark_results/benchmark.json", help="Results file (written per cell).")
    parser.add_argument("--plot", default=None, help="PNG of score vs storage (+ loss heatmap and any-time curves).")
    parser.add_argument("--resume", action="store_true", help="Keep the cells already in --json and run the rest.")
    parser.add_argument("--cache-dir", default=None, help="Model and adapter cache (default: ~/.cache/peft_d2c).")
    parser.add_argument("--no-fetch", action="store_true", help="Never download the base model.")
    search = parser.add_argument_group("D2C search (the `d2c` methods; default: D2CMergeConfig's)")
    search.add_argument(
        "--search", choices=list(SEARCHES), default=None, help="Move acceptance rule (default: paper)."
    )
    search.add_argument("--proposals-per-step", type=int, default=None, help="Candidate moves scored per step.")
    search.add_argument("--patience", type=int, default=None, help="Stop after this many rejections in a row.")
    search.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="Extra D2C method 'name: key=value ...' (keys: search proposals_per_step patience num_iterations "
        "max_forward_passes init cross_fit_folds), over the default settings; repeatable.",
    )
    parser.add_argument(
        "--combination-type",
        dest="combination_types",
        choices=list(COMBINATION_TYPES),
        nargs="+",
        default=None,
        metavar="TYPE",
        help="Merge(s) of every method; several give the merge axis (default: D2CMergeConfig's).",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="Run only these methods (labels of the table).")
    parser.add_argument(
        "--anytime-seeds",
        type=int,
        default=None,
        help="Recompute the any-time curve of paper-rule D2C cells only for seeds below this (default: all).",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Run nothing: print the tables of these results files, combined (e.g. one run per merge).",
    )


def run_benchmark_command(args: argparse.Namespace) -> int:
    """`peft-d2c benchmark`: run, print the tables (and where the files are); or only print them (`--report`)."""
    if args.report:
        runs = []
        for path in args.report:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        print(format_report(combine_runs(runs)))
        return 0
    options = {
        key: getattr(args, key)
        for key in ("search", "proposals_per_step", "patience")
        if getattr(args, key) is not None
    }
    data = run_benchmark(
        model=args.model,
        collection=args.collection,
        clusters=args.clusters,
        seeds=args.seeds,
        first_seed=args.first_seed,
        iterations=args.iterations,
        json_path=args.json,
        plot_path=args.plot,
        resume=args.resume,
        cache_dir=args.cache_dir,
        fetch=not args.no_fetch,
        show_progress=not getattr(args, "quiet", False),
        search_options=options,
        variants=dict(args.variant),
        combination_types=args.combination_types,
        methods=args.methods,
        anytime_seeds=args.anytime_seeds,
    )
    print(format_report(data))
    print(f"\nResults: {os.path.abspath(args.json)}" + (f"; plot: {os.path.abspath(args.plot)}" if args.plot else ""))
    print(f"Wall time: {data['seconds'] / 60:.1f} min")
    return 0
