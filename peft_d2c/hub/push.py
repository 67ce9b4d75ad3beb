"""D2C results out to the Hub: a saved result folder pushed in one commit per repo, with model cards.

Everything goes through `huggingface_hub` (`HfApi.create_commit`, `ModelCard`); set `HF_ENDPOINT` to use another
Hub. Tokens are passed through to the client only: never logged, written to disk or put in a card. May import
`peft_d2c.config`, `peft_d2c.io` and the `hub` modules `adapters` and `cards`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from ..config import CONFIG_NAME
from ..engine.serving.prompt_router import ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME
from ..io import RESULT_NAME, ROUTING_NAME, TASK_CORES_NAME, read_json
from .adapters import ADAPTER_CONFIG_NAME, REPO_ID_PATTERN, WEIGHTS_NAMES, hub_api
from .cards import build_adapter_card, build_collection_card, is_hub_id, read_result_folder

logger = logging.getLogger(__name__)

HUB_NAME = "d2c_hub.json"  # layout of a pushed collection: {"layout", "base_model", "adapters" | "repos"}
LAYOUTS = ("subfolders", "repos")


class D2CPushError(RuntimeError):
    """A push to the Hub failed. `written_repos` lists the repos that were committed before the failure."""

    def __init__(self, message: str, written_repos: Sequence[str] = ()):
        super().__init__(message)
        self.written_repos = list(written_repos)


# --------------------------------------------------------------------------------------------------- results out


@dataclass
class D2CPushResult:
    """What `push_d2c_folder` wrote: one entry per repo, in cluster order for `layout="repos"`."""

    layout: str
    repo_ids: list[str]
    commit_urls: list[str]
    commit_oids: list[str]
    created: list[str] = field(default_factory=list)  # repos that did not exist before the push
    deleted_files: list[str] = field(default_factory=list)  # "repo/path" of an earlier result's stale files
    stale_repos: list[str] = field(default_factory=list)  # `layout="repos"`: cluster repos of an earlier push


def _base_model_id(recorded: str | None, base_model_id: str | None) -> str:
    if base_model_id is not None:
        if not is_hub_id(base_model_id) and not REPO_ID_PATTERN.match(str(base_model_id)):
            raise ValueError(f"`base_model_id` must be a Hub model id like 'owner/name', got {base_model_id!r}.")
        return base_model_id
    if is_hub_id(recorded):
        return recorded  # type: ignore[return-value]
    raise ValueError(
        f"The base model was loaded from {recorded!r}, which is not a Hub id; pass `base_model_id=` (e.g. "
        "'HuggingFaceTB/SmolLM2-135M-Instruct') so the model cards and adapter configs name the right base model."
    )


def _public_result(result: dict[str, Any], base_model_id: str) -> dict[str, Any]:
    """The result record as pushed: the base model's Hub id, and local paths (of source adapters and data files)
    reduced to their file names, since a path of the user's machine means nothing on the Hub and can leak names."""

    def public(record: Any) -> Any:
        if not isinstance(record, dict) or "path" not in record or is_hub_id(record["path"]):
            return record
        return {**record, "path": os.path.basename(str(record["path"]).rstrip("/"))}

    return {
        **result,
        "base_model": base_model_id,
        "sources": {name: public(r) for name, r in (result.get("sources") or {}).items()},
        "data_sources": {name: public(r) for name, r in (result.get("data_sources") or {}).items()},
    }


def _stage_adapter(src: str, dst: str, base_model_id: str) -> None:
    os.makedirs(dst, exist_ok=True)
    config = read_json(os.path.join(src, ADAPTER_CONFIG_NAME))
    config["base_model_name_or_path"] = base_model_id  # PEFT's AutoPeftModel and the Hub read it
    with open(os.path.join(dst, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for weights in WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(src, weights)):
            shutil.copy2(os.path.join(src, weights), os.path.join(dst, weights))


def _stage_metadata(folder: str, dst: str, data: dict[str, Any], base_model_id: str, hub: dict[str, Any]) -> None:
    for filename in (ROUTING_NAME, CONFIG_NAME, ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME, TASK_CORES_NAME):
        if filename in (ROUTING_NAME, CONFIG_NAME) or filename in data["result"].get("files", []):
            shutil.copy2(os.path.join(folder, filename), os.path.join(dst, filename))
    result = {**data["result"], "base_model": base_model_id}
    for path, payload in ((RESULT_NAME, result), (HUB_NAME, hub)):
        with open(os.path.join(dst, path), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=True)


def _stale_files(api, repo_id: str, new_paths: set[str]) -> list[str]:
    """Files of the D2C result already in `repo_id` that the new result no longer has (e.g. `d2c_3/` after a push
    with fewer clusters): the merged adapter folders its `d2c_hub.json` / `d2c_result.json` name. Other files of the
    repo are left alone."""
    previous: set[str] = set()
    for filename, key in ((HUB_NAME, "adapters"), (RESULT_NAME, "merged_adapter_names")):
        try:
            previous.update(read_json(hf_hub_download(repo_id, filename, token=api.token)).get(key) or [])
        except EntryNotFoundError:
            continue
    files = api.list_repo_files(repo_id)
    return sorted(f for f in files if f.split("/", 1)[0] in previous and "/" in f and f not in new_paths)


def _commit_folder(
    api,
    repo_id: str,
    folder: str,
    *,
    private: bool | None,
    message: str,
    description: str,
    allow_public: bool = False,
):
    """Create `repo_id` if needed and commit the whole `folder` in ONE commit (deleting the files of an earlier
    D2C result that the new one no longer has); delete the repo again if this call created it and the commit failed.
    `private=None` leaves a new repo's visibility to the namespace's default on the Hub. Returns (commit info,
    created, deleted files)."""

    created = False
    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
        created = True
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code != 409:
            raise D2CPushError(f"Could not create the repo {repo_id!r} ({type(err).__name__}: {err}).") from err
        if private and not api.model_info(repo_id).private and not allow_public:
            raise D2CPushError(
                f"{repo_id!r} already exists and is public: `private=True` only applies to repos the push creates, "
                "so this push would publish the result. Make the repo private first "
                f"(`HfApi().update_repo_settings({repo_id!r}, private=True)`), push to another repo, or pass "
                "`allow_public=True`."
            ) from None
    operations = [
        CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"),
                           path_or_fileobj=os.path.join(root, f))
        for root, _, files in os.walk(folder) for f in sorted(files)
    ]  # fmt: skip
    stale = [] if created else _stale_files(api, repo_id, {op.path_in_repo for op in operations})
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
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
    return info, created, stale


