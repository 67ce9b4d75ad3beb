"""Interrupted and repeated saves, failed online additions and failing clean-ups never lose the user's work."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest
import torch

from peft_d2c import D2CMergeConfig, D2CResult, merge_adapters_d2c
from peft_d2c import result as result_module
from peft_d2c import testing as tiny
from peft_d2c.engine.merge.merging import AdapterMerger

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture
def two_results(tiny_assets, tiny_tokenizer, tiny_task_examples):
    """A K=3 and a K=2 result of the same model (different merged adapter prefixes)."""
    model = tiny.load_peft_model(*tiny_assets)
    three = merge_adapters_d2c(
        model, tiny_task_examples, D2CMergeConfig(num_clusters=3, num_iterations=4), tokenizer=tiny_tokenizer
    )
    two = merge_adapters_d2c(
        model,
        tiny_task_examples,
        D2CMergeConfig(num_clusters=2, num_iterations=4, merged_adapter_prefix="two"),
        tokenizer=tiny_tokenizer,
    )
    return three, two


class TestSaves:
    def test_a_smaller_result_replaces_a_larger_one_and_keeps_foreign_files(self, two_results, tmp_path):
        three, two = two_results
        folder = tmp_path / "out"
        three.save_pretrained(folder)
        (folder / "notes.txt").write_text("mine")
        two.save_pretrained(folder)
        entries = set(os.listdir(folder))
        assert not any(name in entries for name in three.merged_adapter_names)  # no stale adapter folder loads
        assert (folder / "notes.txt").read_text() == "mine"
        assert D2CResult.from_pretrained(folder).routing == two.routing
        assert {*two.merged_adapter_names, "notes.txt"} <= entries

    def test_an_interrupted_save_leaves_the_previous_result_whole(self, two_results, tmp_path, monkeypatch):
        three, two = two_results
        folder = tmp_path / "out"
        three.save_pretrained(folder)
        before = snapshot(folder)
        real_write = result_module.atomic_write_json

        def write_then_fail(path, data):
            if os.path.basename(path) == "d2c_result.json":  # every adapter and the routing are written by now ...
                raise KeyboardInterrupt  # ... when the user presses Ctrl-C
            real_write(path, data)

        monkeypatch.setattr(result_module, "atomic_write_json", write_then_fail)
        with pytest.raises(KeyboardInterrupt):
            two.save_pretrained(folder)
        assert snapshot(folder) == before
        assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no staging folder left behind

    def test_save_into_a_file_path_is_refused(self, two_results, tmp_path):
        target = tmp_path / "file"
        target.write_text("x")
        with pytest.raises(FileExistsError, match="not a folder"):
            two_results[1].save_pretrained(target)


def modes(folder) -> dict[str, int]:
    """The permission bits of `folder` ("." ) and of every folder and file under it."""
    out = {".": stat.S_IMODE(os.stat(folder).st_mode)}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


@pytest.fixture
def umask(request):
    """Run the test under the umask of its parameter; the previous umask is restored after it."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


class TestSaveModesAndLinks:
    @pytest.mark.parametrize("umask", [0o027, 0o002], indirect=True, ids=oct)
    def test_a_saved_result_has_the_ordinary_modes_of_the_umask(self, two_results, tmp_path, umask):
        """Every file of a saved result used to be left as safetensors / mkdtemp made it (adapter weights 0600) and
        the folder was forced to 0755 whatever the umask; they get the modes `open()` / `mkdir` give new ones."""
        three, two = two_results
        folder = tmp_path / "out"
        three.save_pretrained(folder)
        expected_file, expected_folder = 0o666 & ~umask, 0o777 & ~umask
        found = modes(folder)
        assert len(found) > 8 and "d2c_0/adapter_model.safetensors" in found  # adapters, metadata and the card
        for path, mode in found.items():
            want = expected_folder if os.path.isdir(os.path.join(folder, path)) else expected_file
            assert mode == want, f"{path}: {oct(mode)} instead of {oct(want)} under umask {oct(umask)}"
        two.save_pretrained(folder)  # a replaced result keeps the ordinary modes too
        assert set(modes(folder).values()) <= {expected_file, expected_folder}

    def test_saving_over_a_folder_keeps_the_folders_mode(self, two_results, tmp_path):
        folder = tmp_path / "shared"
        folder.mkdir()
        os.chmod(folder, 0o710)  # the user's choice of who may enter it
        two_results[1].save_pretrained(folder)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o710
        two_results[0].save_pretrained(folder)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o710

    @pytest.mark.parametrize("layout", ["same_folder", "other_folder"])
    def test_saving_into_a_symlink_writes_the_folder_it_points_at(self, two_results, tmp_path, layout):
        """The link itself used to be replaced by a real folder (the user's link lost, its target left stale)."""
        three, two = two_results
        (tmp_path / "data").mkdir()
        (tmp_path / "links").mkdir()
        real = tmp_path / "data" / "real"
        real.mkdir()
        (real / "notes.txt").write_text("mine")
        link = (tmp_path / "data" if layout == "same_folder" else tmp_path / "links") / "out"
        os.symlink(real, link)
        # a first save, a smaller result over it, the same again, and one without a prompt router (its files go)
        for result in (three, two, two, dataclasses.replace(two, prompt_router=None)):
            assert result.save_pretrained(link) == os.fspath(link)
            assert os.path.islink(link) and os.readlink(link) == os.fspath(real)
            assert D2CResult.from_pretrained(real).routing == result.routing
            router = {"d2c_router.json", "d2c_router.safetensors"} if result.prompt_router is not None else set()
            assert set(os.listdir(real)) == {
                *result.merged_adapter_names, "notes.txt", "README.md", "d2c_config.json", "d2c_result.json",
                "d2c_routing.json", *router,
            }  # fmt: skip
            assert snapshot(link) == snapshot(real)
            # no staging folder left behind, next to the link or to its target
            assert sorted(os.listdir(tmp_path / "data")) == (["out", "real"] if layout == "same_folder" else ["real"])
            assert os.listdir(tmp_path / "links") == ([] if layout == "same_folder" else ["out"])
        assert (real / "notes.txt").read_text() == "mine"

    def test_saving_into_a_dangling_symlink_creates_its_target(self, two_results, tmp_path):
        link, real = tmp_path / "out", tmp_path / "new" / "real"
        os.symlink(real, link)
        two_results[1].save_pretrained(link)
        assert os.path.islink(link) and D2CResult.from_pretrained(real).routing == two_results[1].routing


