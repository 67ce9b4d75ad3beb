"""Hugging Face Hub integration: adapters in (folders, repos, collections), D2C results out (one commit per repo,
with model cards), and the on-device router over a pushed collection.

Everything goes through `huggingface_hub` (`HfApi`, `hf_hub_download`, `ModelCard`); set `HF_ENDPOINT` to use
another Hub. Tokens are passed through to the client only: never logged, written to disk or put in a card.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .config import CONFIG_NAME
from .errors import D2CWarning, UnsupportedAdapterError
from .result import RESULT_NAME, ROUTING_NAME

__all__ = [
    "AdapterSource",
    "D2CPushError",
    "D2CPushResult",
    "D2CRouter",
    "build_adapter_card",
    "build_collection_card",
    "load_adapters",
    "load_d2c_collection",
    "push_d2c_folder",
]

logger = logging.getLogger(__name__)

HUB_NAME = "d2c_hub.json"  # layout of a pushed collection: {"layout", "base_model", "adapters" | "repos"}
ADAPTER_CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
LAYOUTS = ("subfolders", "repos")
CARD_TAGS = ["peft", "lora", "d2c", "merge"]
PAPER_TITLE = "Data-driven Clustering and Merging of Adapters for On-device Large Language Models"
PAPER_URL = "https://arxiv.org/abs/2601.17441"
CITATION = """@inproceedings{bohdal2026d2c,
  title         = {Data-driven Clustering and Merging of Adapters for On-device Large Language Models},
  author        = {Bohdal, Ondrej and Ceritli, Taha and Ozay, Mete and Moon, Jijoong and Lee, Kyeng-Hun and
                   Ko, Hyeonmok and Michieli, Umberto},
  booktitle     = {IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year          = {2026},
  eprint        = {2601.17441},
  archivePrefix = {arXiv}
}"""
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_COLLECTION = re.compile(r"^(?:https?://[^/]+/)?(?:collections/)?([^/@\s]+/[^/@\s]+-[0-9a-f]{24})/?$")
_LORA_KEY = re.compile(
    r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$|^base_model\.model\.(.+)\.(lora_embedding_[AB])$"
)


class D2CPushError(RuntimeError):
    """A push to the Hub failed. `written_repos` lists the repos that were committed before the failure."""

    def __init__(self, message: str, written_repos: Sequence[str] = ()):
        super().__init__(message)
        self.written_repos = list(written_repos)


# ------------------------------------------------------------------------------------------------ adapters in


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


def _hub_api(token: str | bool | None):
    from huggingface_hub import HfApi

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
    if item.startswith(("/", "./", "../", "~")) or os.sep in item and not item.count("/"):
        raise FileNotFoundError(f"Adapter folder not found: {item!r}.")
    spec, _, revision = item.partition("@")
    parts = spec.strip("/").split("/")
    repo_id = "/".join(parts[:2])
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
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
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

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
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    import torch

    return {
        key: tuple(value.shape) for key, value in torch.load(weights, map_location="meta", weights_only=True).items()
    }


def _module_io(module) -> tuple[int, int] | None:
    """(input size, output size) that a LoRA on `module` must have, or None for module types not checked."""
    import torch

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
    from .merging import _UNMERGEABLE_FLAGS

    config, where = resolved.config, resolved.source.describe()
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(
            f"Adapter {where!r} is a {config.get('peft_type')!r} adapter; only LoRA is supported."
        )
    for flag, feature in _UNMERGEABLE_FLAGS.items():
        if config.get(flag):
            raise UnsupportedAdapterError(
                f"Adapter {where!r} uses {feature} (`{flag}`); PEFT cannot merge it faithfully."
            )
    from peft.tuners.tuners_utils import check_target_module_exists

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


def _reserved_names(model) -> set[str]:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    names = set(dir(torch.nn.ModuleDict())) | set(dir(PeftModel)) | set(dir(LoraModel)) | set(dir(model))
    return names | {name for name, _ in model.named_children()}


def _assign_names(resolved: list[_Resolved], names: Sequence[str] | Mapping[str, str] | None, model, taken: set[str]):
    reserved = _reserved_names(model)
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
            if not isinstance(explicit, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", explicit):
                raise ValueError(
                    f"Adapter name {explicit!r} must start with a letter and hold only letters, digits, '_' and '-' "
                    "(PEFT breaks on '.')."
                )
            if explicit in reserved:
                raise ValueError(f"Adapter name {explicit!r} clashes with a model attribute; choose another name.")
            if explicit in taken:
                raise ValueError(f"Adapter name {explicit!r} is used twice or already loaded; names must be unique.")
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
    from peft import PeftModel

    api = _hub_api(token)
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


# ---------------------------------------------------------------------------------------------- routing on device


class D2CRouter:
    """Activates the merged adapter that serves a task: the on-device deployment step of D2C.

    Switching keeps every parameter's `requires_grad` as it was (PEFT's `set_adapter` would make the adapter
    trainable).

    Args:
        model (`PeftModel`): A model holding the merged adapters.
        routing (`Mapping[str, str]`): Task -> merged adapter name.

    Example:
        ```python
        >>> model, router = load_d2c_collection(base, "my-org/word-tasks-d2c")
        >>> with router.task("capital"):
        ...     out = model.generate(**inputs)
        ```
    """

    def __init__(self, model, routing: Mapping[str, str]):
        unknown = sorted({name for name in routing.values() if name not in model.peft_config})
        if unknown:
            raise ValueError(
                f"The routing names adapters {unknown} that are not loaded; loaded: {sorted(model.peft_config)}."
            )
        self.model = model
        self.routing = dict(routing)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.routing)

    @property
    def adapters(self) -> list[str]:
        return sorted(set(self.routing.values()))

    def __contains__(self, task: object) -> bool:
        return task in self.routing

    def __len__(self) -> int:
        return len(self.routing)

    def __repr__(self) -> str:
        return f"D2CRouter({len(self.routing)} tasks -> {len(self.adapters)} adapters)"

    def adapter_for(self, task: str) -> str:
        """Name of the merged adapter serving `task`.

        Raises:
            KeyError: If `task` is unknown; the message lists the known tasks.
        """
        if task not in self.routing:
            raise KeyError(f"Unknown task {task!r}; known tasks: {self.tasks}.")
        return self.routing[task]

    def adapter_names_for(self, tasks: Sequence[str]) -> list[str]:
        """One adapter name per task, for a mixed batch: `model(**batch, adapter_names=router.adapter_names_for(t))`."""
        return [self.adapter_for(task) for task in tasks]

    def set_task(self, task: str) -> str:
        """Activate the adapter serving `task` and return its name."""
        name = self.adapter_for(task)
        self._activate(name)
        return name

    @contextmanager
    def task(self, task: str) -> Iterator[str]:
        """Context manager: activate the adapter serving `task`, restore the previously active adapter on exit."""
        previous = self.model.active_adapter
        name = self.set_task(task)
        try:
            yield name
        finally:
            self._activate(previous)

    def _activate(self, name: str) -> None:
        flags = {param_name: p.requires_grad for param_name, p in self.model.named_parameters()}
        self.model.set_adapter(name)
        for param_name, p in self.model.named_parameters():
            p.requires_grad_(flags.get(param_name, False))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _download_json(repo_id: str, filename: str, revision: str, token) -> Any | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return _read_json(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except EntryNotFoundError:
        return None


def _collection_plan(target: str | Sequence[str], api, token, revision: str | None):
    """(sources, names, routing) of a saved or pushed D2C collection."""
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(target, (list, tuple)):  # `layout="repos"`: one repo per merged adapter
        sources, names, routing = [], [], {}
        for repo_id in target:
            sha = api.model_info(repo_id, revision=revision).sha
            hub = _download_json(repo_id, HUB_NAME, sha, token) or {}
            name = next((n for n, r in hub.get("repos", {}).items() if r == repo_id), None)
            if name is None:
                raise ValueError(f"{repo_id!r} is not a repo of a D2C collection pushed with `layout='repos'`.")
            sources.append(AdapterSource(repo_id=repo_id, revision=sha))
            names.append(name)
            routing.update(
                {t: a for t, a in (_download_json(repo_id, ROUTING_NAME, sha, token) or {}).items() if a == name}
            )
        return sources, names, routing
    target = os.fspath(target)
    if os.path.isdir(target):
        routing_path = os.path.join(target, ROUTING_NAME)
        if not os.path.isfile(routing_path):
            raise FileNotFoundError(f"{target!r} is not a D2C result folder: it has no {ROUTING_NAME}.")
        routing = _read_json(routing_path)
        result_path = os.path.join(target, RESULT_NAME)
        names = _read_json(result_path).get("merged_adapter_names") if os.path.isfile(result_path) else None
        names = names or sorted(set(routing.values()))
        return [AdapterSource(path=os.path.join(target, n)) for n in names], names, routing
    try:
        sha = api.model_info(target, revision=revision).sha
    except RepositoryNotFoundError:
        first = f"{target}-cluster-0"  # the base id of a collection pushed with `layout="repos"`
        try:
            sha = api.model_info(first, revision=revision).sha
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"Neither {target!r} nor {first!r} exists on the Hub ({api.endpoint}).") from None
        hub = _download_json(first, HUB_NAME, sha, token) or {}
        if hub.get("layout") != "repos":
            raise ValueError(
                f"{first!r} is not part of a D2C collection (no {HUB_NAME} with layout 'repos')."
            ) from None
        return _collection_plan(list(hub["repos"].values()), api, token, None)
    hub = _download_json(target, HUB_NAME, sha, token) or {}
    if hub.get("layout") == "repos":
        return _collection_plan(list(hub["repos"].values()), api, token, None)
    routing = _download_json(target, ROUTING_NAME, sha, token)
    if routing is None:
        raise FileNotFoundError(f"{target!r} is not a D2C collection: it has no {ROUTING_NAME}.")
    names = hub.get("adapters") or sorted(set(routing.values()))
    return [AdapterSource(repo_id=target, revision=sha, subfolder=n) for n in names], list(names), routing


def load_d2c_collection(
    base_model,
    repo_id_or_path: str | os.PathLike | Sequence[str],
    *,
    token: str | bool | None = None,
    revision: str | None = None,
    strict_base_model: bool = False,
):
    """Load every merged adapter of a D2C collection and a router that picks the right one per task.

    Args:
        base_model (`PreTrainedModel`): The base model the collection was made for.
        repo_id_or_path (`str`, `os.PathLike` or `list[str]`):
            A folder written by `D2CResult.save_pretrained`, a Hub repo pushed with `layout="subfolders"`, or for
            `layout="repos"` the list of cluster repos or the `repo_id` given to the push (its `-cluster-{i}` repos
            are found through `d2c_hub.json`).
        token (`str` or `bool`, *optional*): Hub token for private repos.
        revision (`str`, *optional*): Branch, tag or commit of the Hub repo (all files come from that one commit).
        strict_base_model (`bool`, defaults to `False`): See `load_adapters`.

    Returns:
        `tuple[PeftModel, D2CRouter]`: the model (eval mode) with all merged adapters, and the router.

    Raises:
        FileNotFoundError: If the folder or repo does not exist or holds no routing table.
        ValueError: If the routing names an adapter that is not part of the collection.

    Example:
        ```python
        >>> from peft_d2c.hub import load_d2c_collection
        >>> model, router = load_d2c_collection(base, "my-org/word-tasks-d2c")
        >>> router.set_task("capital")  # doctest: +SKIP
        'd2c_0'
        ```
    """
    api = _hub_api(token)
    sources, names, routing = _collection_plan(repo_id_or_path, api, token, revision)
    model = load_adapters(base_model, sources, names=names, strict_base_model=strict_base_model, token=token)
    return model, D2CRouter(model, routing)


# --------------------------------------------------------------------------------------------------- results out


@dataclass
class D2CPushResult:
    """What `push_d2c_folder` wrote: one entry per repo, in cluster order for `layout="repos"`."""

    layout: str
    repo_ids: list[str]
    commit_urls: list[str]
    commit_oids: list[str]
    created: list[str] = field(default_factory=list)  # repos that did not exist before the push


def _read_result_folder(folder: str) -> dict[str, Any]:
    """Load and check a folder written by `D2CResult.save_pretrained`."""
    for filename in (ROUTING_NAME, RESULT_NAME, CONFIG_NAME):
        if not os.path.isfile(os.path.join(folder, filename)):
            raise FileNotFoundError(f"{folder!r} is not a saved D2C result: {filename} is missing.")
    result = _read_json(os.path.join(folder, RESULT_NAME))
    routing = _read_json(os.path.join(folder, ROUTING_NAME))
    names = result.get("merged_adapter_names") or sorted(set(routing.values()))
    for name in names:
        files = os.listdir(os.path.join(folder, name)) if os.path.isdir(os.path.join(folder, name)) else []
        if ADAPTER_CONFIG_NAME not in files or not any(w in files for w in WEIGHTS_NAMES):
            raise FileNotFoundError(f"Merged adapter {name!r} is missing from {folder!r} (no config or weights).")
    return {
        "result": result,
        "routing": routing,
        "config": _read_json(os.path.join(folder, CONFIG_NAME)),
        "names": names,
    }


def _is_hub_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(_REPO_ID.match(value))
        and "--" not in value
        and ".." not in value
        and not os.path.exists(value)
        and value not in ("json", "csv", "parquet", "text")
        and not value.lower().endswith(tuple(FILE_SUFFIXES))
    )


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


def _base_model_id(recorded: str | None, base_model_id: str | None) -> str:
    if base_model_id is not None:
        if not _is_hub_id(base_model_id) and not _REPO_ID.match(str(base_model_id)):
            raise ValueError(f"`base_model_id` must be a Hub model id like 'owner/name', got {base_model_id!r}.")
        return base_model_id
    if _is_hub_id(recorded):
        return recorded  # type: ignore[return-value]
    raise ValueError(
        f"The base model was loaded from {recorded!r}, which is not a Hub id; pass `base_model_id=` (e.g. "
        "'HuggingFaceTB/SmolLM2-135M-Instruct') so the model cards and adapter configs name the right base model."
    )


def _eval_results(tasks: Sequence[str], data: dict[str, Any], served_by: Mapping[str, str] | None = None) -> list:
    from huggingface_hub import EvalResult

    losses, heldout = data["result"].get("task_losses", {}), data["result"].get("heldout_scores") or {}
    sources = data["result"].get("data_sources") or {}
    out = []
    for task in tasks:
        source = sources.get(task) or {}
        common = {
            "task_type": "text-generation",
            "task_name": f"{task} (via {served_by[task]})" if served_by else task,
            "dataset_type": str(source.get("path") or task),
            "dataset_name": task,
            "dataset_config": source.get("name"),
            "dataset_split": source.get("split"),
        }
        if task in losses:
            out.append(
                EvalResult(
                    **common,
                    metric_type="loss",
                    metric_name="few-shot loss",
                    metric_value=round(float(losses[task]), 6),
                )
            )
        if task in heldout:
            out.append(
                EvalResult(
                    **common,
                    metric_type="score",
                    metric_name="held-out score",
                    metric_value=round(float(heldout[task]), 6),
                )
            )
    return out


def _card_data(model_name: str, base: str, tasks: Sequence[str], data: dict[str, Any], served_by=None):
    from huggingface_hub import ModelCardData

    sources = data["result"].get("data_sources") or {}
    datasets = sorted({s["path"] for t, s in sources.items() if t in tasks and s and _is_hub_id(s.get("path"))})
    return ModelCardData(
        model_name=model_name,
        library_name="peft",
        base_model=base,
        base_model_relation="adapter",
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        datasets=datasets or None,
        eval_results=_eval_results(tasks, data, served_by) or None,
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _source_text(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "unknown"
    if record.get("repo_id"):
        sub = f" (`{record['subfolder']}`)" if record.get("subfolder") else ""
        rev = f" @ `{str(record['revision'])[:10]}`" if record.get("revision") else ""
        return f"[`{record['repo_id']}`](https://huggingface.co/{record['repo_id']}){sub}{rev}"
    return f"local folder `{os.path.basename(str(record.get('path', '')).rstrip('/'))}`"


def _method_section(data: dict[str, Any]) -> str:
    result, config = data["result"], data["config"]
    n, k = result.get("num_adapters", len(data["routing"])), result.get("num_clusters", len(data["names"]))
    budget = config.get("storage_budget")
    budget_text = f"storage budget {budget:.1%} of the source adapters, " if budget else ""
    density = result.get("density", config.get("density"))
    lines = [
        f"- **Clustering**: `{result.get('method', config.get('method'))}` "
        f"(start `{config.get('init')}`, {config.get('num_iterations')} proposed moves, "
        f"{config.get('examples_per_task')} few-shot examples per task, seed {config.get('seed')}).",
        f"- **Merge**: PEFT `add_weighted_adapter`, `combination_type={result.get('combination_type', config.get('combination_type'))!r}`"
        + (f", `density={density}`" if density is not None else "")
        + ".",
        f"- **Storage**: {budget_text}{k} merged adapters stored instead of {n} ({k / max(n, 1):.1%}).",
    ]
    return "\n".join(lines)


def _routing_section(data: dict[str, Any], repos: Mapping[str, str] | None = None) -> str:
    rows = []
    for task, name in sorted(data["routing"].items()):
        where = f"`{repos[name]}`" if repos else f"`{name}/`"
        rows.append((f"`{task}`", f"`{name}`", where))
    return _table(["task", "merged adapter", "location"], rows)


def _citation_section() -> str:
    return f"## Citation\n\nD2C is the method of [{PAPER_TITLE}]({PAPER_URL}) (ICASSP 2026):\n\n```bibtex\n{CITATION}\n```\n"


def build_adapter_card(
    data: dict[str, Any], name: str, *, repo_id: str, base_model_id: str, subfolder: str | None, repos=None
):
    """The `ModelCard` of one merged adapter (`data` as returned by the folder reader of `push_d2c_folder`)."""
    from huggingface_hub import ModelCard

    result = data["result"]
    index = data["names"].index(name)
    members = (result.get("clusters") or [[t for t, a in data["routing"].items() if a == name]])[index]
    served = sorted(t for t, a in data["routing"].items() if a == name)
    sources, losses = result.get("sources") or {}, result.get("task_losses") or {}
    heldout = result.get("heldout_scores") or {}
    rows = [
        (f"`{m}`", _source_text(sources.get(m)), f"{losses[m]:.4f}" if m in losses else "–",
         f"{heldout[m]:.4f}" if m in heldout else "–")
        for m in members
    ]  # fmt: skip
    sub_arg = f', subfolder="{subfolder}"' if subfolder else ""
    body = f"""
