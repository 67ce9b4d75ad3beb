"""peft-d2c: data-driven clustering and merging of LoRA adapters (D2C, arXiv 2601.17441) for Hugging Face PEFT."""

__version__ = "0.1.0"

from .config import D2CMergeConfig
from .d2c import merge_adapters_d2c
from .data import Example
from .errors import CheckpointMismatchError, D2CWarning, NonFiniteLossError, UnsupportedAdapterError
from .result import D2CResult

__all__ = [
    "CheckpointMismatchError",
    "D2CMergeConfig",
    "D2CResult",
    "D2CWarning",
    "Example",
    "NonFiniteLossError",
    "UnsupportedAdapterError",
    "__version__",
    "merge_adapters_d2c",
]
