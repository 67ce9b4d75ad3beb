"""Hub integration against the local Hub test server: adapters in from repos and collections, few-shot data from a
Hub dataset, a real D2C run, the result pushed with both layouts, downloaded again and compared logit for logit."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from urllib.parse import quote

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CWarning, UnsupportedAdapterError, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.data.spec import load_task_examples
from peft_d2c.hub import D2CPushError, load_adapters, load_d2c_collection, push_d2c_folder

FAMILIES = ["copy", "reverse", "first", "last"]
BASE_ID = "tiny-org/tiny-llama"
INPUT_IDS = torch.tensor([[1, 4, 5, 6, 12, 7], [1, 9, 9, 10, 12, 4]])


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _logits(model, adapter: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        if adapter is None:
            return model(input_ids=INPUT_IDS).logits
        return model(input_ids=INPUT_IDS, adapter_names=[adapter] * len(INPUT_IDS)).logits


def _base(tiny_assets) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_assets[0]).eval()


def _has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_modules())


@pytest.fixture(scope="module")
def api(hub_server) -> HfApi:
    return HfApi(endpoint=hub_server.url, token="dummy-token")


@pytest.fixture(scope="module")
def hub_sources(api, hub_server, tiny_assets, tmp_path_factory):
    """Four task adapters pushed as `{owner}/lora-{family}` repos, a collection of them (plus a dataset item), and a
    dataset repo with one config per task."""
    owner = f"alice{_uid()}"
    _, adapter_dirs = tiny_assets
    repos = []
    for family in FAMILIES:
        repo_id = f"{owner}/lora-{family}"
        api.create_repo(repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=adapter_dirs[family], commit_message="add adapter")
        repos.append(repo_id)
    dataset_id = f"{owner}/word-tasks"
    root = tmp_path_factory.mktemp("dataset")
    readme = "---\nconfigs:\n"
    for family in FAMILIES:
        rows = tiny.make_examples(family, 12, seed=3)
        (root / family).mkdir()
        with open(root / family / "train.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({"symbols": row["prompt"][:-2], "answer": row["completion"]}) + "\n")
        readme += f"- config_name: {family}\n  data_files:\n  - split: train\n    path: {family}/train.jsonl\n"
    (root / "README.md").write_text(readme + "---\n# Tiny word tasks\n")
    api.create_repo(dataset_id, repo_type="dataset")
    api.upload_folder(repo_id=dataset_id, folder_path=root, repo_type="dataset", commit_message="data")
    slug = f"{owner}/tiny-loras-{uuid.uuid4().hex[:24]}"
    items = [{"id": r, "type": "model"} for r in repos] + [{"id": dataset_id, "type": "dataset"}]
    hub_server.add_collection(slug, "Tiny LoRAs", items)
    return {"owner": owner, "repos": repos, "slug": slug, "dataset": dataset_id}


@pytest.fixture(scope="module")
def d2c_run(hub_sources, tiny_assets, tmp_path_factory):
    """The full workflow: collection in, Hub few-shot data, a real D2C run, the result saved to a folder."""
    model = load_adapters(_base(tiny_assets), hub_sources["slug"])
    spec = {
        "defaults": {"path": hub_sources["dataset"], "num_examples": 8, "prompt_template": "{symbols} =",
                     "completion_template": "{answer}"},
        "tasks": {f"lora-{family}": {"name": family} for family in FAMILIES},
    }  # fmt: skip
    examples = load_task_examples(spec)
    config = D2CMergeConfig(num_clusters=2, num_iterations=4, show_progress=False, scoring={"examples_per_task": 8})
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny.make_tokenizer())
    result.data_sources = examples.data_sources
    result.heldout_scores = {task: 0.5 for task in result.routing}
    result.heldout_whole_scores = {task: 0.25 for task in result.routing}
    folder = str(tmp_path_factory.mktemp("d2c") / "result")
    result.save_pretrained(folder)
    return result, folder


class TestLoadAdapters:
    def test_from_collection_slug_keeps_model_items_pinned_to_their_commit(self, hub_sources, hub_server, tiny_assets):
        model = load_adapters(_base(tiny_assets), hub_sources["slug"])
        assert list(model.peft_config) == [f"lora-{f}" for f in FAMILIES]
        for family, repo_id in zip(FAMILIES, hub_sources["repos"], strict=True):
            source = model.d2c_adapter_sources[f"lora-{family}"]
            assert source == {"repo_id": repo_id, "revision": hub_server.commits(repo_id)[-1], "subfolder": None}
        reference = tiny.load_peft_model(tiny_assets[0], {"copy": tiny_assets[1]["copy"]})
        assert torch.equal(_logits(model, "lora-copy"), _logits(reference, "copy"))
        assert not any(p.requires_grad for p in model.parameters())

    def test_repo_ids_with_revision_and_subfolder(self, api, tiny_assets, tmp_path):
        _, adapter_dirs = tiny_assets
        repo_id = f"bob{_uid()}/bundle"
        api.create_repo(repo_id)
        first = api.upload_folder(repo_id=repo_id, folder_path=adapter_dirs["copy"], path_in_repo="task",
                                  commit_message="copy").oid  # fmt: skip
        api.upload_folder(
            repo_id=repo_id, folder_path=adapter_dirs["reverse"], path_in_repo="task", commit_message="rev"
        )
        model = load_adapters(
            _base(tiny_assets),
            [f"{repo_id}/task@{first}", {"repo_id": repo_id, "subfolder": "task"}],
            names=["old", "new"],
        )
        reference = tiny.load_peft_model(tiny_assets[0], {k: adapter_dirs[k] for k in ("copy", "reverse")})
        assert torch.equal(_logits(model, "old"), _logits(reference, "copy"))
        assert torch.equal(_logits(model, "new"), _logits(reference, "reverse"))
        assert model.d2c_adapter_sources["old"] == {"repo_id": repo_id, "revision": first, "subfolder": "task"}
        assert model.d2c_adapter_sources["new"]["revision"] != first

    def test_default_names_are_safe_unique_and_clear_of_module_attributes(self, tiny_assets, tmp_path):
        src = tiny_assets[1]["copy"]
        paths = [tmp_path / "lora.v1", tmp_path / "train", tmp_path / "a" / "same", tmp_path / "b" / "same"]
        for path in paths:
            shutil.copytree(src, path)
        model = load_adapters(_base(tiny_assets), [str(p) for p in paths])
        assert list(model.peft_config) == ["lora_v1", "train_adapter", "same", "same_2"]
        assert model.d2c_adapter_sources["same_2"] == {"path": str(paths[3])}
        assert callable(model.train)

    @pytest.mark.parametrize("bad_name", ["a.b", "train", "1st"])
    def test_explicit_bad_names_are_refused(self, tiny_assets, bad_name):
        base = _base(tiny_assets)
        with pytest.raises(ValueError, match="Adapter name"):
            load_adapters(base, [tiny_assets[1]["copy"]], names=[bad_name])
        assert not _has_lora(base)

    @pytest.mark.parametrize("kind", ["dora", "ia3", "shapes", "modules", "not_an_adapter"])
    def test_bad_source_is_refused_before_anything_is_loaded(self, kind, tiny_assets, tmp_path):
        bad = tmp_path / kind
        if kind == "dora":
            model = get_peft_model(_base(tiny_assets), tiny.lora_config(use_dora=True))
            model.save_pretrained(bad)
            error, match = UnsupportedAdapterError, "DoRA"
        elif kind == "ia3":
            config = IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])
            get_peft_model(_base(tiny_assets), config).save_pretrained(bad)
            error, match = UnsupportedAdapterError, "'IA3' adapter; only LoRA"
        elif kind == "shapes":
            other = tiny.make_base_model()
            bigger = LlamaForCausalLM(other.config.__class__(**{**other.config.to_dict(), "hidden_size": 32}))
            get_peft_model(bigger, tiny.lora_config()).save_pretrained(bad)
            error, match = ValueError, "does not fit module"
        elif kind == "modules":
            gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=len(tiny.VOCAB)))
            get_peft_model(gpt2, LoraConfig(target_modules=["c_attn"])).save_pretrained(bad)
            error, match = ValueError, "match no module of the base model"
        else:
            bad.mkdir()
            (bad / "config.json").write_text("{}")
            error, match = UnsupportedAdapterError, "not a PEFT adapter"
        base = _base(tiny_assets)
        with pytest.raises(error, match=match):
            load_adapters(base, [tiny_assets[1]["copy"], str(bad)])
        assert not _has_lora(base), "nothing may be loaded when one source is refused"

    def test_other_base_model_name_warns_or_raises(self, tiny_assets, tmp_path):
        moved = tmp_path / "moved"
        shutil.copytree(tiny_assets[1]["copy"], moved)
        config = json.loads((moved / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "someone/other-model"
        (moved / "adapter_config.json").write_text(json.dumps(config))
        with pytest.warns(D2CWarning, match="trained on base model 'someone/other-model'"):
            load_adapters(_base(tiny_assets), [str(moved)])
        base = _base(tiny_assets)
        with pytest.raises(ValueError, match="strict_base_model=True"):
            load_adapters(base, [str(moved)], strict_base_model=True)
        assert not _has_lora(base)

    def test_missing_hub_repo_and_non_adapter_repo(self, api, tiny_assets):
        with pytest.raises(FileNotFoundError, match="not found on the Hub"):
            load_adapters(_base(tiny_assets), f"nobody{_uid()}/missing")
        repo_id = f"carol{_uid()}/not-an-adapter"
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
        with pytest.raises(UnsupportedAdapterError, match="has no adapter_config.json"):
            load_adapters(_base(tiny_assets), repo_id)


def _check_card_metadata(card: ModelCard, *, model_name: str, tasks: list[str], result, dataset_id: str) -> None:
    data = card.data
    assert data.library_name == "peft"
    assert data.base_model == BASE_ID
    assert data.to_dict()["base_model_relation"] == "adapter"
    assert {"peft", "lora", "d2c", "merge"} <= set(data.tags)
    assert data.datasets == [dataset_id]
    assert data.model_name == model_name
    losses = {r.dataset_name: r.metric_value for r in data.eval_results if r.metric_type == "loss"}
    assert losses == pytest.approx({t: result.task_losses[t] for t in tasks}, abs=1e-5)
    heldout = {
        (r.dataset_name, r.metric_name, r.metric_value) for r in data.eval_results if r.metric_type == "exact_match"
    }
    first, whole = "held-out exact match (first word)", "held-out exact match (whole answer)"
    assert heldout == {(t, first, 0.5) for t in tasks} | {(t, whole, 0.25) for t in tasks}  # the card says which
    assert {r.dataset_type for r in data.eval_results} == {dataset_id}
    assert {r.dataset_config for r in data.eval_results} == {t.removeprefix("lora-") for t in tasks}
    assert "2601.17441" in card.text and "@inproceedings" in card.text


class TestPush:
    def test_subfolders_layout_round_trips_logits_and_cards(self, d2c_run, hub_server, hub_sources, tiny_assets):
        result, folder = d2c_run
        repo_id = f"{hub_sources['owner']}/tiny-d2c-{_uid()}"
        pushed = push_d2c_folder(folder, repo_id, base_model_id=BASE_ID)
        assert pushed.repo_ids == [repo_id] and pushed.created == [repo_id]
        assert hub_server.commits(repo_id)[1:] == pushed.commit_oids  # initial commit + exactly one push commit

        local = snapshot_download(repo_id)
        assert json.loads(open(os.path.join(local, "d2c_routing.json")).read()) == result.routing
        assert {"d2c_config.json", "d2c_result.json", "README.md"} <= set(os.listdir(local))
        for i, name in enumerate(result.merged_adapter_names):
            expected = _logits(result.model, name)
            source = local if i == 0 else repo_id  # from the downloaded snapshot, and straight from the Hub
            loaded = PeftModel.from_pretrained(_base(tiny_assets), source, subfolder=name).eval()
            assert torch.allclose(_logits(loaded), expected, atol=1e-6)
            adapter_config = json.loads(open(os.path.join(local, name, "adapter_config.json")).read())
            assert adapter_config["base_model_name_or_path"] == BASE_ID
            card = ModelCard.load(hf_hub_download(repo_id, f"{name}/README.md"))
            tasks = sorted(t for t, a in result.routing.items() if a == name)
            _check_card_metadata(card, model_name=f"{repo_id}/{name}", tasks=tasks, result=result,
                                 dataset_id=hub_sources["dataset"])  # fmt: skip
            assert f'subfolder="{name}"' in card.text and "`combination_type='regmean'`." in card.text
            assert "density" not in card.text  # regmean does not prune: the card names no density
            for member in result.clusters[i]:
                assert f"`{member}`" in card.text
        card = ModelCard.load(repo_id)
        _check_card_metadata(card, model_name=repo_id, tasks=sorted(result.routing), result=result,
                             dataset_id=hub_sources["dataset"])  # fmt: skip
        assert "2 merged adapters stored instead of 4" in card.text
        assert "`paper` search, 4 proposed moves" in card.text  # the config's search and its T

        with pytest.warns(D2CWarning, match="Names are unreliable"):  # pushed for BASE_ID, loaded from a local path
            model, router = load_d2c_collection(_base(tiny_assets), repo_id)
        for task, name in result.routing.items():
            with router.task(task):
                assert torch.allclose(_logits(model), _logits(result.model, name), atol=1e-6)
        # the prompt router came with it, from the same commit: same centroids, same routes as the run's
        assert {"d2c_router.json", "d2c_router.safetensors"} <= set(os.listdir(local))
        assert torch.equal(router.prompt_router.centroids, result.prompt_router.centroids)
        prompts = [e["prompt"] for e in tiny.make_examples("sort", 3, seed=5)]
        assert router.route(prompts, tiny.make_tokenizer()) == result.route(prompts)
        assert "A request without a task label" in card.text

    def test_repos_layout_writes_one_repo_per_cluster(self, d2c_run, hub_server, hub_sources, tiny_assets):
        result, folder = d2c_run
        prefix = f"{hub_sources['owner']}/tiny-d2c-{_uid()}"
        pushed = push_d2c_folder(folder, prefix, base_model_id=BASE_ID, layout="repos")
        assert pushed.repo_ids == [f"{prefix}-cluster-{i}" for i in range(2)]
        for repo_id, name in zip(pushed.repo_ids, result.merged_adapter_names, strict=True):
            assert len(hub_server.commits(repo_id)) == 2
            loaded = PeftModel.from_pretrained(_base(tiny_assets), snapshot_download(repo_id)).eval()
            assert torch.allclose(_logits(loaded), _logits(result.model, name), atol=1e-6)
            card = ModelCard.load(repo_id)
            tasks = sorted(t for t, a in result.routing.items() if a == name)
            _check_card_metadata(
                card, model_name=repo_id, tasks=tasks, result=result, dataset_id=hub_sources["dataset"]
            )
            assert all(other in card.text for other in pushed.repo_ids)
        for target in (prefix, pushed.repo_ids):
            with pytest.warns(D2CWarning, match="Names are unreliable"):
                model, router = load_d2c_collection(_base(tiny_assets), target)
            assert router.routing == result.routing
            assert torch.equal(router.prompt_router.centroids, result.prompt_router.centroids)  # from the first repo
            task = next(iter(result.routing))
            router.set_task(task)
            assert torch.allclose(_logits(model), _logits(result.model, result.routing[task]), atol=1e-6)

    def test_failed_upload_leaves_an_existing_repo_unchanged(self, api, d2c_run, hub_server, hub_sources):
        _, folder = d2c_run
        repo_id = f"{hub_sources['owner']}/tiny-d2c-{_uid()}"
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=b"kept", path_in_repo="notes.txt", repo_id=repo_id)
        before = hub_server.commits(repo_id)
        failures = [
            (f"POST /__lfs/model/{quote(repo_id, safe='')}/verify/", 422),  # mid-way through the LFS uploads
            (f"POST /api/models/{repo_id}/commit/", 500),  # after the LFS uploads, at the commit
        ]
        for failing, status in failures:
            hub_server.fail_next(failing, status)
            with pytest.raises(D2CPushError, match=f"(?s)Pushing to '{repo_id}' failed.*the repo is unchanged"):
                push_d2c_folder(folder, repo_id, base_model_id=BASE_ID)
            assert hub_server.pending_failures() == []
            assert hub_server.commits(repo_id) == before
            assert hub_server.list_files(repo_id) == [".gitattributes", "notes.txt"]
        pushed = push_d2c_folder(folder, repo_id, base_model_id=BASE_ID)
        assert pushed.created == [] and hub_server.commits(repo_id) == [*before, *pushed.commit_oids]
        assert "notes.txt" in hub_server.list_files(repo_id)

    def test_failed_push_deletes_the_repo_it_created(self, d2c_run, hub_server, hub_sources):
        _, folder = d2c_run
        repo_id = f"{hub_sources['owner']}/tiny-d2c-{_uid()}"
        hub_server.fail_next(f"POST /api/models/{repo_id}/commit/", 503)
        with pytest.raises(D2CPushError, match="deleted again"):
            push_d2c_folder(folder, repo_id, base_model_id=BASE_ID)
        assert not hub_server.repo_exists(repo_id)

    def test_repos_layout_failure_reports_written_repos(self, d2c_run, hub_server, hub_sources):
        _, folder = d2c_run
        prefix = f"{hub_sources['owner']}/tiny-d2c-{_uid()}"
        hub_server.fail_next(f"POST /api/models/{prefix}-cluster-1/commit/", 500)
        with pytest.raises(D2CPushError, match="Repos already written") as info:
            push_d2c_folder(folder, prefix, base_model_id=BASE_ID, layout="repos")
        assert info.value.written_repos == [f"{prefix}-cluster-0"]
        assert hub_server.repo_exists(f"{prefix}-cluster-0") and not hub_server.repo_exists(f"{prefix}-cluster-1")

    def test_local_base_model_needs_a_hub_id(self, d2c_run, tiny_assets):
        result, folder = d2c_run
        assert result.base_model == tiny_assets[0]
        with pytest.raises(ValueError, match="pass `base_model_id=`"):
            push_d2c_folder(folder, "someone/x")
        with pytest.raises(ValueError, match="`layout` must be one of"):
            push_d2c_folder(folder, "someone/x", base_model_id=BASE_ID, layout="flat")

    def test_token_is_never_written_or_logged(self, d2c_run, hub_server, hub_sources, caplog):
        _, folder = d2c_run
        secret = f"hf_SECRET{_uid()}"
        repo_id = f"{hub_sources['owner']}/tiny-d2c-{_uid()}"
        with caplog.at_level(logging.DEBUG):
            push_d2c_folder(folder, repo_id, base_model_id=BASE_ID, token=secret)
        assert secret not in caplog.text
        for root, _, files in os.walk(hub_server.root):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    assert secret.encode() not in f.read(), f"token written to {name}"


class TestRouter:
    def test_local_folder_collection_and_task_switching(self, d2c_run, tiny_assets):
        result, folder = d2c_run
        model, router = load_d2c_collection(_base(tiny_assets), folder)
        assert sorted(model.peft_config) == sorted(result.merged_adapter_names)
        assert router.tasks == sorted(result.routing) and len(router) == len(result.routing)
        first, second = result.merged_adapter_names
        task_first = next(t for t, a in result.routing.items() if a == first)
        task_second = next(t for t, a in result.routing.items() if a == second)
        assert router.set_task(task_first) == first
        with router.task(task_second) as name:
            assert name == second and model.active_adapter == second
            assert torch.allclose(_logits(model), _logits(result.model, second), atol=1e-6)
        assert model.active_adapter == first
        assert router.set_task(task_second) == second and model.active_adapter == second
        assert not any(p.requires_grad for p in model.parameters())
        assert router.adapter_names_for([task_second]) == [second]
        with pytest.raises(KeyError, match=r"Unknown task 'nope'; known tasks: \["):
            router.adapter_for("nope")


class TestExample:
    def test_hub_workflow_script_runs_end_to_end_against_the_server(
        self, hub_server, hub_sources, tiny_assets, tmp_path
    ):
        """`examples/hub_workflow.py` in a fresh process: collection in, Hub few-shot data, D2C, push, reload."""
        import subprocess
        import sys

        spec = tmp_path / "spec.yaml"
        tasks = "".join(f"  lora-{f}: {{name: {f}}}\n" for f in FAMILIES)
        spec.write_text(
            f"defaults:\n  path: {hub_sources['dataset']}\n  num_examples: 6\n  prompt_template: '{{symbols}} ='\n"
            f"  completion_template: '{{answer}}'\ntasks:\n{tasks}"
        )
        repo_id = f"{hub_sources['owner']}/example-{_uid()}"
        script = os.path.join(os.path.dirname(__file__), "..", "examples", "hub_workflow.py")
        args = [sys.executable, script, "--endpoint", hub_server.url, "--no-xet", "--token", "dummy-token",
                "--base-model", tiny_assets[0], "--base-model-id", BASE_ID, "--collection", hub_sources["slug"],
                "--data-spec", str(spec), "--clusters", "2", "--iterations", "3", "--repo-id", repo_id,
                "--output", str(tmp_path / "out"), "--check"]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"Pushed {repo_id}" in done.stdout
        check = re.search(r"reloaded 2 adapters for 4 tasks, max logit difference (\S+)", done.stdout)
        assert check is not None and float(check.group(1)) < 1e-5, done.stdout
        assert len(hub_server.commits(repo_id)) == 2
        assert "dummy-token" not in done.stdout + done.stderr


def _with_extra_cluster(folder: str, out: str) -> str:
    """A copy of a saved 2-cluster result as a 3-cluster one (a third adapter folder serving one task)."""
    shutil.copytree(folder, out)
    data = json.loads(open(os.path.join(out, "d2c_result.json")).read())
    routing = json.loads(open(os.path.join(out, "d2c_routing.json")).read())
    extra = "d2c_2"
    shutil.copytree(os.path.join(out, data["merged_adapter_names"][0]), os.path.join(out, extra))
    task = sorted(routing)[0]
    routing[task] = extra
    data["merged_adapter_names"] = [*data["merged_adapter_names"], extra]
    data["clusters"] = [[t for t in members if t != task] for members in data["clusters"]] + [[task]]
    data["routing"] = routing
    for name, payload in (("d2c_result.json", data), ("d2c_routing.json", routing)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(payload, f)
    return out


class TestPushSafety:
    def test_private_push_to_an_existing_public_repo_is_refused(self, api, d2c_run, hub_sources):
        _, folder = d2c_run
        repo_id = f"{hub_sources['owner']}/public-{_uid()}"
        api.create_repo(repo_id, private=False)
        commits = len(api.list_repo_commits(repo_id))
        with pytest.raises(D2CPushError, match="already exists and is public"):
            push_d2c_folder(folder, repo_id, base_model_id=BASE_ID, private=True)
        assert len(api.list_repo_commits(repo_id)) == commits  # nothing was uploaded
        pushed = push_d2c_folder(folder, repo_id, base_model_id=BASE_ID, private=True, allow_public=True)
        assert pushed.repo_ids == [repo_id]

    def test_default_push_creates_repos_with_the_accounts_default_visibility(
        self, api, d2c_run, hub_server, hub_sources
    ):
        """`private` defaulted to False and was sent as `"visibility": "public"`, so a push made a repo public even
        where the account's setting makes new repos private; `None` (huggingface_hub's default) leaves it to the
        Hub, and an explicit `private` still wins."""
        result, folder = d2c_run
        owner = f"private-org-{_uid()}"
        hub_server.set_private_by_default(owner)
        default = push_d2c_folder(folder, f"{owner}/default-{_uid()}", base_model_id=BASE_ID)
        repos = push_d2c_folder(folder, f"{owner}/split-{_uid()}", base_model_id=BASE_ID, layout="repos")
        method = result.push_to_hub(f"{owner}/method-{_uid()}", base_model_id=BASE_ID)
        public = push_d2c_folder(folder, f"{owner}/public-{_uid()}", base_model_id=BASE_ID, private=False)
        for pushed, private in ((default, True), (repos, True), (method, True), (public, False)):
            assert pushed.created == pushed.repo_ids and len(pushed.repo_ids) >= 1
            assert [api.model_info(r).private for r in pushed.repo_ids] == [private] * len(pushed.repo_ids)
        elsewhere = push_d2c_folder(folder, f"{hub_sources['owner']}/default-{_uid()}", base_model_id=BASE_ID)
        assert api.model_info(elsewhere.repo_ids[0]).private is False  # an account without the setting: public

    def test_re_push_with_fewer_clusters_deletes_the_stale_adapters_in_one_commit(
        self, api, d2c_run, hub_server, hub_sources, tmp_path
    ):
        _, folder = d2c_run
        repo_id = f"{hub_sources['owner']}/shrink-{_uid()}"
        push_d2c_folder(_with_extra_cluster(folder, str(tmp_path / "three")), repo_id, base_model_id=BASE_ID)
        api.upload_file(path_or_fileobj=b"keep me", path_in_repo="notes/mine.txt", repo_id=repo_id)
        assert any(f.startswith("d2c_2/") for f in api.list_repo_files(repo_id))
        commits = hub_server.commits(repo_id)
        pushed = push_d2c_folder(folder, repo_id, base_model_id=BASE_ID)
        files = api.list_repo_files(repo_id)
        assert not any(f.startswith("d2c_2/") for f in files)
        assert "notes/mine.txt" in files and "d2c_0/adapter_config.json" in files
        assert hub_server.commits(repo_id) == [*commits, pushed.commit_oids[0]]  # one commit added and removed
        assert sorted(pushed.deleted_files) == sorted(
            f"{repo_id}/d2c_2/{n}" for n in ("README.md", "adapter_config.json", "adapter_model.safetensors")
        )

    def test_repos_layout_lists_stale_cluster_repos_and_deletes_them_on_request(
        self, api, d2c_run, hub_sources, tmp_path
    ):
        _, folder = d2c_run
        prefix = f"{hub_sources['owner']}/layout-{_uid()}"
        push_d2c_folder(
            _with_extra_cluster(folder, str(tmp_path / "three")), prefix, base_model_id=BASE_ID, layout="repos"
        )
        pushed = push_d2c_folder(folder, prefix, base_model_id=BASE_ID, layout="repos")
        assert pushed.stale_repos == [f"{prefix}-cluster-2"] and api.repo_exists(f"{prefix}-cluster-2")
        pushed = push_d2c_folder(folder, prefix, base_model_id=BASE_ID, layout="repos", delete_stale_repos=True)
        assert pushed.stale_repos == [f"{prefix}-cluster-2"] and not api.repo_exists(f"{prefix}-cluster-2")

    def test_local_paths_never_reach_the_hub(self, api, d2c_run, hub_sources, tmp_path):
        _, folder = d2c_run
        local = shutil.copytree(folder, str(tmp_path / "local"))
        path = os.path.join(local, "d2c_result.json")
        data = json.loads(open(path).read())
        task = sorted(data["routing"])[0]
        data["sources"][task] = {"path": "/home/alice/private-loras/lora-x"}
        data["data_sources"][task] = {"path": "/home/alice/data/train.jsonl", "name": None, "split": "train"}
        data["base_model"] = "/home/alice/models/tiny-llama"
        with open(path, "w") as f:
            json.dump(data, f)
        repo_id = f"{hub_sources['owner']}/paths-{_uid()}"
        push_d2c_folder(local, repo_id, base_model_id=BASE_ID)
        for filename in api.list_repo_files(repo_id):
            if filename.endswith((".json", ".md")):
                assert "/home/alice" not in open(hf_hub_download(repo_id, filename)).read(), filename
        pushed = json.loads(open(hf_hub_download(repo_id, "d2c_result.json")).read())
        assert pushed["sources"][task] == {"path": "lora-x"} and pushed["data_sources"][task]["path"] == "train.jsonl"
        assert pushed["base_model"] == BASE_ID
