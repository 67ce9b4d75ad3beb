"""Export a saved D2C result folder for deployment: llama.cpp (GGUF), vLLM, or plain PEFT, with a manifest.

Every merged adapter of the folder is converted (and checked) in memory first; only then is anything written, into
a staging folder next to the output that is moved into place, so a refused adapter leaves no partial export. The
manifest (`d2c_export.json`) maps each task to its adapter file and says how to serve it; `lm_eval_commands.sh`
holds the `lm_eval` command of each merged adapter with the tasks routed to it (written, not run); a result's prompt
router is copied next to the adapters, with a manifest entry saying how a server uses it. May import
`peft_d2c.config`, `peft_d2c.errors`, `peft_d2c.io`, `peft_d2c.engine`, `peft_d2c.hub` and the `export` modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
from typing import Any

from ..engine.merge.task_cores import load_task_cores, serving_routing, write_task_adapter
from ..engine.serving.prompt_router import MAX_FEATURE_TOKENS, ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME
from ..hub.cards import read_result_folder
from ..io import ROUTING_NAME, TASK_CORES_NAME, atomic_write_json, atomic_write_text, read_json
from .llamacpp import base_info_from_config, base_info_from_gguf, convert_peft_adapter, write_gguf_lora
from .vllm import read_vllm_adapter, vllm_max_lora_rank, write_vllm_adapter

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "MANIFEST_NAME", "export_d2c_folder", "file_sha256"]

EXPORT_FORMATS = ("gguf", "vllm", "peft")
MANIFEST_NAME = "d2c_export.json"
LM_EVAL_NAME = "lm_eval_commands.sh"
VLLM_MODULES_NAME = "vllm_lora_modules.json"
TASK_PEFT_DIR = "peft_task_adapters"  # a GGUF export of task adapters: their PEFT folders, for the lm_eval commands


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tasks_of(routing: dict[str, str], name: str) -> list[str]:
    return sorted(t for t, a in routing.items() if a == name)


def _lm_eval_command(base: str, adapter_path: str, tasks: list[str]) -> str:
    return (
        f"lm_eval --model hf --model_args {shlex.quote(f'pretrained={base},peft={adapter_path}')} "
        f"--tasks {shlex.quote(','.join(tasks))}"
    )


def _move_into(staging: str, output: str) -> None:
    os.makedirs(output, exist_ok=True)
    for entry in sorted(os.listdir(staging)):
        target = os.path.join(output, entry)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, entry), target)


def export_d2c_folder(
    folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    format: str = "gguf",
    base_gguf: str | os.PathLike | None = None,
    base_model_id: str | None = None,
    base_config: Any = None,
    permute_qk: bool = True,
) -> dict[str, Any]:
    """Export the merged adapters of a saved result folder for llama.cpp, vLLM or PEFT, with a manifest.

    A result with task cores (`merge.task_cores`) exports one plain LoRA per task instead, each built from its
    cluster's merged adapter and the task's core (`engine.merge.task_cores.write_task_adapter`): N adapters of the
    merged rank, what servers that take whole LoRAs need (the stored result stays K adapters and the cores).

    Args:
        folder (`str` or `os.PathLike`): A folder written by `D2CResult.save_pretrained`.
        output_dir (`str` or `os.PathLike`): Where the export goes (created; files of the same names are replaced).
        format (`str`, *optional*, defaults to `"gguf"`): `"gguf"` (one llama.cpp LoRA file per merged adapter),
            `"vllm"` (standalone PEFT folders + `--lora-modules` JSON) or `"peft"` (the PEFT folders as they are).
        base_gguf (`str` or `os.PathLike`, *optional*): The base model's GGUF file. With `"gguf"` its architecture,
            heads and tensor shapes are checked against every adapter (recommended); the manifest records its
            sha256. Without it, `base_config` is used, else the base model's `config.json` is read by name
            (`base_model_id` or the recorded base model).
        base_model_id (`str`, *optional*): The base model's name for the manifest and commands; defaults to the
            recorded base model.
        base_config (`PretrainedConfig` or `dict`, *optional*): The base model's config, already in memory (as
            `D2CResult.export` passes it); with `"gguf"` and no `base_gguf` it is used instead of reading the config
            by name, which fails once that name is no longer loadable (an offline Hub id, a moved folder).
        permute_qk (`bool`, *optional*, defaults to `True`): See `convert_peft_adapter`; only for a negative control.

    Returns:
        `dict`: the manifest also written to `output_dir/d2c_export.json`.

    Raises:
        ValueError: If `format` is unknown.
        FileNotFoundError: If `folder` is not a complete saved result, `base_gguf` does not exist, or (`"gguf"`
            without `base_gguf` or `base_config`) the base model's config cannot be loaded by name.
        UnsupportedAdapterError: If a merged adapter cannot be served in `format` (nothing is written then).

    Example:
        ```python
        >>> manifest = export_d2c_folder("d2c_output", "d2c_gguf", format="gguf", base_gguf="SmolLM2.Q4_1.gguf")
        >>> manifest["tasks"]["capital_world"]["file"]
        'd2c_0.gguf'
        ```
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"`format` must be one of {list(EXPORT_FORMATS)}, got {format!r}.")
    folder, output_dir = os.fspath(folder), os.fspath(output_dir)
    data = read_result_folder(folder)
    routing, names = data["routing"], data["names"]
    with tempfile.TemporaryDirectory(prefix="d2c-task-adapters-") as task_folder:
        task_adapters = data["result"].get("task_adapters") or {}
        if TASK_CORES_NAME in data["result"].get("files", []) and task_adapters:
            # Servers take whole LoRAs: every task's adapter is materialised from its cluster's adapter and core.
            cores = load_task_cores(os.path.join(folder, TASK_CORES_NAME))
            for task, name in task_adapters.items():
                write_task_adapter(os.path.join(folder, routing[task]), cores[task], os.path.join(task_folder, name))
            folder, names = task_folder, [task_adapters[t] for t in sorted(task_adapters)]
            routing = serving_routing(routing, task_adapters)
        return _export(folder, output_dir, data, routing, names, format, base_gguf, base_model_id, base_config,
                       permute_qk, materialised=folder == task_folder)  # fmt: skip


