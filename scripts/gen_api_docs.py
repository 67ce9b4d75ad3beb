"""Write docs/api.md from the docstrings of the public API (tests/test_docs.py checks it is up to date).

python scripts/gen_api_docs.py
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

# (module, names): the public surface, in reading order.
PUBLIC = [
    ("peft_d2c", ["D2CMergeConfig", "MergeSettings", "ScoringSettings", "merge_adapters_d2c", "D2CResult"]),
    ("peft_d2c.data.spec", ["TaskDataSpec", "load_data_spec", "load_task_examples"]),
    ("peft_d2c.hub", ["load_adapters", "push_d2c_folder", "load_d2c_collection", "D2CRouter"]),
    ("peft_d2c.evaluation.heldout", ["evaluate_routing"]),
    ("peft_d2c.embedded", ["load_embedded_base_model", "load_embedded_tasks", "load_embedded_peft_model"]),
    ("peft_d2c.engine.merge.merging", ["merge_weights_for"]),
    ("peft_d2c.engine.search.loop", ["d2c_search", "kmeans_partition"]),
    ("peft_d2c.engine.search.plan", ["SearchPlan"]),
    ("peft_d2c.engine.merge.layer_merge", ["peft_helpers_verified"]),
    ("peft_d2c.export", ["export_d2c_folder"]),
    ("peft_d2c.cli", ["main"]),
]
METHODS = {"D2CResult": ["save_pretrained", "from_pretrained", "push_to_hub", "add_adapter", "adapter_for", "export"]}


def summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/gen_api_docs.py`; the full docstrings (arguments, returns,",
        "errors, examples) are in the code and in `help()`.",
        "",
    ]
    for module_name, names in PUBLIC:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", ""]
        for name in names:
            obj = getattr(module, name)
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = "(...)"
            lines += [f"### `{name}{signature}`", "", summary(obj), ""]
            for method in METHODS.get(name, []):
                if hasattr(obj, method):
                    member = getattr(obj, method)
                    lines += [f"- `{name}.{method}{inspect.signature(member)}`: {summary(member)}"]
            if name in METHODS:
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    path = Path(__file__).parents[1] / "docs" / "api.md"
    path.write_text(render())
    print(f"wrote {path}")
