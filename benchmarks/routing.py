"""Requests without a task label: the prompt router against the oracle routing, on the held-out prompts.

    OMP_NUM_THREADS=1 python benchmarks/routing.py docs/benchmark_regmean.json --clusters 4 --json routing.json
    OMP_NUM_THREADS=1 python benchmarks/routing.py docs/benchmark_validation.json --collection validation --clusters 3

The router is fitted on the few-shot prompts only (`peft_d2c.engine.serving.prompt_router`), as `merge_adapters_d2c`
fits it. Measured on the held-out split of the collection:
- task accuracy of the router and of two alternatives on the same few-shot prompts: a logistic-regression probe
  (scikit-learn) on the same features, and nearest centroid on a middle layer's features; a confusion list;
- for every cell of a `peft-d2c benchmark` results file (method `--method`, K `--clusters`): the cell's clusters are
  merged again (`--combination-type`, no search) and every held-out prompt is answered twice, by the adapter its task
  is routed to (oracle) and by the adapter the router picks; adapter accuracy, both exact matches, and their paired
  difference over the cells with a 95% t-interval;
- prompts of no known task: the other collection's held-out prompts (tasks the router never saw), random text and
  short questions in other languages; per set the share the router accepts as known (false accept) and the mean
  confidence, against the share of known-task held-out prompts it refuses (false reject; the fit targets 5%);
- cost per request: seconds of the router's features per prompt (batched) next to seconds of answering.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import numpy as np
import torch

from peft_d2c import D2CMergeConfig
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.embedded import load_embedded_tasks
from peft_d2c.embedded.benchmark_report import t_interval
from peft_d2c.embedded.conflict import load_conflict_assets
from peft_d2c.embedded.mainjob import load_embedded_assets
from peft_d2c.embedded.validation import load_validation_assets, load_validation_tasks
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.engine.serving.prompt_router import fit_prompt_router, prompt_features
from peft_d2c.evaluation.generation import generate_answers, normalize_answer, normalize_whole_answer


@torch.no_grad()
def features(embeddings: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The router's features: unit length, minus the fit's mean unit embedding, unit length again."""
    return torch.nn.functional.normalize(torch.nn.functional.normalize(embeddings, dim=-1) - mean, dim=-1)


def centroid_accuracy(train: torch.Tensor, labels: np.ndarray, test: torch.Tensor, test_labels: np.ndarray) -> float:
    mean = torch.nn.functional.normalize(train, dim=-1).mean(0)
    unit = features(train, mean)
    centroids = torch.nn.functional.normalize(
        torch.stack([unit[labels == i].mean(0) for i in range(labels.max() + 1)]), dim=-1
    )
    predicted = (features(test, mean) @ centroids.T).argmax(1).numpy()
    return float((predicted == test_labels).mean())


# Prompts of no known task written for this benchmark: everyday questions and requests in six other languages.
OTHER_LANGUAGES = [
    "Quelle heure est-il à Paris en ce moment ?",
    "Peux-tu me recommander un bon livre pour l'été ?",
    "Comment prépare-t-on une tarte aux pommes ?",
    "Traduis cette phrase en anglais, s'il te plaît.",
    "Wie wird das Wetter morgen in Berlin?",
    "Kannst du mir erklären, wie ein Motor funktioniert?",
    "Ich suche ein gutes Restaurant in der Nähe.",
    "Schreibe mir bitte ein kurzes Gedicht über den Herbst.",
    "¿Cuál es la mejor manera de aprender a programar?",
    "¿Dónde puedo comprar billetes de tren baratos?",
    "Explícame por qué el cielo es azul.",
    "Necesito una receta de paella para seis personas.",
    "Qual è il modo migliore per imparare una lingua?",
    "Mi puoi consigliare un film da vedere stasera?",
    "Come si coltivano i pomodori sul balcone?",
    "Quanto costa un biglietto per il museo?",
    "Qual é a capital do estado de Minas Gerais?",
    "Como faço para abrir uma conta no banco?",
    "Pode me ajudar a escrever um e-mail formal?",
    "Wat is de snelste route naar het station?",
    "Hoe lang moet ik een ei koken?",
    "Kun je me helpen met mijn huiswerk wiskunde?",
    "Waarom vallen de bladeren in de herfst?",
    "Welke talen worden er in België gesproken?",
]