class TestOnlineAdditionFailure:
    def test_a_failed_re_merge_keeps_the_old_merged_adapter(self, tiny_assets, tiny_tokenizer, monkeypatch):
        families = ["copy", "reverse", "sort", "first"]
        model = tiny.load_peft_model(*tiny_assets)
        examples = {f: tiny.make_examples(f, 5, seed=7) for f in families}
        result = merge_adapters_d2c(
            model,
            examples,
            D2CMergeConfig(num_clusters=2, num_iterations=4),
            tokenizer=tiny_tokenizer,
            adapter_names=families,
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters() if ".d2c_" in n}
        routing = dict(result.routing)
        real_merge = AdapterMerger.merge

        def merge_fails_for_final_names(self, members, adapter_name, **kwargs):
            if adapter_name in result.merged_adapter_names:
                raise RuntimeError("disk full")
            return real_merge(self, members, adapter_name, **kwargs)

        monkeypatch.setattr(AdapterMerger, "merge", merge_fails_for_final_names)
        with pytest.raises(RuntimeError, match="disk full"):
            result.add_adapter(
                "last", tiny.make_examples("last", 5, seed=7), tokenizer=tiny_tokenizer, member_examples=examples
            )
        after = {n: p.detach() for n, p in model.named_parameters() if ".d2c_" in n}
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n], before[n]) for n in before)
        assert result.routing == routing and "last" not in result.assignment


class TestCleanupFailure:
    def test_model_state_is_restored_even_if_cleanup_raises(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, monkeypatch
    ):
        model = tiny.load_peft_model(*tiny_assets)
        model.set_adapter("sort")
        model.eval()
        modes = {n: m.training for n, m in model.named_modules()}
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        calls = {"n": 0}
        real_cleanup = AdapterMerger.cleanup

        def cleanup_fails_at_the_end(self):
            calls["n"] += 1
            real_cleanup(self)
            if calls["n"] >= 2:  # the final clean-up of the run
                raise OSError("could not delete")

        monkeypatch.setattr(AdapterMerger, "cleanup", cleanup_fails_at_the_end)
        with pytest.raises(OSError, match="could not delete"):
            merge_adapters_d2c(
                model, tiny_task_examples, D2CMergeConfig(num_clusters=2, num_iterations=2), tokenizer=tiny_tokenizer
            )
        assert model.active_adapter == "sort"
        assert {n: m.training for n, m in model.named_modules() if n in modes} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters() if n in grads} == grads


class TestResultCard:
    def test_a_saved_result_explains_itself_and_a_users_readme_is_kept(self, two_results, tmp_path):
        three, two = two_results
        folder = tmp_path / "out"
        three.save_pretrained(folder)
        card = (folder / "README.md").read_text()
        assert "Lee, Kyeng-Hun and Ko, Hyeonmok" in card and all(
            f"`{name}`" in card for name in three.merged_adapter_names
        )
        two.save_pretrained(folder)  # the earlier result's card is the result's own: replaced
        assert all(f"`{name}`" in (folder / "README.md").read_text() for name in two.merged_adapter_names)
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "README.md").write_text("my notes")
        two.save_pretrained(mine)
        assert (mine / "README.md").read_text() == "my notes"