def _export(folder, output_dir, data, routing, names, format, base_gguf, base_model_id, base_config, permute_qk,
            *, materialised: bool) -> dict[str, Any]:  # fmt: skip
    """`export_d2c_folder` for the adapters `names` of `folder` (the saved merged adapters, or the materialised
    task adapters of a result with task cores) and their `routing`."""
    base = base_model_id or data["result"].get("base_model") or "BASE_MODEL"
    if base_gguf is not None and not os.path.isfile(base_gguf):
        raise FileNotFoundError(f"`base_gguf` {os.fspath(base_gguf)!r} does not exist.")
    base_record: dict[str, Any] = {"name": base}
    if base_gguf is not None:
        base_record.update(gguf_file=os.path.basename(base_gguf), gguf_sha256=file_sha256(base_gguf))

    # Convert and check everything before writing anything.
    converted: dict[str, Any] = {}
    if format == "gguf":
        if base_gguf is not None:
            info = base_info_from_gguf(base_gguf)
        elif base_config is not None:
            info = base_info_from_config(base_config)
        else:
            try:
                info = base_info_from_config(base)
            except OSError as error:
                raise FileNotFoundError(
                    f"No config of the base model {base!r} ({error}); pass the base model's GGUF file "
                    "(`base_gguf=` / `--base-gguf`) or its Hub id or folder (`base_model_id=` / `--base-model-id`)."
                ) from error
        converted = {n: convert_peft_adapter(os.path.join(folder, n), info, permute_qk=permute_qk) for n in names}
    elif format == "vllm":
        for name in names:
            read_vllm_adapter(os.path.join(folder, name))

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".d2c-export-", dir=parent)
    try:
        adapters = _write_adapters(format, folder, staging, output_dir, names, converted, routing, base)
        if materialised and format == "gguf":  # the lm_eval commands' PEFT folders outlive the temporary ones
            for name, record in adapters.items():
                shutil.copytree(os.path.join(folder, name), os.path.join(staging, TASK_PEFT_DIR, name))
                record["peft_path"] = os.path.join(os.path.abspath(output_dir), TASK_PEFT_DIR, name)
        manifest = _manifest(format, base_record, adapters, routing, names, output_dir, base_gguf)
        if format == "vllm":
            atomic_write_json(os.path.join(staging, VLLM_MODULES_NAME), manifest["vllm"]["lora_modules"])
        lm_eval = [_lm_eval_command(base, a["peft_path"], a["tasks"]) for a in adapters.values()]
        manifest["lm_eval"] = {name: cmd for name, cmd in zip(names, lm_eval, strict=True)}
        atomic_write_text(os.path.join(staging, LM_EVAL_NAME), "#!/usr/bin/env bash\n" + "\n".join(lm_eval) + "\n")
        atomic_write_json(os.path.join(staging, ROUTING_NAME), routing)
        if ROUTER_CONFIG_NAME in data["result"].get("files", []):  # requests without a task label
            for filename in (ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME):
                shutil.copy2(os.path.join(folder, filename), os.path.join(staging, filename))
            manifest["router"] = _router_entry(format)
        atomic_write_json(os.path.join(staging, MANIFEST_NAME), manifest)
        _move_into(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Exported %d merged adapters (%s) to %s.", len(names), format, output_dir)
    return manifest


def _write_adapters(format, folder, staging, output_dir, names, converted, routing, base) -> dict[str, dict[str, Any]]:
    adapters = {}
    for index, name in enumerate(names):
        tasks = _tasks_of(routing, name)
        source = os.path.abspath(os.path.join(folder, name))
        record: dict[str, Any] = {"tasks": tasks, "peft_path": source}
        if format == "gguf":
            adapter = converted[name]
            file = f"{name}.gguf"
            size = write_gguf_lora(os.path.join(staging, file), adapter, name=name, task_names=tasks, base_name=base)
            record.update(file=file, rank=adapter.rank, alpha=adapter.alpha, bytes=size,
                          folded_scale=adapter.folded_scale, server_id=index)  # fmt: skip
        elif format == "vllm":
            written = write_vllm_adapter(os.path.join(folder, name), os.path.join(staging, name))
            record.update(file=name, rank=written["rank"], bytes=written["bytes"], folded_scale=written["folded_scale"],
                          lora_int_id=index + 1)  # fmt: skip
            record["peft_path"] = os.path.join(os.path.abspath(output_dir), name)
        else:
            shutil.copytree(source, os.path.join(staging, name))
            size = sum(
                os.path.getsize(os.path.join(staging, name, f)) for f in os.listdir(os.path.join(staging, name))
            )
            config = read_json(os.path.join(source, "adapter_config.json"))
            rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
            record.update(file=name, rank=rank, bytes=size, peft_path=os.path.join(os.path.abspath(output_dir), name))
        adapters[name] = record
    return adapters


def _manifest(format, base_record, adapters, routing, names, output_dir, base_gguf) -> dict[str, Any]:
    base_file = os.path.basename(base_gguf) if base_gguf is not None else "BASE.gguf"
    manifest: dict[str, Any] = {"format": format, "base_model": base_record, "adapters": adapters, "tasks": {}}
    if format == "gguf":
        loras = " ".join(f"--lora {shlex.quote(adapters[n]['file'])}" for n in names)
        manifest["llama_server"] = f"llama-server -m {shlex.quote(base_file)} {loras} --lora-init-without-apply"
    if format == "vllm":
        rank = max(a["rank"] for a in adapters.values())
        modules = [{"name": n, "path": os.path.join(os.path.abspath(output_dir), n), "base_model_name": base_record["name"]}
                   for n in names]  # fmt: skip
        manifest["vllm"] = {
            "max_lora_rank": vllm_max_lora_rank(rank),
            "max_loras": len(names),
            "lora_modules": modules,
            "serve": f"vllm serve {shlex.quote(base_record['name'])} --enable-lora --max-lora-rank "
            f"{vllm_max_lora_rank(rank)} --max-loras {len(names)} --lora-modules "
            + " ".join(shlex.quote(_json(m)) for m in modules),
        }
    for task in sorted(routing):
        name = routing[task]
        adapter = adapters[name]
        entry: dict[str, Any] = {"adapter": name, "file": adapter["file"]}
        if format == "gguf":
            entry["server_id"] = adapter["server_id"]
            entry["llama_cli"] = (
                f"llama-cli -m {shlex.quote(base_file)} --lora {shlex.quote(adapter['file'])} --temp 0 -n 16 -p PROMPT"
            )
            entry["server_request"] = {"prompt": "PROMPT", "lora": [{"id": adapter["server_id"], "scale": 1.0}]}
        elif format == "vllm":
            entry["lora_int_id"] = adapter["lora_int_id"]
            entry["openai_model"] = name  # the `model` field of an OpenAI-compatible request
        manifest["tasks"][task] = entry
    return manifest


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _router_entry(format: str) -> dict[str, Any]:
    """How a server picks the adapter of a request without a task label, from the router files (docs/routing.md)."""
    how = (
        f"Embed the prompt with the base model: its last hidden state (after the final norm), mean over the prompt's "
        f"tokens (the last {MAX_FEATURE_TOKENS}); divide by its L2 norm, subtract `mean` ({ROUTER_WEIGHTS_NAME}), "
        "divide by the L2 norm again; the "
        f"task is the row of `centroids` with the largest dot product ({ROUTER_CONFIG_NAME} `tasks`, in row order), "
        "of no known task below that task's entry of `thresholds`; `tasks` below gives its adapter. With "
        "`use_chat_template`, wrap the prompt in the tokenizer's chat template (one user turn, generation prompt) "
        "before embedding and answering it."
    )
    entry: dict[str, Any] = {"files": [ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME], "how": how}
    if format == "gguf":
        entry["llama_server"] = (
            "a second llama-server with `--embedding --pooling mean` on the base GGUF gives the embedding "
            "(POST /v1/embeddings); then POST /completion with the task's `server_request`"
        )
        entry["serve"] = (
            "or, in one process: `peft-d2c serve THIS_FOLDER --base-gguf BASE.gguf` (llama-cpp-python, "
            "OpenAI-compatible POST /v1/completions; a request without `model` is routed)"
        )
    return entry
