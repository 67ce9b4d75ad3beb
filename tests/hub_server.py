"""A small Hugging Face Hub-API-compatible HTTP server for the test suite.

The real `huggingface_hub`, `datasets` and `peft` client code talks to it over real HTTP (point `HF_ENDPOINT` at
`server.url` *before* `huggingface_hub` is imported and set `HF_HUB_DISABLE_XET=1`). It keeps what is pushed for
real: file contents live on disk under `root/blobs/` (content-addressed by sha256), every repo has a linear,
git-like commit history with real sha1 commit ids, and revisions resolve by branch name or (a prefix of) a commit id.
A commit is applied as a whole or not at all.

Endpoints (models, datasets and spaces alike; see DESIGN.md §3):

    POST   /api/repos/create (no visibility given: the namespace's default, see `set_private_by_default`)
    DELETE /api/repos/delete
    POST   /api/validate-yaml                         GET    /api/whoami-v2
    GET    /api/collections/{namespace}/{slug}
    GET    /api/{type}s/{repo}[/revision/{rev}]       repo info (sha, siblings, cardData)
    GET    /api/{type}s/{repo}/tree/{rev}[/{path}]    ?recursive=&expand=
    POST   /api/{type}s/{repo}/paths-info/{rev}       GET /api/{type}s/{repo}/refs, /commits/{rev}
    POST   /api/{type}s/{repo}/preupload/{rev}        POST /api/{type}s/{repo}/commit/{rev} (NDJSON)
    POST   /[{type}s/]{repo}.git/info/lfs/objects/batch   basic transfer: PUT upload + POST verify hrefs;
                                                      LFS objects are stored per repo, as on the Hub
    HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}   Range requests, X-Repo-Commit, ETag, X-Linked-*

Errors follow the Hub: a missing repo answers 404 with `X-Error-Code: RepoNotFound`, a missing revision
`RevisionNotFound`, a missing file `EntryNotFound`, each with an `X-Error-Message` and a JSON `{"error": ...}` body.

Example:
    ```python
    >>> server = start_hub_server("/tmp/hub")     # before `import huggingface_hub`
    >>> os.environ["HF_ENDPOINT"] = server.url
    >>> ...
    >>> server.stop()
    ```
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

__all__ = ["HubServer", "start_hub_server"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files stored through LFS regardless of size, as in the default .gitattributes of a new Hub repo.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".gguf", ".onnx", ".msgpack", ".npy", ".npz",
    ".parquet", ".arrow", ".zip", ".gz", ".tar", ".pkl", ".model", ".joblib",
)  # fmt: skip
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
API_ACTIONS = {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits"}
USER = "test-user"


class HubError(Exception):
    """An HTTP error answer: status, Hub error code (`X-Error-Code`) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class _Entry:
    """One file in a commit: its content (a blob on disk) and how git would see it."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # sha1 of the git blob: the file itself, or its LFS pointer

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "git_oid": self.git_oid}


@dataclass
class _Commit:
    id: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, _Entry]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "title": self.title,
            "description": self.description,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in self.files.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Commit:
        files = {path: _Entry(**entry) for path, entry in data.pop("files").items()}
        return cls(files=files, **data)


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    object_id: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # LFS storage is per repo, as on the Hub

    def history(self, commit_id: str) -> list[_Commit]:
        """The commits reachable from `commit_id`, newest first."""
        out = []
        current: str | None = commit_id
        while current is not None:
            commit = self.commits[current]
            out.append(commit)
            current = commit.parent
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "object_id": self.object_id,
            "branches": self.branches,
            "commits": [c.to_json() for c in self.commits.values()],
            "lfs_objects": sorted(self.lfs_objects),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Repo:
        commits = [_Commit.from_json(c) for c in data.pop("commits")]
        lfs_objects = set(data.pop("lfs_objects", []))
        return cls(commits={c.id: c for c in commits}, lfs_objects=lfs_objects, **data)


class HubServer:
    """The state of the test Hub and the HTTP server that exposes it. Build it with `start_hub_server`."""

    def __init__(self, root: str, host: str = "127.0.0.1", port: int = 0):
        self.root = os.path.abspath(root)
        self.blob_dir = os.path.join(self.root, "blobs")
        self.repo_dir = os.path.join(self.root, "repos")
        self.tmp_dir = os.path.join(self.root, "tmp")
        for folder in (self.blob_dir, self.repo_dir, self.tmp_dir):
            os.makedirs(folder, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._collections: dict[str, dict[str, Any]] = {}
        self._failures: list[tuple[str, int]] = []
        self._private_by_default: set[str] = set()  # namespaces whose new repos are private unless asked otherwise
        self._counter = 0
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered
        self._load()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-test-server", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------------- public API

    def stop(self) -> None:
        """Stop serving (idempotent). Stored files stay on disk under `root`."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def add_collection(self, slug: str, title: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Register a collection served at `GET /api/collections/{slug}`.

        Args:
            slug (`str`): `"{namespace}/{name}-{id}"`, as on the Hub.
            title (`str`): The collection title.
            items (`list[dict]`): `{"id": repo_id, "type": "model" | "dataset" | "space" | "paper", ...}` each.

        Returns:
            `dict`: the JSON the server will answer.
        """
        if slug.count("/") != 1:
            raise ValueError(f"`slug` must look like 'namespace/name-id', got {slug!r}.")
        namespace = slug.split("/")[0]
        stored = []
        for position, item in enumerate(items):
            entry = {"_id": uuid.uuid4().hex[:24], "position": position, **item}
            if entry.get("type") in ("model", "dataset", "space"):
                entry.setdefault("author", entry["id"].split("/")[0])
            stored.append(entry)
        data = {
            "slug": slug,
            "title": title,
            "description": None,
            "owner": {"name": namespace, "type": "user", "_id": uuid.uuid4().hex[:24], "fullname": namespace},
            "items": stored,
            "lastUpdated": _now(),
            "position": len(self._collections),
            "private": False,
            "theme": "blue",
            "upvotes": 0,
            "gating": False,
        }
        with self._lock:
            self._collections[slug] = data
        return data

    def fail_next(self, method_path_substring: str, status: int = 500) -> None:
        """Answer the next request whose `"METHOD /path"` contains `method_path_substring` with HTTP `status`.

        The failing request changes nothing. Example: `fail_next("POST /api/models/user/repo/commit/")`.
        """
        with self._lock:
            self._failures.append((method_path_substring, status))

    def pending_failures(self) -> list[tuple[str, int]]:
        """Failures registered with `fail_next` that no request has consumed yet."""
        with self._lock:
            return list(self._failures)

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Commit ids of `repo_id` at `revision`, oldest first (empty if the repo does not exist)."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None or revision not in repo.branches:
                return []
            return [c.id for c in reversed(repo.history(repo.branches[revision]))]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Paths of the files of `repo_id` at `revision`, sorted."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return sorted(repo.commits[self._resolve_rev(repo, revision)].files)

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        """Content of one stored file."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            entry = repo.commits[self._resolve_rev(repo, revision)].files[path]
        with open(self._blob_path(entry.sha256), "rb") as f:
            return f.read()

    def set_private_by_default(self, namespace: str, private: bool = True) -> None:
        """Give the user or organisation `namespace` the Hub setting "new repos are private by default": a
        `POST /api/repos/create` that names no visibility (`huggingface_hub`'s `private=None`) creates a private repo
        there; an explicit `private` / `visibility` still wins."""
        with self._lock:
            (self._private_by_default.add if private else self._private_by_default.discard)(namespace)

    def create_repo(self, repo_id: str, repo_type: str = "model", *, private: bool = False) -> None:
        """Create a repo directly (same as `POST /api/repos/create`)."""
        self._create_repo(repo_type, repo_id, private)

    # ---------------------------------------------------------------------------------------------- persistence

    def _state_path(self, repo: _Repo) -> str:
        return os.path.join(self.repo_dir, f"{repo.repo_type}s", repo.repo_id, "state.json")

    def _save(self, repo: _Repo) -> None:
        path = self._state_path(repo)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(repo.to_json(), f, indent=1)
        os.replace(tmp, path)

    def _load(self) -> None:
        for dirpath, _, filenames in os.walk(self.repo_dir):
            if "state.json" in filenames:
                with open(os.path.join(dirpath, "state.json"), encoding="utf-8") as f:
                    repo = _Repo.from_json(json.load(f))
                self._repos[(repo.repo_type, repo.repo_id)] = repo

    def _blob_path(self, sha256: str) -> str:
        return os.path.join(self.blob_dir, sha256[:2], sha256)

    def _store_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha256

    # ------------------------------------------------------------------------------------------------ repo model

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found: {repo_type} {repo_id!r} does not exist.", "RepoNotFound")
        return repo

    def _resolve_rev(self, repo: _Repo, revision: str) -> str:
        revision = revision.removeprefix("refs/heads/")
        if revision in repo.branches:
            return repo.branches[revision]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for c in repo.commits if c.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                url = f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", None, {"url": url})
            repo = _Repo(repo_type, repo_id, private, _now(), uuid.uuid4().hex[:24])
            self._repos[(repo_type, repo_id)] = repo
            self._commit(repo, "main", "initial commit", "", {".gitattributes": GITATTRIBUTES.encode()}, {}, [])
            return repo

    def _new_entry(self, path: str, data: bytes, force_lfs: bool | None = None) -> _Entry:
        sha256 = self._store_blob(data)
        lfs = _wants_lfs(path, len(data)) if force_lfs is None else force_lfs
        git_oid = _git_blob_oid(_lfs_pointer(sha256, len(data)) if lfs else data)
        return _Entry(sha256, len(data), lfs, git_oid)

    def _commit(
        self,
        repo: _Repo,
        branch: str,
        title: str,
        description: str,
        regular: dict[str, bytes],
        lfs: dict[str, str],
        deletions: list[tuple[str, bool]],
        parent_commit: str | None = None,
    ) -> _Commit:
        """Apply one commit atomically: everything is checked before the branch moves."""
        with self._lock:
            if branch not in repo.branches and repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.branches.get(branch)
            if parent_commit is not None and (head is None or not head.startswith(parent_commit)):
                raise HubError(412, f"A commit has happened since. Parent commit {parent_commit} is not {head}.")
            files = dict(repo.commits[head].files) if head else {}
            for path, is_folder in deletions:
                if is_folder:
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                elif path in files:
                    del files[path]
                else:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for path, sha256 in lfs.items():
                blob = self._blob_path(sha256)
                if sha256 not in repo.lfs_objects or not os.path.exists(blob):
                    raise HubError(422, f"LFS object {sha256} of {path!r} was never uploaded to this repo.")
                size = os.path.getsize(blob)
                files[path] = _Entry(sha256, size, True, _git_blob_oid(_lfs_pointer(sha256, size)))
            for path, data in regular.items():
                files[path] = self._new_entry(path, data, force_lfs=False)
            self._counter += 1
            date = _now()
            digest = hashlib.sha1(
                json.dumps([head, sorted((p, e.git_oid) for p, e in files.items()), title, description, date,
                            self._counter, repo.repo_id]).encode()
            ).hexdigest()  # fmt: skip
            commit = _Commit(digest, head, title, description, date, files)
            repo.commits[commit.id] = commit
            repo.branches[branch] = commit.id
            self._save(repo)
            return commit

    def _delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            del self._repos[(repo_type, repo_id)]
            shutil.rmtree(os.path.dirname(self._state_path(repo)), ignore_errors=True)

    def _take_failure(self, method: str, path: str) -> int | None:
        key = f"{method} {path}"
        with self._lock:
            for i, (substring, status) in enumerate(self._failures):
                if substring in key:
                    del self._failures[i]
                    return status
        return None


