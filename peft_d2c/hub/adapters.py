"""Loading many LoRA adapters into one `PeftModel`: local folders, Hub repos (pinned to a commit, optionally a
subfolder) and the model repos of a Hub collection, every source checked before any is loaded."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from peft import PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open

from ..engine.merge.lora import EXACT_IN_UPDATE_SPACE, UNMERGEABLE_FLAGS, reserved_adapter_names
from ..errors import D2CWarning, UnsupportedAdapterError
from ..names import check_adapter_name

__all__ = ["AdapterSource", "load_adapters"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_COLLECTION = re.compile(r"^(?:https?://[^/]+/)?(?:collections/)?([^/@\s]+/[^/@\s]+-[0-9a-f]{24})/?$")
_LORA_KEY = re.compile(
    r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$|^base_model\.model\.(.+)\.(lora_embedding_[AB])$"
)


@dataclass(frozen=True)
class AdapterSource:
    """Where one adapter comes from: a local `path`, or a Hub `repo_id` with optional `revision` and `subfolder`."""

    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        text = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return text + (f"@{self.revision}" if self.revision else "")

    def default_name(self) -> str:
        """The repo name (or subfolder, or folder name), made a safe PEFT adapter name."""
        raw = (
            self.name
            or (self.subfolder or self.repo_id or os.path.abspath(self.path or "")).rstrip("/").split("/")[-1]
        )
        name = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
        return name if name[:1].isalpha() else f"adapter_{name}"


@dataclass
class _Resolved:
    source: AdapterSource
    local_dir: str
    config: dict[str, Any]
    weights: str
    record: dict[str, Any]  # what goes into `d2c_adapter_sources`
    name: str = ""


def hub_api(token: str | bool | None):
    return HfApi(token=token)


def _parse_source(item: Any, api) -> list[AdapterSource]:
    if isinstance(item, AdapterSource):
        return [item]
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"path", "repo_id", "revision", "subfolder", "name", "collection"})
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in adapter source {dict(item)!r}; allowed: path, repo_id, revision, "
                "subfolder, name, collection."
            )
        if "collection" in item:
            return _collection_sources(item["collection"], api)
        if ("path" in item) == ("repo_id" in item):
            raise ValueError(f"An adapter source needs exactly one of `path` and `repo_id`, got {dict(item)!r}.")
        return [AdapterSource(**item)]
    if isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.isdir(item)):
        return [AdapterSource(path=os.fspath(item))]
    if not isinstance(item, str):
        raise TypeError(f"An adapter source must be a path, a repo id, a collection slug or a dict, got {item!r}.")
    match = _COLLECTION.match(item)
    if match:
        return _collection_sources(match.group(1), api)
    if item.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"Adapter folder not found: {item!r}.")
    spec, _, revision = item.partition("@")
    parts = spec.strip("/").split("/")
    repo_id = "/".join(parts[:2])
    if not REPO_ID_PATTERN.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ValueError(
            f"{item!r} is neither an existing folder nor a Hub repo id like 'owner/name[/subfolder][@rev]'."
        )
    return [AdapterSource(repo_id=repo_id, subfolder="/".join(parts[2:]) or None, revision=revision or None)]


def _collection_sources(slug: str, api) -> list[AdapterSource]:
    collection = api.get_collection(slug)
    models = sorted((i for i in collection.items if i.item_type == "model"), key=lambda i: i.position)
    skipped = [f"{i.item_type}:{i.item_id}" for i in collection.items if i.item_type != "model"]
    if skipped:
        logger.info("Collection %r: skipping non-model items %s.", slug, skipped)
    if not models:
        raise ValueError(f"Collection {slug!r} holds no model repos (items: {skipped}).")
    return [AdapterSource(repo_id=item.item_id) for item in models]


def _resolve(source: AdapterSource, api, token: str | bool | None) -> _Resolved:
    """Fetch (or find) the adapter's config and weights file, without loading anything into a model."""
    if source.path is not None:
        folder = os.path.abspath(os.path.expanduser(source.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Adapter folder not found: {source.path!r}.")
        config_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise UnsupportedAdapterError(f"{source.path!r} is not a PEFT adapter: it has no {ADAPTER_CONFIG_NAME}.")
        weights = next(
            (os.path.join(folder, w) for w in WEIGHTS_NAMES if os.path.isfile(os.path.join(folder, w))), None
        )
        record: dict[str, Any] = {"path": folder}
    else:
        try:
            sha = api.model_info(source.repo_id, revision=source.revision, token=token).sha
        except RevisionNotFoundError as err:
            raise ValueError(f"Revision {source.revision!r} of {source.repo_id!r} does not exist on the Hub.") from err
        except RepositoryNotFoundError as err:
            raise FileNotFoundError(f"Adapter repo {source.repo_id!r} not found on the Hub ({api.endpoint}).") from err

        def fetch(filename: str) -> str | None:
            try:
                return hf_hub_download(source.repo_id, filename, subfolder=source.subfolder, revision=sha, token=token)
            except EntryNotFoundError:
                return None

        config_path = fetch(ADAPTER_CONFIG_NAME)
        if config_path is None:
            raise UnsupportedAdapterError(
                f"{source.describe()!r} is not a PEFT adapter: it has no {ADAPTER_CONFIG_NAME}."
            )
        weights = next((path for path in map(fetch, WEIGHTS_NAMES) if path is not None), None)
        folder = os.path.dirname(config_path)
        record = {"repo_id": source.repo_id, "revision": sha, "subfolder": source.subfolder}
    if weights is None:
        raise UnsupportedAdapterError(
            f"Adapter {source.describe()!r} has no weights file (one of {list(WEIGHTS_NAMES)})."
        )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return _Resolved(source, folder, config, weights, record)


def _tensor_shapes(weights: str) -> dict[str, tuple[int, ...]]:
    if weights.endswith(".safetensors"):
        with safe_open(weights, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    return {
        key: tuple(value.shape) for key, value in torch.load(weights, map_location="meta", weights_only=True).items()
    }


def _module_io(module) -> tuple[int, int] | None:
    """(input size, output size) that a LoRA on `module` must have, or None for module types not checked."""

    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return module.in_channels, module.out_channels
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # transformers' GPT-2 layer
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def _check_adapter(
    resolved: _Resolved, modules: dict[str, Any], model_name: str | None, strict_base_model: bool
) -> None:
    """Refuse anything but a plain LoRA whose modules and shapes fit the model; warn on another base model name."""
    config, where = resolved.config, resolved.source.describe()
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(
            f"Adapter {where!r} is a {config.get('peft_type')!r} adapter; only LoRA is supported."
        )
    for flag, feature in UNMERGEABLE_FLAGS.items():
        # rslora and lora_bias load fine and the update-space types merge them: the merge decides.
        if config.get(flag) and flag not in EXACT_IN_UPDATE_SPACE:
            raise UnsupportedAdapterError(
                f"Adapter {where!r} uses {feature} (`{flag}`); PEFT cannot merge it faithfully."
            )

    if config.get("target_modules"):
        keys = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
        targets = SimpleNamespace(target_parameters=None, **{k: config.get(k) for k in keys})
        if not any(check_target_module_exists(targets, name) for name in modules if name):
            raise ValueError(
                f"Adapter {where!r} targets {config['target_modules']!r}, which match no module of the base model."
            )
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _tensor_shapes(resolved.weights).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(f"Adapter {where!r} holds a tensor {key!r} that is not a plain LoRA weight.")
        module_name, kind = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        pairs.setdefault(module_name, {})[kind[-1]] = shape
    if not pairs:
        raise UnsupportedAdapterError(f"Adapter {where!r} holds no LoRA weights.")
    missing = sorted(name for name in pairs if name not in modules)
    if missing:
        raise ValueError(f"Adapter {where!r} adapts modules the base model does not have, e.g. {missing[:3]}.")
    for module_name, shapes in pairs.items():
        if set(shapes) != {"A", "B"}:
            raise ValueError(f"Adapter {where!r}: module {module_name!r} lacks its LoRA A or B weight.")
        # A is (r, in, ...) and B is (out, r, ...) for Linear, Embedding, Conv and GPT-2's Conv1D alike.
        a, b = shapes["A"], shapes["B"]
        io = _module_io(modules[module_name])
        if a[0] != b[1] or (io is not None and (a[1], b[0]) != tuple(io)):
            raise ValueError(
                f"Adapter {where!r} does not fit module {module_name!r}: LoRA shapes A{list(a)} B{list(b)}, module "
                f"(in, out) = {io}. Was it trained for another base model?"
            )
    adapter_base = config.get("base_model_name_or_path")
    if adapter_base and model_name and adapter_base.rstrip("/") != model_name.rstrip("/"):
        message = (
            f"Adapter {where!r} was trained on base model {adapter_base!r}, but the model was loaded as {model_name!r}. "
            "Names are unreliable when a model is loaded from a local path; the shapes fit."
        )
        if strict_base_model:
            raise ValueError(message + " (`strict_base_model=True`)")
        warnings.warn(message + " Pass `strict_base_model=True` to make this an error.", D2CWarning, stacklevel=3)


def _assign_names(resolved: list[_Resolved], names: Sequence[str] | Mapping[str, str] | None, model, taken: set[str]):
    reserved = reserved_adapter_names(model)
    if names is not None and not isinstance(names, Mapping):
        if isinstance(names, str) or len(names) != len(resolved):
            raise ValueError(f"`names` must give one name per adapter ({len(resolved)}), got {names!r}.")
    for i, item in enumerate(resolved):
        explicit = item.source.name
        if isinstance(names, Mapping):
            explicit = names.get(item.source.describe(), names.get(item.source.repo_id or "", explicit))
        elif names is not None:
            explicit = names[i]
        if explicit is not None:
            check_adapter_name(explicit, taken=taken, reserved=reserved)
            item.name = explicit
        else:
            base = item.source.default_name()
            base = f"{base}_adapter" if base in reserved else base
            name, k = base, 2
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            item.name = name
        taken.add(item.name)


def load_adapters(
    base_model,
    sources: Any,
    *,
    names: Sequence[str] | Mapping[str, str] | None = None,
    strict_base_model: bool = False,
    token: str | bool | None = None,
):
    """Load many LoRA adapters into one `PeftModel`: local folders, Hub repos or the model repos of a collection.

    Every source is checked before any is loaded (a plain LoRA, target modules present in the model, tensor shapes
    that fit), so a bad source leaves the model untouched. Hub sources are pinned to the commit they resolve to.

    Args:
        base_model (`PreTrainedModel` or `PeftModel`):
            The base model; a `PeftModel` gets the new adapters added next to its own.
        sources (`str`, `dict`, `AdapterSource` or a list of them):
            Each is a local adapter folder, a Hub repo id (`"owner/name"`, `"owner/name/subfolder"`, optionally
            `"...@revision"`), a collection slug (`"owner/title-<24 hex id>"`, its model items are loaded in order)
            or a dict with `path` or `repo_id` (+ `revision`, `subfolder`, `name`), or `collection`.
        names (`Sequence[str]` or `Mapping[str, str]`, *optional*):
            Adapter names, one per resolved adapter in order, or a mapping from source (repo id or path) to name.
            Defaults to the repo, subfolder or folder name made safe (no `.`), unique and clear of model attribute
            names such as `train`.
        strict_base_model (`bool`, defaults to `False`):
            Raise instead of warning when an adapter's `base_model_name_or_path` differs from the model's name.
        token (`str` or `bool`, *optional*):
            Hub token for private repos (never logged or stored).

    Returns:
        `PeftModel`: in eval mode, with the adapters loaded (the first one active) and `d2c_adapter_sources` set to
        `{name: {"path": ...} | {"repo_id": ..., "revision": <commit sha>, "subfolder": ...}}`.

    Raises:
        UnsupportedAdapterError: If a source is not a plain LoRA (no adapter config, another PEFT type, DoRA, rslora,
            lora_bias or another variant).
        ValueError: If target modules or shapes do not fit the model, a name is invalid, or the base model name
            differs with `strict_base_model=True`.
        FileNotFoundError: If a folder or Hub repo does not exist.

    Example:
        ```python
        >>> from peft_d2c.hub import load_adapters
        >>> model = load_adapters(base, ["my-org/lora-capital", "my-org/lora-plural@v1", "./lora-sentiment"])
        >>> sorted(model.peft_config)  # doctest: +SKIP
        ['lora-capital', 'lora-plural', 'lora-sentiment']
        ```
    """
    api = hub_api(token)
    items = sources if isinstance(sources, (list, tuple)) else [sources]
    parsed = [source for item in items for source in _parse_source(item, api)]
    if not parsed:
        raise ValueError("`sources` is empty; give at least one adapter.")
    is_peft = isinstance(base_model, PeftModel)
    model = base_model.get_base_model() if is_peft else base_model
    modules = dict(model.named_modules())
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    resolved = [_resolve(source, api, token) for source in parsed]
    for item in resolved:
        _check_adapter(item, modules, model_name, strict_base_model)
    _assign_names(resolved, names, base_model, set(base_model.peft_config) if is_peft else set())

    peft_model = base_model if is_peft else None
    loaded: list[str] = []
    try:
        for item in resolved:
            logger.info("Loading adapter %r from %s", item.name, item.source.describe())
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base_model, item.local_dir, adapter_name=item.name)
            else:
                peft_model.load_adapter(item.local_dir, adapter_name=item.name)
            loaded.append(item.name)
    except BaseException:
        if peft_model is not None and not is_peft:
            peft_model.unload()
        elif peft_model is not None:
            for name in loaded:
                peft_model.delete_adapter(name)
        raise
    previous = dict(getattr(peft_model, "d2c_adapter_sources", {}) or {})
    peft_model.d2c_adapter_sources = {**previous, **{item.name: item.record for item in resolved}}
    return peft_model.eval()
