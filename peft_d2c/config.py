"""`D2CMergeConfig`: every setting of a D2C clustering-and-merging run, saved next to its results."""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .checks import check_choice, check_int
from .combination_types import COMBINATION_TYPES, DATA_TYPES, UPDATE_TYPES
from .errors import D2CWarning
from .io import atomic_write_json
from .names import check_adapter_name
from .settings import APPLIES_TO, AUTO_RANK, MergeSettings, ScoringSettings, settings_group
from .sizes import is_bytes_budget, parse_size

CONFIG_NAME = "d2c_config.json"
# Format of `d2c_config.json`: 2 holds the T the run used; 1 (no key) may hold None, and a key it lacks had the
# default of then: before `search="partition"` (12358e6), `knots_ties` (ee75b00) and T = None (= 30 for partition).
# 3 groups the merge's and the scoring's settings (`merge`, `scoring`) and has no search variants of before.
CONFIG_VERSION, CONFIG_VERSION_KEY = 3, "d2c_config_version"
_V1_DEFAULTS = {"search": "paper", "combination_type": "ties", "init": "random", "proposal": "random"}
_V1_DEFAULT_STEPS = {"paper": 100, "partition": 30}
# Search settings of versions 1-2 that were removed (level with the paper's rule within noise; docs/benchmark.md),
# with the value that means what a run does today. A saved config that ran another value keeps it, as a record, in
# `legacy_settings`; such a config loads, but `merge_adapters_d2c` does not run it.
_REMOVED_SETTINGS = {"proposal": "random", "task_score": "loss", "restarts": 1, "final_pass": False}
_REMOVED_VALUES = {"search": ("paper_then_partition",), "init": ("lowest_loss",)}

METHODS = ("d2c", "random", "kmeans", "kmeans_svd")
INITS = ("random", "kmeans", "kmeans_svd")
# The acceptance rules of the D2C search (`search`; None is "paper"), and T of each up to 16 adapters when
# `num_iterations` is None (`peft_d2c.engine.search.plan.SearchPlan.for_run` scales it by N / 16 above).
SEARCHES = ("paper", "partition")
DEFAULT_STEPS = {"paper": 100, "partition": 30}
# The search settings a baseline `method` has no use for (it returns its partition without a search), with the value
# that means "not set".
SEARCH_SETTINGS = {
    "init": None,
    "search": None,
    "num_iterations": None,
    "max_forward_passes": None,
    "patience": None,
    "proposals_per_step": 1,
}


# Where each setting of the flat configuration before `d2c_config_version` 3 lives now: (group, name in the group).
MOVED_SETTINGS = {
    "density": ("merge", "density"),
    "majority_sign_method": ("merge", "majority_sign_method"),
    "regmean_alpha": ("merge", "regmean_alpha"),
    "memory_limit": ("merge", "memory_limit"),
    "rank_allocation": ("merge", "rank_allocation"),
    "merge_weight": ("merge", "weight"),
    "svd_rank": ("merge", "svd_rank"),
    "merge_cache_size": ("merge", "cache_size"),
    "examples_per_task": ("scoring", "examples_per_task"),
    "batch_size": ("scoring", "batch_size"),
    "max_batch_tokens": ("scoring", "max_batch_tokens"),
    "max_length": ("scoring", "max_length"),
    "use_chat_template": ("scoring", "use_chat_template"),
}


