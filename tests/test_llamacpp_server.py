"""Requests without a task label answered by a real llama.cpp (issue 37): `peft-d2c serve` on a GGUF export.

A D2C run on four embedded tasks (SmolLM2-135M, K = 2) is saved, exported to GGUF and served by `RoutedLlamaCpp`
behind its HTTP front on a free local port. Held-out prompts are sent over real HTTP with no task label. What is
expected comes from elsewhere: the adapter from the prompt's task label and the run's routing table, the answer from a
separate llama.cpp instance of the base GGUF with that adapter's file, called directly.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from test_export_llamacpp import TASKS, base_gguf_file

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.embedded import load_embedded_peft_model, load_embedded_tasks
from peft_d2c.export import RoutedLlamaCpp, RoutedUpstream, export_d2c_folder, make_server

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the `llamacpp` extra (llama-cpp-python)")

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

MAX_TOKENS = 6
PROMPTS_PER_TASK = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tokenizer, _, _ = load_embedded_peft_model(tasks=TASKS, show_progress=False)
    fewshot = load_embedded_tasks("fewshot", tasks=TASKS)
    config = D2CMergeConfig(num_clusters=2, num_iterations=4, seed=0, show_progress=False)
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    root = tmp_path_factory.mktemp("serve")
    folder = result.save_pretrained(root / "result")
    export_dir = root / "gguf"
    manifest = export_d2c_folder(folder, export_dir, format="gguf", base_gguf=base_gguf_file())
    routed = RoutedLlamaCpp(export_dir, base_gguf_file(), n_threads=1)
    server = make_server(routed, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "routing": result.routing, "manifest": manifest,
           "export_dir": export_dir, "routed": routed, "folder": folder, "model": model,
           "tokenizer": tokenizer}  # fmt: skip
    server.shutdown()
    server.server_close()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def direct_answer(export_dir, adapter_file: str, prompt: str) -> str:
    """The greedy answer of a fresh llama.cpp instance: the base GGUF with one adapter file, no server, no router."""
    llm = llama_cpp.Llama(model_path=base_gguf_file(), lora_path=str(export_dir / adapter_file), n_ctx=2048,
                          n_threads=1, n_threads_batch=1, verbose=False)  # fmt: skip
    return llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0.0)["choices"][0]["text"]


def test_a_request_without_a_task_label_is_answered_by_its_tasks_merged_adapter(served):
    test = load_embedded_tasks("test", tasks=TASKS)
    for task in TASKS:
        adapter = served["routing"][task]  # from the task label and the run's routing table
        adapter_file = served["manifest"]["adapters"][adapter]["file"]
        for example in test[task][:PROMPTS_PER_TASK]:
            status, body = post(
                f"{served['url']}/v1/completions", {"prompt": example["prompt"], "max_tokens": MAX_TOKENS}
            )
            assert status == 200, body
            route = body["d2c_route"]
            assert (route["task"], route["adapter"], route["known"], route["labelled"]) == (task, adapter, True, False)
            assert body["model"] == adapter
            assert body["choices"][0]["text"] == direct_answer(served["export_dir"], adapter_file, example["prompt"])


def test_a_labelled_request_is_served_with_the_adapter_it_names(served):
    prompt = load_embedded_tasks("test", tasks=["plural"])["plural"][0]["prompt"]
    other = next(t for t in TASKS if served["routing"][t] != served["routing"]["plural"])
    adapter = served["routing"][other]  # on purpose the adapter of another task than the prompt's
    status, body = post(
        f"{served['url']}/v1/completions", {"prompt": prompt, "model": other, "max_tokens": MAX_TOKENS}
    )
    assert status == 200 and body["d2c_route"] == {"task": other, "adapter": adapter, "labelled": True}
    file = served["manifest"]["adapters"][adapter]["file"]
    assert body["choices"][0]["text"] == direct_answer(served["export_dir"], file, prompt)


def test_prompts_of_no_known_task_and_bad_requests(served):
    status, body = post(f"{served['url']}/v1/completions", {"prompt": "Wie wird das Wetter morgen in Berlin?"})
    assert status == 200 and body["d2c_route"]["known"] is False
    status, body = post(f"{served['url']}/v1/completions", {"prompt": "a", "model": "no_such_task"})
    assert status == 404 and "neither a task nor a merged adapter" in body["error"]["message"]
    assert post(f"{served['url']}/v1/completions", {"max_tokens": 3})[0] == 400
    with urllib.request.urlopen(f"{served['url']}/v1/models", timeout=30) as response:
        ids = [m["id"] for m in json.loads(response.read())["data"]]
    assert ids == sorted(TASKS) + list(served["manifest"]["adapters"])


def test_the_server_refuses_another_base_file_and_an_export_without_gguf(served, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the base")
    with pytest.raises(ValueError, match="not the base GGUF"):
        RoutedLlamaCpp(served["export_dir"], other)
    with pytest.raises(FileNotFoundError, match="export the result first"):
        RoutedLlamaCpp(tmp_path, base_gguf_file())


def start(routed) -> tuple[str, object]:
    server = make_server(routed, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture(scope="module")
def front(served, tmp_path_factory):
    """The routing front of a vLLM export (`RoutedUpstream`: transformers features, the request forwarded with
    `model` set to the merged adapter's name) in front of an OpenAI-compatible server that serves the adapters by
    name: here the llama.cpp server above, as vLLM would with the export's `--lora-modules`."""
    export_dir = tmp_path_factory.mktemp("vllm") / "vllm"
    manifest = export_d2c_folder(served["folder"], export_dir, format="vllm")
    assert [m["name"] for m in manifest["vllm"]["lora_modules"]] == list(served["manifest"]["adapters"])
    routed = RoutedUpstream(export_dir, served["url"], served["model"], served["tokenizer"])
    url, server = start(routed)
    yield url
    server.shutdown()
    server.server_close()


def test_the_front_of_an_upstream_server_routes_and_forwards_by_adapter_name(served, front):
    test = load_embedded_tasks("test", tasks=TASKS)
    for task in TASKS:
        adapter = served["routing"][task]
        adapter_file = served["manifest"]["adapters"][adapter]["file"]
        for example in test[task][:PROMPTS_PER_TASK]:
            status, body = post(f"{front}/v1/completions", {"prompt": example["prompt"], "max_tokens": MAX_TOKENS})
            assert status == 200, body
            route = body["d2c_route"]
            assert (route["task"], route["adapter"], route["known"], route["labelled"]) == (task, adapter, True, False)
            assert body["model"] == adapter  # the upstream's own account of the adapter that answered
            assert body["choices"][0]["text"] == direct_answer(served["export_dir"], adapter_file, example["prompt"])
    prompt = test["plural"][0]["prompt"]
    other = next(t for t in TASKS if served["routing"][t] != served["routing"]["plural"])
    status, body = post(f"{front}/v1/completions", {"prompt": prompt, "model": other, "max_tokens": MAX_TOKENS})
    adapter = served["routing"][other]
    assert status == 200 and body["d2c_route"] == {"task": other, "adapter": adapter, "labelled": True}
    assert body["model"] == adapter  # not the prompt's own task's adapter, which the upstream would route it to
    file = served["manifest"]["adapters"][adapter]["file"]
    assert body["choices"][0]["text"] == direct_answer(served["export_dir"], file, prompt)


def test_the_front_reports_an_unreachable_upstream(served, front, tmp_path):
    vllm_dir = tmp_path / "vllm"
    export_d2c_folder(served["folder"], vllm_dir, format="vllm")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    url, server = start(RoutedUpstream(vllm_dir, f"http://127.0.0.1:{closed}", served["model"], served["tokenizer"]))
    try:
        status, body = post(f"{url}/v1/completions", {"prompt": "Country: Chile\nCapital:"})
        assert status == 502 and "upstream server failed" in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(FileNotFoundError, match="export the result first"):
        RoutedUpstream(tmp_path / "nothing", url, served["model"], served["tokenizer"])


@pytest.fixture(scope="module")
def chat_served(served, tmp_path_factory):
    """A run scored on chat-templated prompts (`use_chat_template=True`), exported twice: to GGUF, served by
    llama.cpp (labelled requests only: its embedding reads raw text), and to vLLM's layout behind `RoutedUpstream`,
    which routes on the templated prompt's features and forwards its token ids."""
    model, tokenizer = served["model"], served["tokenizer"]
    fewshot = load_embedded_tasks("fewshot", tasks=TASKS)
    config = D2CMergeConfig(
        num_clusters=2, num_iterations=4, seed=0, show_progress=False, scoring={"use_chat_template": True},
        merged_adapter_prefix="chat",
    )  # fmt: skip
    result = merge_adapters_d2c(model, fewshot, config, tokenizer=tokenizer)
    root = tmp_path_factory.mktemp("chat")
    folder = result.save_pretrained(root / "result")
    gguf_dir = root / "gguf"
    manifest = export_d2c_folder(folder, gguf_dir, format="gguf", base_gguf=base_gguf_file())
    export_d2c_folder(folder, root / "vllm", format="vllm")
    upstream_url, upstream = start(RoutedLlamaCpp(gguf_dir, base_gguf_file(), n_threads=1))
    front_url, front = start(RoutedUpstream(root / "vllm", upstream_url, model, tokenizer))
    yield {"upstream": upstream_url, "front": front_url, "routing": result.routing, "manifest": manifest,
           "export_dir": gguf_dir, "tokenizer": tokenizer}  # fmt: skip
    for server in (front, upstream):
        server.shutdown()
        server.server_close()


def test_a_chat_template_run_is_routed_and_answered_on_its_templated_tokens(chat_served):
    tokenizer = chat_served["tokenizer"]
    test = load_embedded_tasks("test", tasks=TASKS)
    for task in TASKS:
        adapter = chat_served["routing"][task]
        adapter_file = chat_served["manifest"]["adapters"][adapter]["file"]
        for example in test[task][:PROMPTS_PER_TASK]:
            status, body = post(
                f"{chat_served['front']}/v1/completions", {"prompt": example["prompt"], "max_tokens": MAX_TOKENS}
            )
            assert status == 200, body
            assert body["d2c_route"]["adapter"] == adapter and body["model"] == adapter
            # transformers' own rendering of one user turn, tokenised by it: the tokens the adapter must answer
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": example["prompt"]}], add_generation_prompt=True, tokenize=True,
                return_dict=True,
            )["input_ids"]  # fmt: skip
            llm = llama_cpp.Llama(model_path=base_gguf_file(), lora_path=str(chat_served["export_dir"] / adapter_file),
                                  n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)  # fmt: skip
            expected = llm.create_completion(ids, max_tokens=MAX_TOKENS, temperature=0.0)["choices"][0]["text"]
            assert body["choices"][0]["text"] == expected


