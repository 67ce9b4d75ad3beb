"""peft-d2c: data-driven clustering and merging of LoRA adapters (D2C, arXiv 2601.17441) for Hugging Face PEFT.

The public API. The package is laid out by pipeline stage (docs/architecture.md): `data` -> `engine` (scoring,
search, merging) -> `result` -> `hub` / `evaluation` -> `embedded` -> `cli`, with `config` and `errors` below all.
"""

from .config import D2CMergeConfig
from .d2c import merge_adapters_d2c
from .data.examples import Example
from .errors import CheckpointMismatchError, D2CWarning, NonFiniteLossError, UnsupportedAdapterError
from .result import D2CResult
from .version import __version__

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