@dataclass
class D2CMergeConfig:
    """Configuration of a D2C run: how many merged adapters to keep, how to find the clusters, how to merge them.

    Modelled on PEFT's `LoraConfig`: validated in `__post_init__`, `save_pretrained` / `from_pretrained` as JSON.

    The default search is the paper's Algorithm 1: a balanced random start, random moves, a move kept if the moved
    task's few-shot loss drops, T = ceil(100 x max(1, N / 16)) moves (only T changes with N; nothing with K).
    `search="partition"` is the one alternative; `engine.search.plan.SearchPlan` records what a run ran.

    Args:
        num_clusters (`int`, *optional*):
            K, the number of merged adapters to produce. Exactly one of `num_clusters` and `storage_budget` is set.
        storage_budget (`float` or `str`, *optional*):
            Fraction of the N source adapters that may be kept, in (0, 1]; K = max(1, floor(fraction * N)). Or a size
            in bytes (`"20MB"`, `"1.5GiB"`, an int > 1): the largest K whose merged adapters fit, computed from the
            tensor sizes PEFT's merge produces (see `peft_d2c.engine.merge.budget`).
        method (`str`, defaults to `"d2c"`):
            `"d2c"` (Algorithm 1 of the paper), or a baseline: `"random"`, `"kmeans"` (K-means on the flattened
            full updates B·A·scaling) or `"kmeans_svd"` (K-means on cosine-normalised truncated-SVD embeddings of them).
        init (`str`, *optional*):
            Starting partition of the d2c search: a balanced `"random"` partition (`None`, the paper's), `"kmeans"`
            or `"kmeans_svd"`. `method="d2c"` only (like every search setting below: a baseline refuses them).
        num_iterations (`int`, *optional*):
            T, the number of proposed moves. `None`: 100 (`search="partition"`: 30) times max(1, N / 16), rounded up,
            or `max_forward_passes` if that is set. A result's config holds the T that ran.
        max_forward_passes (`int`, *optional*):
            A budget of the search's steps in forward passes of scoring (all processes together; the final merges not
            counted): the steps stop once it is spent (or at T).
        patience (`int`, *optional*):
            Stop early after this many proposals in a row were rejected. `None` runs all `num_iterations`.
        combination_type (`str`, defaults to `"regmean"`):
            A rank-r update-space merge of peft-d2c (`UPDATE_TYPES`: `regmean`, which also uses the few-shot examples'
            layer inputs and so needs the tokenizer; `knots_ties` (the default before), `core_ta`, `core_ties`,
            `tsv_m`; rslora, rank / alpha pattern and lora_bias scaling applied exactly, any mix of target modules; the
            rank-r truncation is lossy), or any combination type of PEFT's `add_weighted_adapter` (`ties`, ...; see
            `docs/concepts.md`).
        merge (`MergeSettings` or `dict`, *optional*):
            The merge's own settings (density, RegMean's alpha, ranks, member weights, live merges, ...); each
            applies to some combination types only, and a value other than its default with a type it does not
            apply to is refused (`MergeSettings`).
        scoring (`ScoringSettings` or `dict`, *optional*):
            How the few-shot examples are scored: how many per task, batch sizes, truncation, chat template
            (`ScoringSettings`).
        svd_embedding_dim (`int`, defaults to 8):
            Number of SVD components of the `kmeans_svd` features (capped at N - 1).
        proposals_per_step (`int`, defaults to 1):
            p, the candidate moves scored per step (1: the paper's). With p > 1 a step scores p candidates in one batch
            (split across `accelerate launch` processes) and applies the one whose task loss drops the most.
        search (`str`, *optional*):
            Acceptance rule of a move. `None` is `"paper"`: Algorithm 1, the moved task's few-shot loss (with p = 1
            the paper's algorithm exactly). `"partition"`: the summed loss of every task of the two clusters the move
            changes, so the total few-shot loss never rises (it won on neither benchmark collection; docs/benchmark.md).
        checkpoint_every (`int`, defaults to 10):
            With a `checkpoint_dir` given to `merge_adapters_d2c`, save the search state every this many steps.
        seed (`int`, defaults to 0):
            Seeds every random choice of the run: the start partition, the proposals, K-means and `dare_*` masks.
        merged_adapter_prefix (`str`, defaults to `"d2c"`):
            The merged adapters are named `{prefix}_0 ... {prefix}_{K-1}`.
        show_progress (`bool`, defaults to `True`):
            Show a tqdm bar over the iterations (also silenced by the `TQDM_DISABLE` environment variable).
        allow_mixed_base_models (`bool`, defaults to `False`):
            Adapters whose `base_model_name_or_path` name different Hub ids or different folders are refused; set this
            to merge them anyway (with a `D2CWarning`), e.g. when two folders hold the same weights.
        fit_router (`bool`, defaults to `True`):
            At the end, fit a prompt router on the few-shot prompts (`peft_d2c.engine.serving.prompt_router`, one
            forward pass of the base per 16 prompts) so that `result.route(prompt)` / `result.generate(prompt)` serve
            requests without a task label; needs the tokenizer (skipped without one).
        legacy_settings (`dict`, *optional*):
            Only in a config loaded from a run of an older peft-d2c: the search settings it ran that this version no
            longer has (e.g. `{"search": "paper_then_partition"}`), kept as the record of that run. Such a config
            loads, and its result can be used, saved and pushed, but `merge_adapters_d2c` refuses to run it.

    Example:
        ```python
        >>> from peft_d2c import D2CMergeConfig
        >>> config = D2CMergeConfig(num_clusters=4, num_iterations=50)
        >>> config.resolve_num_clusters(16)
        4
        ```
    """

    num_clusters: int | None = field(default=None, metadata={"help": "K, the number of merged adapters."})
    storage_budget: float | str | None = field(
        default=None, metadata={"help": "Fraction of the N adapters to keep (K = floor(fraction * N)) or '20MB'."}
    )
    method: Literal["d2c", "random", "kmeans", "kmeans_svd"] = field(
        default="d2c", metadata={"help": f"Clustering method, one of {list(METHODS)}."}
    )
    init: Literal["random", "kmeans", "kmeans_svd"] | None = field(
        default=None, metadata={"help": f"Start of the d2c search, one of {list(INITS)} (None: random)."}
    )
    num_iterations: int | None = field(
        default=None, metadata={"help": "T, the proposed moves (None: 100 paper, 30 partition, x max(1, N/16))."}
    )
    max_forward_passes: int | None = field(default=None, metadata={"help": "Forward passes the steps may spend."})
    patience: int | None = field(default=None, metadata={"help": "Stop after this many rejections in a row."})
    combination_type: str = field(
        default="regmean", metadata={"help": "Merge: an update-space type or a PEFT add_weighted_adapter type."}
    )
    merge: MergeSettings = field(
        default_factory=lambda: MergeSettings(), metadata={"help": "The merge's own settings (MergeSettings)."}
    )
    scoring: ScoringSettings = field(
        default_factory=lambda: ScoringSettings(), metadata={"help": "How examples are scored (ScoringSettings)."}
    )
    svd_embedding_dim: int = field(default=8, metadata={"help": "SVD components of the kmeans_svd features."})
    proposals_per_step: int = field(default=1, metadata={"help": "Candidate moves scored per step; 1 = the paper's."})
    search: Literal["paper", "partition"] | None = field(
        default=None, metadata={"help": "Move acceptance rule: paper (None, Algorithm 1) or partition."}
    )
    checkpoint_every: int = field(default=10, metadata={"help": "Steps between two checkpoints of the search."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice of the run."})
    merged_adapter_prefix: str = field(default="d2c", metadata={"help": "Merged adapters are named {prefix}_{i}."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    allow_mixed_base_models: bool = field(default=False, metadata={"help": "Merge adapters of other bases (warns)."})
    fit_router: bool = field(default=True, metadata={"help": "Fit a prompt router on the few-shot prompts."})
    legacy_settings: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "A saved run's settings that this version no longer has (a record)."}
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> D2CMergeConfig:
        # The settings that moved into `merge` / `scoring` (version 3) get an error that says where they went.
        moved = {k: MOVED_SETTINGS[k] for k in kwargs if k in MOVED_SETTINGS}
        if moved:
            where = ", ".join(f"`{k}` -> `{group}={{'{name}': ...}}`" for k, (group, name) in moved.items())
            raise TypeError(f"These settings moved into a group of D2CMergeConfig: {where}.")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if (self.num_clusters is None) == (self.storage_budget is None):
            raise ValueError(
                "Set exactly one of `num_clusters` and `storage_budget`, got "
                f"num_clusters={self.num_clusters!r} and storage_budget={self.storage_budget!r}."
            )
        if self.num_clusters is not None:
            check_int("num_clusters", self.num_clusters, minimum=1)
        if self.storage_budget is not None:
            budget = self.storage_budget
            message = f"`storage_budget` must be a fraction in (0, 1] or a size such as '20MB', got {budget!r}."
            if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
                raise TypeError(message)
            if is_bytes_budget(budget):
                parse_size(budget)  # validates; the value is stored as given
            elif not 0 < budget <= 1:
                raise ValueError(message)
            else:
                self.storage_budget = float(budget)
        check_choice("method", self.method, METHODS)
        check_choice("init", self.init, INITS, optional=True)
        check_choice("combination_type", self.combination_type, COMBINATION_TYPES)
        check_int("num_iterations", self.num_iterations, minimum=0, optional=True)
        check_int("max_forward_passes", self.max_forward_passes, minimum=1, optional=True)
        check_int("patience", self.patience, minimum=1, optional=True)
        positive = ("svd_embedding_dim", "proposals_per_step")
        for name in (*positive, "checkpoint_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_choice("search", self.search, SEARCHES, optional=True)
        if self.method != "d2c":  # a baseline returns its partition: a search setting would be silently ignored
            for name, unset in SEARCH_SETTINGS.items():
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"`{name}={getattr(self, name)!r}` applies to the d2c search only, and "
                        f"`method={self.method!r}` does not search: leave `{name}` at {unset!r} or use `method='d2c'`."
                    )
        check_choice("fit_router", self.fit_router, (True, False))
        if not isinstance(self.legacy_settings, dict):
            raise TypeError(f"`legacy_settings` must be a dict, got {self.legacy_settings!r}.")
        check_int("seed", self.seed, minimum=0)
        self.merge = settings_group(MergeSettings, self.merge, "merge")
        self.scoring = settings_group(ScoringSettings, self.scoring, "scoring")
        self.merge.check_applies_to(self.combination_type)
        self._check_cross_fit()
        self._check_auto_rank()
        self._check_task_cores()
        check_adapter_name(self.merged_adapter_prefix, argument="`merged_adapter_prefix`")

    def _check_cross_fit(self) -> None:
        """Refuse `cross_fit_folds` > 1 where it cannot change the loss or cannot run."""
        folds = self.scoring.cross_fit_folds
        if folds is None or folds == 1:
            return
        if self.combination_type not in DATA_TYPES:
            raise ValueError(
                f"`scoring.cross_fit_folds={folds}` changes only the loss of a merge fitted to the few-shot examples "
                f"({list(DATA_TYPES)}); `combination_type={self.combination_type!r}` is not: leave it at None."
            )
        if self.merge.task_cores:
            raise ValueError(
                f"`scoring.cross_fit_folds={folds}` with `merge.task_cores`: the search scores the task adapters, which "
                "are not fitted to the examples (their basis and cores come from the adapters alone): leave it at None."
            )
        if folds > self.scoring.examples_per_task:
            raise ValueError(
                f"`scoring.cross_fit_folds={folds}` needs at least {folds} examples per task, and `scoring.examples_per_task` "
                f"is {self.scoring.examples_per_task}: lower the folds or raise the examples."
            )
        if folds > self.merge.cache_size:
            raise ValueError(
                f"`scoring.cross_fit_folds={folds}` keeps {folds} merges of every scored cluster live: raise `merge.cache_size` "
                f"(now {self.merge.cache_size}) to at least {folds}."
            )

    def _check_auto_rank(self) -> None:
        """Refuse `merge.svd_rank="auto"` where the bytes cannot decide the shape."""
        if self.merge.svd_rank != AUTO_RANK:
            return
        if not is_bytes_budget(self.storage_budget):
            raise ValueError(
                "`merge.svd_rank='auto'` lets a byte budget decide K and the rank: give `storage_budget` in bytes "
                f"(e.g. '20MB') instead of num_clusters={self.num_clusters!r} / storage_budget={self.storage_budget!r}."
            )
        if self.combination_type not in UPDATE_TYPES:
            raise ValueError(
                f"`merge.svd_rank='auto'` needs an update-space merge of any rank ({list(UPDATE_TYPES)}), got "
                f"`combination_type={self.combination_type!r}`."
            )
        if self.merge.rank_allocation != "uniform":
            raise ValueError(
                "`merge.svd_rank='auto'` chooses one rank per shape: leave `merge.rank_allocation` at 'uniform'."
            )

    def _check_task_cores(self) -> None:
        """Refuse `merge.task_cores` where the cores cannot be fitted or counted."""
        if self.merge.task_cores and self.merge.rank_allocation != "uniform":
            raise ValueError(
                "`merge.task_cores=True` spends part of the bytes on the cores: leave `merge.rank_allocation` at "
                "'uniform' (the 'spectrum' allocation spends the whole budget on the merged adapters)."
            )

    @property
    def search_steps(self) -> int | None:
        """T up to 16 adapters: `num_iterations`, else `DEFAULT_STEPS[search]` (None if both are None; a run's T is
        `peft_d2c.engine.search.plan.SearchPlan.for_run`'s, which its resolved config holds)."""
        if self.num_iterations is not None or self.search is None:
            return self.num_iterations
        return DEFAULT_STEPS[self.search]

    def resolved_for(self, plan: Any) -> D2CMergeConfig:
        """This config as a run with `plan` ran it: `search`, `num_iterations`, `init` and `scoring.cross_fit_folds`
        filled in from the plan, so a result's saved config records what ran. `plan` is the run's `peft_d2c.engine.search.plan.SearchPlan` (from
        `SearchPlan.for_run(config, N, K)`; the engine sits above the config, so it is not imported here), or None
        for a baseline, whose config is returned as it is.

        Example:
            ```python
            >>> from peft_d2c.engine.search.plan import SearchPlan
            >>> config = D2CMergeConfig(num_clusters=4)
            >>> resolved = config.resolved_for(SearchPlan.for_run(config, 40, 4))
            >>> resolved.search, resolved.num_iterations, resolved.init
            ('paper', 250, 'random')
            ```
        """
        if plan is None:
            return self
        return replace(
            self,
            search=plan.rule,
            num_iterations=plan.num_iterations,
            init=plan.init,
            scoring=replace(self.scoring, cross_fit_folds=plan.cross_fit_folds),
        )

    def check_runnable(self) -> None:
        """Refuse to run a config that records settings of an older peft-d2c this version no longer has.

        Raises:
            ValueError: If `legacy_settings` is not empty, naming them and what to do.
        """
        if self.legacy_settings:
            raise ValueError(
                f"This config records a run of an older peft-d2c with settings this version no longer has "
                f"(`legacy_settings={self.legacy_settings!r}`; docs/benchmark.md says why they were removed). Its "
                "result stays usable; to run again, drop them: `dataclasses.replace(config, legacy_settings={})`."
            )

    def resolve_num_clusters(self, num_adapters: int) -> int:
        """Number of clusters K for `num_adapters` source adapters.

        Args:
            num_adapters (`int`): N, the number of adapters to cluster.

        Returns:
            `int`: `num_clusters` if set, else max(1, floor(storage_budget * N)).

        Raises:
            ValueError: If K is larger than N.
        """
        if self.num_clusters is not None:
            k = self.num_clusters
        elif isinstance(self.storage_budget, str) or self.storage_budget > 1:
            raise ValueError(
                f"`storage_budget`={self.storage_budget!r} is a size in bytes; K then depends on the adapters' tensor "
                "sizes: use `peft_d2c.engine.merge.budget.resolve_num_clusters(peft_model, names, config)`."
            )
        else:
            k = max(1, math.floor(self.storage_budget * num_adapters + 1e-9))
        if k > num_adapters:
            raise ValueError(f"`num_clusters` must be between 1 and the number of adapters ({num_adapters}), got {k}.")
        return k

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dict (every field, in declaration order)."""
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the configuration to `save_directory/d2c_config.json` (sorted keys, written atomically), as the run
        ran: `num_iterations` is the resolved T (`search_steps`); `d2c_config_version` is `CONFIG_VERSION`.

        Returns:
            `str`: the path of the written file.
        """
        data = {**self.to_dict(), "num_iterations": self.search_steps, CONFIG_VERSION_KEY: CONFIG_VERSION}
        atomic_write_json(path := os.path.join(os.fspath(save_directory), CONFIG_NAME), data)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> D2CMergeConfig:
        """Build a configuration from `to_dict()` output; unknown keys (from a newer version) are dropped with a
        warning. A saved file's `d2c_config_version` is checked (newer: `ValueError`); 1 reads as in `from_pretrained`."""
        data = dict(data)
        version = _check_version(data.pop(CONFIG_VERSION_KEY, CONFIG_VERSION), "This D2C config")
        if version == 1:
            data = {**_V1_DEFAULTS, **data}
            if data.get("num_iterations") is None and data["search"] in _V1_DEFAULT_STEPS:
                data["num_iterations"] = _V1_DEFAULT_STEPS[data["search"]]
        data = _nest(data)
        if version < 3:
            data = _as_version_3(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown D2CMergeConfig keys {unknown}; they may come from a newer peft-d2c, consider "
                "upgrading.",
                D2CWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> D2CMergeConfig:
        """Read a configuration written by `save_pretrained` (a folder, or the JSON file itself).

        A file without `d2c_config_version` (1) reads as the run it was, not with today's defaults: no `search` means
        `"paper"`, no `combination_type` `"ties"`, no (or None) `num_iterations` the T then (100 paper, 30 partition).

        Raises:
            ValueError: If the file was saved by a newer peft-d2c (a `d2c_config_version` above `CONFIG_VERSION`).
        """
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        _check_version(data.get(CONFIG_VERSION_KEY, 1), path)
        return cls.from_dict({CONFIG_VERSION_KEY: 1, **data})


# `__new__` (the moved-settings message) would hide the fields from `inspect.signature`: show `__init__`'s.
D2CMergeConfig.__signature__ = inspect.signature(D2CMergeConfig.__init__).replace(
    parameters=list(inspect.signature(D2CMergeConfig.__init__).parameters.values())[1:]
)


def _nest(data: dict[str, Any]) -> dict[str, Any]:
    """Move the flat settings of before version 3 (`MOVED_SETTINGS`, e.g. `density`) into their groups."""
    data = dict(data)
    groups = {group: dict(data.get(group) or {}) for group in ("merge", "scoring")}
    for key, (group, name) in MOVED_SETTINGS.items():
        if key in data:
            if name in groups[group]:
                raise ValueError(f"`{key}` is given twice: flat and as `{group}.{name}`; keep one.")
            groups[group][name] = data.pop(key)
    return {**data, **{group: values for group, values in groups.items() if values or group in data}}


def _as_version_3(data: dict[str, Any]) -> dict[str, Any]:
    """A config of version 1 or 2 as the run it was: the merge settings its combination type ignored, and a
    baseline's search settings, are dropped (they did nothing); removed search settings that changed the run are kept
    in `legacy_settings`."""
    data = dict(data)
    merge, combination_type = dict(data.get("merge") or {}), data.get("combination_type", "regmean")
    defaults = {f.name: f.default for f in fields(MergeSettings)}
    for name, types in APPLIES_TO.items():
        if name in merge and merge[name] != defaults[name] and combination_type not in types:
            del merge[name]
    if "merge" in data:
        data["merge"] = merge
    if data.get("method", "d2c") != "d2c":  # a baseline never searched: what older versions filled in did nothing
        for name in ("init", "search", "num_iterations", "max_forward_passes", "patience", "proposals_per_step"):
            data.pop(name, None)
    legacy = dict(data.get("legacy_settings") or {})
    for name, today in _REMOVED_SETTINGS.items():
        value = data.pop(name, None)
        if value is not None and value != today:
            legacy[name] = value
    for name, removed in _REMOVED_VALUES.items():
        if data.get(name) in removed:
            legacy[name] = data.pop(name)
    if legacy:
        data["legacy_settings"] = legacy
    return data


def _check_version(version: Any, source: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: `{CONFIG_VERSION_KEY}` must be a version number >= 1, got {version!r}.")
    if version > CONFIG_VERSION:
        raise ValueError(f"{source} was saved by a newer peft-d2c ({CONFIG_VERSION_KEY}={version}); upgrade peft-d2c.")
    return version
