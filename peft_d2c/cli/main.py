"""The `peft-d2c` command.

    peft-d2c run                 # the main job on the embedded default (SmolLM2-135M + 16 task adapters), K=4
    peft-d2c run --quick         # the same pipeline on a tiny random model: a smoke test that needs no download
    peft-d2c benchmark           # D2C vs the baselines on the embedded default (docs/benchmark.md)
    peft-d2c merge run.yaml      # your base model, adapters and data (peft_d2c/cli/run_config.py); --push-to-hub REPO
    peft-d2c estimate run.yaml   # a short timing probe: expected evaluations and run time
    peft-d2c evaluate DIR --data heldout.yaml
    peft-d2c add-adapter DIR ./lora-new --examples new.jsonl
    peft-d2c push DIR owner/repo

Only this module prints; the library logs. User errors exit with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence

from ..embedded.mainjob import run_main_job
from ..version import __version__
from .benchmark import add_benchmark_arguments, run_benchmark_command
from .commands import add_subcommands

logger = logging.getLogger("peft_d2c")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="Seed of every random choice (default: 0).")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", "-v", action="store_true", help="Log details (DEBUG level).")
    verbosity.add_argument("--quiet", "-q", action="store_true", help="Only print results; no progress bars.")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, `peft-d2c: error: ...`, exit status 2 (like every other user error)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"peft-d2c: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peft-d2c",
        description="Cluster and merge LoRA adapters with D2C (data-driven clustering, arXiv 2601.17441).",
    )
    parser.add_argument("--version", action="version", version=f"peft-d2c {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="Main job: cluster and merge the embedded default's 16 adapters, print and save the result.",
        description=(
            "Load SmolLM2-135M-Instruct (Hub, or the copy shipped on PyPI), build or reuse one LoRA adapter per "
            "embedded task, run D2C on the 10 few-shot examples per task, print the clusters, the routing and a "
            "held-out table (zero-shot vs single-task adapters vs merged adapters), and save the merged adapters."
        ),
    )
    run.add_argument("--quick", action="store_true", help="Use a tiny random model and synthetic tasks (seconds).")
    run.add_argument("--clusters", "-k", type=int, default=None, help="K (default: 4, or 2 with --quick).")
    run.add_argument(
        "--iterations",
        "-t",
        type=int,
        default=None,
        help="T of the d2c search (default: 100, the paper's Algorithm 1; 30 with --quick).",
    )
    run.add_argument("--method", default="d2c", help="d2c | random | kmeans | kmeans_svd (default: d2c).")
    run.add_argument("--output", "-o", default="d2c_output", help="Output folder (default: ./d2c_output).")
    run.add_argument("--cache-dir", default=None, help="Model and adapter cache (default: ~/.cache/peft_d2c).")
    run.add_argument("--no-fetch", action="store_true", help="Never download the base model; use the cache only.")
    _add_common(run)
    run.set_defaults(handler=_cmd_run)

    bench = commands.add_parser(
        "benchmark",
        help="D2C vs random / K-means / K-means-SVD / single-task LoRAs / zero-shot on the embedded default.",
        description="Run the benchmark of docs/benchmark.md and print a table shaped like the paper's Table 1.",
    )
    add_benchmark_arguments(bench)
    _add_common(bench)
    bench.set_defaults(handler=run_benchmark_command)

    add_subcommands(commands, _add_common)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"


def _cmd_run(args: argparse.Namespace) -> int:
    report = run_main_job(
        quick=args.quick,
        num_clusters=args.clusters,
        num_iterations=args.iterations,
        method=args.method,
        output_dir=args.output,
        cache_dir=args.cache_dir,
        fetch=not args.no_fetch,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    print(report)
    return 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_user_error(error: BaseException) -> bool:
    """Network and Hub failures (unreachable endpoint, HTTP errors) are the user's environment, not a bug."""
    prefixes = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "yaml", "datasets")
    return any(cls.__module__.startswith(prefixes) for cls in type(error).__mro__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peft-d2c` command; returns the exit status.

    Example:
        ```python
        >>> from peft_d2c.cli import main
        >>> main(["run", "--quick", "--quiet", "--output", "/tmp/d2c_quick"])  # doctest: +SKIP
        0
        ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seed_given = args.seed is not None
    if args.seed is None:
        args.seed = 0
    _configure_logging(args)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if not args.verbose:  # third-party deprecation notices are not for the command's user
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            status = args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, OSError) as error:
        if args.verbose:
            raise
        print(f"peft-d2c: error: {_first_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.verbose or not _is_user_error(error):
            raise
        print(f"peft-d2c: error: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peft-d2c: interrupted", file=sys.stderr)
        return 130
    logger.info("done in %.1f s", time.perf_counter() - started)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
