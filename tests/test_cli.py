"""The `peft-d2c` command: every subcommand on the tiny model, in-process through `main(argv)`, plus a few real
subprocess runs (real files, the local Hub test server where it pushes), and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from peft_d2c import D2CResult
from peft_d2c import testing as tiny
from peft_d2c.cli import main

NEW = "shift"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One model/adapter cache for the module, so the tiny assets are built once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_assets) -> dict[str, str]:
    """Real files for the commands: few-shot and held-out JSONL data, data specs, a run config, new-task examples."""
    root = tmp_path_factory.mktemp("cli")
    base_dir, adapter_dirs = tiny_assets
    for split, count, seed in (("fewshot", 10, 7), ("heldout", 6, 11)):
        tasks = {}
        for family in tiny.TASK_FAMILIES:
            path = root / f"{family}-{split}.jsonl"
            path.write_text("".join(json.dumps(e) + "\n" for e in tiny.make_examples(family, count, seed=seed)))
            if family != NEW:
                tasks[family] = {"path": str(path)}
        (root / f"{split}.yaml").write_text(yaml.safe_dump({"defaults": {"num_examples": count}, "tasks": tasks}))
    run = {
        "base_model": base_dir,
        "adapters": [adapter_dirs[f] for f in tiny.TASK_FAMILIES if f != NEW],
        "data": str(root / "fewshot.yaml"),
        "d2c": {"num_clusters": 2, "num_iterations": 6},
        "output": str(root / "out"),
    }
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    (root / "new.json").write_text(json.dumps(tiny.make_examples(NEW, 10, seed=7)))
    (root / "empty.jsonl").write_text("")
    return {
        "root": str(root),
        "run": str(root / "run.yaml"),
        "out": str(root / "out"),
        "heldout": str(root / "heldout.yaml"),
        "new_adapter": adapter_dirs[NEW],
        "new_examples": str(root / "new.json"),
        "empty": str(root / "empty.jsonl"),
        "base": base_dir,
        "adapter": adapter_dirs["copy"],
    }


@pytest.fixture(scope="module")
def merged(files) -> str:
    """`peft-d2c merge run.yaml` once for the module; returns the output folder."""
    assert main(["merge", files["run"], "--quiet", "--no-plots"]) == 0
    return files["out"]


def _write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_run_quick_prints_and_saves_the_main_job(tmp_path, capsys, cache_dir):
    out = tmp_path / "out"
    status = main(["run", "--quick", "--quiet", "--output", str(out), "--cache-dir", cache_dir])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Clusters:" in printed and "| **average** |" in printed
    whole = printed.split("Whole-answer EM % (average): ")[1].splitlines()[0]
    assert [part.rsplit(" ", 1)[0] for part in whole.split(", ")] == ["zero-shot", "single-task LoRA", "merged (D2C)"]
    columns = json.loads((out / "heldout.json").read_text())["columns"]
    for part in whole.split(", "):
        name, printed_mean = part.rsplit(" ", 1)
        expected = sum(s["whole_match"] for s in columns[name].values()) / len(columns[name])
        assert float(printed_mean) == round(100 * expected, 1)
    result = D2CResult.from_pretrained(out)
    assert len(result.clusters) == 2 and set(result.heldout_scores) == set(result.routing)
    heldout = json.loads((out / "heldout.json").read_text())
    assert set(heldout["columns"]) == {"zero-shot", "single-task LoRA", "merged (D2C)"}
    assert all(os.path.isfile(out / name / "adapter_model.safetensors") for name in result.merged_adapter_names)


class TestMerge:
    def test_merge_saves_result_and_effective_config(self, merged, files):
        result = D2CResult.from_pretrained(merged)
        assert result.num_clusters == 2 and sorted(result.routing) == sorted(set(tiny.TASK_FAMILIES) - {NEW})
        assert all(
            os.path.isfile(os.path.join(merged, n, "adapter_model.safetensors")) for n in result.merged_adapter_names
        )
        saved = yaml.safe_load(open(os.path.join(merged, "d2c_run.yaml")))
        assert saved["d2c"]["num_clusters"] == 2 and saved["d2c"]["num_iterations"] == 6 and saved["d2c"]["seed"] == 0
        assert "tasks" in saved["data"] and os.path.isfile(os.path.join(merged, "RUN.md"))

    def test_saved_run_config_repeats_the_run_exactly(self, merged, tmp_path, capsys):
        again = str(tmp_path / "again")
        assert main(["merge", os.path.join(merged, "d2c_run.yaml"), "--output", again, "--quiet", "--no-plots"]) == 0
        assert "Clusters (2 merged adapters from 5)" in capsys.readouterr().out
        first, second = D2CResult.from_pretrained(merged), D2CResult.from_pretrained(again)
        assert first.clusters == second.clusters and first.task_losses == second.task_losses

    def test_flags_override_the_yaml(self, files, tmp_path):
        out = str(tmp_path / "flags")
        run = yaml.safe_load(open(files["run"]))
        run["d2c"].pop("num_iterations")  # a baseline refuses a search setting (a bad case below)
        path = _write(tmp_path / "baseline.yaml", yaml.safe_dump(run))
        argv = ["merge", path, "-o", out, "--storage-budget", "0.5", "--method", "random", "--seed", "3"]
        assert main([*argv, "--quiet", "--no-plots"]) == 0
        saved = yaml.safe_load(open(os.path.join(out, "d2c_run.yaml")))["d2c"]
        assert saved["storage_budget"] == 0.5 and saved["num_clusters"] is None
        assert saved["method"] == "random" and saved["seed"] == 3


@pytest.mark.parametrize("budget,expected_k", [("50kB", 2), ("73728", 3)])
def test_merge_with_a_bytes_budget(files, tmp_path, budget, expected_k):
    """A tiny adapter is 24,576 bytes (r=8, 3 modules x 2 layers, float32): 50 kB holds 2, 73,728 bytes 3."""
    out = str(tmp_path / "bytes")
    assert main(["merge", files["run"], "-o", out, "--storage-budget", budget, "--quiet", "--no-plots"]) == 0
    assert D2CResult.from_pretrained(out).num_clusters == expected_k
    assert str(yaml.safe_load(open(os.path.join(out, "d2c_run.yaml")))["d2c"]["storage_budget"]) == budget


def test_evaluate_writes_heldout_scores(merged, files, capsys):
    assert main(["evaluate", merged, "--data", files["heldout"], "--quiet"]) == 0
    assert "| **average** |" in capsys.readouterr().out
    scores = json.load(open(os.path.join(merged, "heldout.json")))
    assert set(scores) == set(tiny.TASK_FAMILIES) - {NEW}
    saved = D2CResult.from_pretrained(merged)
    assert saved.heldout_scores == {t: s["exact_match"] for t, s in scores.items()}
    assert saved.heldout_whole_scores == {t: s["whole_match"] for t, s in scores.items()}


def test_add_adapter_updates_the_saved_result(merged, files, tmp_path, capsys):
    folder = str(tmp_path / "copy")
    shutil.copytree(merged, folder)
    argv = ["add-adapter", folder, files["new_adapter"], "--examples", files["new_examples"], "--quiet"]
    argv += ["--member-data", os.path.join(files["root"], "fewshot.yaml")]  # the default `regmean` needs them
    assert main(argv) == 0
    assert f"Added {NEW!r} to d2c_" in capsys.readouterr().out
    result = D2CResult.from_pretrained(folder)
    assert NEW in result.routing and NEW in result.clusters[result.assignment[NEW]]
    assert result.sources[NEW]["path"].endswith(NEW)


def test_add_adapter_to_a_regmean_result_takes_the_members_data(files, tmp_path, capsys):
    out = str(tmp_path / "regmean")
    argv = ["merge", files["run"], "--combination-type", "regmean", "--output", out, "--quiet", "--no-plots"]
    assert main(argv) == 0
    argv = ["add-adapter", out, files["new_adapter"], "--examples", files["new_examples"], "--quiet"]
    assert main(argv) == 2
    assert "--member-data" in capsys.readouterr().err
    assert main([*argv, "--member-data", os.path.join(files["root"], "fewshot.yaml")]) == 0
    assert NEW in D2CResult.from_pretrained(out).routing


def test_estimate_prints_evaluations_and_time(files, merged, capsys):
    assert main(["estimate", files["run"], "--probe", "2", "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    estimate = json.loads(out.strip().splitlines()[-1])
    # 5 adapters, K = 2, T = 6 steps of the paper's rule (the default): each scores the moved task under two merges,
    # plus the final 5 losses; the plan is the one the run records
    assert estimate["num_clusters"] == 2 and estimate["max_evaluations"] == 6 * 2 + 5
    plan = {"rule": "paper", "num_iterations": 6, "init": "random", "proposals_per_step": 1, "patience": None,
            "max_forward_passes": None, "cross_fit_folds": 1}  # fmt: skip
    assert estimate["search_plan"] == plan == D2CResult.from_pretrained(merged).stats["search_plan"]
    assert "method=d2c (paper search), T=6" in out
    ran = D2CResult.from_pretrained(merged)  # the same run: the losses it computed stay within the estimate
    assert 0 < ran.stats["cache_misses"] <= estimate["max_evaluations"]
    assert estimate["expected_seconds"] > 0
    # the default `regmean` holds every adapter's layer inputs for the run: the probe collects the same ones
    assert estimate["layer_input_bytes"] == ran.stats["layer_input_bytes"] > 0
    # predicted before they were collected (what a run checks against `memory_limit`), to the byte
    assert estimate["predicted_layer_input_bytes"] == ran.stats["layer_input_bytes"]
    # the probe's peak holds the model, every layer input and one merge: more than the layer inputs alone
    assert estimate["peak_bytes"] > estimate["layer_input_bytes"]
    assert "expected peak memory" in out
    assert "regmean layer inputs held for the run" in out


def test_push_in_a_subprocess_reaches_the_local_hub(merged, hub_api):
    repo = f"cli-org/d2c-{os.getpid()}"
    cmd = [sys.executable, "-m", "peft_d2c.cli", "push", merged, repo, "--base-model-id", "tiny-org/tiny-llama", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert repo in done.stdout
    files = set(hub_api.list_repo_files(repo))
    assert {"README.md", "d2c_routing.json", "d2c_0/adapter_model.safetensors"} <= files


@pytest.mark.parametrize(
    "private_by_default,flags,private",
    [(True, [], True), (True, ["--no-private"], False), (False, [], False), (False, ["--private"], True)],
)
def test_push_visibility_is_the_accounts_default_unless_a_flag_says(
    merged, hub_server, hub_api, private_by_default, flags, private, capsys
):
    """Without `--private` the push used to send `private=False`, making repos public in a private-by-default org."""
    owner = f"cli-vis-{uuid.uuid4().hex[:8]}"
    hub_server.set_private_by_default(owner, private_by_default)
    repo = f"{owner}/d2c"
    assert main(["push", merged, repo, "--base-model-id", "tiny-org/tiny-llama", "-q", *flags]) == 0
    assert hub_api.model_info(repo).private is private


def test_help_of_every_subcommand_exits_0(capsys):
    for command in ("merge", "evaluate", "push", "add-adapter", "estimate", "sweep", "benchmark", "run", "export"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--seed" in capsys.readouterr().out


def _bad_cases(files, tmp_path) -> dict[str, tuple[list[str], str]]:
    run = yaml.safe_load(open(files["run"]))

    def variant(**changes):
        data = {**run, **changes}
        return _write(tmp_path / f"v{len(os.listdir(tmp_path))}.yaml", yaml.safe_dump(data))

    return {
        "missing file": (["merge", str(tmp_path / "nope.yaml")], "file not found"),
        "bad yaml": (["merge", _write(tmp_path / "bad.yaml", "d2c: [1, 2\n")], "is not valid YAML (line"),
        "unknown key": (["merge", variant(model="x")], "Unknown key(s) ['model'] in the run config; allowed keys"),
        "unknown d2c key": (["merge", variant(d2c={"clusters": 2})], "Unknown key(s) ['clusters'] in `d2c`"),
        "wrong type": (["merge", variant(d2c={"num_clusters": "two"})], "`num_clusters` must be an int, got 'two'"),
        "k out of range": (["merge", files["run"], "-k", "9"], "between 1 and the number of adapters"),
        "unknown adapter": (["merge", variant(adapters=[str(tmp_path / "no-adapter")])], "Adapter folder not found"),
        "empty data": (
            ["merge", variant(data={"tasks": {"copy": {"path": files["empty"]}}})],
            "is an empty file; it holds no examples",
        ),
        "budget too small": (["merge", files["run"], "--storage-budget", "1kB"], "too small for one merged adapter"),
        "bad budget unit": (["merge", files["run"], "--storage-budget", "20 parsecs"], "must be a number followed by"),
        "conflicting options": (["merge", files["run"], "-k", "2", "--storage-budget", "0.5"], "not allowed with"),
        "bad method": (["merge", files["run"], "--method", "best"], "`method` must be one of"),
        "search setting of a baseline": (
            ["merge", files["run"], "--method", "kmeans"],
            "`num_iterations=6` applies to the d2c search only, and `method='kmeans'` does not search",
        ),
        "not a result": (["evaluate", files["root"], "--data", files["heldout"]], "No d2c_result.json"),
        "missing examples": (
            ["add-adapter", files["out"], files["new_adapter"], "--examples", str(tmp_path / "x.json")],
            "`--examples` file not found",
        ),
        "empty examples": (
            ["add-adapter", files["out"], files["new_adapter"], "--examples", files["empty"]],
            "holds no examples",
        ),
        "missing base model": (["merge", files["run"], "--base-model", "./no-such-model"], "`base_model` folder"),
        "serve without a backend": (["serve", str(tmp_path)], "Pass `--base-gguf`"),
        "serve upstream without base": (
            ["serve", str(tmp_path), "--upstream", "http://127.0.0.1:1"],
            "`--base-model`",
        ),
    }


BAD_CASES = [
    "missing file",
    "bad yaml",
    "unknown key",
    "unknown d2c key",
    "wrong type",
    "k out of range",
    "unknown adapter",
    "empty data",
    "budget too small",
    "bad budget unit",
    "conflicting options",
    "bad method",
    "search setting of a baseline",
    "not a result",
    "missing examples",
    "empty examples",
    "missing base model",
    "serve without a backend",
    "serve upstream without base",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line(case, files, merged, tmp_path, capsys):
    argv, message = _bad_cases(files, tmp_path)[case]
    with pytest.raises(SystemExit) if case == "conflicting options" else _no_exit() as caught:
        status = main(
            [*argv, "--quiet", "--output", str(tmp_path / "o")] if argv[0] == "merge" else [*argv, "--quiet"]
        )
    status = caught.value.code if case == "conflicting options" else status
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-d2c: error:") and message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unreachable_hub_endpoint_is_one_line_in_a_subprocess(files, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    cmd = [sys.executable, "-m", "peft_d2c.cli", "merge", files["run"], "--adapter", "some-org/some-lora", "-q"]
    done = subprocess.run(
        [*cmd, "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-d2c: error:"), done.stderr


def test_sweep_writes_score_vs_storage(files, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["sweep", files["run"], "--k", "1,2,5", "-t", "3", "--heldout", files["heldout"], "-o", out, "--quiet"]
    assert main([*argv, "--no-plots"]) == 0
    assert "| K | storage |" in capsys.readouterr().out
    sweep = json.load(open(os.path.join(out, "d2c_sweep.json")))
    assert [p["k"] for p in sweep["points"]] == [1, 2, 5]
    assert sweep["metric"] == "heldout exact match" and sweep["higher_is_better"]
    sizes = [p["storage_bytes"] for p in sweep["points"]]
    assert sizes[0] * 2 == sizes[1] and sizes[0] * 5 == sizes[2] == sweep["source_bytes"]
    assert sweep["points"][2]["storage_fraction"] == 1.0
    assert all(0 <= p["score"] <= 1 and len(p["clusters"]) == p["k"] for p in sweep["points"])


def test_sweep_rejects_k_out_of_range(files, tmp_path, capsys):
    assert main(["sweep", files["run"], "--k", "0,9", "-o", str(tmp_path / "s"), "--quiet"]) == 2
    assert "between 1 and the number of adapters (5), got [0, 9]" in capsys.readouterr().err


def test_merge_pushes_to_the_local_hub(files, tmp_path, hub_api, capsys):
    repo = f"cli-org/merge-{os.getpid()}"
    argv = [
        "merge",
        files["run"],
        "-o",
        str(tmp_path / "m"),
        "--push-to-hub",
        repo,
        "--base-model-id",
        "tiny-org/tiny",
    ]
    assert main([*argv, "--quiet", "--no-plots"]) == 0
    assert f"Pushed to {repo}" in capsys.readouterr().out
    assert "d2c_result.json" in hub_api.list_repo_files(repo)
