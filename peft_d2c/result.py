"""`D2CResult`: the clusters found, the merged adapters, the routing table, and how to save and reload them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .combination_types import DENSITY_TYPES
from .config import CONFIG_NAME, D2CMergeConfig
from .engine.merge.task_cores import load_task_cores, save_task_cores, serving_routing
from .engine.serving.prompt_router import (
    ROUTER_CONFIG_NAME,
    ROUTER_WEIGHTS_NAME,
    PromptRouter,
    Route,
    generate_routed,
    route_prompts,
)
from .export.folder import export_d2c_folder
from .hub.cards import build_result_card
from .hub.push import push_d2c_folder
from .io import (
    RESULT_NAME,
    ROUTING_NAME,
    TASK_CORES_NAME,
    atomic_write_json,
    make_ordinary,
    read_json,
    replace_folder,
    resolve_target,
)
from .online import add_adapter
from .version import __version__ as PEFT_D2C_VERSION

FORMAT_VERSION = 1


@dataclass
class D2CResult:
    """Outcome of `merge_adapters_d2c`, shaped like scikit-learn's fitted attributes.

    Attributes:
        clusters (`list[list[str]]`): Source adapter names of each cluster; cluster i became `merged_adapter_names[i]`.
        assignment (`dict[str, int]`): Cluster index of every source adapter.
        merged_adapter_names (`list[str]`): One PEFT adapter per cluster, added to the model.
        routing (`dict[str, str]`): Task (= source adapter name) -> merged adapter serving it.
        task_losses (`dict[str, float]`): Few-shot loss of each task under its merged adapter.
        history (`list[dict]`): One record per D2C proposal: `iteration, task, source, target, loss_before,
            loss_after, accepted` (empty for the baselines and for K = 1 or K = N).
        config (`D2CMergeConfig`): The configuration of the run (its `search`, `num_iterations` and `init` those the
            search ran).
        initial_clusters (`list[list[str]]`): The start partition of the search.
        base_model (`str`, *optional*): Name or path of the base model.
        sources (`dict[str, dict]`): Where each source adapter came from (`{"path": ...}` or `{"repo_id": ...,
            "revision": ..., "subfolder": ...}`), empty when unknown.
        data_sources (`dict[str, dict]`): Where each task's examples came from, when known.
        heldout_scores (`dict[str, float]`): Held-out exact match of the answer's first word per task, when evaluated.
        heldout_whole_scores (`dict[str, float]`): Held-out exact match of the whole answer per task, when evaluated.
        stats (`dict[str, float]`): Work done: merges, forward passes, cache hits, seconds, the bytes of `regmean`
            layer inputs held (`layer_input_bytes`); `fewshot_loss`, the mean few-shot loss of the final partition;
            and for `method="d2c"` `search_plan`, the search that ran (`engine.search.plan.SearchPlan.to_dict()`).
        model: The `PeftModel` holding the merged adapters (not saved; `None` after `from_pretrained`).
        tokenizer: The base model's tokenizer of the run (not saved), for `route` and `generate`.
        prompt_router (`PromptRouter`, *optional*): Picks the merged adapter for a prompt without a task label
            (`config.fit_router`; saved as `d2c_router.json` + `d2c_router.safetensors`).
        task_adapters (`dict[str, str]`): With `merge.task_cores`, task -> its own adapter in `model` (the merged
            adapter's basis with the task's core, `engine.merge.task_cores`); `task_losses` are then under these.
            Empty without task cores.
        task_cores (`dict[str, dict[str, torch.Tensor]]`): The task cores the task adapters are built from (saved
            as `d2c_task_cores.safetensors`).
    """

    clusters: list[list[str]]
    assignment: dict[str, int]
    merged_adapter_names: list[str]
    routing: dict[str, str]
    task_losses: dict[str, float]
    history: list[dict[str, Any]]
    config: D2CMergeConfig
    initial_clusters: list[list[str]] = field(default_factory=list)
    base_model: str | None = None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    heldout_scores: dict[str, float] = field(default_factory=dict)
    heldout_whole_scores: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    prompt_router: PromptRouter | None = field(default=None, repr=False, compare=False)
    task_adapters: dict[str, str] = field(default_factory=dict)
    task_cores: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    @property
    def serving_routing(self) -> dict[str, str]:
        """Task -> the adapter that answers it: the task's own adapter with task cores (`task_adapters`), else the
        merged adapter of its cluster (`routing`)."""
        return serving_routing(self.routing, self.task_adapters)

    def adapter_for(self, task: str) -> str:
        """Name of the adapter that serves `task`: its cluster's merged adapter, or with task cores its own adapter.

        Raises:
            KeyError: If `task` was not clustered; the message lists the known tasks.
        """
        if task not in self.routing:
            raise KeyError(f"Unknown task {task!r}; known tasks: {sorted(self.routing)}.")
        return self.serving_routing[task]

    def route(self, prompts: str | Sequence[str], *, tokenizer=None, fallback: str = "nearest") -> Route | list[Route]:
        """Which merged adapter should answer each prompt (no task label needed): one `Route` (task, adapter,
        confidence, similarity, known) for a prompt, a list for several. `tokenizer` defaults to the run's;
        `fallback` for a prompt of no known task: `"nearest"` (the nearest task's adapter) or `"base"` (`"__base__"`).
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        routes = route_prompts(*self._serving(tokenizer), self.serving_routing, batch, fallback=fallback)
        return routes[0] if isinstance(prompts, str) else routes

    def generate(self, prompt: str, *, tokenizer=None, fallback: str = "nearest", **kwargs) -> tuple[str, Route]:
        """Route `prompt` and answer it with the chosen merged adapter (greedy; `kwargs` go to `model.generate`,
        e.g. `max_new_tokens`): returns the answer and the `Route` taken."""
        return generate_routed(*self._serving(tokenizer), self.serving_routing, prompt, fallback=fallback, **kwargs)

    def _serving(self, tokenizer) -> tuple[Any, Any, PromptRouter]:
        if self.prompt_router is None or self.model is None or (tokenizer or self.tokenizer) is None:
            raise ValueError(
                "Routing a prompt needs a fitted `prompt_router` (`D2CMergeConfig(fit_router=True)` with a tokenizer), "
                "the model holding the merged adapters and a tokenizer; for a saved result use `load_d2c_collection`."
            )
        return self.model, tokenizer or self.tokenizer, self.prompt_router

    def add_adapter(
        self,
        name: str,
        examples,
        *,
        tokenizer=None,
        score_fn=None,
        source: dict[str, Any] | None = None,
        member_examples=None,
    ) -> dict[str, Any]:
        """Add a new task's adapter to the cluster where its task loss is lowest, without re-running the search.

        For every cluster, the new adapter is merged with the cluster's members and scored on `examples` (one merge
        and one loss per cluster). The best cluster's merged adapter is rebuilt in place with the new member; every
        other merged adapter is left untouched, bit for bit. `clusters`, `assignment`, `routing`, `task_losses` and
        `sources` are updated. The other members' `task_losses` in the receiving cluster keep their recorded values.

        Args:
            name (`str`): The new adapter, already loaded in `self.model` under this name (= its task).
            examples (`Sequence[dict]`): Few-shot `{"prompt", "completion"}` examples of the new task (the first
                `config.scoring.examples_per_task` are used).
            tokenizer (*optional*): The base model's tokenizer; required unless `score_fn` is given.
            score_fn (`Callable`, *optional*): Custom `score_fn(model, adapter_name, task, examples) -> float`.
            source (`dict`, *optional*): Where the adapter came from (`{"path": ...}` or `{"repo_id": ...}`);
                defaults to what `load_adapters` recorded.
            member_examples (`Mapping[str, Sequence[dict]]`, *optional*): Few-shot examples of every clustered
                task; only a data-aware merge (`regmean`) needs them (its merges use every member's layer inputs).

        Returns:
            `dict`: `{"cluster": index, "merged_adapter": name, "losses": [loss under each cluster's merge]}`.

        Raises:
            ValueError: If the result has no model, `name` is already clustered or not loaded, the examples are
                empty, the adapter cannot be merged with the others, or a byte budget would be exceeded.

        Example:
            ```python
            >>> load_adapters(result.model, "./lora-new-task", names=["new_task"])  # doctest: +SKIP
            >>> result.add_adapter("new_task", examples, tokenizer=tokenizer)  # doctest: +SKIP
            {'cluster': 1, 'merged_adapter': 'd2c_1', 'losses': [2.31, 0.87]}
            ```
        """
        return add_adapter(
            self,
            name,
            examples,
            tokenizer=tokenizer,
            score_fn=score_fn,
            source=source,
            member_examples=member_examples,
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model and the adapter weights, as written to `d2c_result.json`."""
        return {
            "format_version": FORMAT_VERSION,
            "peft_d2c_version": PEFT_D2C_VERSION,
            "base_model": self.base_model,
            "num_adapters": len(self.assignment),
            "num_clusters": self.num_clusters,
            "method": self.config.method,
            "combination_type": self.config.combination_type,
            "density": self.config.merge.density if self.config.combination_type in DENSITY_TYPES else None,
            "clusters": self.clusters,
            "initial_clusters": self.initial_clusters,
            "merged_adapter_names": self.merged_adapter_names,
            "routing": self.routing,
            "task_adapters": self.task_adapters,
            "task_losses": self.task_losses,
            "heldout_scores": self.heldout_scores,
            "heldout_whole_scores": self.heldout_whole_scores,
            "sources": self.sources,
            "data_sources": self.data_sources,
            "stats": self.stats,
            "prompt_router": None if self.prompt_router is None else self.prompt_router.stats,
            "history": self.history,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool = True) -> str:
        """Write the merged adapters (PEFT format, one subfolder each), routing, config and results.

        Layout: `dir/<merged name>/adapter_config.json` + `adapter_model.safetensors` per cluster, `d2c_routing.json`,
        `d2c_config.json`, `d2c_result.json`, the prompt router (`d2c_router.json` + `.safetensors`), the task cores
        (`d2c_task_cores.safetensors`, with `merge.task_cores`; `load_d2c_collection` builds the task adapters from
        them) and the model card
        `README.md` a push writes (a README of the user's is kept). Written into a temporary folder next to `dir`,
        then exchanged with `dir` in one atomic step (an interrupted save leaves the previous folder as it was). A
        previous result's files are replaced, any other file is kept; a symlinked `dir` stays one. Files get the
        ordinary modes of new ones under the umask; `dir` keeps its mode.

        Args:
            save_directory (`str` or `os.PathLike`): Output folder (created if needed).
            is_main_process (`bool`, defaults to `True`): Only the main process writes (distributed runs).

        Returns:
            `str`: the output folder.

        Raises:
            ValueError: If the result has no model holding its merged adapters (e.g. it was loaded from disk).

        Example:
            ```python
            >>> result.save_pretrained("d2c_output")  # doctest: +SKIP
            >>> PeftModel.from_pretrained(base, "d2c_output", subfolder="d2c_0")  # doctest: +SKIP
            ```
        """
        save_directory = os.fspath(save_directory)
        if not is_main_process:
            return save_directory
        if self.model is None:
            raise ValueError(
                "This D2CResult holds no model with its merged adapters (it was read from disk); its adapters are "
                "already saved in the folder it was loaded from."
            )
        # A symlinked output folder is written through: staged next to the folder it points at and exchanged there.
        target = resolve_target(save_directory)
        if os.path.exists(target) and not os.path.isdir(target):
            raise FileExistsError(f"{save_directory!r} exists and is not a folder; choose another output folder.")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".d2c-save-", dir=os.path.dirname(target))
        try:
            peft_dir = tempfile.mkdtemp(prefix=".peft-", dir=staging)
            self.model.save_pretrained(peft_dir, selected_adapters=list(self.merged_adapter_names))
            for name in self.merged_adapter_names:
                # PEFT writes the adapter named "default" at the top level and every other one in a subfolder.
                src = peft_dir if name == "default" else os.path.join(peft_dir, name)
                os.makedirs(os.path.join(staging, name))
                for filename in ("adapter_config.json", "adapter_model.safetensors"):
                    os.replace(os.path.join(src, filename), os.path.join(staging, name, filename))
            shutil.rmtree(peft_dir)
            owned = _previous_result_files(target)
            # The model card a push writes, so the folder explains itself; never over a README that is the user's.
            with_card = not os.path.exists(os.path.join(target, CARD_NAME)) or CARD_NAME in owned
            files = _result_files(self) + ([CARD_NAME] if with_card else [])
            atomic_write_json(os.path.join(staging, ROUTING_NAME), self.routing)
            if self.prompt_router is not None:
                self.prompt_router.save_pretrained(staging)
            if self.task_cores:
                save_task_cores(self.task_cores, os.path.join(staging, TASK_CORES_NAME))
            self.config.save_pretrained(staging)
            atomic_write_json(os.path.join(staging, RESULT_NAME), {**self.to_dict(), "files": sorted(files)})
            if with_card:
                location = os.path.basename(os.path.abspath(save_directory))  # the name the user saved to
                card = build_result_card(staging, location=location)
                card.save(os.path.join(staging, CARD_NAME))
            make_ordinary(staging)  # safetensors and mkdtemp write private files and folders
            replace_folder(staging, target, owned=owned)  # the folder's mode: the replaced one's, or umask's
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return save_directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        base_model_id: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        layout: str = "subfolders",
        allow_public: bool = False,
        delete_stale_repos: bool = False,
    ):
        """Save to a temporary folder and push it in one commit per repo with model cards.

        See `peft_d2c.hub.push_d2c_folder` for the arguments, the two layouts and the guarantees on failure
        (`private=None`, the default, creates repos with the visibility the Hub account or organisation defaults to).
        """
        with tempfile.TemporaryDirectory(prefix="d2c-push-") as tmp:
            folder = os.path.join(tmp, "result")
            self.save_pretrained(folder)
            return push_d2c_folder(
                folder,
                repo_id,
                base_model_id=base_model_id,
                private=private,
                token=token,
                commit_message=commit_message,
                layout=layout,
                allow_public=allow_public,
                delete_stale_repos=delete_stale_repos,
            )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> D2CResult:
        """Read a result written by `save_pretrained` (the adapters stay on disk, `model` is `None`).

        Raises:
            FileNotFoundError: If `directory` holds no `d2c_result.json`.
            ValueError: If the file was written by a newer, incompatible format version.
        """
        directory = os.fspath(directory)
        path = os.path.join(directory, RESULT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {RESULT_NAME} in {directory!r}; is it the folder of `save_pretrained`?")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {data['format_version']}, newer than this peft-d2c understands "
                f"({FORMAT_VERSION}); upgrade peft-d2c."
            )
        config = D2CMergeConfig.from_pretrained(os.path.join(directory, CONFIG_NAME))
        clusters = data["clusters"]
        return cls(
            clusters=clusters,
            assignment={name: i for i, members in enumerate(clusters) for name in members},
            merged_adapter_names=data["merged_adapter_names"],
            routing=data["routing"],
            task_losses=data["task_losses"],
            history=data.get("history", []),
            config=config,
            initial_clusters=data.get("initial_clusters", []),
            base_model=data.get("base_model"),
            sources=data.get("sources", {}),
            data_sources=data.get("data_sources", {}),
            heldout_scores=data.get("heldout_scores", {}),
            heldout_whole_scores=data.get("heldout_whole_scores", {}),
            stats=data.get("stats", {}),
            prompt_router=PromptRouter.from_pretrained(directory)
            if ROUTER_CONFIG_NAME in data.get("files", [])
            else None,
            task_adapters=data.get("task_adapters", {}),
            task_cores=load_task_cores(os.path.join(directory, TASK_CORES_NAME))
            if TASK_CORES_NAME in data.get("files", [])
            else {},
        )

    def export(
        self,
        directory: str | os.PathLike,
        *,
        format: str = "gguf",
        base_gguf: str | os.PathLike | None = None,
        base_model_id: str | None = None,
    ) -> dict[str, Any]:
        """Export the merged adapters for deployment: llama.cpp (GGUF), vLLM or PEFT, with a manifest.

        The result is saved to a temporary folder first (`save_pretrained`), then exported from it by
        `peft_d2c.export.export_d2c_folder`, with the in-memory config of the base model (so the export works even
        when the base model's name no longer loads, e.g. an offline Hub id or a moved folder); a result read from
        disk is exported from its folder with that function or `peft-d2c export FOLDER`.

        Args:
            directory (`str` or `os.PathLike`): Output folder of the export.
            format (`str`, *optional*, defaults to `"gguf"`): `"gguf"`, `"vllm"` or `"peft"`.
            base_gguf (`str` or `os.PathLike`, *optional*): The base model's GGUF file (checked against the adapters;
                its sha256 goes into the manifest).
            base_model_id (`str`, *optional*): The base model's name in the manifest and commands.

        Returns:
            `dict`: the manifest (`directory/d2c_export.json`): task -> adapter file, sizes, serving commands.

        Raises:
            ValueError: If the result holds no model (read from disk) or `format` is unknown.
            UnsupportedAdapterError: If a merged adapter cannot be served in `format`; nothing is written then.

        Example:
            ```python
            >>> manifest = result.export("d2c_gguf", format="gguf", base_gguf="SmolLM2-135M-Instruct.Q4_1.gguf")
            >>> manifest["tasks"]["capital_world"]["server_request"]["lora"]  # doctest: +SKIP
            [{'id': 0, 'scale': 1.0}]
            ```
        """
        if self.model is None:
            raise ValueError(
                "This D2CResult holds no model (it was read from disk); export its folder instead: "
                "`peft_d2c.export.export_d2c_folder(folder, directory, format=...)` or `peft-d2c export FOLDER`."
            )
        # The base model's config is in memory: never re-read it by a name that may no longer load.
        base_config = self.model.get_base_model().config
        with tempfile.TemporaryDirectory(prefix="d2c-export-") as tmp:
            folder = self.save_pretrained(os.path.join(tmp, "result"))
            return export_d2c_folder(
                folder,
                directory,
                format=format,
                base_gguf=base_gguf,
                base_model_id=base_model_id,
                base_config=base_config,
            )


CARD_NAME = "README.md"


def _result_files(result: D2CResult) -> list[str]:
    """The entries of a result folder that belong to the result (what a later save may replace)."""
    router = [ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME] if result.prompt_router is not None else []
    cores = [TASK_CORES_NAME] if result.task_cores else []
    return sorted([*result.merged_adapter_names, ROUTING_NAME, CONFIG_NAME, RESULT_NAME, *router, *cores])


def _previous_result_files(directory: str) -> set[str]:
    """The entries of the result already saved in `directory` (none if it holds no result)."""
    path = os.path.join(directory, RESULT_NAME)
    if not os.path.isfile(path):
        return set()
    data = read_json(path)
    return {*data.get("files", []), *data.get("merged_adapter_names", []), ROUTING_NAME, CONFIG_NAME, RESULT_NAME}
