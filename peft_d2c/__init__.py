"""peft-d2c: data-driven clustering and merging of LoRA adapters (D2C, arXiv 2601.17441) for Hugging Face PEFT.

The public API. The package is laid out by pipeline stage (docs/architecture.md): `data` -> `engine` (scoring,
search, merging) -> `result` -> `hub` / `evaluation` -> `embedded` -> `cli`, with `config` and `errors` below all.
"""

import logging

# bitsandbytes, which PEFT imports, warns on CPUs with AVX512-BF16 that it cannot load an optional kernel from the Hub
# (offline, or untrusted by `kernels` >= 0.19) and falls back to its own CPU kernel: one line of noise on stderr in
# every run and every CLI call. Raised to ERROR here, before PEFT is imported, unless the application set that level.
if logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import D2CMergeConfig, MergeSettings, ScoringSettings  # noqa: E402
from .d2c import merge_adapters_d2c  # noqa: E402
from .data.examples import Example  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointMismatchError,
    D2CWarning,
    MemoryLimitError,
    NonFiniteLossError,
    UnsupportedAdapterError,
)
from .result import D2CResult  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "CheckpointMismatchError",
    "D2CMergeConfig",
    "D2CResult",
    "D2CWarning",
    "Example",
    "MemoryLimitError",
    "MergeSettings",
    "NonFiniteLossError",
    "ScoringSettings",
    "UnsupportedAdapterError",
    "__version__",
    "merge_adapters_d2c",
]
