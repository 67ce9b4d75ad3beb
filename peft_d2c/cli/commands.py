"""Subcommands of `peft-d2c` built on the public API: merge, evaluate, push, export, serve, add-adapter, estimate,
sweep.

Part of the command-line layer (with `main.py`): these handlers print; the library modules they call only log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from fractions import Fraction
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..combination_types import DATA_TYPES
from ..d2c import merge_adapters_d2c
from ..data.spec import load_task_examples
from ..engine.serving.prompt_router import FALLBACKS
from ..evaluation.estimate import estimate_run, format_estimate
from ..evaluation.heldout import evaluate_routing, loss_matrix
from ..evaluation.plots import plot_run
from ..evaluation.sweep import run_sweep, save_sweep
from ..export.folder import EXPORT_FORMATS, MANIFEST_NAME, export_d2c_folder
from ..export.server import RoutedLlamaCpp, RoutedUpstream, make_server
from ..hub.adapters import load_adapters
from ..hub.push import push_d2c_folder
from ..io import RESULT_NAME, atomic_write_json, atomic_write_text
from ..online import attach_model
from ..result import D2CResult
from .run_config import load_run_config


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `merge`, `estimate` and `sweep`: the YAML run config and the flags overriding it."""
    parser.add_argument("config", nargs="?", default=None, help="YAML run config (see peft_d2c/cli/run_config.py).")
    parser.add_argument("--base-model", help="Hub id or folder of the base model and its tokenizer.")
    parser.add_argument(
        "--adapter", "-a", action="append", dest="adapters", metavar="SOURCE",
        help="Adapter folder, Hub id (owner/name[/sub][@rev]) or collection slug; repeat for each adapter.",
    )  # fmt: skip
    parser.add_argument("--data", help="YAML task data spec (see peft_d2c/data/spec.py).")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--clusters", "-k", type=int, help="K, the number of merged adapters.")
    budget.add_argument(
        "--storage-budget", help="Fraction of the adapters to keep (0.25) or a size ('20MB', '1.5GiB')."
    )
    parser.add_argument("--iterations", "-t", type=int, help="T, the number of proposed moves.")
    parser.add_argument("--method", help="d2c | random | kmeans | kmeans_svd.")
    parser.add_argument("--combination-type", help="knots_ties, regmean, ... or a PEFT type (ties, cat, svd, ...).")
    parser.add_argument("--output", "-o", help="Output folder (default: the config's `output`, else ./d2c_output).")


def _budget_value(text: str | None) -> Any:
    if text is None:
        return None
    for parse in (int, float):  # "1048576" is a number of bytes, "0.25" a fraction, "20MB" a size
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _run_from_args(args: argparse.Namespace, **extra: Any):
    d2c = {
        "num_clusters": args.clusters,
        "storage_budget": _budget_value(args.storage_budget),
        "num_iterations": args.iterations,
        "method": args.method,
        "combination_type": args.combination_type,
        "seed": args.seed if args.seed_given else None,
        "show_progress": False if args.quiet else None,
    }
    return load_run_config(
        args.config,
        base_model=args.base_model,
        adapters=args.adapters,
        data=args.data,
        output=args.output,
        d2c=d2c,
        **extra,
    )


def _load_inputs(run, *, token=None):
    """Base model + tokenizer, source adapters and few-shot examples of a run."""

    examples = load_task_examples(run.data, token=token)
    if not os.path.isdir(run.base_model) and run.base_model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"`base_model` folder not found: {run.base_model!r}.")
    tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    base = AutoModelForCausalLM.from_pretrained(run.base_model)
    model = load_adapters(base, run.adapters, token=token)
    return model, tokenizer, examples


def cmd_merge(args: argparse.Namespace) -> int:
    run = _run_from_args(args, push_to_hub=args.push_to_hub)
    model, tokenizer, examples = _load_inputs(run)
    result = merge_adapters_d2c(model, examples, run.d2c, tokenizer=tokenizer)
    result.save_pretrained(run.output)
    run.save(run.output)
    _write_run_readme(run.output, result)
    if getattr(args, "plots", True):
        _maybe_plot(run.output, result, model, tokenizer, examples)
    print(f"Clusters ({result.num_clusters} merged adapters from {len(result.assignment)}):")
    for name, members in zip(result.merged_adapter_names, result.clusters, strict=True):
        print(f"  {name}: {', '.join(members)}")
    print(f"Saved to {run.output}")
    if run.push_to_hub:
        pushed = push_d2c_folder(run.output, run.push_to_hub, base_model_id=args.base_model_id)
        print(f"Pushed to {', '.join(pushed.repo_ids)}")
    return 0


