"""Model cards of pushed D2C results, built with `huggingface_hub.ModelCard` / `ModelCardData` / `EvalResult`:
metadata for the Hub (base model, relation, tags, datasets, model-index with the per-task losses) and a body that
explains the adapter, its source adapters and tasks, the merge, the storage budget, the routing, usage and citation.

`data` below is a saved result folder read back: `{"result": d2c_result.json, "routing": d2c_routing.json,
"config": d2c_config.json, "names": [merged adapter names]}`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..combination_types import DENSITY_TYPES, UPDATE_TYPES
from ..config import CONFIG_NAME, DEFAULT_STEPS, D2CMergeConfig
from ..io import RESULT_NAME, ROUTING_NAME, read_json
from .adapters import ADAPTER_CONFIG_NAME, REPO_ID_PATTERN, WEIGHTS_NAMES

__all__ = [
    "CITATION",
    "build_adapter_card",
    "build_collection_card",
    "build_result_card",
    "is_hub_id",
    "read_result_folder",
]

CARD_TAGS = ["peft", "lora", "d2c", "merge"]
PAPER_TITLE = "Data-driven Clustering and Merging of Adapters for On-device Large Language Models"
PAPER_URL = "https://arxiv.org/abs/2601.17441"
# Authors in the paper's order (arXiv 2601.17441); the key is named after the first author.
CITATION = """@inproceedings{lee2026d2c,
  title         = {Data-driven Clustering and Merging of Adapters for On-device Large Language Models},
  author        = {Lee, Kyeng-Hun and Ko, Hyeonmok and Bohdal, Ondrej and Michieli, Umberto and Ozay, Mete and
                   Ceritli, T. and Moon, J.},
  booktitle     = {IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year          = {2026},
  eprint        = {2601.17441},
  archivePrefix = {arXiv}
}"""
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
UNKNOWN_BASE = "unknown-base-model"


def is_hub_id(value: Any) -> bool:
    """Whether `value` reads as a Hub repo id (`"owner/name"`) rather than a local path, file or builder name."""
    return (
        isinstance(value, str)
        and bool(REPO_ID_PATTERN.match(value))
        and "--" not in value
        and ".." not in value
        and not os.path.exists(value)
        and value not in ("json", "csv", "parquet", "text")
        and not value.lower().endswith(tuple(FILE_SUFFIXES))
    )


def _eval_results(tasks: Sequence[str], data: dict[str, Any], served_by: Mapping[str, str] | None = None) -> list:
    """One `EvalResult` per task and metric: the few-shot score, and the held-out score when there is one."""

    metrics = [
        ("loss", "few-shot loss", data["result"].get("task_losses") or {}),
        ("exact_match", "held-out exact match (first word)", data["result"].get("heldout_scores") or {}),
        ("exact_match", "held-out exact match (whole answer)", data["result"].get("heldout_whole_scores") or {}),
    ]
    sources = data["result"].get("data_sources") or {}
    out = []
    for task in tasks:
        source = sources.get(task) or {}
        for metric_type, metric_name, values in metrics:
            if task not in values:
                continue
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=f"{task} (via {served_by[task]})" if served_by else task,
                    dataset_type=str(source.get("path") or task),
                    dataset_name=task,
                    dataset_config=source.get("name"),
                    dataset_split=source.get("split"),
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(float(values[task]), 6),
                )
            )
    return out


def _card_data(model_name: str, base: str, tasks: Sequence[str], data: dict[str, Any], served_by=None):
    sources = data["result"].get("data_sources") or {}
    datasets = sorted({s["path"] for t, s in sources.items() if t in tasks and s and is_hub_id(s.get("path"))})
    # `base_model` metadata must be a Hub id: a local folder (or no known base) is named in the body only.
    hub_base = base if base != UNKNOWN_BASE and is_hub_id(base) else None
    return ModelCardData(
        model_name=model_name,
        library_name="peft",
        base_model=hub_base,
        base_model_relation="adapter" if hub_base else None,
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        datasets=datasets or None,
        eval_results=_eval_results(tasks, data, served_by) or None,
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _source_text(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "unknown"
    if record.get("repo_id"):
        sub = f" (`{record['subfolder']}`)" if record.get("subfolder") else ""
        rev = f" @ `{str(record['revision'])[:10]}`" if record.get("revision") else ""
        return f"[`{record['repo_id']}`](/{record['repo_id']}){sub}{rev}"
    return f"local folder `{os.path.basename(str(record.get('path', '')).rstrip('/'))}`"


def _search_text(config: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """The search a d2c run ran, from its recorded plan (`stats["search_plan"]`; a result of before it: its config),
    e.g. "start `random`, `paper` search, 100 proposed moves, "; empty for a baseline, which does not search."""
    if result.get("method", config.get("method")) not in (None, "d2c"):
        return ""
    plan = (result.get("stats") or {}).get("search_plan") or {}
    search = plan.get("rule") or config.get("search") or "paper"
    steps = plan.get("num_iterations", config.get("num_iterations"))
    steps = DEFAULT_STEPS.get(search) if steps is None else steps
    limits = [
        text.format(plan[key])
        for key, text in (
            ("proposals_per_step", "{} candidate moves a step"),
            ("patience", "patience {}"),
            ("max_forward_passes", "at most {} forward passes"),
        )
        if plan.get(key) not in (None, 1)
    ]
    limits_text = f" ({', '.join(limits)})" if limits else ""
    init = plan.get("init") or config.get("init") or "random"
    return f"start `{init}`, `{search}` search, {steps} proposed moves{limits_text}, "


def _merge_engine(combination_type: str | None) -> str:
    """Who computes the merge: PEFT's `add_weighted_adapter`, or peft-d2c's update-space merges (rank r, exact)."""
    if combination_type in UPDATE_TYPES:
        return "peft-d2c's update-space merge (`peft_d2c.engine.merge.merge_methods`, rank r, a standard LoRA)"
    return "PEFT `add_weighted_adapter`"


def _method_section(data: dict[str, Any]) -> str:
    result, config = data["result"], data["config"]
    n, k = result.get("num_adapters", len(data["routing"])), result.get("num_clusters", len(data["names"]))
    budget = config.get("storage_budget")
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget <= 1:
        budget_text = f"storage budget {budget:.1%} of the source adapters, "
    else:
        budget_text = f"storage budget {budget}, " if budget else ""
    combination = result.get("combination_type", config.get("combination_type"))
    # the density only where the merge prunes (a result of before 3 recorded it for every type)
    density = result.get("density", (config.get("merge") or {}).get("density"))
    density = density if combination in DENSITY_TYPES else None
    folds = (config.get("scoring") or {}).get("cross_fit_folds") or 1
    loss_text = "few-shot loss" if folds == 1 else f"few-shot loss cross-fitted over {folds} folds"
    lines = [
        f"- **Clustering**: `{result.get('method', config.get('method'))}` ({_search_text(config, result)}"
        f"{(config.get('scoring') or {}).get('examples_per_task')} few-shot examples per task scored by their "
        f"{loss_text}, seed {config.get('seed')}).",
        f"- **Merge**: {_merge_engine(combination)}, `combination_type={combination!r}`"
        + (f", `density={density}`" if density is not None else "")
        + ".",
        f"- **Storage**: {budget_text}{k} merged adapters stored instead of {n} ({k / max(n, 1):.1%}).",
    ]
    sizes = (result.get("stats") or {}).get("merged_sizes")
    if sizes:  # rank_allocation="spectrum": ranks differ per adapter and module (`rank_pattern`)
        each = ", ".join(f"`{name}` r <= {s['r']}, {s['bytes']:,} bytes" for name, s in sizes.items())
        lines.append(f"- **Ranks**: the byte budget spent by singular values over every adapter and module: {each}.")
    shapes = (result.get("stats") or {}).get("shapes")
    if shapes:  # merge.svd_rank="auto": the byte budget chose K and the rank
        each = ", ".join(f"K = {s['num_clusters']} x rank {s['rank']}: {s['objective']:.3f}" for s in shapes)
        chosen = min(shapes, key=lambda s: s["objective"])
        objective = (
            "few-shot loss of its task adapters" if result.get("task_adapters") else "cross-fitted few-shot loss"
        )
        lines.append(
            f"- **Shape**: the byte budget chose K = {chosen['num_clusters']} merged adapters of rank {chosen['rank']}, "
            f"the lowest {objective} of the shapes that fit ({each})."
        )
    if result.get("task_adapters"):  # merge.task_cores: every task answered in its cluster's basis by its own core
        lines.append(
            f"- **Task cores**: each merged adapter of two or more tasks is its cluster's shared rank-r basis, and each "
            f"of its tasks has its own r x r core in it (`d2c_task_cores.safetensors`, "
            f"{len(result['task_adapters'])} cores). `load_d2c_collection` builds each task's adapter from its "
            "cluster's adapter and core, and a task label or the prompt router selects it. Such a merged adapter "
            "alone is its cluster's merge projected into the basis: serve prompts by their task, not with it."
        )
    return "\n".join(lines)


def _routing_section(data: dict[str, Any], repos: Mapping[str, str] | None = None) -> str:
    rows = []
    for task, name in sorted(data["routing"].items()):
        where = f"`{repos[name]}`" if repos else f"`{name}/`"
        rows.append((f"`{task}`", f"`{name}`", where))
    return _table(["task", "merged adapter", "location"], rows)


def _citation_section() -> str:
    return f"## Citation\n\nD2C is the method of [{PAPER_TITLE}]({PAPER_URL}) (ICASSP 2026):\n\n```bibtex\n{CITATION}\n```\n"


_SCORE_MEANING = (
    "The few-shot loss is the mean token cross-entropy of each task's completions under this merged adapter."
)


def build_adapter_card(
    data: dict[str, Any], name: str, *, repo_id: str, base_model_id: str, subfolder: str | None, repos=None
):
    """The `ModelCard` of one merged adapter (`data` as returned by the folder reader of `push_d2c_folder`)."""

    result = data["result"]
    index = data["names"].index(name)
    members = (result.get("clusters") or [[t for t, a in data["routing"].items() if a == name]])[index]
    served = sorted(t for t, a in data["routing"].items() if a == name)
    sources, losses = result.get("sources") or {}, result.get("task_losses") or {}
    heldout, whole = result.get("heldout_scores") or {}, result.get("heldout_whole_scores") or {}
    rows = [
        (f"`{m}`", _source_text(sources.get(m)), f"{losses[m]:.4f}" if m in losses else "–",
         f"{heldout[m]:.4f}" if m in heldout else "–", f"{whole[m]:.4f}" if m in whole else "–")
        for m in members
    ]  # fmt: skip
    sub_arg = f', subfolder="{subfolder}"' if subfolder else ""
    body = f"""
# {name}: a D2C multi-task LoRA adapter for `{base_model_id}`

This is a LoRA adapter for [`{base_model_id}`](/{base_model_id}), made by merging
{len(members)} single-task LoRA adapter(s) with [D2C]({PAPER_URL}): the source adapters were clustered using a few
examples per task, and the adapters of each cluster merged into one. It is cluster {index + 1} of
{len(data["names"])} of the collection `{repo_id}` and serves the tasks {", ".join(f"`{t}`" for t in served)}.

## Merged source adapters

{_table(["task (source adapter)", "source", "few-shot loss", "held-out EM (first word)", "held-out EM (whole answer)"], rows)}

{_SCORE_MEANING}

## How it was made

{_method_section(data)}

## Routing of the whole collection

{_routing_section(data, repos)}

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model_id}"), "{repo_id}"{sub_arg})
```

{_citation_section()}"""
    card_data = _card_data(f"{repo_id}/{name}" if subfolder else repo_id, base_model_id, members, data)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def build_collection_card(
    data: dict[str, Any], *, repo_id: str, base_model_id: str, base_model_note: str | None = None
):
    """The repo-level `ModelCard` of a collection pushed with `layout="subfolders"`.

    `base_model_note` (Markdown), when given, is a "Base model" paragraph after the introduction: what exactly the
    adapters were trained and merged on, e.g. a converted copy of `base_model_id`.
    """

    result, routing = data["result"], data["routing"]
    note = f"\n**Base model.** {base_model_note}\n" if base_model_note else ""
    clusters = result.get("clusters") or [[t for t, a in routing.items() if a == n] for n in data["names"]]
    rows = [
        (f"[`{n}`](./{n})", ", ".join(f"`{t}`" for t in members))
        for n, members in zip(data["names"], clusters, strict=True)
    ]
    body = f"""
# D2C adapter collection for `{base_model_id}`

{len(data["names"])} multi-task LoRA adapters for [`{base_model_id}`](/{base_model_id}) that
together serve {len(routing)} tasks, made with [D2C]({PAPER_URL}) from {result.get("num_adapters", len(routing))}
single-task LoRA adapters. D2C clusters the source adapters using a few examples per task and merges each cluster into
one adapter, so a device stores only the merged adapters and activates, per request, the one serving the task.
Each subfolder is a standard PEFT adapter with its own model card.
{note}
## Merged adapters

{_table(["merged adapter", "merges the adapters of the tasks"], rows)}

## How it was made

{_method_section(data)}

## Routing (`d2c_routing.json`)

{_routing_section(data)}

## Usage

All adapters with a task router (`pip install peft-d2c`):

```python
from peft_d2c.hub import load_d2c_collection
model, router = load_d2c_collection(AutoModelForCausalLM.from_pretrained("{base_model_id}"), "{repo_id}")
with router.task("{sorted(routing)[0]}"): ...  # runs with the adapter serving this task
```
{_prompt_router_section(data, base_model_id)}
One adapter with plain PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model_id}"), "{repo_id}", subfolder="{data["names"][0]}")
```

