"""The local Hub test server speaks the protocol the real clients use: `huggingface_hub` uploads (regular and LFS
files), downloads, revisions, errors and collections, and `datasets.load_dataset` from a dataset repo.

Every test talks to the server over real HTTP through the unpatched client libraries.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from hub_server import start_hub_server


def _repo(prefix: str = "repo") -> str:
    return f"tester/{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "up"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("hello hub\n")
    (root / "sub" / "weights.safetensors").write_bytes(os.urandom(3000))
    (root / "README.md").write_text("---\nlibrary_name: peft\ntags: [test]\n---\n# Test repo\n")
    return root


class TestModelRepos:
    def test_upload_folder_then_snapshot_download_gives_same_files(self, hub_api, hub_server, folder):
        from huggingface_hub import snapshot_download

        repo_id = _repo()
        hub_api.create_repo(repo_id)
        before = len(hub_server.requests)
        hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
        calls = [f"{m} {p}" for m, p, _ in hub_server.requests[before:]]
        assert any(c.startswith("PUT /__lfs/model/") for c in calls), "the safetensors file must go through LFS"
        assert sum(c == f"POST /api/models/{repo_id}/commit/main" for c in calls) == 1

        assert sorted(hub_api.list_repo_files(repo_id)) == [
            ".gitattributes",
            "README.md",
            "notes.txt",
            "sub/weights.safetensors",
        ]
        local = snapshot_download(repo_id)
        for path in ("notes.txt", "sub/weights.safetensors", "README.md"):
            with open(os.path.join(local, path), "rb") as got, open(folder / path, "rb") as want:
                assert got.read() == want.read()
        info = hub_api.model_info(repo_id, files_metadata=True)
        assert info.sha == hub_server.commits(repo_id)[-1]
        assert info.card_data.library_name == "peft"
        lfs = {s.rfilename: s.lfs for s in info.siblings}
        assert lfs["sub/weights.safetensors"] is not None and lfs["notes.txt"] is None

    def test_missing_file_repo_and_revision_raise_the_hub_errors(self, hub_api, folder):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        repo_id = _repo()
        hub_api.create_repo(repo_id)
        hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(repo_id, "does-not-exist.json")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("tester/no-such-repo", "config.json")
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(repo_id, "notes.txt", revision="no-such-branch")
        assert not hub_api.file_exists(repo_id, "does-not-exist.json")
        assert hub_api.file_exists(repo_id, "sub/weights.safetensors")

    def test_revisions_pin_old_content_by_commit_id(self, hub_api, hub_server, tmp_path):
        from huggingface_hub import hf_hub_download

        repo_id = _repo()
        hub_api.create_repo(repo_id)
        first = hub_api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id).oid
        second = hub_api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id).oid
        assert first != second and len(first) == 40
        assert hub_server.commits(repo_id)[-2:] == [first, second]
        assert [c.commit_id for c in hub_api.list_repo_commits(repo_id)][:2] == [second, first]
        with open(hf_hub_download(repo_id, "f.txt", revision=first)) as f:
            assert f.read() == "v1"
        with open(hf_hub_download(repo_id, "f.txt", revision=first[:12])) as f:
            assert f.read() == "v1"
        with open(hf_hub_download(repo_id, "f.txt")) as f:
            assert f.read() == "v2"

    def test_tree_listing_is_recursive_only_when_asked(self, hub_api, folder):
        repo_id = _repo()
        hub_api.create_repo(repo_id)
        hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
        flat = {entry.path for entry in hub_api.list_repo_tree(repo_id)}
        deep = {entry.path for entry in hub_api.list_repo_tree(repo_id, recursive=True)}
        assert "sub" in flat and "sub/weights.safetensors" not in flat
        assert "sub/weights.safetensors" in deep
        infos = hub_api.get_paths_info(repo_id, ["notes.txt", "sub", "missing"])
        assert sorted(i.path for i in infos) == ["notes.txt", "sub"]

    def test_failed_commit_changes_nothing(self, hub_api, hub_server, folder):
        from huggingface_hub.errors import HfHubHTTPError

        repo_id = _repo()
        hub_api.create_repo(repo_id)
        before = hub_server.commits(repo_id)
        hub_server.fail_next(f"POST /api/models/{repo_id}/commit/", status=500)
        with pytest.raises(HfHubHTTPError):
            hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
        assert hub_server.commits(repo_id) == before
        assert hub_api.list_repo_files(repo_id) == [".gitattributes"]
        hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload again")
        assert len(hub_server.commits(repo_id)) == len(before) + 1

    def test_create_repo_conflict_and_delete(self, hub_api, hub_server):
        from huggingface_hub.errors import HfHubHTTPError

        repo_id = _repo()
        hub_api.create_repo(repo_id, private=True)
        with pytest.raises(HfHubHTTPError) as info:
            hub_api.create_repo(repo_id)
        assert info.value.response.status_code == 409
        hub_api.create_repo(repo_id, exist_ok=True)
        assert hub_api.model_info(repo_id).private is True
        hub_api.delete_repo(repo_id)
        assert not hub_api.repo_exists(repo_id)
        assert not hub_server.repo_exists(repo_id)

    def test_invalid_card_metadata_is_refused(self, hub_api, hub_server):
        repo_id = _repo()
        hub_api.create_repo(repo_id)
        card = "---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\nbody\n"
        with pytest.raises(ValueError, match="Invalid metadata"):
            hub_api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
        assert len(hub_server.commits(repo_id)) == 1

    def test_state_is_stored_on_disk(self, hub_api, hub_server, tmp_path):
        repo_id = _repo()
        hub_api.create_repo(repo_id)
        hub_api.upload_file(path_or_fileobj=b"kept", path_in_repo="f.txt", repo_id=repo_id)
        second = start_hub_server(hub_server.root)  # a new server over the same folder sees the same repos
        try:
            assert second.commits(repo_id) == hub_server.commits(repo_id)
            assert second.read_file(repo_id, "f.txt") == b"kept"
        finally:
            second.stop()


class TestCollectionsAndDatasets:
    def test_get_collection_returns_items_in_order(self, hub_api, hub_server):
        slug = f"tester/loras-{uuid.uuid4().hex[:24]}"
        hub_server.add_collection(
            slug, "My LoRAs", [{"id": "tester/a", "type": "model"}, {"id": "tester/data", "type": "dataset"}]
        )
        collection = hub_api.get_collection(slug)
        assert collection.title == "My LoRAs"
        assert [(i.item_id, i.item_type, i.position) for i in collection.items] == [
            ("tester/a", "model", 0),
            ("tester/data", "dataset", 1),
        ]
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError):
            hub_api.get_collection(f"tester/missing-{'0' * 24}")

    def test_load_dataset_from_a_dataset_repo_with_configs(self, hub_api, tmp_path):
        import datasets

        root = tmp_path / "ds"
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        (root / "a" / "train.jsonl").write_text("".join(json.dumps({"x": i, "y": str(i)}) + "\n" for i in range(7)))
        (root / "b" / "train.jsonl").write_text("".join(json.dumps({"x": i, "y": i * 2}) + "\n" for i in range(5)))
        (root / "README.md").write_text(
            "---\nconfigs:\n- config_name: a\n  data_files:\n  - split: train\n    path: a/train.jsonl\n"
            "- config_name: b\n  data_files:\n  - split: train\n    path: b/train.jsonl\n---\n# data\n"
        )
        repo_id = _repo("ds")
        hub_api.create_repo(repo_id, repo_type="dataset")
        hub_api.upload_folder(repo_id=repo_id, folder_path=root, repo_type="dataset", commit_message="data")
        a = datasets.load_dataset(repo_id, "a", split="train")
        b = datasets.load_dataset(repo_id, "b", split="train")
        assert a.num_rows == 7 and a[3] == {"x": 3, "y": "3"}
        assert b.num_rows == 5 and b[4] == {"x": 4, "y": 8}