def _write_run_readme(output: str, result, plots: list[str] | None = None) -> None:
    lines = [
        "# D2C run",
        "",
        f"{len(result.assignment)} adapters merged into {result.num_clusters} with `{result.config.method}` "
        f"(`combination_type={result.config.combination_type!r}`). Repeat it with `peft-d2c merge d2c_run.yaml`.",
        "",
        "| merged adapter | tasks |",
        "|---|---|",
        *(f"| {n} | {', '.join(m)} |" for n, m in zip(result.merged_adapter_names, result.clusters, strict=True)),
    ]
    if plots:
        lines += ["", "## Plots", "", *(f"![{os.path.splitext(p)[0]}]({p})" for p in plots)]
    atomic_write_text(os.path.join(output, "RUN.md"), "\n".join(lines) + "\n")


def _maybe_plot(output: str, result, model, tokenizer, examples) -> None:
    """Write the plots of a run when matplotlib is installed (the `plots` extra), and link them from RUN.md."""

    if importlib.util.find_spec("matplotlib") is None:
        logging.getLogger(__name__).info("matplotlib is not installed; no plots (pip install 'peft-d2c[plots]').")
        return

    matrix = loss_matrix(
        model,
        tokenizer,
        {t: examples[t] for t in result.routing},
        result.merged_adapter_names,
        batch_size=result.config.scoring.batch_size,
    )
    written = plot_run(result, output, loss_matrix=matrix)
    _write_run_readme(output, result, [os.path.basename(p) for p in written])


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = D2CResult.from_pretrained(args.directory)
    examples = load_task_examples(args.data)
    unknown = sorted(set(examples) - set(result.routing))
    if unknown:
        raise ValueError(
            f"`--data` has tasks {unknown} that the result does not route; known: {sorted(result.routing)}."
        )
    model = attach_model(result, args.directory, base_model=args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model or result.base_model)
    routing = {t: result.serving_routing[t] for t in examples}
    scores = evaluate_routing(
        model, tokenizer, examples, routing, use_chat_template=result.config.scoring.use_chat_template
    )
    result.heldout_scores = {t: s["exact_match"] for t, s in scores.items()}
    result.heldout_whole_scores = {t: s["whole_match"] for t, s in scores.items()}
    atomic_write_json(os.path.join(args.directory, RESULT_NAME), result.to_dict())
    atomic_write_json(os.path.join(args.directory, "heldout.json"), scores)
    print("| task | merged adapter | exact match % | loss |")
    print("|---|---|---|---|")
    for task, score in scores.items():
        print(f"| {task} | {result.routing[task]} | {100 * score['exact_match']:.1f} | {score['loss']:.3f} |")
    mean = sum(s["exact_match"] for s in scores.values()) / len(scores)
    print(f"| **average** | | {100 * mean:.1f} | |")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.directory):
        raise FileNotFoundError(f"`DIR` is not a folder: {args.directory!r}.")
    pushed = push_d2c_folder(
        args.directory,
        args.repo_id,
        base_model_id=args.base_model_id,
        private=args.private,
        layout=args.layout,
        allow_public=args.allow_public,
        delete_stale_repos=args.delete_stale_repos,
    )
    print(f"Pushed to {', '.join(pushed.repo_ids)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.directory):
        raise FileNotFoundError(f"`RESULT_DIR` is not a folder: {args.directory!r}.")
    output = args.output or os.path.join(args.directory, f"export-{args.format}")
    manifest = export_d2c_folder(
        args.directory, output, format=args.format, base_gguf=args.base_gguf, base_model_id=args.base_model_id
    )
    print(f"Exported {len(manifest['adapters'])} merged adapters ({args.format}) to {output}:")
    for adapter in manifest["adapters"].values():
        print(f"  {adapter['file']}: {adapter['bytes']} bytes, tasks {', '.join(adapter['tasks'])}")
    if "llama_server" in manifest:
        print(f"Serve: {manifest['llama_server']}")
    if "vllm" in manifest:
        print(f"Serve: {manifest['vllm']['serve']}")
    print(f"Manifest: {os.path.join(output, MANIFEST_NAME)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if (args.base_gguf is None) == (args.upstream is None):
        raise ValueError(
            "Pass `--base-gguf` (serve a GGUF export with llama.cpp) or `--upstream URL --base-model PATH` (route "
            "for a server that serves the adapters by name, e.g. vLLM), not both."
        )
    if args.upstream is not None:
        if args.base_model is None:
            raise ValueError("`--upstream` needs `--base-model`: the router's features come from the base model.")
        base = AutoModelForCausalLM.from_pretrained(args.base_model)
        tokenizer = AutoTokenizer.from_pretrained(args.base_model)
        routed = RoutedUpstream(args.directory, args.upstream, base, tokenizer, fallback=args.fallback)
    else:
        routed = RoutedLlamaCpp(args.directory, args.base_gguf, fallback=args.fallback, n_threads=args.threads)
    server = make_server(routed, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"Serving {len(routed.adapters)} merged adapters for {len(routed.routing)} tasks on http://{host}:{port}")
    print('POST /v1/completions {"prompt": ...} (routed), or with "model": a task or adapter; GET /v1/models')
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _read_examples(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--examples` file not found: {path!r}.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"`--examples` {path!r} is not valid JSON: {error}.") from None
    if not isinstance(rows, list):
        raise TypeError(
            f"`--examples` must hold a list of {{'prompt', 'completion'}} objects, got {type(rows).__name__}."
        )
    if not rows:
        raise ValueError(f"`--examples` {path!r} holds no examples.")
    return rows


def cmd_add_adapter(args: argparse.Namespace) -> int:
    examples = _read_examples(args.examples)
    result = D2CResult.from_pretrained(args.directory)
    name = args.name or os.path.basename(os.path.normpath(args.adapter)).split("@")[0].replace(".", "-")
    if name in result.assignment:
        raise ValueError(f"`--name` {name!r} is already clustered; choose another name.")
    model = attach_model(result, args.directory, base_model=args.base_model)
    load_adapters(model, args.adapter, names=[name])
    tokenizer = AutoTokenizer.from_pretrained(args.base_model or result.base_model)
    if result.config.combination_type in DATA_TYPES and not args.member_data:
        raise ValueError(f"A {result.config.combination_type!r} result needs `--member-data` (its tasks' data spec).")
    members = load_task_examples(args.member_data) if args.member_data else None
    outcome = result.add_adapter(name, examples, tokenizer=tokenizer, member_examples=members)
    result.save_pretrained(args.directory)
    losses = ", ".join(
        f"{n}={loss:.3f}" for n, loss in zip(result.merged_adapter_names, outcome["losses"], strict=True)
    )
    print(f"Added {name!r} to {outcome['merged_adapter']} (loss per cluster: {losses})")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    run = _run_from_args(args)
    model, tokenizer, examples = _load_inputs(run)
    estimate = estimate_run(model, examples, run.d2c, tokenizer=tokenizer, probe_evaluations=args.probe)
    print(format_estimate(estimate))
    if args.json:
        print(json.dumps(estimate, sort_keys=True))
    return 0


def _parse_ks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"`--k` must be a comma-separated list of integers such as '1,2,4', got {text!r}.") from None


def _parse_budgets(text: str | None) -> list[float] | None:
    """`--budgets 1/64,1/16,0.25` -> fractions of the sources' bytes."""
    if text is None:
        return None
    try:
        return [float(Fraction(part.strip())) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"`--budgets` must be comma-separated fractions such as '1/64,1/16,0.25', got {text!r}."
        ) from None


def cmd_sweep(args: argparse.Namespace) -> int:
    ks, budgets = _parse_ks(args.k), _parse_budgets(args.budgets)
    run = _run_from_args(args)
    heldout = load_task_examples(args.heldout) if args.heldout else None
    model, tokenizer, examples = _load_inputs(run)
    sweep = run_sweep(
        model, examples, run.d2c, tokenizer=tokenizer, num_clusters=ks, heldout_examples=heldout, budgets=budgets
    )
    written = save_sweep(sweep, run.output, plot=args.plots)
    if budgets is None:
        print(f"| K | storage | storage % | {sweep['metric']} |")
        print("|---|---|---|---|")
    else:
        print(f"| budget | K x rank | storage | storage % | {sweep['metric']} | one merge (K = 1): rank, score |")
        print("|---|---|---|---|---|---|")
    for point in sweep["points"]:
        shape = (
            str(point["k"]) if budgets is None else f"{point['budget_fraction']:.4g} | {point['k']} x {point['rank']}"
        )
        single = point.get("single")
        extra = "" if budgets is None else (f" {single['rank']}, {single['score']:.4f} |" if single else " - |")
        print(
            f"| {shape} | {point['storage_bytes']} B | {100 * point['storage_fraction']:.1f} | "
            f"{point['score']:.4f} |{extra}"
        )
    print(f"Wrote {', '.join(written)}")
    return 0


def add_subcommands(commands, add_common) -> None:
    """Register merge, evaluate, push, export, serve, add-adapter, estimate and sweep on the `peft-d2c` subparsers."""
    merge = commands.add_parser(
        "merge",
        help="Cluster and merge adapters from a YAML run config (or flags); save, optionally push.",
        description=(
            "Load the base model, the adapters and the few-shot data, run D2C, and save the merged adapters, the "
            "routing, the results and the effective run config (d2c_run.yaml, which repeats the run exactly)."
        ),
    )
    add_run_arguments(merge)
    merge.add_argument("--push-to-hub", metavar="REPO", help="Push the result to this Hub repo.")
    merge.add_argument("--base-model-id", help="Hub id of the base model for the cards (when it is a local path).")
    merge.add_argument("--no-plots", dest="plots", action="store_false", help="Do not write plots.")
    add_common(merge)
    merge.set_defaults(handler=cmd_merge)

    evaluate = commands.add_parser(
        "evaluate",
        help="Held-out exact match and loss of a saved result.",
        description="Score every task of a data spec with the merged adapter that serves it; update the result.",
    )
    evaluate.add_argument("directory", metavar="DIR", help="Folder of a saved result.")
    evaluate.add_argument("--data", required=True, help="YAML data spec of the held-out examples.")
    evaluate.add_argument("--base-model", help="Base model (default: the one recorded in the result).")
    add_common(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    push = commands.add_parser("push", help="Push a saved result to the Hub with model cards.")
    push.add_argument("directory", metavar="DIR", help="Folder of a saved result.")
    push.add_argument("repo_id", metavar="REPO", help="Target repo (owner/name).")
    push.add_argument("--base-model-id", help="Hub id of the base model (required if the result recorded a path).")
    push.add_argument(
        "--private", action=argparse.BooleanOptionalAction, help="Create new repos private (default: the account's)."
    )
    push.add_argument(
        "--allow-public", action="store_true", help="With --private, push even to an existing public repo."
    )
    push.add_argument(
        "--delete-stale-repos", action="store_true", help="--layout repos: delete cluster repos of an earlier push."
    )
    push.add_argument(
        "--layout", choices=("subfolders", "repos"), default="subfolders", help="One repo or one per cluster."
    )
    add_common(push)
    push.set_defaults(handler=cmd_push)

    export = commands.add_parser(
        "export",
        help="Export a saved result for llama.cpp (GGUF LoRA), vLLM or PEFT, with a manifest.",
        description=(
            "Write every merged adapter of RESULT_DIR in the chosen format, the manifest d2c_export.json (task -> "
            "adapter file, sizes, the llama.cpp / vLLM commands), the routing and lm_eval_commands.sh."
        ),
    )
    export.add_argument("directory", metavar="RESULT_DIR", help="Folder of a saved result.")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="gguf", help="Export format (default: gguf).")
    export.add_argument("--base-gguf", metavar="FILE", help="GGUF file of the base model (checked, hashed).")
    export.add_argument("--base-model-id", help="Base model name for the manifest (default: the recorded one).")
    export.add_argument("--output", "-o", metavar="DIR", help="Output folder (default: RESULT_DIR/export-FORMAT).")
    add_common(export)
    export.set_defaults(handler=cmd_export)

    serve = commands.add_parser(
        "serve",
        help="Serve an export; requests without a task label are routed (llama.cpp, or in front of vLLM).",
        description=(
            "Answer OpenAI-compatible POST /v1/completions for EXPORT_DIR: the prompt router picks the merged adapter "
            "of a request without `model`; `model` may name a task or a merged adapter. With `--base-gguf`, a GGUF "
            "export is loaded into llama.cpp (llama-cpp-python, the llamacpp extra); with `--upstream URL "
            "--base-model PATH`, the request is forwarded to a server that serves the merged adapters by name (vLLM "
            "started with a `--format vllm` export's command), the router's features computed by the base model."
        ),
    )
    serve.add_argument("directory", metavar="EXPORT_DIR", help="Folder of an export with its router.")
    serve.add_argument("--base-gguf", metavar="FILE", help="The base GGUF a GGUF export was made for (llama.cpp).")
    serve.add_argument("--upstream", metavar="URL", help="An OpenAI-compatible server holding the merged adapters "
                       "by name, e.g. http://localhost:8000 (vLLM); requests are forwarded to it.")  # fmt: skip
    serve.add_argument("--base-model", metavar="PATH", help="With --upstream: the base model (a transformers folder "
                       "or Hub id) that computes the router's features.")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    serve.add_argument("--port", type=int, default=8080, help="Port (default: 8080; 0 picks a free one).")
    serve.add_argument("--fallback", choices=FALLBACKS, default="nearest", help="Prompts of no known task go to the "
                       "nearest task's adapter or to the base model (default: nearest).")  # fmt: skip
    serve.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama.cpp's).")
    add_common(serve)
    serve.set_defaults(handler=cmd_serve)

    add = commands.add_parser(
        "add-adapter",
        help="Add a new task's adapter to the best cluster of a saved result (no new search).",
        description=(
            "Reload the base model, the recorded source adapters and the merged adapters of DIR, merge the new "
            "adapter into each cluster, keep the cluster where its task loss is lowest, re-merge only that cluster "
            "and save DIR again."
        ),
    )
    add.add_argument("directory", metavar="DIR", help="Folder of a saved result.")
    add.add_argument("adapter", metavar="NEW_ADAPTER", help="Folder or Hub id of the new adapter.")
    add.add_argument("--examples", required=True, help="JSON or JSONL file of {prompt, completion} examples.")
    add.add_argument("--name", help="Task / adapter name (default: the folder or repo name).")
    add.add_argument("--member-data", help="YAML data spec of the clustered tasks (needed by `regmean` results).")
    add.add_argument("--base-model", help="Base model (default: the one recorded in the result).")
    add_common(add)
    add.set_defaults(handler=cmd_add_adapter)

    estimate = commands.add_parser(
        "estimate",
        help="Time a few evaluations and print the expected number of evaluations and run time.",
        description="A short timing probe on the real model and data, extrapolated to the configured run.",
    )
    add_run_arguments(estimate)
    estimate.add_argument("--probe", type=int, default=4, help="Evaluations to time (default: 4).")
    estimate.add_argument("--json", action="store_true", help="Also print the estimate as JSON.")
    add_common(estimate)
    estimate.set_defaults(handler=cmd_estimate)

    sweep = commands.add_parser(
        "sweep",
        help="Run K = 1..N (or --k 1,2,4, or --budgets 1/64,1/16 of the bytes) and write the score-vs-storage curve.",
        description=(
            "One D2C run per K on the same model and data; each run's score (held-out exact match with --heldout, "
            "else the mean few-shot loss) against the bytes of its merged adapters, written to d2c_sweep.json and "
            "d2c_sweep.png (with the `plots` extra) in the output folder."
        ),
    )
    add_run_arguments(sweep)
    sweep.add_argument("--k", help="Comma-separated K values (default: 1..N).")
    sweep.add_argument(
        "--budgets",
        help="Instead of --k: comma-separated fractions of the sources' bytes (e.g. 1/64,1/32,1/16,1/8,1/4,1/2); each "
        "byte budget decides K and the rank (merge.svd_rank='auto'), next to the best single merge of those bytes.",
    )
    sweep.add_argument("--heldout", help="YAML data spec of held-out examples to score each run.")
    sweep.add_argument("--no-plots", dest="plots", action="store_false", help="Do not write the PNG.")
    add_common(sweep)
    sweep.set_defaults(handler=cmd_sweep)
