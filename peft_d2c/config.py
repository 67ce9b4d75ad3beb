"""`D2CMergeConfig`: every setting of a D2C clustering-and-merging run, saved next to its results."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .checks import check_choice, check_fraction, check_int
from .combination_types import COMBINATION_TYPES, UPDATE_TYPES
from .errors import D2CWarning
from .io import atomic_write_json
from .names import check_adapter_name
from .search_defaults import (
    DEFAULT_STEPS,
    PROPOSALS,
    SEARCHES,
    TASK_SCORES,
    default_search,
    default_search_rule,
    default_steps,
    default_task_score,
    merge_cache_size_for,
)
from .sizes import is_bytes_budget, parse_size

CONFIG_NAME = "d2c_config.json"
# Format of `d2c_config.json`: 2 holds the T the run used; 1 (no key) may hold None, and a key it lacks had the
# default of then: before `search="partition"` (12358e6), `knots_ties` (ee75b00) and T = None (= 30 for partition).
CONFIG_VERSION, CONFIG_VERSION_KEY = 2, "d2c_config_version"
_V1_DEFAULTS = {"search": "paper", "combination_type": "ties", "init": "random", "proposal": "random"}
_V1_DEFAULT_STEPS = {"paper": 100, "partition": 30}

METHODS = ("d2c", "random", "kmeans", "kmeans_svd")
INITS = ("random", "kmeans", "kmeans_svd", "lowest_loss")


@dataclass
class D2CMergeConfig:
    """Configuration of a D2C run: how many merged adapters to keep, how to find the clusters, how to merge them.

    Modelled on PEFT's `LoraConfig`: validated in `__post_init__`, `save_pretrained` / `from_pretrained` as JSON.

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
            Starting partition for `method="d2c"`: a balanced `"random"` partition, `"kmeans"`, `"kmeans_svd"`, or
            `"lowest_loss"`: the random one or the `kmeans_svd` one, whichever has the lower total few-shot loss
            (2N losses and 2K merges more; the random one on a tie). `None`: `"random"` up to `REFERENCE_N` = 16
            adapters or with `search="paper"`, `"lowest_loss"` above (see `resolved_for`).
        num_iterations (`int`, *optional*):
            T, the number of proposed moves (of the first phase of `"paper_then_partition"`). `None`: `DEFAULT_STEPS`
            (`search_defaults`; 100 paper steps, 30 partition steps), times N / 16 above 16 adapters with random
            proposals, 2N with the others; `max_forward_passes` if set. A result's config holds the T that ran.
        max_forward_passes (`int`, *optional*):
            A budget of the search's steps in forward passes of scoring (all processes together; Grams and final
            pass not counted), split between restarts like T: steps stop once it is spent (or at T).
        patience (`int`, *optional*):
            Stop early after this many proposals in a row were rejected. `None` runs all `num_iterations`.
        examples_per_task (`int`, defaults to 10):
            n, the number of examples per task used for clustering; extra examples are ignored.
        task_score (`str`, *optional*):
            What a task's examples score under a merge: `"loss"` (the paper's mean completion-token loss) or `"miss"`
            (1 - the mean probability of each whole completion, teacher-forced: in [0, 1], flat where a task fails).
            The first phase of `"paper_then_partition"`, Algorithm 1, scores the loss either way (the same passes).
            `None`: `"miss"` with `"paper_then_partition"`, else `"loss"` (`search_defaults.default_task_score`).
        combination_type (`str`, defaults to `"regmean"`):
            A rank-r update-space merge of peft-d2c (`UPDATE_TYPES`: `regmean`, which also uses the few-shot examples'
            layer inputs and so needs the tokenizer; `knots_ties` (the default before), `core_ta`, `core_ties`,
            `tsv_m`; rslora, rank / alpha pattern and lora_bias scaling applied exactly, any mix of target modules; the
            rank-r truncation is lossy), or any combination type of PEFT's `add_weighted_adapter` (`ties`, ...; see
            `docs/concepts.md`).
        density (`float`, defaults to 0.5):
            Fraction of values kept by the pruning combination types (ties, dare, magnitude_prune).
        regmean_alpha (`float`, defaults to 0.9):
            `regmean`: the share of the off-diagonal entries of the layer-input Gram matrices kept (RegMean's α), in
            (0, 1): 1 would leave the sum of the (singular) few-shot Grams unregularised.
        memory_limit (`int` or `str`, *optional*):
            `regmean`: the most memory (resident set) the process may use once the layer inputs are held, in bytes or
            as a size (`"16GB"`). A run predicts their size before collecting them and refuses, naming this setting,
            when the process's memory plus theirs would exceed it. Defaults to the process's memory plus the memory
            available when the run starts.
        rank_allocation (`str`, defaults to `"uniform"`):
            Ranks of the final merged adapters (update-space types): `"uniform"` (`svd_rank` or the largest source
            rank in every module) or `"spectrum"` (the same total bytes, or all of a byte `storage_budget`, spent on
            the largest singular values per byte over every merged adapter and module; `engine.merge.rank_budget`).
        merge_weight (`float`, *optional*):
            Weight given to every member of a cluster. `None` picks the weight for which merging k identical copies
            of an adapter gives that adapter back (see `merge_weights_for`).
        svd_rank (`int`, *optional*):
            Rank of the merged adapter for the `*svd` and `UPDATE_TYPES` merges (defaults to the largest source rank).
        majority_sign_method (`str`, defaults to `"total"`):
            Sign election of the ties merges: `"total"` or `"frequency"`.
        svd_embedding_dim (`int`, defaults to 8):
            Number of SVD components of the `kmeans_svd` features (capped at N - 1).
        use_chat_template (`bool`, defaults to `False`):
            Wrap each prompt in the tokenizer's chat template before scoring.
        max_length (`int`, *optional*):
            Truncate prompt + completion to this many tokens (the prompt is cut from the left).
        batch_size (`int`, defaults to 32):
            Rows per forward pass when scoring.
        merge_cache_size (`int`, defaults to 8):
            Number of temporary merged adapters kept alive in the model (an LRU); older ones are deleted. With
            `proposal="targeted"` / `"misfit"` at least K + 2 (each current cluster's merge, a step's two new ones).
        proposals_per_step (`int`, defaults to 1):
            p, the candidate moves scored per step (1: the paper's). With p > 1 a step scores p candidates in one batch
            (split across `accelerate launch` processes) and applies the one whose task loss drops the most.
        search (`str`, *optional*):
            Acceptance rule of a move: `"partition"` (the summed loss of every task of the two clusters the move
            changes, so the total few-shot loss never rises) or `"paper"` (Algorithm 1: the moved task's loss; with
            `restarts=1`, `final_pass=False` and T = 100 the paper's algorithm exactly). `"paper_then_partition"`: T
            paper steps, then at most T partition steps within the passes the first T spent (never a higher total
            `task_score` than the paper's end, at most 2x its passes plus one step; `restarts=1` only). `None`: that up
            to 16 adapters with more than 4 a cluster (N > 4K), else `"partition"` (`default_search_rule`).
        proposal (`str`, *optional*):
            Which move a step proposes (`peft_d2c.engine.search.proposals`): `"random"` (the paper's uniform draws) or
            `"sweep"` (every adapter in turn, in rounds of a fresh random order, moved or swapped with a member of
            a random other cluster) or `"targeted"` (as sweep, into the other cluster whose merge gives the task its
            lowest loss) or `"misfit"` (as targeted, each round the tasks that fit another cluster's merge best first);
            none with `search="paper"`. `None`: `"misfit"` with `"paper_then_partition"`, else `"random"` up to 16
            adapters or with `search="paper"`, `"targeted"` above.
        restarts (`int`, defaults to 1):
            R starts (the `init` partition, `kmeans_svd`, then random, each its own seed; split between `accelerate
            launch` processes), T split between them; the lowest total few-shot loss is kept.
        final_pass (`bool`, defaults to `False`):
            After the steps, apply improving single moves and singleton relocations until none is left (`polish`).
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
        max_batch_tokens (`int`, defaults to 16384):
            Tokens of one scoring forward pass (rows x longest row, padding included): a batch of `batch_size` rows is
            split further, by the examples alone (1- and N-process runs stay bit-identical), so none runs out of memory.
        fit_router (`bool`, defaults to `True`):
            At the end, fit a prompt router on the few-shot prompts (`peft_d2c.engine.serving.prompt_router`, one
            forward pass of the base per 16 prompts) so that `result.route(prompt)` / `result.generate(prompt)` serve
            requests without a task label; needs the tokenizer (skipped without one).

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
    init: Literal["random", "kmeans", "kmeans_svd", "lowest_loss"] | None = field(
        default=None, metadata={"help": f"Start of the d2c search, one of {list(INITS)} (None: by N)."}
    )
    num_iterations: int | None = field(
        default=None, metadata={"help": "T, the number of proposed moves (None: 100 for paper, 30 for partition)."}
    )
    max_forward_passes: int | None = field(default=None, metadata={"help": "Forward passes the steps may spend."})
    patience: int | None = field(default=None, metadata={"help": "Stop after this many rejections in a row."})
    examples_per_task: int = field(default=10, metadata={"help": "n, examples per task used for clustering."})
    task_score: Literal["loss", "miss"] | None = field(
        default=None, metadata={"help": "loss or miss (None: by N, K)."}
    )
    combination_type: str = field(
        default="regmean", metadata={"help": "Merge: an update-space type or a PEFT add_weighted_adapter type."}
    )
    density: float = field(default=0.5, metadata={"help": "Fraction kept by ties / dare / magnitude_prune merges."})
    regmean_alpha: float = field(
        default=0.9, metadata={"help": "regmean: share of off-diagonal Gram entries kept, in (0, 1)."}
    )
    memory_limit: int | str | None = field(
        default=None, metadata={"help": "regmean: the most bytes its layer inputs may hold (default: free memory)."}
    )
    rank_allocation: Literal["uniform", "spectrum"] = field(
        default="uniform", metadata={"help": "Final ranks: one rank everywhere, or bytes spent by singular values."}
    )
    merge_weight: float | None = field(
        default=None, metadata={"help": "Weight of every cluster member; None = the exact-average weight."}
    )
    svd_rank: int | None = field(default=None, metadata={"help": "Rank of *svd merges (default: max source rank)."})
    majority_sign_method: Literal["total", "frequency"] = field(
        default="total", metadata={"help": "Sign election of ties merges."}
    )
    svd_embedding_dim: int = field(default=8, metadata={"help": "SVD components of the kmeans_svd features."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the chat template."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate scored sequences to this length."})
    batch_size: int = field(default=32, metadata={"help": "Rows per forward pass."})
    merge_cache_size: int = field(default=8, metadata={"help": "Live temporary merged adapters (LRU)."})
    proposals_per_step: int = field(default=1, metadata={"help": "Candidate moves scored per step; 1 = the paper's."})
    search: Literal["paper", "partition", "paper_then_partition"] | None = field(
        default=None, metadata={"help": "Move acceptance rule (None: by N and K)."}
    )
    proposal: Literal["random", "sweep", "targeted", "misfit"] | None = field(
        default=None, metadata={"help": "Proposed moves: random (the paper's), sweep, targeted, misfit (None: by N)."}
    )
    restarts: int = field(default=1, metadata={"help": "Start partitions searched; the lowest total loss is kept."})
    final_pass: bool = field(default=False, metadata={"help": "Finish with improving single moves until none left."})
    checkpoint_every: int = field(default=10, metadata={"help": "Steps between two checkpoints of the search."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice of the run."})
    merged_adapter_prefix: str = field(default="d2c", metadata={"help": "Merged adapters are named {prefix}_{i}."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    allow_mixed_base_models: bool = field(default=False, metadata={"help": "Merge adapters of other bases (warns)."})
    max_batch_tokens: int = field(default=16384, metadata={"help": "Most tokens of a scoring pass (rows x length)."})
    fit_router: bool = field(default=True, metadata={"help": "Fit a prompt router on the few-shot prompts."})

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
        check_choice("majority_sign_method", self.majority_sign_method, ("total", "frequency"))
        check_int("num_iterations", self.num_iterations, minimum=0, optional=True)
        check_int("max_forward_passes", self.max_forward_passes, minimum=1, optional=True)
        check_int("patience", self.patience, minimum=1, optional=True)
        positive = ("examples_per_task", "svd_embedding_dim", "batch_size", "max_batch_tokens", "proposals_per_step")
        for name in (*positive, "restarts", "checkpoint_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_choice("task_score", self.task_score, TASK_SCORES, optional=True)
        check_int("merge_cache_size", self.merge_cache_size, minimum=2)
        check_choice("search", self.search, SEARCHES, optional=True)
        check_choice("proposal", self.proposal, PROPOSALS, optional=True)
        if self.proposal not in (None, "random") and self.search == "paper":
            raise ValueError(f"`proposal={self.proposal!r}` swaps tasks, which only the partition rule can judge.")
        if self.search == "paper_then_partition" and self.restarts != 1:
            raise ValueError("`search='paper_then_partition'` searches one start: set `restarts=1`.")
        check_choice("final_pass", self.final_pass, (True, False))
        check_choice("fit_router", self.fit_router, (True, False))
        check_int("seed", self.seed, minimum=0)
        check_int("svd_rank", self.svd_rank, minimum=1, optional=True)
        check_int("max_length", self.max_length, minimum=2, optional=True)
        self.density = check_fraction("density", self.density)
        # alpha = 1 keeps the off-diagonal Gram entries whole: ten examples' Grams are singular, and so is their sum
        # where few tokens reach a layer, so the merge's Cholesky would fail mid-run.
        self.regmean_alpha = check_fraction("regmean_alpha", self.regmean_alpha, include_one=False)
        if self.memory_limit is not None:
            parse_size(self.memory_limit, "memory_limit")
        check_choice("rank_allocation", self.rank_allocation, ("uniform", "spectrum"))
        if self.rank_allocation == "spectrum" and self.combination_type not in UPDATE_TYPES:
            raise ValueError(f"`rank_allocation='spectrum'` needs one of {list(UPDATE_TYPES)} as `combination_type`.")
        if self.merge_weight is not None:
            if not isinstance(self.merge_weight, (int, float)) or not math.isfinite(self.merge_weight):
                raise ValueError(f"`merge_weight` must be a finite number or None, got {self.merge_weight!r}.")
            self.merge_weight = float(self.merge_weight)
        check_adapter_name(self.merged_adapter_prefix, argument="`merged_adapter_prefix`")
        if self.method != "d2c" and self.init not in (None, "random"):
            warnings.warn(f"`init={self.init!r}` is ignored for `method={self.method!r}`.", D2CWarning, stacklevel=3)

    @property
    def search_steps(self) -> int | None:
        """T when it depends on neither N nor K: `num_iterations`, else `DEFAULT_STEPS[search]` (None if both are)."""
        if self.num_iterations is not None or self.search is None:
            return self.num_iterations
        return DEFAULT_STEPS[self.search]

    def search_rule_for(self, num_adapters: int, num_clusters: int | None = None) -> str:
        """`search`, or where it is None `search_defaults.default_search_rule` for N = `num_adapters` and K =
        `num_clusters` (default: `resolve_num_clusters(num_adapters)`)."""
        if self.search is not None:
            return self.search
        num_clusters = self.resolve_num_clusters(num_adapters) if num_clusters is None else num_clusters
        return default_search_rule(num_adapters, num_clusters, self.restarts)

    def search_steps_for(self, num_adapters: int, num_clusters: int | None = None) -> int:
        """T of a search over `num_adapters` adapters: `num_iterations` if set, else `max_forward_passes` if set (a
        step costs at least one pass unless all its losses are cached), else `search_defaults.default_steps`."""
        if self.num_iterations is not None:
            return self.num_iterations
        if self.max_forward_passes is not None:
            return self.max_forward_passes
        search = self.search_rule_for(num_adapters, num_clusters)
        return default_steps(num_adapters, search, self.search_defaults_for(num_adapters, num_clusters)[1])

    def search_defaults_for(self, num_adapters: int, num_clusters: int | None = None) -> tuple[str, str]:
        """`(init, proposal)` of a search over `num_adapters` adapters: each field, or where it is None
        `search_defaults.default_search` for the rule of `search_rule_for`."""
        init, proposal = default_search(num_adapters, self.search_rule_for(num_adapters, num_clusters))
        return self.init or init, self.proposal or proposal

    def resolved_for(self, num_adapters: int, num_clusters: int) -> D2CMergeConfig:
        """This config as a run of `num_adapters` adapters into `num_clusters` uses it: `search`, `init`, `proposal`,
        `num_iterations` (`search_rule_for`, `search_defaults_for`, `search_steps_for`) and `merge_cache_size`
        (`search_defaults.merge_cache_size_for`) and `task_score` filled in; a result's config is this."""
        search = self.search_rule_for(num_adapters, num_clusters)
        init, proposal = self.search_defaults_for(num_adapters, num_clusters)
        if self.method != "d2c":  # a baseline has no start to choose: a search's default start would warn as ignored
            init = self.init or "random"
        cache = merge_cache_size_for(proposal, num_clusters, self.merge_cache_size)
        steps = self.search_steps_for(num_adapters, num_clusters)
        resolved = replace(
            self, search=search, init=init, proposal=proposal, num_iterations=steps, merge_cache_size=cache
        )
        return replace(resolved, task_score=self.task_score or default_task_score(search))

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


def _check_version(version: Any, source: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: `{CONFIG_VERSION_KEY}` must be a version number >= 1, got {version!r}.")
    if version > CONFIG_VERSION:
        raise ValueError(f"{source} was saved by a newer peft-d2c ({CONFIG_VERSION_KEY}={version}); upgrade peft-d2c.")
    return version
