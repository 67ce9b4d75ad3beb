"""Exceptions and warnings raised by peft-d2c.

Each exception also subclasses a built-in one, so ``except ValueError`` keeps working for callers that do not know
about peft-d2c.
"""

from __future__ import annotations


class D2CWarning(UserWarning):
    """Warning category for risky but allowed peft-d2c input (like PEFT's ``PeftWarning``)."""


class UnsupportedAdapterError(ValueError):
    """An adapter cannot be merged faithfully by PEFT (not a LoRA, or a LoRA variant such as DoRA or rslora)."""


class NonFiniteLossError(ValueError):
    """A task loss came out NaN or infinite during a run; the merged weights or the examples are broken."""


class CheckpointMismatchError(ValueError):
    """A search checkpoint belongs to a different configuration or adapter set than the current call."""


class MemoryLimitError(ValueError):
    """A run would hold more memory than `D2CMergeConfig.merge.memory_limit` allows (refused before the work starts)."""
