"""How long a default D2C run takes at N = 40 on SmolLM2-135M (issue 38's target: within 10 minutes on 2 cores).

    OMP_NUM_THREADS=2 python benchmarks/n40_time.py --json benchmark_results/n40_time.json

Forty adapters of the bundled collections on their one base model: the 16 embedded tasks, the 12 validation tasks
and the first 12 conflict tasks (six pairs), each with its own few-shot examples. One `merge_adapters_d2c` call with
the defaults and `num_clusters=5` (12.5%), timed as a user would time it, with where the time went
(`result.stats`), and the held-out first-word and whole-answer exact match under the routing (not in the time).
`--task-cores` adds a core per task (`merge={"task_cores": True}`): the search then scores the task adapters, and
the held-out answers are each task's own adapter's (`result.serving_routing`, the merged adapters without cores).
"""

from __future__ import annotations

import argparse
import json
import time

from peft import get_peft_model_state_dict, set_peft_model_state_dict

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.embedded.benchmark import _load
from peft_d2c.evaluation.heldout import evaluate_routing


def _collection(peft_model, name: str, keep: int | None):
    """Copy the first `keep` adapters of collection `name` (on the same base model) into `peft_model`; their
    few-shot and held-out examples."""
    other, _, _, fewshot, test = _load("smollm2", name, None, True, False)
    tasks = list(fewshot)[:keep]
    for task in tasks:
        peft_model.add_adapter(task, other.peft_config[task])
        set_peft_model_state_dict(peft_model, get_peft_model_state_dict(other, adapter_name=task), adapter_name=task)
    return {t: fewshot[t] for t in tasks}, {t: test[t] for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmark_results/n40_time.json")
    parser.add_argument("--task-cores", action="store_true", help="merge={'task_cores': True}: routed by task")
    args = parser.parse_args()
    peft_model, tokenizer, _, fewshot, test = _load("smollm2", "embedded", None, True, False)
    for name, keep in (("validation", 12), ("conflict", 12)):
        more_fewshot, more_test = _collection(peft_model, name, keep)
        fewshot, test = {**fewshot, **more_fewshot}, {**test, **more_test}
    peft_model.eval()
    assert len(fewshot) == 40, len(fewshot)
    merge = {"task_cores": True} if args.task_cores else {}
    config = D2CMergeConfig(num_clusters=5, seed=args.seed, fit_router=False, merge=merge)
    started = time.perf_counter()
    result = merge_adapters_d2c(peft_model, fewshot, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    scores = evaluate_routing(peft_model, tokenizer, test, result.serving_routing)
    report = {
        "num_adapters": 40,
        "num_clusters": 5,
        "task_cores": args.task_cores,
        "seed": args.seed,
        "seconds": seconds,
        "search_plan": result.stats.get("search_plan"),
        "stats": {k: v for k, v in result.stats.items() if isinstance(v, (int, float))},
        "heldout_em": sum(s["exact_match"] for s in scores.values()) / len(scores),
        "heldout_whole_em": sum(s["whole_match"] for s in scores.values()) / len(scores),
        "clusters": result.clusters,
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "clusters"}, indent=1))
    print(f"default D2C at N = 40, K = 5: {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