def _wants_lfs(path: str, size: int) -> bool:
    return size >= LFS_THRESHOLD or path.lower().endswith(LFS_SUFFIXES)


def _front_matter(text: str) -> str | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    return match.group(1) if match else None


def _validate_card_metadata(content: str) -> list[str]:
    """The checks the Hub's `/api/validate-yaml` makes that matter here: YAML parses, and the known keys have the
    right shape (`model-index`, `base_model`, `base_model_relation`, `tags`, `datasets`)."""
    raw = _front_matter(content)
    if raw is None:
        return []
    try:
        meta = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        return [f"Invalid YAML: {err}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["Metadata must be a YAML mapping."]
    errors = []
    for key in ("tags", "datasets", "language"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a string or an array of strings')
    base = meta.get("base_model")
    if base is not None and not (
        isinstance(base, str) or (isinstance(base, list) and all(isinstance(b, str) for b in base))
    ):
        errors.append('"base_model" must be a string or an array of strings')
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
        errors.append(f'"base_model_relation" must be one of adapter, merge, quantized, finetune, got {relation!r}')
    index = meta.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            errors.append('"model-index" must be an array')
        else:
            for model in index:
                if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                    errors.append('"model-index[].name" is required and must be a string')
                    continue
                for result in model.get("results", []):
                    task = result.get("task") if isinstance(result, dict) else None
                    dataset = result.get("dataset") if isinstance(result, dict) else None
                    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                        errors.append('"model-index[].results[].task.type" is required')
                    if not isinstance(dataset, dict) or not all(
                        isinstance(dataset.get(k), str) for k in ("type", "name")
                    ):
                        errors.append('"model-index[].results[].dataset.type" and ".name" are required')
                    metrics = result.get("metrics") if isinstance(result, dict) else None
                    if not isinstance(metrics, list) or not metrics:
                        errors.append('"model-index[].results[].metrics" must be a non-empty array')
                    elif not all(isinstance(m, dict) and "type" in m and "value" in m for m in metrics):
                        errors.append('"model-index[].results[].metrics[]" needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubTestServer/1.0"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # ---------------------------------------------------------------------------------------------- plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self._query = parse_qs(split.query, keep_blank_values=True)
        self._body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        status = self.hub._take_failure(method, split.path)
        try:
            if status is not None:
                raise HubError(status, f"Injected failure of {method} {split.path} (test server).")
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            status = self._route(method, segments)
        except HubError as err:
            status = err.status
            self._send_json({"error": err.message, **err.extra}, status=err.status, error=err)
        except Exception as err:  # a server bug must answer 500, not hang the client
            status = 500
            self._send_json({"error": f"{type(err).__name__}: {err}"}, status=500)
        self.hub.requests.append((method, split.path, status))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, head: bool = False) -> int:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status

    def _send_json(self, data: Any, status: int = 200, error: HubError | None = None, head: bool = False) -> int:
        headers = {"Content-Type": "application/json"}
        if error is not None:
            headers["X-Error-Message"] = error.message.encode("ascii", "replace").decode()
            if error.code:
                headers["X-Error-Code"] = error.code
        return self._send(status, json.dumps(data).encode(), headers, head=head or self.command == "HEAD")

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _flag(self, name: str) -> bool:
        values = self._query.get(name, [])
        return bool(values) and values[-1].lower() in ("1", "true", "yes")

    # ------------------------------------------------------------------------------------------------ routing

    def _route(self, method: str, s: list[str]) -> int:
        if s and s[-1] == "" and len(s) > 1:
            s = s[:-1]
        if s[:1] == ["api"]:
            return self._route_api(method, s[1:])
        if s[:1] == ["__lfs"] and len(s) == 5 and s[1] in URL_PREFIX:
            return self._lfs_transfer(method, s[1], s[2], s[3], s[4])
        if method == "POST" and len(s) >= 5 and s[-4:] == ["info", "lfs", "objects", "batch"]:
            repo_type, rest = ("dataset", s[1:]) if s[0] == "datasets" else ("space", s[1:]) if s[0] == "spaces" else ("model", s)  # fmt: skip
            repo_part = "/".join(rest[:-4])
            if not repo_part.endswith(".git"):
                raise HubError(404, "Not found")
            return self._lfs_batch(repo_type, repo_part[: -len(".git")])
        if method in ("GET", "HEAD") and "resolve" in s:
            repo_type, rest = "model", s
            if s[0] in ("datasets", "spaces") and s.index("resolve") > 1:
                repo_type, rest = REPO_TYPES[s[0]], s[1:]
            i = rest.index("resolve")
            if i in (1, 2) and len(rest) >= i + 3:
                return self._resolve(method, repo_type, "/".join(rest[:i]), rest[i + 1], "/".join(rest[i + 2 :]))
        raise HubError(404, f"Not found: {method} {self.path} (not served by the test Hub)")

    def _route_api(self, method: str, s: list[str]) -> int:
        hub = self.hub
        if s == ["whoami-v2"] and method == "GET":
            return self._send_json(
                {"type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User", "orgs": [],
                 "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}
            )  # fmt: skip
        if s == ["repos", "create"] and method == "POST":
            body = self._json_body()
            name, org = body.get("name"), body.get("organization")
            repo_type = body.get("type") or "model"
            repo_id = f"{org}/{name}" if org else f"{USER}/{name}"
            if "private" in body or "visibility" in body:
                private = body.get("private", body.get("visibility") == "private")
            else:  # no visibility asked for: the namespace's default, as on the Hub
                with hub._lock:
                    private = repo_id.split("/")[0] in hub._private_by_default
            hub._create_repo(repo_type, repo_id, bool(private))
            return self._send_json({"url": f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}", "name": repo_id})
        if s == ["repos", "delete"] and method == "DELETE":
            body = self._json_body()
            org, name = body.get("organization"), body.get("name")
            hub._delete_repo(body.get("type") or "model", f"{org}/{name}" if org else f"{USER}/{name}")
            return self._send_json({})
        if s == ["validate-yaml"] and method == "POST":
            errors = _validate_card_metadata(self._json_body().get("content", ""))
            if errors:
                return self._send_json(
                    {"errors": [{"message": m} for m in errors], "warnings": []},
                    status=400,
                    error=HubError(400, "; ".join(errors)),
                )
            return self._send_json({"errors": [], "warnings": []})
        if s[:1] == ["collections"] and len(s) == 3 and method == "GET":
            slug = f"{s[1]}/{s[2]}"
            with hub._lock:
                data = hub._collections.get(slug)
            if data is None:
                raise HubError(404, f"Collection {slug!r} not found", "CollectionNotFound")
            return self._send_json(data)
        if s and s[0] in REPO_TYPES and len(s) >= 2:
            repo_type = REPO_TYPES[s[0]]
            repo_id, rest = self._split_repo(repo_type, s[1:])
            return self._repo_api(method, repo_type, repo_id, rest)
        raise HubError(404, f"Not found: {method} /api/{'/'.join(s)} (not served by the test Hub)")

    def _split_repo(self, repo_type: str, s: list[str]) -> tuple[str, list[str]]:
        with self.hub._lock:
            if len(s) >= 2 and (repo_type, f"{s[0]}/{s[1]}") in self.hub._repos:
                return f"{s[0]}/{s[1]}", s[2:]
            if (repo_type, s[0]) in self.hub._repos:
                return s[0], s[1:]
        if len(s) >= 2 and s[1] not in API_ACTIONS:
            return f"{s[0]}/{s[1]}", s[2:]
        return s[0], s[1:]

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> int:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            action = rest[0] if rest else ""
            if method == "GET" and action in ("", "revision"):
                commit = repo.commits[hub._resolve_rev(repo, rest[1] if len(rest) > 1 else "main")]
                return self._send_json(self._repo_info(repo, commit))
            if method == "GET" and action == "tree" and len(rest) >= 2:
                commit = repo.commits[hub._resolve_rev(repo, rest[1])]
                return self._send_json(
                    self._tree(repo, commit, "/".join(rest[2:]), self._flag("recursive"), self._flag("expand"))
                )
            if method == "POST" and action == "paths-info" and len(rest) == 2:
                commit = repo.commits[hub._resolve_rev(repo, rest[1])]
                return self._send_json(self._paths_info(repo, commit))
            if method == "GET" and action == "refs":
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
                return self._send_json({"branches": branches, "tags": [], "converts": []})
            if method == "GET" and action == "commits" and len(rest) == 2:
                history = repo.history(hub._resolve_rev(repo, rest[1]))
                return self._send_json(
                    [{"id": c.id, "title": c.title, "message": c.description, "date": c.date,
                      "authors": [{"user": USER}]} for c in history]
                )  # fmt: skip
            if method == "POST" and action == "preupload" and len(rest) == 2:
                return self._preupload(repo, rest[1])
            if method == "POST" and action == "commit" and len(rest) == 2:
                return self._commit(repo, rest[1])
        raise HubError(404, f"Not found: {method} {self.path} (not served by the test Hub)")

    # ---------------------------------------------------------------------------------------------- endpoints

    def _repo_info(self, repo: _Repo, commit: _Commit) -> dict[str, Any]:
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
            if entry.lfs:
                pointer = len(_lfs_pointer(entry.sha256, entry.size))
                sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": pointer}
            siblings.append(sibling)
        card_data = None
        if "README.md" in commit.files:
            with open(self.hub._blob_path(commit.files["README.md"].sha256), encoding="utf-8") as f:
                raw = _front_matter(f.read())
            try:
                card_data = yaml.safe_load(raw) if raw else None
            except yaml.YAMLError:
                card_data = None
        info = {
            "_id": repo.object_id,
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card_data or {}).get("tags") or []) if isinstance(card_data, dict) else [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if isinstance(card_data, dict):
            info["cardData"] = card_data
            if repo.repo_type == "model" and card_data.get("library_name"):
                info["library_name"] = card_data["library_name"]
        return info

    def _file_json(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        entry = commit.files[path]
        data: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            pointer = len(_lfs_pointer(entry.sha256, entry.size))
            data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer}
        if expand:
            last = next(c for c in repo.history(commit.id) if c.parent is None or
                        repo.commits[c.parent].files.get(path) != entry)  # fmt: skip
            data["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return data

    def _folder_json(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        prefix = path + "/"
        oids = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(prefix))
        data: dict[str, Any] = {"type": "directory", "oid": hashlib.sha1(json.dumps(oids).encode()).hexdigest(),
                                "size": 0, "path": path}  # fmt: skip
        if expand:
            data["lastCommit"] = {"id": commit.id, "title": commit.title, "date": commit.date}
        return data

    def _folders(self, commit: _Commit) -> set[str]:
        folders = set()
        for path in commit.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folders.add("/".join(parts[:i]))
        return folders

    def _tree(self, repo: _Repo, commit: _Commit, path: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
        path = path.strip("/")
        folders = self._folders(commit)
        if path and path not in folders:
            if path in commit.files:
                raise HubError(400, f"{path!r} is a file, not a folder")
            raise HubError(404, f"Entry not found: {path!r} does not exist at {commit.id}", "EntryNotFound")
        prefix = path + "/" if path else ""
        out = []
        for folder in sorted(folders):
            rel = folder[len(prefix) :] if folder.startswith(prefix) else None
            if rel and (recursive or "/" not in rel):
                out.append(self._folder_json(repo, commit, folder, expand))
        for file in sorted(commit.files):
            rel = file[len(prefix) :] if file.startswith(prefix) else None
            if rel and (recursive or "/" not in rel):
                out.append(self._file_json(repo, commit, file, expand))
        return out

    def _paths_info(self, repo: _Repo, commit: _Commit) -> list[dict[str, Any]]:
        if self.headers.get("Content-Type", "").startswith("application/json"):
            body = self._json_body()
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(self._body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        folders = self._folders(commit)
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_json(repo, commit, path, expand))
            elif path in folders:
                out.append(self._folder_json(repo, commit, path, expand))
        return out

    def _preupload(self, repo: _Repo, revision: str) -> int:
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test Hub.")
        files = self._json_body().get("files", [])
        commit = repo.commits.get(repo.branches.get(revision.removeprefix("refs/heads/"), ""), None)
        if commit is None:
            self.hub._resolve_rev(repo, revision)  # raises RevisionNotFound for unknown names
            raise HubError(400, f"Uploads go to a branch, got revision {revision!r}.")
        out = []
        for item in files:
            path, size = item["path"], int(item.get("size", 0))
            mode = "lfs" if _wants_lfs(path, size) and size > 0 else "regular"
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if mode == "lfs" else existing.git_oid
                if existing.lfs != (mode == "lfs"):
                    oid = None
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._send_json({"files": out, "commitOid": commit.id})

    def _commit(self, repo: _Repo, revision: str) -> int:
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test Hub.")
        header: dict[str, Any] = {}
        regular: dict[str, bytes] = {}
        lfs: dict[str, str] = {}
        deletions: list[tuple[str, bool]] = []
        for line in self._body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                regular[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"Unsupported LFS algo {value.get('algo')!r}")
                lfs[value["path"]] = value["oid"]
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((value["path"], key == "deletedFolder"))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "The commit header needs a summary.")
        commit = self.hub._commit(
            repo,
            revision.removeprefix("refs/heads/"),
            header["summary"],
            header.get("description", ""),
            regular,
            lfs,
            deletions,
            parent_commit=header.get("parentCommit"),
        )
        prefix = URL_PREFIX[repo.repo_type]
        return self._send_json(
            {"success": True, "commitOid": commit.id, "commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{commit.id}",
             "pullRequestUrl": None}
        )  # fmt: skip

    def _lfs_batch(self, repo_type: str, repo_id: str) -> int:
        hub = self.hub
        with hub._lock:
            known = set(hub._get_repo(repo_type, repo_id).lfs_objects)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, f"Only the 'upload' LFS operation is served, got {body.get('operation')!r}")
        if "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "Only the 'basic' LFS transfer is served")
        base = f"{hub.url}/__lfs/{repo_type}/{quote(repo_id, safe='')}"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            blob = hub._blob_path(oid)
            if not (oid in known and os.path.exists(blob) and os.path.getsize(blob) == size):
                entry["actions"] = {
                    "upload": {"href": f"{base}/upload/{oid}", "expires_in": 3600},
                    "verify": {"href": f"{base}/verify/{oid}"},
                }
            objects.append(entry)
        return self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_transfer(self, method: str, repo_type: str, repo_id: str, action: str, oid: str) -> int:
        hub = self.hub
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, f"Invalid LFS oid {oid!r}")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
        if method == "PUT" and action == "upload":
            actual = hashlib.sha256(self._body).hexdigest()
            if actual != oid:
                raise HubError(400, f"LFS upload content has sha256 {actual}, expected {oid}")
            hub._store_blob(self._body)
            with hub._lock:
                repo.lfs_objects.add(oid)
                hub._save(repo)
            return self._send(200, b"")
        if method == "POST" and action == "verify":
            body = self._json_body()
            blob = hub._blob_path(oid)
            if oid not in repo.lfs_objects or not os.path.exists(blob):
                raise HubError(404, f"LFS object {oid} was not uploaded to {repo_id}")
            if "size" in body and os.path.getsize(blob) != int(body["size"]):
                raise HubError(422, f"LFS object {oid} has size {os.path.getsize(blob)}, expected {body['size']}")
            return self._send_json({})
        raise HubError(404, f"Not found: {method} {self.path}")

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            commit = repo.commits[hub._resolve_rev(repo, revision)]
            entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path!r} does not exist at {commit.id}", "EntryNotFound")
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        with open(hub._blob_path(entry.sha256), "rb") as f:
            data = f.read()
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match is None:
                raise HubError(416, f"Unsupported range {range_header!r}")
            start_s, end_s = match.groups()
            if start_s == "":
                start, end = max(0, len(data) - int(end_s)), len(data) - 1
            else:
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(416, b"", headers, head=method == "HEAD")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return self._send(status, data, headers, head=method == "HEAD")


def start_hub_server(root: str, *, host: str = "127.0.0.1", port: int = 0) -> HubServer:
    """Start a Hub-API-compatible server on a free port, storing everything under `root`.

    Args:
        root (`str`): Folder for blobs and repo histories; existing state there is loaded again.
        host (`str`, defaults to `"127.0.0.1"`): Interface to bind.
        port (`int`, defaults to 0): Port to bind; 0 picks a free one.

    Returns:
        `HubServer`: the running server; `server.url` is the endpoint to use as `HF_ENDPOINT`.
    """
    return HubServer(root, host=host, port=port)