`d2c_config.json` holds the run's configuration and `d2c_result.json` the clusters, losses and sources.

{_citation_section()}"""
    card_data = _card_data(repo_id, base_model_id, sorted(routing), data, served_by=routing)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def read_result_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """A folder written by `D2CResult.save_pretrained`, read back and checked: the `data` the cards are built from.

    Returns:
        `dict`: `{"result": d2c_result.json, "routing": d2c_routing.json, "config": d2c_config.json,
        "names": [merged adapter names]}`.

    Raises:
        FileNotFoundError: If a result file, or the config or weights of a merged adapter, is missing.
        ValueError: If `d2c_config.json` was saved by a newer peft-d2c.
    """
    folder = os.fspath(folder)
    for filename in (ROUTING_NAME, RESULT_NAME, CONFIG_NAME):
        if not os.path.isfile(os.path.join(folder, filename)):
            raise FileNotFoundError(f"{folder!r} is not a saved D2C result: {filename} is missing.")
    result = read_json(os.path.join(folder, RESULT_NAME))
    routing = read_json(os.path.join(folder, ROUTING_NAME))
    names = result.get("merged_adapter_names") or sorted(set(routing.values()))
    for name in names:
        files = os.listdir(os.path.join(folder, name)) if os.path.isdir(os.path.join(folder, name)) else []
        if ADAPTER_CONFIG_NAME not in files or not any(w in files for w in WEIGHTS_NAMES):
            raise FileNotFoundError(f"Merged adapter {name!r} is missing from {folder!r} (no config or weights).")
    # Through `from_pretrained`: a file of an older format reads as the run it describes, a newer one is refused.
    config = D2CMergeConfig.from_pretrained(os.path.join(folder, CONFIG_NAME)).to_dict()
    return {"result": result, "routing": routing, "config": config, "names": names}


def build_result_card(
    folder: str | os.PathLike,
    *,
    base_model_id: str | None = None,
    location: str | None = None,
    base_model_note: str | None = None,
) -> ModelCard:
    """The README model card of a saved result folder: the collection card a push (`layout="subfolders"`) writes.

    Call it once the folder's `d2c_result.json`, `d2c_routing.json`, `d2c_config.json` and adapters are written (a
    staging folder is fine) and save it with `card.save(os.path.join(folder, "README.md"))`.

    Args:
        folder (`str` or `os.PathLike`): The saved result folder.
        base_model_id (`str`, *optional*): The base model's name in the card; defaults to the recorded base model.
            Only a Hub id goes into the `base_model` metadata; a local path is named in the text only.
        location (`str`, *optional*): What the usage snippets load from, where a push puts the repo id; defaults to
            the folder's name.
        base_model_note (`str`, *optional*): A "Base model" paragraph (Markdown) saying what exactly the adapters were
            trained and merged on, e.g. that the weights are a converted copy of `base_model_id`.

    Returns:
        `huggingface_hub.ModelCard`: the card (YAML metadata + body, with the citation).

    Example:
        ```python
        >>> card = build_result_card("d2c_output")
        >>> card.save("d2c_output/README.md")
        ```
    """
    data = read_result_folder(folder)
    base = base_model_id or data["result"].get("base_model") or UNKNOWN_BASE
    where = location or os.path.basename(os.path.abspath(os.fspath(folder)))
    return build_collection_card(data, repo_id=where, base_model_id=str(base), base_model_note=base_model_note)


def _prompt_router_section(data: dict[str, Any], base_model_id: str) -> str:
    """How to answer a request that carries no task label, when the result has a prompt router."""
    if "d2c_router.json" not in data["result"].get("files", []):
        return ""
    stats = data["result"].get("prompt_router") or {}
    accuracy = stats.get("leave_one_out_accuracy")
    measured = "" if accuracy is None else f" (task accuracy {accuracy:.1%} on the few-shot prompts, leave-one-out)"
    calibration = stats.get("calibration")
    unknown = ""
    if calibration is not None:
        unknown = (
            f" A prompt less similar to its nearest task than that task's threshold is of no known task "
            f'(`route.known` is False; `fallback="base"` answers it with the base model); the thresholds are set so '
            f"that about {calibration['false_reject']:.0%} of a known task's prompts are refused."
        )
    warning = ""
    if stats.get("above_chance") is False:
        chance = stats.get("chance_accuracy")
        warning = (
            f"\n**The router tells these tasks apart no better than chance** (leave-one-out accuracy {accuracy:.1%}, "
            f"chance {chance:.1%}): the prompts do not say which task they are. Label requests with their task "
            "(`router.task(...)` above) rather than routing them by content.\n"
        )
    return f"""
A request without a task label: the prompt router (`d2c_router.json`, `d2c_router.safetensors`) picks the adapter
from the base model's embedding of the prompt{measured}.{unknown}
{warning}
```python
from transformers import AutoTokenizer
answer, route = router.generate("PROMPT", AutoTokenizer.from_pretrained("{base_model_id}"))
```
"""
