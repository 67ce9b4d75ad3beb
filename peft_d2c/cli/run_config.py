"""The YAML file of `peft-d2c merge` (and `estimate`, `sweep`): one run, validated into `D2CMergeConfig` and a data spec.

```yaml
base_model: HuggingFaceTB/SmolLM2-135M-Instruct   # Hub id or local folder
adapters:                                          # folders, Hub ids ("owner/name[/sub][@rev]"), or a collection
  - ./loras/capital
  - my-org/lora-plural@v1
  - collection: my-org/word-loras-0123456789abcdef01234567
data:                                              # a data spec as in `peft_d2c.data.spec` (or a path to one)
  defaults: {num_examples: 10}
  tasks:
    capital: {path: data/capital.jsonl}
d2c: {num_clusters: 2, num_iterations: 100, combination_type: ties}   # any `D2CMergeConfig` field
output: d2c_output
push_to_hub: my-org/word-loras-d2c                 # optional
```

The effective run (after command-line overrides) is written next to the results as `d2c_run.yaml`, which
`peft-d2c merge d2c_run.yaml` repeats exactly. Relative paths are read relative to the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from ..config import MOVED_SETTINGS, D2CMergeConfig
from ..data.spec import load_data_spec
from ..io import atomic_write_text

RUN_CONFIG_NAME = "d2c_run.yaml"
RUN_KEYS = ("base_model", "adapters", "data", "d2c", "output", "push_to_hub")


@dataclass
class MergeRunConfig:
    """One validated `peft-d2c merge` run.

    Args:
        base_model (`str`): Hub id or folder of the base model (and its tokenizer).
        adapters (`list`): Adapter sources as `peft_d2c.hub.adapters.load_adapters` takes them.
        data (`dict`): The data spec mapping (`{"defaults": ..., "tasks": ...}`), already validated.
        d2c (`D2CMergeConfig`): The D2C settings.
        output (`str`, defaults to `"d2c_output"`): Output folder.
        push_to_hub (`str`, *optional*): Repo to push the result to.
    """

    base_model: str
    adapters: list[Any]
    data: dict[str, Any]
    d2c: D2CMergeConfig
    output: str = "d2c_output"
    push_to_hub: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The run as written to `d2c_run.yaml` (plain YAML types only)."""
        return {
            "base_model": self.base_model,
            "adapters": list(self.adapters),
            "data": self.data,
            "d2c": self.d2c.to_dict(),
            "output": self.output,
            "push_to_hub": self.push_to_hub,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write `directory/d2c_run.yaml` and return its path."""

        path = os.path.join(os.fspath(directory), RUN_CONFIG_NAME)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))  # never a half-written config
        return path


def read_yaml(path: str | os.PathLike, argument: str = "CONFIG") -> Any:
    """Parse a YAML file; a syntax error becomes a one-line `ValueError` naming the file and line."""

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{argument}` file not found: {path!r}.")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"`{argument}` {path!r} is not valid YAML{where}: {problem}.") from None


def _data_mapping(data: Any) -> dict[str, Any]:
    """The data spec as a plain mapping (a path to a YAML spec is read), validated with `load_data_spec`."""

    if isinstance(data, (str, os.PathLike)):
        data = read_yaml(data, "data")
    if not isinstance(data, Mapping):
        raise TypeError(f"`data` must be a data spec mapping or the path of a YAML data spec, got {data!r}.")
    try:
        load_data_spec(data)
    except (ValueError, TypeError) as error:
        raise type(error)(f"In `data`: {error}") from None
    return dict(data)


def d2c_config_from_mapping(values: Mapping[str, Any]) -> D2CMergeConfig:
    """Build a `D2CMergeConfig` from the `d2c` section (groups nested, `merge: {density: 0.7}`, or their settings
    flat, `density: 0.7`), naming unknown keys and listing the allowed ones."""
    if not isinstance(values, Mapping):
        raise TypeError(f"`d2c` must be a mapping of D2CMergeConfig fields, got {values!r}.")
    allowed = [f.name for f in fields(D2CMergeConfig)]
    unknown = sorted(set(values) - set(allowed) - set(MOVED_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in `d2c`; allowed keys: {allowed}.")
    try:  # `from_dict` also takes the flat keys of before the `merge` / `scoring` groups (`density: 0.7`)
        return D2CMergeConfig.from_dict(dict(values))
    except (ValueError, TypeError) as error:
        raise type(error)(f"In `d2c`: {error}") from None


def load_run_config(source: str | os.PathLike | Mapping[str, Any] | None, **overrides: Any) -> MergeRunConfig:
    """Read and validate a run from a YAML file or mapping, with command-line `overrides` applied on top.

    Args:
        source (`str`, `os.PathLike`, `Mapping` or `None`): The YAML file, a mapping of it, or `None` (everything
            from `overrides`).
        overrides: Top-level keys (`base_model`, `adapters`, `data`, `output`, `push_to_hub`) and `d2c` (a dict
            merged into the `d2c` section); `None` values are ignored.

    Returns:
        `MergeRunConfig`: the validated run.

    Raises:
        FileNotFoundError: If the YAML file does not exist.
        ValueError: On invalid YAML, an unknown key (named, with the allowed keys), a missing key or a bad value.
        TypeError: If a value has the wrong type.

    Example:
        ```python
        >>> run = load_run_config("merge.yaml", d2c={"num_clusters": 3})  # doctest: +SKIP
        >>> run.d2c.num_clusters  # doctest: +SKIP
        3
        ```
    """
    raw: Any = {} if source is None else read_yaml(source) if isinstance(source, (str, os.PathLike)) else source
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"The run config must be a mapping with keys {list(RUN_KEYS)}, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in the run config; allowed keys: {list(RUN_KEYS)}.")
    values = dict(raw)
    d2c_values = dict(values.get("d2c") or {})
    d2c_overrides = {k: v for k, v in (overrides.pop("d2c", None) or {}).items() if v is not None}
    if "num_clusters" in d2c_overrides:
        d2c_values.pop("storage_budget", None)
    if "storage_budget" in d2c_overrides:
        d2c_values.pop("num_clusters", None)
    d2c_values.update(d2c_overrides)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("base_model", "adapters", "data"):
        if not values.get(key):
            raise ValueError(f"The run config needs `{key}` (in the YAML file or as a command-line option).")
    if not isinstance(values["base_model"], str):
        raise TypeError(f"`base_model` must be a Hub id or folder (a string), got {values['base_model']!r}.")
    adapters = values["adapters"]
    if isinstance(adapters, (str, Mapping)):
        adapters = [adapters]
    if not isinstance(adapters, list):
        raise TypeError(f"`adapters` must be a list of folders, Hub ids or `collection:` entries, got {adapters!r}.")
    for key in ("output", "push_to_hub"):
        if values.get(key) is not None and not isinstance(values[key], str):
            raise TypeError(f"`{key}` must be a string, got {values[key]!r}.")
    if "num_clusters" not in d2c_values and "storage_budget" not in d2c_values:
        d2c_values["num_clusters"] = 2
    return MergeRunConfig(
        base_model=values["base_model"],
        adapters=adapters,
        data=_data_mapping(values["data"]),
        d2c=d2c_config_from_mapping(d2c_values),
        output=values.get("output") or "d2c_output",
        push_to_hub=values.get("push_to_hub"),
    )
