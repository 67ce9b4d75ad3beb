"""The model-state guard: what every operation on a user's model gives back untouched.

A run switches adapters, puts the model in eval mode and PEFT's `set_adapter` / `get_peft_model` change
`requires_grad` flags. `ModelState` records the active adapter, every module's train/eval flag and every
parameter's `requires_grad`, and puts them back, also after an error or Ctrl-C. Used by the D2C run, online
addition, the estimate probe and adapter training. Imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModelState:
    """The active adapter (for a `PeftModel`), the train/eval flag of every module and `requires_grad` of every
    parameter, by name.

    Example:
        ```python
        >>> state = ModelState.capture(model)
        >>> model.eval()  # ... work ...
        >>> state.restore(model)
        ```
    """

    active: Any
    training: dict[str, bool]
    requires_grad: dict[str, bool]

    @classmethod
    def capture(cls, model: torch.nn.Module) -> ModelState:
        """Record the state of `model` now."""
        return cls(
            active=getattr(model, "active_adapter", None),
            training={name: module.training for name, module in model.named_modules()},
            requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        )

    def restore(self, model: torch.nn.Module) -> None:
        """Give back the recorded state.

        A module created since `capture` (e.g. the `lora_dropout` of a merged adapter, which PEFT builds in training
        mode whatever the model's mode) takes the train/eval flag of its closest recorded parent, so an adapter
        returned to the user behaves like the model it lives in. Parameters created since `capture` keep their flags.
        """
        if self.active is not None and model.active_adapter != self.active:
            model.set_adapter(self.active)
        for name, module in model.named_modules():
            module.training = self.training[name] if name in self.training else self._parent_training(name)
        self.restore_requires_grad(model)

    def _parent_training(self, name: str) -> bool:
        parts = name.split(".")
        for end in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:end])
            if parent in self.training:
                return self.training[parent]
        return False

    def restore_requires_grad(self, model: torch.nn.Module) -> None:
        """Give back only the recorded `requires_grad` flags (PEFT's `set_adapter` makes the adapter it activates
        trainable)."""
        for name, param in model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])


@contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[ModelState]:
    """Context manager form of `ModelState`: capture on entry, restore on exit (also on errors)."""
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore(model)