# {name}: a D2C multi-task LoRA adapter for `{base_model_id}`

This is a LoRA adapter for [`{base_model_id}`](https://huggingface.co/{base_model_id}), made by merging
{len(members)} single-task LoRA adapter(s) with [D2C]({PAPER_URL}): the source adapters were clustered using a few
examples per task, and the adapters of each cluster merged into one. It is cluster {index + 1} of
{len(data["names"])} of the collection `{repo_id}` and serves the tasks {", ".join(f"`{t}`" for t in served)}.

## Merged source adapters

{_table(["task (source adapter)", "source", "few-shot loss", "held-out score"], rows)}

The few-shot loss is the mean token cross-entropy of each task's completions under this merged adapter.

## How it was made

{_method_section(data)}

## Routing of the whole collection

{_routing_section(data, repos)}

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model_id}"), "{repo_id}"{sub_arg})
```

{_citation_section()}"""
    card_data = _card_data(f"{repo_id}/{name}" if subfolder else repo_id, base_model_id, members, data)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def build_collection_card(data: dict[str, Any], *, repo_id: str, base_model_id: str):
    """The repo-level `ModelCard` of a collection pushed with `layout="subfolders"`."""
    from huggingface_hub import ModelCard

    result, routing = data["result"], data["routing"]
    clusters = result.get("clusters") or [[t for t, a in routing.items() if a == n] for n in data["names"]]
    rows = [
        (f"[`{n}`](./{n})", ", ".join(f"`{t}`" for t in members))
        for n, members in zip(data["names"], clusters, strict=True)
    ]
    body = f"""
# D2C adapter collection for `{base_model_id}`

{len(data["names"])} multi-task LoRA adapters for [`{base_model_id}`](https://huggingface.co/{base_model_id}) that
together serve {len(routing)} tasks, made with [D2C]({PAPER_URL}) from {result.get("num_adapters", len(routing))}
single-task LoRA adapters. D2C clusters the source adapters using a few examples per task and merges each cluster into
one adapter, so a device stores only the merged adapters and activates, per request, the one serving the task.
Each subfolder is a standard PEFT adapter with its own model card.

## Merged adapters

{_table(["merged adapter", "merges the adapters of the tasks"], rows)}

## How it was made

{_method_section(data)}

## Routing (`d2c_routing.json`)

{_routing_section(data)}

## Usage

All adapters with a task router (`pip install peft-d2c`):

```python
from peft_d2c.hub import load_d2c_collection
model, router = load_d2c_collection(AutoModelForCausalLM.from_pretrained("{base_model_id}"), "{repo_id}")
with router.task("{sorted(routing)[0]}"): ...  # runs with the adapter serving this task
```

One adapter with plain PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model_id}"), "{repo_id}", subfolder="{data["names"][0]}")
```

