"""A D2C collection back from a folder or the Hub, with the router that serves each task with its merged adapter.

`load_d2c_collection` reads the routing table (and, for `layout="repos"`, `d2c_hub.json`) from one commit and loads
every merged adapter with `load_adapters`; `D2CRouter` switches to the adapter of a task, or routes a prompt without
a task label with the collection's prompt router (`peft_d2c.engine.serving.prompt_router`). May import
`peft_d2c.io`, `peft_d2c.errors`, `peft_d2c.engine` and the other `hub` modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from ..engine.merge.task_cores import add_task_adapters, load_task_cores, serving_routing
from ..engine.runtime.state import ModelState
from ..engine.serving.prompt_router import (
    ROUTER_CONFIG_NAME,
    ROUTER_WEIGHTS_NAME,
    PromptRouter,
    Route,
    generate_routed,
    route_prompts,
)
from ..io import RESULT_NAME, ROUTING_NAME, TASK_CORES_NAME, read_json
from .adapters import AdapterSource, hub_api, load_adapters
from .push import HUB_NAME


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

    def __init__(self, model, routing: Mapping[str, str], prompt_router: PromptRouter | None = None):
        unknown = sorted({name for name in routing.values() if name not in model.peft_config})
        if unknown:
            raise ValueError(
                f"The routing names adapters {unknown} that are not loaded; loaded: {sorted(model.peft_config)}."
            )
        self.model = model
        self.routing = dict(routing)
        self.prompt_router = prompt_router

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

    def route(self, prompts: str | Sequence[str], tokenizer, *, fallback: str = "nearest") -> Route | list[Route]:
        """Which adapter should answer each prompt that carries no task label (see `D2CResult.route`).

        Raises:
            ValueError: If the collection was saved without a prompt router.
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        routes = route_prompts(self.model, tokenizer, self._prompt_router(), self.routing, batch, fallback=fallback)
        return routes[0] if isinstance(prompts, str) else routes

    def generate(self, prompt: str, tokenizer, *, fallback: str = "nearest", **kwargs) -> tuple[str, Route]:
        """Route `prompt` and answer it with the chosen adapter (see `D2CResult.generate`)."""
        return generate_routed(
            self.model, tokenizer, self._prompt_router(), self.routing, prompt, fallback=fallback, **kwargs
        )

    def _prompt_router(self) -> PromptRouter:
        if self.prompt_router is None:
            raise ValueError(
                "This collection has no prompt router (saved before peft-d2c had one, or with `fit_router=False`); fit "
                "one with `peft_d2c.engine.serving.prompt_router.fit_prompt_router` on the tasks' few-shot prompts."
            )
        return self.prompt_router

    def _activate(self, name: str) -> None:
        state = ModelState.capture(self.model)
        self.model.set_adapter(name)
        state.restore_requires_grad(self.model)


def _download_json(repo_id: str, filename: str, revision: str, token) -> Any | None:

    try:
        return read_json(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except EntryNotFoundError:
        return None


def _hub_router(repo_id: str, sha: str, token) -> PromptRouter | None:
    """The prompt router of a pushed collection, when its `d2c_result.json` lists the router's files."""
    if ROUTER_CONFIG_NAME not in (_download_json(repo_id, RESULT_NAME, sha, token) or {}).get("files", []):
        return None
    for filename in (ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME):
        path = hf_hub_download(repo_id, filename, revision=sha, token=token)
    return PromptRouter.from_pretrained(os.path.dirname(path))


def _collection_plan(target: str | Sequence[str], api, token, revision: str | None):
    """(sources, names, routing, prompt router or None) of a saved or pushed D2C collection."""

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
        first = sources[0]
        return sources, names, routing, _hub_router(first.repo_id, first.revision, token)
    target = os.fspath(target)
    if os.path.isdir(target):
        routing_path = os.path.join(target, ROUTING_NAME)
        if not os.path.isfile(routing_path):
            raise FileNotFoundError(f"{target!r} is not a D2C result folder: it has no {ROUTING_NAME}.")
        routing = read_json(routing_path)
        result_path = os.path.join(target, RESULT_NAME)
        saved = read_json(result_path) if os.path.isfile(result_path) else {}
        names = saved.get("merged_adapter_names") or sorted(set(routing.values()))
        router = PromptRouter.from_pretrained(target) if ROUTER_CONFIG_NAME in saved.get("files", []) else None
        return [AdapterSource(path=os.path.join(target, n)) for n in names], names, routing, router
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
        return _collection_plan(list(hub["repos"].values()), api, token, revision)
    hub = _download_json(target, HUB_NAME, sha, token) or {}
    if hub.get("layout") == "repos":
        return _collection_plan(list(hub["repos"].values()), api, token, revision)
    routing = _download_json(target, ROUTING_NAME, sha, token)
    if routing is None:
        raise FileNotFoundError(f"{target!r} is not a D2C collection: it has no {ROUTING_NAME}.")
    names = hub.get("adapters") or sorted(set(routing.values()))
    sources = [AdapterSource(repo_id=target, revision=sha, subfolder=n) for n in names]
    return sources, list(names), routing, _hub_router(target, sha, token)


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
    api = hub_api(token)
    sources, names, routing, prompt_router = _collection_plan(repo_id_or_path, api, token, revision)
    model = load_adapters(base_model, sources, names=names, strict_base_model=strict_base_model, token=token)
    cores, task_adapters = _saved_task_cores(repo_id_or_path, sources, token)
    if task_adapters:  # every task is served by its own adapter, built from its cluster's merged adapter and core
        add_task_adapters(model, cores, task_adapters, routing)
        routing = serving_routing(routing, task_adapters)
    return model, D2CRouter(model, routing, prompt_router)


def _saved_task_cores(target, sources: Sequence[AdapterSource], token) -> tuple[dict, dict[str, str]]:
    """(task cores, task -> task adapter name) of a collection saved or pushed with `merge.task_cores` (both empty
    otherwise): from the folder, or from the commit of the first adapter's repo (every repo of `layout="repos"` holds
    the result's files)."""
    first = sources[0]
    if first.path is not None:
        folder = os.fspath(target)
        result_path = os.path.join(folder, RESULT_NAME)
        saved = read_json(result_path) if os.path.isfile(result_path) else {}
        cores_path = os.path.join(folder, TASK_CORES_NAME)
    else:
        saved = _download_json(first.repo_id, RESULT_NAME, first.revision, token) or {}
        cores_path = None
    if TASK_CORES_NAME not in saved.get("files", []) or not saved.get("task_adapters"):
        return {}, {}
    if cores_path is None:
        cores_path = hf_hub_download(first.repo_id, TASK_CORES_NAME, revision=first.revision, token=token)
    return load_task_cores(cores_path), dict(saved["task_adapters"])