def test_llama_cpp_serves_a_chat_template_run_for_labelled_requests_only(chat_served):
    url = f"{chat_served['upstream']}/v1/completions"
    status, body = post(url, {"prompt": "Noun: eagle\nPlural:"})
    assert status == 400 and "chat-templated" in body["error"]["message"]
    status, body = post(url, {"prompt": [1, 2, 3]})
    assert status == 400 and "token ids is not routed" in body["error"]["message"]
    status, body = post(url, {"prompt": [1, 2, 3], "model": "plural", "max_tokens": 2})
    assert status == 200 and body["d2c_route"]["labelled"] is True


def test_the_serve_command_routes_for_an_upstream_server(served, tmp_path):
    """`peft-d2c serve EXPORT --upstream URL --base-model PATH` as a user starts it: its own process, the base model
    loaded by transformers from a folder, the answer coming from the upstream server with the routed adapter."""
    vllm_dir = tmp_path / "vllm"
    export_d2c_folder(served["folder"], vllm_dir, format="vllm")
    base = served["model"].get_base_model().config._name_or_path  # the embedded base model's local folder
    command = [sys.executable, "-m", "peft_d2c.cli", "serve", str(vllm_dir), "--upstream", served["url"],
               "--base-model", base, "--port", "0"]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"http://[\w.]+:\d+", line)
        assert match, line
        prompt = load_embedded_tasks("test", tasks=["plural"])["plural"][0]["prompt"]
        status, body = post(f"{match.group(0)}/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS})
        adapter = served["routing"]["plural"]
        assert status == 200 and body["d2c_route"]["adapter"] == adapter and body["model"] == adapter
        file = served["manifest"]["adapters"][adapter]["file"]
        assert body["choices"][0]["text"] == direct_answer(served["export_dir"], file, prompt)
    finally:
        process.terminate()
        process.wait(timeout=60)