def push_d2c_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model_id: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    layout: str = "subfolders",
    allow_public: bool = False,
    delete_stale_repos: bool = False,
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
    them in `written_repos`. Re-pushing to a repo that holds an earlier D2C result deletes, in the same commit, the
    merged adapters the new result no longer has (other files of the repo are kept). Adapter configs get
    `base_model_name_or_path=base_model_id`; local paths of adapters and data files are reduced to file names. The
    token is only passed to the Hub client.

    Args:
        folder (`str` or `os.PathLike`): The saved result folder.
        repo_id (`str`): Target repo (`"owner/name"`), or the prefix of the cluster repos for `layout="repos"`.
        base_model_id (`str`, *optional*): Hub id of the base model; required when the result recorded a local path.
        private (`bool`, *optional*): Visibility of the repos this push creates: `True` private, `False` public,
            `None` (default) the default of the user or organisation on the Hub (public unless it is set to private),
            as `huggingface_hub.HfApi.create_repo` does. Existing repos keep their visibility.
        token (`str` or `bool`, *optional*): Hub token with write access.
        commit_message (`str`, *optional*): Defaults to `"Upload D2C merged adapters"`.
        layout (`str`, defaults to `"subfolders"`): `"subfolders"` or `"repos"`.
        allow_public (`bool`, defaults to `False`): With `private=True`, push even to an existing public repo (which
            `private` cannot make private); without it that push is refused before anything is uploaded.
        delete_stale_repos (`bool`, defaults to `False`): With `layout="repos"`, delete the `-cluster-{i}` repos of an
            earlier push with more clusters (they are listed in `stale_repos` and a warning either way).

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

    folder = os.fspath(folder)
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {list(LAYOUTS)}, got {layout!r}.")
    validate_repo_id(repo_id)
    data = read_result_folder(folder)
    base = _base_model_id(data["result"].get("base_model"), base_model_id)
    data["result"] = _public_result(data["result"], base)  # cards and metadata see no local path
    message = commit_message or "Upload D2C merged adapters"
    api = hub_api(token)
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
                info, created, deleted = _commit_folder(
                    api,
                    repo,
                    staged,
                    private=private,
                    message=message,
                    description=description,
                    allow_public=allow_public,
                )
            except D2CPushError as err:
                done = f" Repos already written: {out.repo_ids}." if out.repo_ids else ""
                raise D2CPushError(f"{err}{done}", written_repos=out.repo_ids) from err.__cause__
            out.repo_ids.append(repo)
            out.commit_urls.append(str(info.commit_url))
            out.commit_oids.append(info.oid)
            if created:
                out.created.append(repo)
            out.deleted_files.extend(f"{repo}/{path}" for path in deleted)
            logger.info(
                "Pushed %s to %s", os.path.basename(staged) if layout == "repos" else "the D2C result", info.commit_url
            )
    if layout == "repos":
        out.stale_repos = _stale_cluster_repos(api, repo_id, len(data["names"]))
        if out.stale_repos and delete_stale_repos:
            for stale in out.stale_repos:
                api.delete_repo(stale)
            logger.info("Deleted the stale cluster repos %s.", out.stale_repos)
        elif out.stale_repos:
            logger.warning(
                "The repos %s hold clusters of an earlier push with more clusters; they still load. Delete them with "
                "`delete_stale_repos=True`.",
                out.stale_repos,
            )
    return out


def _stale_cluster_repos(api, repo_id: str, num_clusters: int) -> list[str]:
    """`{repo_id}-cluster-{i}` repos with i >= `num_clusters`: left by an earlier push with more clusters."""
    stale, index = [], num_clusters
    while api.repo_exists(f"{repo_id}-cluster-{index}"):
        stale.append(f"{repo_id}-cluster-{index}")
        index += 1
    return stale
