"""Task data specs: YAML and Python specs, `load_task_examples` from local files, a local Hub-layout folder and a
Hub dataset repo on the test server, seeded sampling and errors that name the task."""

from __future__ import annotations

import json
import uuid

import pytest

from peft_d2c.data.spec import TaskDataSpec, load_data_spec, load_task_examples

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]
CAPITALS += [(f"Country{i}", f"City{i}") for i in range(15)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def capitals_file(tmp_path):
    return _write_jsonl(tmp_path / "capitals.jsonl", [{"country": c, "capital": k} for c, k in CAPITALS])


@pytest.fixture
def hub_layout_folder(tmp_path):
    """A folder laid out like a Hub dataset repo: two configs declared in the README."""
    root = tmp_path / "word_tasks"
    _write_jsonl(root / "capital" / "train.jsonl", [{"country": c, "capital": k} for c, k in CAPITALS])
    _write_jsonl(root / "plural" / "train.jsonl", [{"word": f"cat{i}", "plural": f"cats{i}"} for i in range(12)])
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: capital\n  data_files:\n  - split: train\n    path: capital/train.jsonl\n"
        "- config_name: plural\n  data_files:\n  - split: train\n    path: plural/train.jsonl\n"
        "---\n# Word tasks\n"
    )
    return root


WORD_SPEC = {
    "capital": {
        "name": "capital",
        "prompt_template": "Country: {country}\nCapital:",
        "completion_template": " {capital}",
        "num_examples": 5,
    },
    "plural": {"name": "plural", "columns": {"prompt": "word", "completion": "plural"}, "num_examples": 4},
}


class TestSpecs:
    def test_yaml_spec_with_defaults(self, tmp_path, capitals_file):
        path = tmp_path / "spec.yaml"
        path.write_text(
            f"defaults:\n  num_examples: 3\n  seed: 5\ntasks:\n  capital:\n    path: {capitals_file}\n"
            "    prompt_template: \"Country: {country}\\nCapital:\"\n    completion_template: ' {capital}'\n"
            "  capital_big:\n    path: " + str(capitals_file) + "\n    num_examples: 8\n"
            "    prompt_template: '{country} ->'\n    completion_template: ' {capital}'\n"
        )
        specs = load_data_spec(path)
        assert list(specs) == ["capital", "capital_big"]
        assert specs["capital"].num_examples == 3 and specs["capital"].seed == 5
        assert specs["capital_big"].num_examples == 8
        assert specs["capital"].prompt_template == "Country: {country}\nCapital:"
        examples = load_task_examples(path)
        assert len(examples["capital"]) == 3 and len(examples["capital_big"]) == 8
        assert examples["capital"][0]["prompt"].startswith("Country: ")
        assert examples.data_sources["capital"] == {"path": str(capitals_file), "name": None, "split": "train"}

    @pytest.mark.parametrize(
        "spec, match",
        [
            ({"t": {"path": "x", "colums": {}}}, r"Unknown key\(s\) \['colums'\] in the data spec of task 't'"),
            ({"tasks": {"t": "x"}, "extra": 1}, r"Unknown top-level key\(s\) \['extra'\]"),
            ({"defaults": {"sede": 1}, "tasks": {"t": "x"}}, r"`defaults`; allowed keys"),
            ({"t": {"name": "c"}}, r"task 't' needs a `path`"),
            ({"t": {"path": "x", "num_examples": 0}}, r"Task 't': `num_examples` must be >= 1, got 0"),
            ({"t": {"path": "x", "columns": {"input": "a"}}}, r"`columns` keys must be in \['prompt', 'completion'\]"),
            ({"t": {"path": "x", "prompt_template": "{}"}}, r"named fields"),
            ({"t": {"path": "x", "prompt_template": "{a", "completion_template": "b"}}, r"not a valid format string"),
            ({}, r"no tasks"),
        ],
    )
    def test_invalid_specs_name_the_problem(self, spec, match):
        with pytest.raises((ValueError, TypeError), match=match):
            load_data_spec(spec)