`d2c_config.json` holds the run's configuration and `d2c_result.json` the clusters, losses and sources.

{_citation_section()}"""
    card_data = _card_data(repo_id, base_model_id, sorted(routing), data, served_by=routing)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _stage_adapter(src: str, dst: str, base_model_id: str) -> None:
    os.makedirs(dst, exist_ok=True)
    config = _read_json(os.path.join(src, ADAPTER_CONFIG_NAME))
    config["base_model_name_or_path"] = base_model_id  # PEFT's AutoPeftModel and the Hub read it
    with open(os.path.join(dst, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for weights in WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(src, weights)):
            shutil.copy2(os.path.join(src, weights), os.path.join(dst, weights))


def _stage_metadata(folder: str, dst: str, data: dict[str, Any], base_model_id: str, hub: dict[str, Any]) -> None:
    for filename in (ROUTING_NAME, CONFIG_NAME):
        shutil.copy2(os.path.join(folder, filename), os.path.join(dst, filename))
    result = {**data["result"], "base_model": base_model_id}
    for path, payload in ((RESULT_NAME, result), (HUB_NAME, hub)):
        with open(os.path.join(dst, path), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=True)


def _commit_folder(api, repo_id: str, folder: str, *, private: bool, message: str, description: str):
    """Create `repo_id` if needed and commit the whole `folder` in ONE commit; delete the repo again if this call
    created it and the commit failed. Returns (commit info, created)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    created = False
    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
        created = True
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code != 409:
            raise D2CPushError(f"Could not create the repo {repo_id!r} ({type(err).__name__}: {err}).") from err
    operations = [
        CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"),
                           path_or_fileobj=os.path.join(root, f))
        for root, _, files in os.walk(folder) for f in sorted(files)
    ]  # fmt: skip
    try:
        info = api.create_commit(repo_id, operations, commit_message=message, commit_description=description)
    except Exception as err:
        state = "unchanged"
        if created:
            state = "deleted again (this push had created it)"
            try:
                api.delete_repo(repo_id)
            except Exception as cleanup_err:  # keep the original error; say what is left behind
                state = (
                    f"created by this push but could not be deleted again ({cleanup_err}); it holds no commit of it"
                )
        raise D2CPushError(
            f"Pushing to {repo_id!r} failed ({type(err).__name__}: {err}); the repo is {state}."
        ) from err
    return info, created