def random_text(count: int, seed: int = 0) -> list[str]:
    """Prompts of random lowercase "words" (2-9 letters, 3-12 words): text of no task at all."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    return [
        " ".join("".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(int(rng.integers(3, 13))))
        for _ in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="A results JSON of `peft-d2c benchmark` (its cells give the clusters).")
    parser.add_argument("--collection", default="embedded", choices=["embedded", "validation", "conflict"])
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--method", nargs="+", default=["d2c", "d2c [paper]"], help="Cells of these methods.")
    parser.add_argument("--combination-type", default="regmean")
    parser.add_argument("--extra-results", nargs="*", default=[], help="More results files (e.g. other seeds).")
    parser.add_argument(
        "--gguf", nargs="*", default=[], help="Base GGUF files: route with llama.cpp's embeddings too."
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cells = []
    for path in [args.results, *args.extra_results]:
        with open(path, encoding="utf-8") as f:
            cells += [c for c in json.load(f)["results"] if c["method"] in args.method
                      and c["num_clusters"] == args.clusters and c.get("combination_type") == args.combination_type]  # fmt: skip
    load = {"embedded": load_embedded_assets, "validation": load_validation_assets, "conflict": load_conflict_assets}
    model, tokenizer, _, fewshot, test = load[args.collection](fetch=False, show_progress=False)
    others = load_validation_tasks("test") if args.collection == "embedded" else load_embedded_tasks("test")
    tasks = sorted(fewshot)
    few_prompts = {t: [e["prompt"] for e in fewshot[t][:10]] for t in tasks}
    test_prompts = [e["prompt"] for t in tasks for e in test[t]]
    test_tasks = [t for t in tasks for _ in test[t]]
    labels = np.array([tasks.index(t) for t in test_tasks])
    out: dict = {"collection": args.collection, "num_prompts": len(test_prompts)}

    started = time.perf_counter()
    router = fit_prompt_router(model, tokenizer, few_prompts)
    out["fit_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    embeddings = prompt_features(model, tokenizer, test_prompts)
    out["feature_seconds_per_prompt"] = (time.perf_counter() - started) / len(test_prompts)
    identity = {t: t for t in tasks}
    routes = router.route_features(embeddings, identity)
    out["task_accuracy"] = float(np.mean([r.task == t for r, t in zip(routes, test_tasks, strict=True)]))
    out["known_share_of_known_tasks"] = float(np.mean([r.known for r in routes]))
    out["confusions"] = collections.Counter(f"{t} -> {r.task}" for r, t in zip(routes, test_tasks, strict=True)
                                            if r.task != t).most_common()  # fmt: skip
    out["loo_accuracy_fewshot"] = router.stats["leave_one_out_accuracy"]
    out["mean_confidence_right"] = float(
        np.mean([r.confidence for r, t in zip(routes, test_tasks, strict=True) if r.task == t])
    )
    wrong = [r.confidence for r, t in zip(routes, test_tasks, strict=True) if r.task != t]
    out["mean_confidence_wrong"] = float(np.mean(wrong)) if wrong else None

    # alternatives on the same few-shot prompts
    from sklearn.linear_model import LogisticRegression  # only this benchmark needs it

    few_flat = [p for t in tasks for p in few_prompts[t]]
    few_labels = np.array([i for i, t in enumerate(tasks) for _ in few_prompts[t]])
    few_embeddings = prompt_features(model, tokenizer, few_flat)
    probe = LogisticRegression(max_iter=2000).fit(features(few_embeddings, router.mean).numpy(), few_labels)
    probe_predicted = probe.predict(features(embeddings, router.mean).numpy())
    out["probe_task_accuracy"] = float((probe_predicted == labels).mean())
    middle = model.get_base_model().config.num_hidden_layers // 2
    out["middle_layer"] = middle
    out["middle_layer_task_accuracy"] = centroid_accuracy(
        prompt_features(model, tokenizer, few_flat, layer=middle), few_labels,
        prompt_features(model, tokenizer, test_prompts, layer=middle), labels,
    )  # fmt: skip

    for gguf_path in args.gguf:  # what a llama.cpp server's /embedding (mean pooling) gives the same router
        import llama_cpp  # the `llamacpp` extra

        llm = llama_cpp.Llama(model_path=gguf_path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                              n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)  # fmt: skip
        started = time.perf_counter()
        cpp = torch.tensor([llm.embed(p) for p in test_prompts], dtype=torch.float32)
        seconds = (time.perf_counter() - started) / len(test_prompts)
        cpp_routes = router.route_features(cpp, identity)
        cosine = torch.nn.functional.cosine_similarity(cpp, embeddings, dim=-1)
        out.setdefault("llama_cpp", {})[os.path.basename(gguf_path)] = {
            "task_accuracy": float(np.mean([r.task == t for r, t in zip(cpp_routes, test_tasks, strict=True)])),
            "same_task_as_transformers": float(np.mean([a.task == b.task for a, b in zip(cpp_routes, routes, strict=True)])),
            "feature_cosine_min_mean": [float(cosine.min()), float(cosine.mean())],
            "seconds_per_prompt": seconds,
        }  # fmt: skip
        del llm

    out["false_reject_of_known_tasks"] = 1 - out["known_share_of_known_tasks"]
    out["leave_one_out_false_reject"] = router.stats["leave_one_out_false_reject"]
    unknown_sets = {
        "other collection": [e["prompt"] for items in others.values() for e in items],
        "random text": random_text(100),
        "other languages": OTHER_LANGUAGES,
    }
    out["unknown"] = {}
    for name, prompts in unknown_sets.items():
        unknown_routes = router.route_features(prompt_features(model, tokenizer, prompts), identity)
        out["unknown"][name] = {
            "prompts": len(prompts),
            "false_accept": float(np.mean([r.known for r in unknown_routes])),
            "mean_confidence": float(np.mean([r.confidence for r in unknown_routes])),
        }
    print(json.dumps({k: v for k, v in out.items() if k != "confusions"}, indent=1), flush=True)
    print("confusions:", out["confusions"][:12], flush=True)

    config = D2CMergeConfig(num_clusters=1, combination_type=args.combination_type, merged_adapter_prefix="routed")
    merger = AdapterMerger(model, config)
    examples = {t: items[: config.scoring.examples_per_task] for t, items in normalize_task_examples(fewshot).items()}
    attach_layer_inputs(merger, LossScorer.for_config(model, tokenizer, examples, merger))
    references = [e["completion"] for t in tasks for e in test[t]]
    # Long enough for the longest reference, as the benchmark's held-out scores generate (`evaluate_routing`).
    longest = max(
        len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"]) for t in tasks for e in test[t]
    )
    new_tokens = max(8, longest + 1)
    rows = []
    for cell in sorted(cells, key=lambda c: (c["method"], c["seed"])):
        names = [f"routed_{i}" for i in range(len(cell["clusters"]))]
        for name, members in zip(names, cell["clusters"], strict=True):
            merger.merge(members, name)
        routing = {t: names[i] for i, members in enumerate(cell["clusters"]) for t in members}
        oracle = [routing[t] for t in test_tasks]
        routed = [routing[r.task] for r in routes]
        started = time.perf_counter()
        oracle_answers = generate_answers(
            model, tokenizer, test_prompts, adapter_names=oracle, max_new_tokens=new_tokens
        )
        answer_seconds = (time.perf_counter() - started) / len(test_prompts)
        routed_answers = generate_answers(
            model, tokenizer, test_prompts, adapter_names=routed, max_new_tokens=new_tokens
        )
        for name in names:
            model.delete_adapter(name)

        def em(generated, tasks_=tasks, whole=False):  # mean over tasks of the per-task exact match
            norm = normalize_whole_answer if whole else normalize_answer
            per = collections.defaultdict(list)
            for t, g, ref in zip(test_tasks, generated, references, strict=True):
                per[t].append(norm(g) == norm(ref))
            return float(np.mean([np.mean(per[t]) for t in tasks_]))

        rows.append({"method": cell["method"], "seed": cell["seed"], "clusters": cell["clusters"],
                     "adapter_accuracy": float(np.mean([o == r for o, r in zip(oracle, routed, strict=True)])),
                     "oracle_em": em(oracle_answers), "routed_em": em(routed_answers),
                     "oracle_whole_em": em(oracle_answers, whole=True), "routed_whole_em": em(routed_answers, whole=True),
                     "answer_seconds_per_prompt": answer_seconds})  # fmt: skip
        row = rows[-1]
        print(f"{cell['method']} seed {cell['seed']}: adapter accuracy {row['adapter_accuracy']:.3f}, oracle EM "
              f"{100 * row['oracle_em']:.1f}, routed EM {100 * row['routed_em']:.1f}; whole answer "
              f"{100 * row['oracle_whole_em']:.1f} / {100 * row['routed_whole_em']:.1f} (cell's own "
              f"{100 * cell.get('heldout_whole_score', cell['heldout_score']):.1f} whole)", flush=True)  # fmt: skip
    if rows:
        diffs = [100 * (r["routed_em"] - r["oracle_em"]) for r in rows]
        mean, low, high = t_interval(diffs)
        out["routed_minus_oracle_em"] = {"mean": mean, "low": low, "high": high, "cells": len(diffs)}
        whole = t_interval([100 * (r["routed_whole_em"] - r["oracle_whole_em"]) for r in rows])
        out["routed_minus_oracle_whole_em"] = dict(zip(("mean", "low", "high"), whole, strict=True))
        print(f"K={args.clusters}: routed - oracle {mean:+.2f} [{low:+.2f}, {high:+.2f}] EM points over {len(diffs)} "
              f"cells; adapter accuracy {np.mean([r['adapter_accuracy'] for r in rows]):.3f}", flush=True)  # fmt: skip
    out["cells"] = rows
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
