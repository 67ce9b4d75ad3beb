"""Merged adapters for vLLM's multi-LoRA serving: standalone PEFT folders and the server's configuration.

vLLM (`vllm serve BASE --enable-lora --lora-modules '{"name": ..., "path": ..., "base_model_name": ...}' ...
--max-lora-rank R`) reads a plain PEFT folder: `adapter_config.json` at its root and the LoRA weights. It scales
every module by the one global `lora_alpha / r`, and supports neither DoRA, `lora_bias` nor `modules_to_save`; so rslora and
`alpha_pattern` scales are folded into B here (`use_rslora: false`, no `alpha_pattern`), and the rest is refused.
Configuration only: vLLM itself is not run. May import `peft_d2c.errors`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from ..errors import UnsupportedAdapterError

__all__ = ["VLLM_LORA_RANKS", "vllm_max_lora_rank", "write_vllm_adapter"]

# The values vLLM's `--max-lora-rank` accepts (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_REFUSED = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens",
}


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`.

    Raises:
        ValueError: If `rank` is above vLLM's largest value.

    Example:
        ```python
        >>> vllm_max_lora_rank(12)
        16
        ```
    """
    for value in VLLM_LORA_RANKS:
        if rank <= value:
            return value
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got rank {rank}.")


def write_vllm_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy a PEFT adapter folder into a standalone vLLM-ready one, folding per-module scales into B.

    Args:
        adapter_dir (`str` or `os.PathLike`): The PEFT folder of one merged adapter.
        out_dir (`str` or `os.PathLike`): The new folder (created).

    Returns:
        `dict`: `{"rank": max rank, "bytes": size of the weights file, "folded_scale": bool}`.

    Raises:
        UnsupportedAdapterError: If the adapter uses DoRA, `lora_bias`, `modules_to_save` or trainable tokens.
    """
    adapter_dir, out_dir = os.fspath(adapter_dir), os.fspath(out_dir)
    config, tensors = read_vllm_adapter(adapter_dir)
    folded = config.pop("_folded")
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "adapter_model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")]
    return {"rank": max(ranks), "bytes": os.path.getsize(weights), "folded_scale": folded}


def read_vllm_adapter(adapter_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The vLLM-ready config and tensors of a PEFT folder, in memory (checks first, so a refusal writes nothing)."""
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key, what in _REFUSED.items():
        if config.get(key):
            raise UnsupportedAdapterError(
                f"{adapter_dir} uses {what}, which vLLM cannot serve ({key}={config[key]!r}); nothing was written."
            )
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern: Mapping[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, float] = config.get("alpha_pattern") or {}
    folded = False
    for key in list(tensors):
        if not key.endswith("lora_B.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
        module_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        target = alpha / r  # what vLLM applies to every module: the global lora_alpha / r
        if not math.isclose(scale, target, rel_tol=1e-9):
            tensors[key] = tensors[key] * (scale / target)
            folded = True
    config.update(use_rslora=False, alpha_pattern={}, modules_to_save=None, inference_mode=True, _folded=folded)
    return config, tensors
