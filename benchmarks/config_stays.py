"""Measure: how often following the config through one `merge_adapters_d2c` call moves between modules (issue 36).

Runs `merge_adapters_d2c` once on the tiny random Llama of `peft_d2c.testing` with a few of its trained task
adapters (default config, K = 2, a few steps), with a `sys.setprofile` hook that records every Python call whose
frame belongs to a `peft_d2c` module and whose locals at call time (the arguments, `self` and closure variables)
hold a config object: a `D2CMergeConfig`, or any object whose class is defined in `peft_d2c.config` or
`peft_d2c.engine.search.plan` (the config's groups, the search plan). Only direct locals count: a `_Run` or an
`AdapterMerger` that holds the config does not, unless `--through-attributes`, which also counts a local whose
attributes (its `__dict__`, one level) hold a config object (`self.config`, `run.config`, `run.plan`).

The modules of those calls, in order, with consecutive repeats collapsed, are the "stays". Printed: the number of
stays, of distinct modules, of returns to a module already left (stays - distinct modules), the most frequent
moves between two modules, and the sequence; `--json PATH` writes all of it.

    python benchmarks/config_stays.py --json stays.json
    # the package of another checkout (check `peft_d2c` in the output):
    git worktree add /tmp/stays_base <commit>
    PYTHONPATH=/tmp/stays_base python benchmarks/config_stays.py

The trained adapters are cached in `--cache-dir` (they do not depend on the checkout measured).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

CONFIG_MODULES = ("peft_d2c.config", "peft_d2c.engine.search.plan")


def tiny_run_inputs(cache_dir: Path, num_adapters: int):
    """(PeftModel with the first `num_adapters` tiny task adapters, tokenizer, examples), trained once per cache."""
    from peft_d2c import testing as tiny

    families = list(tiny.TASK_FAMILIES)[:num_adapters]
    tokenizer = tiny.make_tokenizer()
    base_dir = cache_dir / "base"
    if not (base_dir / "config.json").exists():
        tiny.make_base_model().save_pretrained(str(base_dir))
        tokenizer.save_pretrained(str(base_dir))
    dirs = {}
    for i, family in enumerate(families):  # the seeds of `build_tiny_assets`
        target = cache_dir / family
        if not (target / "adapter_config.json").exists():
            tiny.train_adapter(str(base_dir), tokenizer, family, str(target), seed=i)
        dirs[family] = str(target)
    examples = {family: tiny.make_examples(family, 10, seed=7) for family in families}
    return tiny.load_peft_model(str(base_dir), dirs), tokenizer, examples


def is_config(value, config_class) -> bool:
    return isinstance(value, config_class) or type(value).__module__ in CONFIG_MODULES


def holds_config(values, config_class, through_attributes: bool) -> bool:
    for value in values:
        if is_config(value, config_class):
            return True
        attributes = getattr(value, "__dict__", None) if through_attributes else None
        if isinstance(attributes, dict) and any(is_config(v, config_class) for v in attributes.values()):
            return True
    return False


def trace_config_calls(fn, config_class, through_attributes: bool = False):
    """Run `fn()`; return its result and the module of every `peft_d2c` call whose locals hold a config object."""
    modules: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if (module == "peft_d2c" or module.startswith("peft_d2c.")) and holds_config(
            frame.f_locals.values(), config_class, through_attributes
        ):
            modules.append(module)

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, modules


def stays_of(modules: list[str]) -> dict:
    """The stays (consecutive repeats collapsed), their counts and the most frequent moves between two modules."""
    stays = [m for i, m in enumerate(modules) if i == 0 or m != modules[i - 1]]
    moves = collections.Counter(tuple(sorted(pair)) for pair in zip(stays, stays[1:], strict=False))
    distinct = len(set(stays))
    return {
        "calls": len(modules),
        "stays": len(stays),
        "distinct_modules": distinct,
        "returns": len(stays) - distinct,
        "moves": [[a, b, n] for (a, b), n in moves.most_common()],
        "sequence": stays,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--num-iterations", type=int, default=4)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_d2c_config_stays"))
    parser.add_argument("--through-attributes", action="store_true", help="also count a config held by an attribute")
    parser.add_argument("--json", help="write the measurement to this file")
    args = parser.parse_args(argv)

    import torch

    import peft_d2c
    from peft_d2c import D2CMergeConfig, merge_adapters_d2c

    torch.set_num_threads(1)
    model, tokenizer, examples = tiny_run_inputs(Path(args.cache_dir), args.num_adapters)
    config = D2CMergeConfig(num_clusters=2, num_iterations=args.num_iterations, show_progress=False)
    result, modules = trace_config_calls(
        lambda: merge_adapters_d2c(model, examples, config, tokenizer=tokenizer),
        D2CMergeConfig,
        args.through_attributes,
    )
    report = {
        "peft_d2c": os.path.dirname(peft_d2c.__file__),
        "through_attributes": args.through_attributes,
        "clusters": result.clusters,
        **stays_of(modules),
    }
    print(f"peft_d2c: {report['peft_d2c']}")
    print(f"clusters: {report['clusters']}")
    print(f"calls holding a config: {report['calls']}")
    print(f"stays: {report['stays']}, distinct modules: {report['distinct_modules']}, returns: {report['returns']}")
    print("most frequent moves (either way):")
    for a, b, n in report["moves"][:10]:
        print(f"  {n:3d}  {a} <-> {b}")
    print("sequence:")
    for i, module in enumerate(report["sequence"], 1):
        print(f"  {i:3d}  {module}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
