"""The one rule for the names of adapters peft-d2c creates (merged adapters, adapters loaded from the Hub)."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

# PEFT breaks on '.', and keys of `nn.ModuleDict` must be identifiers that do not shadow module attributes.
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def check_adapter_name(
    name: Any, *, taken: Collection[str] = (), reserved: Collection[str] = (), argument: str = "Adapter name"
) -> None:
    """Refuse an adapter name peft-d2c must not create: the one validator of adapter names.

    Args:
        name (`str`): The proposed name.
        taken (`Collection[str]`, *optional*): Names already in use (loaded adapters).
        reserved (`Collection[str]`, *optional*): Names that clash with model attributes (see
            `peft_d2c.engine.merge.lora.reserved_adapter_names`).
        argument (`str`, *optional*): How the name is called in the error message.

    Raises:
        ValueError: If the name does not start with a letter and hold only letters, digits, '_' and '-', is taken,
            or is reserved.

    Example:
        ```python
        >>> check_adapter_name("d2c_0", taken={"capital"})
        >>> check_adapter_name("d2c.0")
        Traceback (most recent call last):
        ...
        ValueError: Adapter name 'd2c.0' must start with a letter and hold only letters, digits, '_' and '-' (PEFT breaks on '.').
        ```
    """
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.match(name):
        raise ValueError(
            f"{argument} {name!r} must start with a letter and hold only letters, digits, '_' and '-' "
            "(PEFT breaks on '.')."
        )
    if name in taken:
        raise ValueError(
            f"{argument} {name!r} already exists (in the model, or earlier in the same call); names must be unique: "
            "choose another name (for merged adapters, another `merged_adapter_prefix`) or delete the adapter first."
        )
    if name in reserved:
        raise ValueError(f"{argument} {name!r} clashes with a model attribute; choose another name.")
