"""Serve an exported GGUF folder with llama.cpp, routing requests that carry no task label (the `llamacpp` extra).

`peft-d2c export --format gguf` writes one llama.cpp LoRA file per merged adapter, the routing table and the prompt
router. `RoutedLlamaCpp` serves that folder in one process with llama-cpp-python:

- one llama.cpp context on the base GGUF embeds each prompt (mean pooling over its tokens of the last hidden state,
  after the final norm: the router's features, docs/routing.md shows llama.cpp's equal transformers');
- the prompt router picks the task, and so the merged adapter; a prompt of no known task goes to the nearest task's
  adapter (`fallback="nearest"`) or to the base model (`fallback="base"`);
- one llama.cpp context per merged adapter (the base GGUF with that LoRA file) answers greedily.

`RoutedUpstream` is the same front for a server that already holds the adapters and serves each by its name in an
OpenAI request's `model` (vLLM started with the `--lora-modules` of a `--format vllm` export): it computes the
router's features with the base model in transformers, exactly as the router was fitted, and forwards the request
with `model` set to the routed merged adapter.

A request may also name its task or merged adapter in `model` (a labelled request): then it is served with that
adapter and not routed. `make_server` puts an OpenAI-compatible HTTP front on either (stdlib `http.server`):
`POST /v1/completions` (`prompt` as text, or token ids with `model`; `max_tokens`, `stop`, optional `model`)
answers in the OpenAI completion shape plus a `d2c_route` entry saying where the prompt went; `GET /v1/models` lists
the tasks and adapters.

llama.cpp contexts are not thread-safe: one lock serialises the requests of a `RoutedLlamaCpp`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ..engine.scoring.tokenization import prompt_token_ids
from ..engine.serving.generation import BASE_ADAPTER
from ..engine.serving.prompt_router import FALLBACKS, PromptRouter, Route, prompt_features
from ..io import read_json
from .folder import MANIFEST_NAME, file_sha256

__all__ = ["RoutedLlamaCpp", "RoutedUpstream", "make_server"]


class _RoutedExport:
    """What both fronts share: an export's manifest, prompt router and routing table, and which adapter answers a
    request (`choose`). Refuses, before any work, a folder without a manifest or router, an export of another
    `format` (when one is required) and an unknown `fallback`."""

    def __init__(self, export_dir: str, fallback: str, format: str | None = None) -> None:
        manifest_path = os.path.join(export_dir, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(
                f"No {MANIFEST_NAME} in {export_dir!r}: export the result first (`peft-d2c export`)."
            )
        manifest = read_json(manifest_path)
        if format is not None and manifest.get("format") != format:
            raise ValueError(
                f"{export_dir!r} is a {manifest.get('format')!r} export; serve a `--format {format}` one."
            )
        if fallback not in FALLBACKS:
            raise ValueError(f"`fallback` must be one of {list(FALLBACKS)}, got {fallback!r}.")
        if "router" not in manifest:
            raise FileNotFoundError(
                f"{export_dir!r} has no prompt router: export a result fitted with `fit_router=True`."
            )
        self.manifest, self.fallback = manifest, fallback
        self.router = PromptRouter.from_pretrained(export_dir)
        self.routing = {task: entry["adapter"] for task, entry in manifest["tasks"].items()}

    @property
    def adapters(self) -> list[str]:
        """The merged adapters served (in the manifest's order)."""
        return list(self.manifest["adapters"])

    def models(self) -> list[str]:
        """What `model` may name: every task, then every merged adapter."""
        return sorted(self.routing) + self.adapters

    def route(self, prompt: str) -> Route:
        """The `Route` of `prompt` (each front computes the router's features its own way)."""
        raise NotImplementedError

    def _route_features(self, features: torch.Tensor) -> Route:
        return self.router.route_features(features, self.routing, fallback=self.fallback)[0]

    def choose(self, prompt: str | Sequence[int], model: str | None) -> tuple[str, dict[str, Any]]:
        """The adapter that answers `prompt` (routed when `model` is None, else the task or adapter `model` names)
        and where it went, for `d2c_route`.

        Raises:
            KeyError: If `model` names neither a task nor a merged adapter.
            ValueError: If an unlabelled request is token ids (only text is routed).
        """
        if model is None:
            if not isinstance(prompt, str):
                raise ValueError("A request of token ids is not routed: name its task or adapter in `model`.")
            route = self.route(prompt)
            return route.adapter, {**asdict(route), "labelled": False}
        if model in self.routing:
            return self.routing[model], {"task": model, "adapter": self.routing[model], "labelled": True}
        if model in self.manifest["adapters"]:
            return model, {"task": None, "adapter": model, "labelled": True}
        raise KeyError(f"`model` {model!r} is neither a task nor a merged adapter; known: {self.models()}.")


class RoutedLlamaCpp(_RoutedExport):
    """An exported GGUF folder served by llama.cpp, with the prompt router in front (see the module).

    Args:
        export_dir (`str` or `os.PathLike`): The output of `export_d2c_folder(..., format="gguf")`, with its router.
        base_gguf (`str` or `os.PathLike`): The base model GGUF file the adapters were exported for.
        fallback (`str`, defaults to `"nearest"`): Where a prompt of no known task goes: `"nearest"` (the nearest
            task's adapter) or `"base"` (the base model).
        n_ctx (`int`, defaults to 2048): Context length of every llama.cpp context.
        n_threads (`int`, *optional*): llama.cpp threads (default: llama.cpp's choice).

    Raises:
        ImportError: Without llama-cpp-python (`pip install "peft-d2c[llamacpp]"`).
        FileNotFoundError: If `export_dir` has no manifest, no router or an adapter file is missing.
        ValueError: If the export is not a GGUF export, `base_gguf` is not the file it was exported for (its
            SHA-256 differs from the manifest's), or `fallback` is unknown.

    A router fitted on chat-templated prompts is served for labelled requests only (llama.cpp's embedding reads
    the raw text, not the template's special tokens): send the templated prompt's token ids with `model`.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        base_gguf: str | os.PathLike,
        *,
        fallback: str = "nearest",
        n_ctx: int = 2048,
        n_threads: int | None = None,
    ):
        import llama_cpp  # the optional `llamacpp` extra, needed only to serve

        export_dir, base_gguf = os.fspath(export_dir), os.fspath(base_gguf)
        super().__init__(export_dir, fallback, format="gguf")
        manifest = self.manifest
        expected = manifest["base_model"].get("gguf_sha256")
        if expected is not None and file_sha256(base_gguf) != expected:
            raise ValueError(
                f"{base_gguf!r} is not the base GGUF the adapters were exported for (SHA-256 differs from the "
                f"manifest's {expected[:12]}...); pass that file."
            )
        common = {"model_path": base_gguf, "n_ctx": n_ctx, "verbose": False}
        if n_threads is not None:
            common.update(n_threads=n_threads, n_threads_batch=n_threads)
        self._embedder = llama_cpp.Llama(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, **common)
        self._answerers = {BASE_ADAPTER: llama_cpp.Llama(**common)}
        for name, adapter in manifest["adapters"].items():
            path = os.path.join(export_dir, adapter["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"The manifest names {path!r}, which is missing.")
            self._answerers[name] = llama_cpp.Llama(lora_path=path, **common)
        self._lock = threading.Lock()

    def route(self, prompt: str) -> Route:
        """The `Route` of `prompt`: llama.cpp's embedding of it through the prompt router.

        Raises:
            ValueError: If the router was fitted on chat-templated prompts (llama.cpp's embedding reads the raw
                text: label such requests, or route them with `RoutedUpstream`).
        """
        if self.router.use_chat_template:
            raise ValueError(
                "The router was fitted on chat-templated prompts (`scoring.use_chat_template=True`) and this server "
                "embeds raw text: name the task or adapter in `model` (sending the templated prompt's token ids), "
                "or route with `peft-d2c serve --upstream`."
            )
        with self._lock:
            embedding = self._embedder.embed(prompt)
        features = torch.tensor([embedding], dtype=torch.float32)
        return self._route_features(features)

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        model: str | None = None,
        max_tokens: int = 16,
        stop: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Answer `prompt` (text, or token ids for a labelled request) greedily with the adapter of its task: named
        by `model` (a task or a merged adapter), or routed when `model` is None.

        Returns:
            `dict`: An OpenAI completion object (`choices[0]["text"]`; `model` is the adapter that answered) with
            `d2c_route`: the route (`task`, `adapter`, `confidence`, `similarity`, `known`), or `{"task", "adapter",
            "labelled": True}` for a labelled request.

        Raises:
            KeyError: If `model` names neither a task nor a merged adapter.
            ValueError: If an unlabelled request cannot be routed (token ids, or a chat-template router).
        """
        adapter, where = self.choose(prompt, model)
        with self._lock:
            out = self._answerers[adapter].create_completion(
                prompt if isinstance(prompt, str) else list(prompt),
                max_tokens=max_tokens,
                temperature=0.0,
                stop=list(stop) if stop else None,
            )
        out["model"] = adapter
        out["d2c_route"] = where
        return out


class RoutedUpstream(_RoutedExport):
    """An OpenAI-compatible server that serves the exported merged adapters by name (vLLM), with the prompt router in
    front (see the module): a request without a label is routed on the base model's features and forwarded to
    `upstream` with `model` set to its merged adapter's name.

    Args:
        export_dir (`str` or `os.PathLike`): An export (`export_d2c_folder`, any format) with its router; the
            upstream server must serve its merged adapters under their names (`--format vllm`: the manifest's
            `vllm.serve` command does).
        upstream (`str`): The upstream server's base URL, e.g. `"http://localhost:8000"` (its `/v1/completions` is
            called).
        base_model: The base model (transformers; a `PeftModel` works too, its adapters are disabled for the
            features), on any device, and its `tokenizer`: the router's features are computed as it was fitted.
        fallback (`str`, defaults to `"nearest"`): Where a prompt of no known task goes: `"nearest"` or `"base"`
            (forwarded with `model` set to the base model's name in the manifest).
        timeout (`float`, defaults to 120): Seconds to wait for the upstream server.

    Raises:
        FileNotFoundError: If `export_dir` has no manifest or no router.
        ValueError: If `fallback` is unknown.

    With a router fitted on chat-templated prompts (`scoring.use_chat_template=True`), the features are those of the
    templated prompt and the request carries its token ids (`prompt` as a list of ints, which vLLM's completions
    take), so the adapter answers the very tokens it was scored on.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        upstream: str,
        base_model: torch.nn.Module,
        tokenizer: Any,
        *,
        fallback: str = "nearest",
        timeout: float = 120.0,
    ):
        super().__init__(os.fspath(export_dir), fallback)
        self.timeout = timeout
        self.upstream = upstream.rstrip("/")
        self.base_model, self.tokenizer = base_model, tokenizer
        self._lock = threading.Lock()  # one forward pass of the base model at a time

    def route(self, prompt: str) -> Route:
        """The `Route` of `prompt`: the base model's features of it through the prompt router."""
        with self._lock:
            features = prompt_features(
                self.base_model, self.tokenizer, [prompt], use_chat_template=self.router.use_chat_template
            )
        return self._route_features(features)

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        model: str | None = None,
        max_tokens: int = 16,
        stop: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Answer `prompt` greedily upstream with the adapter of its task (as `RoutedLlamaCpp.complete`; the
        completion object is the upstream server's, whose `model` names the adapter that answered).

        Raises:
            KeyError: If `model` names neither a task nor a merged adapter.
            OSError: If the upstream server cannot be reached or answers with an error (`urllib.error.URLError`).
            ValueError: If an unlabelled request is token ids (only text is routed).
        """
        adapter, where = self.choose(prompt, model)
        name = self.manifest["base_model"]["name"] if adapter == BASE_ADAPTER else adapter
        if isinstance(prompt, str) and self.router.use_chat_template:  # the tokens the adapter was scored on
            prompt = prompt_token_ids(self.tokenizer, prompt, use_chat_template=True)
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        request = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            request["stop"] = list(stop)
        out = _post_json(f"{self.upstream}/v1/completions", request, self.timeout)
        out["d2c_route"] = where  # `model` stays the upstream's: the adapter that answered, by its own account
        return out


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def make_server(
    routed: RoutedLlamaCpp | RoutedUpstream, host: str = "127.0.0.1", port: int = 8080
) -> ThreadingHTTPServer:
    """An OpenAI-compatible HTTP front for `routed` (not started: call `serve_forever()`, or run it in a thread).

    `POST /v1/completions` takes `{"prompt": str or [token ids], "max_tokens"?: int, "stop"?: [str], "model"?: task
    or adapter}`; a text request without `model` is routed (token ids must name their `model`). `GET /v1/models`
    lists the tasks and adapters. Errors answer 400 (a bad request), 404 (an unknown path or model) or 502 (the
    upstream server of a `RoutedUpstream` failed) with `{"error": {"message"}}`. `port=0` picks a free port
    (`server.server_address[1]`).
    """

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: the caller logs what it needs
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                self._send(404, {"error": {"message": f"No route {self.path}; use /v1/models or /v1/completions."}})
                return
            models = [{"id": m, "object": "model", "owned_by": "peft-d2c"} for m in routed.models()]
            self._send(200, {"object": "list", "data": models})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": f"No route {self.path}; POST to /v1/completions."}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompt = request.get("prompt")
                ids = isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
                if not (isinstance(prompt, str) or ids) or not prompt:
                    raise ValueError(
                        "`prompt` must be a non-empty string, or a non-empty list of token ids (one prompt per request)."
                    )
                max_tokens = int(request.get("max_tokens", 16))
                stop = request.get("stop")
                stop = [stop] if isinstance(stop, str) else stop
            except (ValueError, TypeError) as error:
                self._send(400, {"error": {"message": str(error)}})
                return
            started = time.perf_counter()
            try:
                out = routed.complete(prompt, model=request.get("model"), max_tokens=max_tokens, stop=stop)
            except ValueError as error:  # a request that cannot be routed
                self._send(400, {"error": {"message": str(error)}})
                return
            except KeyError as error:
                self._send(404, {"error": {"message": str(error.args[0])}})
                return
            except OSError as error:  # urllib's URLError / HTTPError from the upstream server
                self._send(502, {"error": {"message": f"The upstream server failed: {error}"}})
                return
            out["d2c_seconds"] = time.perf_counter() - started
            self._send(200, out)

    return ThreadingHTTPServer((host, port), Handler)
