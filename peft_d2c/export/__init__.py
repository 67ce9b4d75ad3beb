"""Deployment exports of a saved result: llama.cpp LoRA adapters in GGUF (`llamacpp`), vLLM multi-LoRA folders and
configuration (`vllm`), the folder-level export with its manifest and `lm_eval` commands (`folder`), and a GGUF export
served by llama.cpp, or an upstream server's adapters by name (vLLM), with the prompt router in front (`server`).
Sits at the `hub` stage, below `result` (which calls it): may import `peft_d2c.config`, `peft_d2c.errors`,
`peft_d2c.io` and `peft_d2c.hub`.
"""

from .folder import EXPORT_FORMATS, MANIFEST_NAME, export_d2c_folder, file_sha256
from .llamacpp import (
    BaseModelInfo,
    GGUFLoraAdapter,
    base_info_from_config,
    base_info_from_gguf,
    convert_peft_adapter,
    permute_qk_rows,
    write_gguf_lora,
)
from .server import RoutedLlamaCpp, RoutedUpstream, make_server
from .vllm import VLLM_LORA_RANKS, vllm_max_lora_rank, write_vllm_adapter

__all__ = [
    "EXPORT_FORMATS",
    "MANIFEST_NAME",
    "VLLM_LORA_RANKS",
    "BaseModelInfo",
    "GGUFLoraAdapter",
    "RoutedLlamaCpp",
    "RoutedUpstream",
    "base_info_from_config",
    "base_info_from_gguf",
    "convert_peft_adapter",
    "export_d2c_folder",
    "file_sha256",
    "make_server",
    "permute_qk_rows",
    "vllm_max_lora_rank",
    "write_gguf_lora",
    "write_vllm_adapter",
]
