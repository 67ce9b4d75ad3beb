"""How the D2C search grows with the number of adapters N: a tiny-model collection whose right clusters are known.

The collection: N noisy copies of the six trained tiny-model adapters (`peft_d2c.testing`, the six task families),
N/6 per family, each with its own few-shot examples of its family. K = N/8. Each (N, acceptance rule) runs in a fresh
process, so its peak memory is its own. Printed per run: seconds, forward passes, merges, peak resident memory
(after loading the N adapters, and at the end), how often each adapter was proposed (min / mean / max), and the
purity (the share of adapters whose cluster's most common family is their own) and the best purity K allows.

    OMP_NUM_THREADS=1 python scripts/scale_search.py --sizes 16 64 256 --searches paper partition \
        --json .cache/scale/scale.json
    OMP_NUM_THREADS=1 python scripts/scale_search.py --sizes 64 256 --searches default --init kmeans_svd

`default` leaves `search` / `init` at None, so the run takes the plan `SearchPlan.for_run` makes for that N (the
paper's Algorithm 1 from a random start, T = 100 x N / 16).

Results of 2026-12-04 (with proposal rules since removed) are in docs/performance.md ("How the search grows with N").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time


def build_collection(root: str, num_adapters: int, noise: float) -> dict[str, str]:
    """`{name: folder}` of `num_adapters` noisy copies (names `<family>_<i>`), built once under `root`."""
    from peft_d2c import testing as tiny
    from peft_d2c.embedded.mainjob import load_quick_assets

    load_quick_assets(root)  # builds the tiny base model and the six family adapters into root/tiny-v1 once
    families = list(tiny.TASK_FAMILIES)
    folders = {}
    for index in range(num_adapters):
        family = families[index % len(families)]
        name = f"{family}_{index // len(families)}"
        out = os.path.join(root, f"scale-copies-noise{noise}", name)
        if not os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
            tiny.perturbed_copy(os.path.join(root, "tiny-v1", family), out, noise=noise, seed=index)
        folders[name] = out
    return folders


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(num_adapters: int, search: str, seed: int, root: str, noise: float, init: str = "default") -> dict:
    import torch

    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c import testing as tiny

    torch.set_num_threads(1)
    folders = build_collection(root, num_adapters, noise)
    model = tiny.load_peft_model(os.path.join(root, "tiny-v1", "base"), folders)
    rss_loaded = peak_rss_mib()
    examples = {name: tiny.make_examples(name.rsplit("_", 1)[0], 10, seed=1000 + i) for i, name in enumerate(folders)}
    config = D2CMergeConfig(
        num_clusters=num_adapters // 8,
        search=None if search == "default" else search,
        init=None if init == "default" else init,
        seed=seed,
        show_progress=False,
    )
    started = time.perf_counter()
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny.make_tokenizer())
    seconds = time.perf_counter() - started
    proposed = collections.Counter(r["task"] for r in result.history)
    counts = [proposed.get(name, 0) for name in folders]
    majority = sum(max(collections.Counter(m.rsplit("_", 1)[0] for m in c).values()) for c in result.clusters)
    return {
        "num_adapters": num_adapters,
        "num_clusters": config.num_clusters,
        "search": result.stats["search_plan"]["rule"],  # as run: "default" resolved
        "init": result.config.init,
        "seed": seed,
        "num_iterations": result.config.num_iterations,
        "seconds": seconds,
        "forward_passes": result.stats["forward_passes"],
        "num_merges": result.stats["num_merges"],
        "accepted": sum(r["accepted"] for r in result.history),
        "proposed_min": min(counts),
        "proposed_mean": sum(counts) / len(counts),
        "proposed_max": max(counts),
        "never_proposed": sum(c == 0 for c in counts),
        "purity": majority / num_adapters,
        # The best purity K clusters allow: the K largest families each alone (all of them when K >= 6 families).
        "purity_reachable": sum(
            sorted(collections.Counter(n.rsplit("_", 1)[0] for n in folders).values())[::-1][: config.num_clusters]
        )
        / num_adapters,
        "mean_fewshot_loss": sum(result.task_losses.values()) / num_adapters,
        "peak_rss_mib_after_loading": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256], help="Values of N (multiples of 8).")
    parser.add_argument("--searches", nargs="+", default=["default"], choices=["paper", "partition", "default"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init",
        default="default",
        choices=["random", "kmeans", "kmeans_svd", "default"],
        help="Start partition.",
    )
    parser.add_argument("--noise", type=float, default=0.5, help="Noise std of a copy, relative to each tensor's.")
    parser.add_argument("--cache-dir", default=os.path.join(".cache", "scale"))
    parser.add_argument("--json", default=None, help="Write every run's measurements here.")
    parser.add_argument("--one", nargs=2, metavar=("N", "SEARCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.seed, args.cache_dir, args.noise, args.init)))
        return 0
    if any(n % 8 or n < 16 for n in args.sizes):
        parser.error("every N must be a multiple of 8, at least 16 (K = N/8 >= 2)")
    runs = []
    for n in args.sizes:
        for search in args.searches:
            command = [sys.executable, __file__, "--one", str(n), search, "--seed", str(args.seed)]
            command += ["--noise", str(args.noise), "--cache-dir", args.cache_dir, "--init", args.init]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = runs[-1]
            print(
                f"N={n:4d} K={row['num_clusters']:3d} {row['init']:11s} {row['search']:9s} T={row['num_iterations']:4d} "
                f"{row['seconds']:7.1f} s  {row['forward_passes']:6d} passes  {row['num_merges']:5d} merges  "
                f"proposed {row['proposed_min']}/{row['proposed_mean']:.2f}/{row['proposed_max']} "
                f"(never {row['never_proposed']})  purity {row['purity']:.3f} of {row['purity_reachable']:.3f}  "
                f"loss {row['mean_fewshot_loss']:.4f}  RSS {row['peak_rss_mib_after_loading']:.0f} -> "
                f"{row['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    if args.json:
        from peft_d2c.io import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_json(args.json, {"seed": args.seed, "noise": args.noise, "init": args.init, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