class TestLoadTaskExamples:
    def test_sampling_is_seeded(self, capitals_file):
        spec = {"capital": {"path": str(capitals_file), "columns": {"prompt": "country", "completion": "capital"}}}
        first = load_task_examples(spec)["capital"]
        assert first == load_task_examples(spec)["capital"]
        other = load_task_examples({"capital": {**spec["capital"], "seed": 1}})["capital"]
        assert other != first
        assert len(first) == 10 and len({e["prompt"] for e in first}) == 10  # drawn without replacement
        assert all(dict(zip(("prompt", "completion"), pair, strict=True)) in _as_dicts() for pair in _pairs(first))

    def test_csv_and_parquet_files(self, tmp_path):
        import pandas as pd

        frame = pd.DataFrame({"q": [f"q{i}" for i in range(6)], "a": [f"a{i}" for i in range(6)]})
        frame.to_csv(tmp_path / "qa.csv", index=False)
        frame.to_parquet(tmp_path / "qa.parquet")
        spec = {"columns": {"prompt": "q", "completion": "a"}, "num_examples": 6}
        from_csv = load_task_examples({"qa": {"path": str(tmp_path / "qa.csv"), **spec}})["qa"]
        from_parquet = load_task_examples({"qa": {"path": str(tmp_path / "qa.parquet"), **spec}})["qa"]
        assert from_csv == from_parquet
        assert sorted(e["prompt"] for e in from_csv) == [f"q{i}" for i in range(6)]

    def test_task_data_spec_objects_and_data_files(self, tmp_path, capitals_file):
        spec = {"capital": TaskDataSpec("json", data_files=str(capitals_file), prompt_template="{country}:",
                                        completion_template=" {capital}", num_examples=2)}  # fmt: skip
        examples = load_task_examples(spec)["capital"]
        assert len(examples) == 2 and all(e["prompt"].endswith(":") for e in examples)

    def test_too_few_rows_names_the_task(self, capitals_file):
        spec = {"capital": {"path": str(capitals_file), "num_examples": 50, "prompt_template": "{country}",
                            "completion_template": "{capital}"}}  # fmt: skip
        with pytest.raises(ValueError, match=r"Task 'capital' asks for `num_examples`=50 .* only 20 rows"):
            load_task_examples(spec)

    def test_missing_column_names_the_task_and_column(self, capitals_file):
        with pytest.raises(ValueError, match=r"Task 'capital'.*no column 'answer' \(used by the completion column\)"):
            load_task_examples(
                {"capital": {"path": str(capitals_file), "columns": {"prompt": "country", "completion": "answer"}}}
            )

    def test_missing_template_key_names_the_task(self, capitals_file):
        spec = {
            "capital": {"path": str(capitals_file), "prompt_template": "{nation}:", "completion_template": "{capital}"}
        }
        with pytest.raises(ValueError, match=r"Task 'capital'.*'nation' \(used by `prompt_template`\).*'country'"):
            load_task_examples(spec)

    def test_unknown_split_names_the_task(self, capitals_file):
        spec = {"capital": {"path": "json", "data_files": {"train": str(capitals_file)}, "split": "test"}}
        with pytest.raises(ValueError, match=r"Task 'capital': could not load 'json'"):
            load_task_examples(spec)

    def test_local_hub_layout_folder_and_hub_repo_give_the_same_examples(self, hub_api, hub_layout_folder):
        local = load_task_examples({task: {"path": str(hub_layout_folder), **s} for task, s in WORD_SPEC.items()})
        assert local["capital"][0]["prompt"].startswith("Country: ") and local["capital"][0]["completion"][0] == " "
        assert {e["completion"] for e in local["plural"]} <= {f"cats{i}" for i in range(12)}

        repo_id = f"tester/word-tasks-{uuid.uuid4().hex[:8]}"
        hub_api.create_repo(repo_id, repo_type="dataset")
        hub_api.upload_folder(repo_id=repo_id, folder_path=hub_layout_folder, repo_type="dataset", commit_message="d")
        remote = load_task_examples({"tasks": {task: {"path": repo_id, **s} for task, s in WORD_SPEC.items()}})
        assert dict(remote) == dict(local)
        assert remote.data_sources["capital"] == {"path": repo_id, "name": "capital", "split": "train"}

    def test_missing_hub_dataset_names_the_task(self):
        with pytest.raises(FileNotFoundError, match=r"Task 'capital': could not load 'tester/no-such-dataset'"):
            load_task_examples({"capital": {"path": "tester/no-such-dataset"}})


def _pairs(examples):
    return [(e["prompt"], e["completion"]) for e in examples]


def _as_dicts():
    return [{"prompt": c, "completion": k} for c, k in CAPITALS]
