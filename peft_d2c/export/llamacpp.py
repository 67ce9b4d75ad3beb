"""PEFT LoRA adapters as llama.cpp LoRA adapter files (GGUF), the tensors `convert_lora_to_gguf.py` would write.

A llama.cpp LoRA file holds `general.type = adapter`, `general.architecture` (that of the base GGUF),
`adapter.type = lora`, `adapter.lora.alpha`, and for every adapted base tensor `<gguf name>.lora_a` (r x in) and
`<gguf name>.lora_b` (out x r), in float32. llama.cpp scales each pair by `alpha / r` with `r` read from the shape of
`lora_b`, so a per-module scale that is not `lora_alpha / r` (rslora, `rank_pattern`, `alpha_pattern`) is folded into
B. llama.cpp's Llama conversion permutes the rows of `q_proj` / `k_proj` for its RoPE layout; for a LoRA that is a
permutation of the rows of B (A is untouched). May import `peft_d2c.errors`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from transformers import AutoConfig

from ..errors import UnsupportedAdapterError

__all__ = [
    "BaseModelInfo",
    "GGUFLoraAdapter",
    "base_info_from_config",
    "base_info_from_gguf",
    "convert_peft_adapter",
    "permute_qk_rows",
    "write_gguf_lora",
]

# Hugging Face `model_type` -> GGUF architecture whose tensor names and q/k layout this module knows. Only Llama is
# checked against a real llama.cpp runtime (tests/test_export_llamacpp.py); other architectures are refused.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
PERMUTED = {"attn_q": "n_head", "attn_k": "n_head_kv"}  # GGUF tensor -> head count its rows are grouped by
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class BaseModelInfo:
    """What the export needs to know of the base model: architecture, heads and (from a GGUF file) its tensors.

    Args:
        architecture (`str`): GGUF architecture name, e.g. `"llama"`.
        n_head (`int`), n_head_kv (`int`): Attention and key/value heads (the q/k row permutation).
        n_layers (`int`): Transformer blocks.
        tensor_shapes (`dict[str, tuple[int, int]]`, *optional*): Base tensors `name -> (out, in)` when read from a
            GGUF file; every adapted tensor is then checked against it. `None` when read from a `config.json`.
        tied_output (`bool`): The output layer is the token embedding (no `output.weight` in the GGUF file).
        name (`str`, *optional*): The base model's name.
    """

    architecture: str
    n_head: int
    n_head_kv: int
    n_layers: int
    tensor_shapes: dict[str, tuple[int, int]] | None = None
    tied_output: bool = False
    name: str | None = None


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    item = reader.fields.get(key)
    return default if item is None else item.contents()


def base_info_from_gguf(path: str | os.PathLike) -> BaseModelInfo:
    """Read the architecture, head counts and tensor shapes of a base model GGUF file (no weights are loaded).

    Raises:
        ValueError: If the file is not a model GGUF file (e.g. an adapter) or has no head counts.
    """
    reader = gguf.GGUFReader(os.fspath(path))
    arch = _field(reader, "general.architecture")
    if _field(reader, "general.type", "model") != "model" or not arch:
        raise ValueError(f"{os.fspath(path)!r} is not a base model GGUF file (general.type / architecture).")
    n_head = _field(reader, f"{arch}.attention.head_count")
    if n_head is None:
        raise ValueError(f"{os.fspath(path)!r} has no `{arch}.attention.head_count`.")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return BaseModelInfo(
        architecture=arch,
        n_head=int(n_head),
        n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        n_layers=int(_field(reader, f"{arch}.block_count")),
        tensor_shapes={k: v for k, v in shapes.items() if len(v) == 2},
        tied_output="output.weight" not in shapes,
        name=_field(reader, "general.name"),
    )


def base_info_from_config(config: Any) -> BaseModelInfo:
    """Base model facts from a transformers config (object, dict, or a Hub id / folder for `AutoConfig`).

    Raises:
        UnsupportedAdapterError: If the architecture is not one llama.cpp export is implemented for.
    """
    if isinstance(config, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(os.fspath(config))
    values = config if isinstance(config, Mapping) else config.to_dict()
    model_type = values.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedAdapterError(
            f"GGUF export supports the architectures {sorted(ARCHITECTURES)}, got model_type={model_type!r}."
        )
    n_head = int(values["num_attention_heads"])
    return BaseModelInfo(
        architecture=gguf.MODEL_ARCH_NAMES[ARCHITECTURES[model_type]],
        n_head=n_head,
        n_head_kv=int(values.get("num_key_value_heads") or n_head),
        n_layers=int(values["num_hidden_layers"]),
        tied_output=bool(values.get("tie_word_embeddings", False)),
        name=values.get("_name_or_path") or None,
    )


def permute_qk_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k LoRA B from Hugging Face's RoPE layout (halves) to llama.cpp's (interleaved pairs), per head."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size.")
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


@dataclass
class GGUFLoraAdapter:
    """One converted adapter, held in memory until every adapter of an export has been converted."""

    architecture: str
    alpha: float
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # gguf name -> (A, B)
    ranks: dict[str, int] = field(default_factory=dict)
    folded_scale: bool = False  # some module's scale was folded into B

    @property
    def rank(self) -> int:
        return max(self.ranks.values())

    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


def _refuse_config(adapter_dir: str, config: Mapping[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"{adapter_dir}: only LoRA adapters convert to GGUF, got {config['peft_type']}.")
    refused = {
        "use_dora": "DoRA (llama.cpp has no magnitude vector)",
        "lora_bias": "a LoRA bias (lora_bias; llama.cpp LoRA has no bias)",
        "modules_to_save": "modules_to_save (full module copies are no LoRA)",
        "trainable_token_indices": "trainable tokens",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    }
    for key, what in refused.items():
        if config.get(key):
            raise UnsupportedAdapterError(
                f"{adapter_dir} uses {what}: llama.cpp cannot load it ({key}={config[key]!r}); nothing was written."
            )


def _module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of `module`: alpha / r, or alpha / sqrt(r) with rslora; patterns as PEFT matches them."""
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def convert_peft_adapter(
    adapter_dir: str | os.PathLike, base: BaseModelInfo, *, permute_qk: bool = True
) -> GGUFLoraAdapter:
    """Convert one PEFT LoRA folder to llama.cpp's tensors, in memory; refuse what llama.cpp cannot load.

    Args:
        adapter_dir (`str` or `os.PathLike`): A PEFT folder (`adapter_config.json`, `adapter_model.safetensors`).
        base (`BaseModelInfo`): The base model (`base_info_from_gguf` or `base_info_from_config`).
        permute_qk (`bool`, *optional*, defaults to `True`): Permute the B rows of q/k for llama.cpp's RoPE layout.
            Only a test's negative control turns it off; without it llama.cpp computes a different model.

    Returns:
        `GGUFLoraAdapter`: the GGUF tensors, alpha, ranks.

    Raises:
        UnsupportedAdapterError: For DoRA, `lora_bias`, `modules_to_save`, embedding LoRAs, a LoRA on an output layer
            tied to the embeddings, a module with no llama.cpp tensor or a shape the base model does not have; the
            message names the module.

    Example:
        ```python
        >>> base = base_info_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> adapter = convert_peft_adapter("d2c_output/d2c_0", base)
        >>> sorted(adapter.tensors)[0]
        'blk.0.attn_q.weight'
        ```
    """
    adapter_dir = os.fspath(adapter_dir)
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    _refuse_config(adapter_dir, config)
    if base.architecture not in {gguf.MODEL_ARCH_NAMES[a] for a in ARCHITECTURES.values()}:
        raise UnsupportedAdapterError(f"GGUF export is not implemented for the architecture {base.architecture!r}.")
    arch = next(a for a in ARCHITECTURES.values() if gguf.MODEL_ARCH_NAMES[a] == base.architecture)
    names = gguf.get_tensor_name_map(arch, base.n_layers)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module = key.removeprefix("base_model.model.")
        if module.endswith(".base_layer.weight"):
            continue  # a copy of the base weight (PEFT's save_embedding_layers), skipped as convert_lora_to_gguf does
        suffix = next((s for s in _LORA_SUFFIXES if module.endswith(s)), None)
        if suffix is None:
            raise UnsupportedAdapterError(
                f"{adapter_dir}: tensor {key!r} is not a LoRA A/B weight of a linear layer (embedding LoRAs and "
                "other tensors are not exported); nothing was written."
            )
        pairs.setdefault(module.removesuffix(suffix), {})[suffix[6]] = tensor.float()
    alpha = float(config["lora_alpha"]) or float(config["r"])
    adapter = GGUFLoraAdapter(architecture=base.architecture, alpha=alpha)
    for module in sorted(pairs):
        a, b = pairs[module]["A"], pairs[module]["B"]
        gguf_base = names.get_name(module)
        if gguf_base is None:
            raise UnsupportedAdapterError(f"{adapter_dir}: module {module!r} has no llama.cpp tensor.")
        if gguf_base == "output" and base.tied_output:
            raise UnsupportedAdapterError(
                f"{adapter_dir}: module {module!r} is the output layer, which this base model ties to the token "
                "embedding (no output.weight); llama.cpp cannot apply a LoRA to it. Nothing was written."
            )
        name = f"{gguf_base}.weight"
        if base.tensor_shapes is not None:
            expected = base.tensor_shapes.get(name)
            if expected is None or expected != (b.shape[0], a.shape[1]):
                raise UnsupportedAdapterError(
                    f"{adapter_dir}: module {module!r} is {b.shape[0]} x {a.shape[1]}, but the base GGUF's {name} is "
                    f"{expected}; is it the adapter's base model? Nothing was written."
                )
        rank = a.shape[0]
        fold = _module_scale(config, module, rank) * rank / alpha  # llama.cpp applies alpha / rank
        if not math.isclose(fold, 1.0, rel_tol=1e-9):
            b = b * fold
            adapter.folded_scale = True
        layer_kind = gguf_base.rsplit(".", 1)[-1]
        if permute_qk and layer_kind in PERMUTED:
            b = permute_qk_rows(b, getattr(base, PERMUTED[layer_kind]))
        adapter.tensors[name] = (a.contiguous().numpy(), b.contiguous().numpy())
        adapter.ranks[name] = rank
    if not adapter.tensors:
        raise UnsupportedAdapterError(f"{adapter_dir} holds no LoRA weights.")
    return adapter


def write_gguf_lora(
    path: str | os.PathLike,
    adapter: GGUFLoraAdapter,
    *,
    name: str | None = None,
    task_names: Sequence[str] = (),
    base_name: str | None = None,
) -> int:
    """Write `adapter` as a llama.cpp LoRA file with `gguf.GGUFWriter`; returns its size in bytes.

    `adapter.lora.task_name` lists the tasks the adapter serves (comma-separated), which llama-server shows in
    `GET /lora-adapters`.
    """
    path = os.fspath(path)
    writer = gguf.GGUFWriter(path, adapter.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
    if name:
        writer.add_name(name)
    if base_name:
        writer.add_string("general.base_model.0.name", base_name)
        writer.add_uint32("general.base_model.count", 1)
    if task_names:
        writer.add_string(gguf.Keys.Adapter.LORA_TASK_NAME, ",".join(task_names))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor_name, (a, b) in adapter.tensors.items():
        writer.add_tensor(f"{tensor_name}.lora_a", a)
        writer.add_tensor(f"{tensor_name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)