def push_d2c_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model_id: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    layout: str = "subfolders",
) -> D2CPushResult:
    """Push a saved D2C result (a folder written by `D2CResult.save_pretrained`) to the Hub with model cards.

    With `layout="subfolders"` (default) everything goes to one repo: a subfolder per merged adapter with its card,
    the repo-level card explaining the collection, `d2c_routing.json`, `d2c_config.json`, `d2c_result.json` and
    `d2c_hub.json`. With `layout="repos"` each merged adapter gets its own repo `{repo_id}-cluster-{i}` (the adapter
    at the root, with its card and the collection's metadata).

    Each repo is written in a single commit (`HfApi.create_commit` with every file, which is what `upload_folder`
    does without `hf_xet`; with `hf_xet` recent `upload_folder` versions may split a folder into several commits), so a
    failed upload leaves the repo unchanged, and a repo this call created is deleted again. With `layout="repos"`
    each repo is atomic but the set is not: repos pushed before a failure stay, and the raised `D2CPushError` lists
    them in `written_repos`. Adapter configs get `base_model_name_or_path=base_model_id`. The token is only passed
    to the Hub client.

    Args:
        folder (`str` or `os.PathLike`): The saved result folder.
        repo_id (`str`): Target repo (`"owner/name"`), or the prefix of the cluster repos for `layout="repos"`.
        base_model_id (`str`, *optional*): Hub id of the base model; required when the result recorded a local path.
        private (`bool`, defaults to `False`): Create new repos as private.
        token (`str` or `bool`, *optional*): Hub token with write access.
        commit_message (`str`, *optional*): Defaults to `"Upload D2C merged adapters"`.
        layout (`str`, defaults to `"subfolders"`): `"subfolders"` or `"repos"`.

    Returns:
        `D2CPushResult`: the repo ids written, their commit urls and ids, and which repos were created.

    Raises:
        ValueError: If `layout` is unknown or the base model has no Hub id.
        FileNotFoundError: If `folder` is not a complete saved D2C result.
        D2CPushError: If an upload failed (the failed repo is unchanged; `written_repos` lists finished repos).

    Example:
        ```python
        >>> result.save_pretrained("d2c_out")
        >>> push_d2c_folder("d2c_out", "my-org/word-tasks-d2c", base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
        ```
    """
    from huggingface_hub.utils import validate_repo_id

    folder = os.fspath(folder)
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {list(LAYOUTS)}, got {layout!r}.")
    validate_repo_id(repo_id)
    data = _read_result_folder(folder)
    base = _base_model_id(data["result"].get("base_model"), base_model_id)
    message = commit_message or "Upload D2C merged adapters"
    api = _hub_api(token)
    plan: list[tuple[str, str]] = []  # (repo id, staged folder)
    with tempfile.TemporaryDirectory(prefix="d2c-push-") as staging:
        if layout == "subfolders":
            hub = {"format_version": 1, "layout": "subfolders", "base_model": base, "adapters": data["names"]}
            for name in data["names"]:
                _stage_adapter(os.path.join(folder, name), os.path.join(staging, name), base)
                card = build_adapter_card(data, name, repo_id=repo_id, base_model_id=base, subfolder=name)
                card.save(os.path.join(staging, name, "README.md"))
            _stage_metadata(folder, staging, data, base, hub)
            build_collection_card(data, repo_id=repo_id, base_model_id=base).save(os.path.join(staging, "README.md"))
            plan.append((repo_id, staging))
        else:
            repos = {name: f"{repo_id}-cluster-{i}" for i, name in enumerate(data["names"])}
            for repo in repos.values():
                validate_repo_id(repo)
            hub = {"format_version": 1, "layout": "repos", "base_model": base, "repos": repos}
            for name, repo in repos.items():
                dst = os.path.join(staging, name)
                _stage_adapter(os.path.join(folder, name), dst, base)
                _stage_metadata(folder, dst, data, base, hub)
                build_adapter_card(data, name, repo_id=repo, base_model_id=base, subfolder=None, repos=repos).save(
                    os.path.join(dst, "README.md")
                )
                plan.append((repo, dst))
        out = D2CPushResult(layout=layout, repo_ids=[], commit_urls=[], commit_oids=[])
        for repo, staged in plan:
            description = f"D2C: {len(data['names'])} merged adapters for {len(data['routing'])} tasks (peft-d2c)."
            try:
                info, created = _commit_folder(
                    api, repo, staged, private=private, message=message, description=description
                )
            except D2CPushError as err:
                done = f" Repos already written: {out.repo_ids}." if out.repo_ids else ""
                raise D2CPushError(f"{err}{done}", written_repos=out.repo_ids) from err.__cause__
            out.repo_ids.append(repo)
            out.commit_urls.append(str(info.commit_url))
            out.commit_oids.append(info.oid)
            if created:
                out.created.append(repo)
            logger.info(
                "Pushed %s to %s", os.path.basename(staged) if layout == "repos" else "the D2C result", info.commit_url
            )
    return out
