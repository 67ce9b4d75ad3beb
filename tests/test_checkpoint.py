"""Resumable searches: a run killed after a checkpoint and re-run ends exactly as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import peft_d2c.engine.runtime.checkpoint as checkpoint_module
import peft_d2c.engine.scoring.loss as loss_module
import peft_d2c.engine.search.starts as starts_module
from peft_d2c import CheckpointMismatchError, D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.runtime.checkpoint import CHECKPOINT_NAME

DEFAULT_MERGE = {f.name: f.default for f in dataclasses.fields(D2CMergeConfig)}["combination_type"]

# Runs the search in a child process and kills it (SIGKILL, no cleanup at all) right after the checkpoint of step
# `kill_at` reached the disk.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    import peft_d2c.engine.runtime.checkpoint as checkpoint_module
    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c import testing as tiny

    base_dir, adapters, examples, config, checkpoint_dir, kill_at = sys.argv[1:7]
    torch.set_num_threads(1)
    save = checkpoint_module.save_checkpoint

    def save_then_die(directory, payload):
        path = save(directory, payload)
        if payload["state"]["iteration"] >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint_module.save_checkpoint = save_then_die
    model = tiny.load_peft_model(base_dir, json.loads(adapters))
    merge_adapters_d2c(model, json.loads(examples), D2CMergeConfig(**json.loads(config)),
                       tokenizer=tiny.make_tokenizer(), checkpoint_dir=checkpoint_dir)
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")


def run(assets, examples, tokenizer, config, **kwargs):
    model = tiny.load_peft_model(*assets)
    result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer, **kwargs)
    weights = {
        k: v.clone() for k, v in model.state_dict().items() if any(f".{n}." in k for n in result.merged_adapter_names)
    }
    return result, weights


def assert_same_result(resumed, full):
    (a, wa), (b, wb) = resumed, full
    assert a.clusters == b.clusters and a.initial_clusters == b.initial_clusters
    assert a.history == b.history and a.task_losses == b.task_losses
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupted_then_resumed(assets, examples, tokenizer, config, directory, monkeypatch, at):
    """Interrupt a run (Ctrl-C) right after its checkpoint of step `at`, then run it again to resume."""
    save = checkpoint_module.save_checkpoint

    def save_then_interrupt(path, payload):
        save(path, payload)
        if payload["state"]["iteration"] == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_interrupt)
    model = tiny.load_peft_model(*assets)
    before = set(model.peft_config)
    with pytest.raises(KeyboardInterrupt):
        merge_adapters_d2c(model, examples, config, tokenizer=tokenizer, checkpoint_dir=directory)
    assert set(model.peft_config) == before  # cleaned up as on any interruption
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)
    return run(assets, examples, tokenizer, config, checkpoint_dir=directory)


def equal_stats(stats):
    """What a resumed run reports as the uninterrupted one does: every entry but the seconds, and the merges (a
    resumed run's merger starts with no merge in the model to reuse or refill; see `SearchCheckpointer`)."""
    return {k: v for k, v in stats.items() if not k.endswith("seconds") and k not in ("num_merges", "num_refills")}


def assert_same_stats(resumed, full, config):
    """`equal_stats` are equal; a resumed run merges again at most the `merge.cache_size` merges live at the resume."""
    assert equal_stats(resumed) == equal_stats(full)
    assert full["num_merges"] <= resumed["num_merges"] <= full["num_merges"] + config.merge.cache_size


def count_computed_losses(monkeypatch) -> list[int]:
    """The losses computed from now on, one entry per scoring batch (what `stats` reports of a resumed run includes
    the checkpoint's counts, which this does not)."""
    real = loss_module.LossScorer._score_batch
    computed: list[int] = []

    def counted(self, keys):
        computed.append(len(keys))
        return real(self, keys)

    monkeypatch.setattr(loss_module.LossScorer, "_score_batch", counted)
    return computed


class TestResume:
    def test_killed_run_resumes_to_the_uninterrupted_result(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        kwargs = {"num_clusters": 3, "num_iterations": 30, "checkpoint_every": 5, "seed": 2, "show_progress": False}
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        base_dir, adapter_dirs = tiny_assets
        command = [
            sys.executable,
            str(script),
            base_dir,
            json.dumps(adapter_dirs),
            json.dumps(tiny_task_examples),
            json.dumps(kwargs),
            str(tmp_path / "ckpt"),
            "15",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        saved = json.loads((tmp_path / "ckpt" / CHECKPOINT_NAME).read_text())
        assert saved["state"]["iteration"] == 15 and len(saved["state"]["history"]) == 15
        assert not [f for f in os.listdir(tmp_path / "ckpt") if f.startswith(".tmp")]  # atomic writes only

        config = D2CMergeConfig(**kwargs)
        computed = count_computed_losses(monkeypatch)
        resumed = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config, checkpoint_dir=tmp_path / "ckpt")
        resumed_computed = sum(computed)
        full = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config)
        assert_same_result(resumed, full)
        assert_same_stats(resumed[0].stats, full[0].stats, config)
        # The resumed run reused the saved losses instead of recomputing the first 15 steps.
        assert 0 < resumed_computed < sum(computed) - resumed_computed

    def test_interrupted_multi_proposal_run_resumes(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        config = D2CMergeConfig(num_clusters=2, num_iterations=12, proposals_per_step=3, checkpoint_every=4, seed=4)
        resumed = interrupted_then_resumed(
            tiny_assets, tiny_task_examples, tiny_tokenizer, config, tmp_path, monkeypatch, at=8
        )
        full = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config)
        assert_same_result(resumed, full)
        assert_same_stats(resumed[0].stats, full[0].stats, config)

    @pytest.mark.parametrize("search", ["paper", "partition"])
    def test_resumed_run_reports_the_uninterrupted_stats(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch, search
    ):
        """Forward passes, merges, cache hits and misses and the any-time trace used to count from the resume only."""
        config = D2CMergeConfig(num_clusters=2, num_iterations=12, checkpoint_every=3, seed=5, search=search)
        resumed = interrupted_then_resumed(
            tiny_assets, tiny_task_examples, tiny_tokenizer, config, tmp_path, monkeypatch, at=6
        )
        full = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config)
        assert_same_result(resumed, full)
        stats, expected = resumed[0].stats, dict(full[0].stats)
        assert len(stats["trace"]) == 12 and stats["trace"][-1][1] <= stats["forward_passes"]
        # the partition rule's current losses travel in the checkpoint (`SearchState.task_losses`): a resumed search
        # used to read those N again from the cache (N more hits)
        assert_same_stats(stats, expected, config)

    def test_resumed_run_does_not_recompute_its_start(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        """`init="kmeans_svd"` reads every adapter's weights (their Gram matrix) and runs K-means: a resumed run
        used to do it again before taking the checkpoint's start."""
        grams = []
        gram = starts_module.delta_gram_matrix
        monkeypatch.setattr(starts_module, "delta_gram_matrix", lambda *a, **k: grams.append(1) or gram(*a, **k))
        config = D2CMergeConfig(num_clusters=2, num_iterations=10, checkpoint_every=2, seed=3, init="kmeans_svd")
        resumed = interrupted_then_resumed(
            tiny_assets, tiny_task_examples, tiny_tokenizer, config, tmp_path, monkeypatch, at=4
        )
        assert len(grams) == 1  # the interrupted run's; none on resuming
        full = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config)
        assert_same_result(resumed, full)
        assert resumed[0].stats["start"] == "kmeans_svd"
        assert_same_stats(resumed[0].stats, full[0].stats, config)

    def test_checkpoint_without_counters_still_resumes(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        """A checkpoint written before it held the counters, the trace and the start's kind: the search resumes to the
        same result, and the counters count from the resume."""
        config = D2CMergeConfig(num_clusters=2, num_iterations=12, checkpoint_every=3, seed=5)
        save = checkpoint_module.save_checkpoint
        new_keys = ("counters", "trace", "start_kind")
        monkeypatch.setattr(
            checkpoint_module,
            "save_checkpoint",
            lambda d, p: save(d, {k: v for k, v in p.items() if k not in new_keys}),
        )
        resumed = interrupted_then_resumed(
            tiny_assets, tiny_task_examples, tiny_tokenizer, config, tmp_path, monkeypatch, at=6
        )
        full = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config)
        assert_same_result(resumed, full)
        a, b = resumed[0].stats, full[0].stats
        assert a["start"] == b["start"] == "random"
        assert [h for h, _ in a["trace"]] == [h for h, _ in b["trace"][6:]]  # the steps run after resuming
        assert a["cache_misses"] < b["cache_misses"] and a["forward_passes"] < b["forward_passes"]

    def test_finished_run_is_not_searched_again(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        saved_at = []
        save = checkpoint_module.save_checkpoint
        monkeypatch.setattr(
            checkpoint_module,
            "save_checkpoint",
            lambda d, p: saved_at.append(p["state"]["iteration"]) or save(d, p),
        )
        config = D2CMergeConfig(num_clusters=3, num_iterations=25, checkpoint_every=10)
        first = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config, checkpoint_dir=tmp_path)
        assert saved_at == [10, 20, 25]
        # A changed checkpoint_every, show_progress or memory_limit does not make it another run.
        again_config = D2CMergeConfig(
            num_clusters=3, num_iterations=25, checkpoint_every=3, show_progress=False, merge={"memory_limit": "1TB"}
        )
        computed = count_computed_losses(monkeypatch)
        again = run(tiny_assets, tiny_task_examples, tiny_tokenizer, again_config, checkpoint_dir=tmp_path)
        assert_same_result(again, first)
        assert_same_stats(again[0].stats, first[0].stats, first[0].config)
        assert sum(computed) <= len(tiny.TASK_FAMILIES)  # at most the final task losses


MISMATCHES = [
    ("other seed", {"seed": 1}, None, None, r"`seed` was 0, now 1"),
    ("other merge", {"combination_type": "cat"}, None, None, rf"`combination_type` was '{DEFAULT_MERGE}', now 'cat'"),
    ("other adapters", {}, ["copy", "reverse", "sort", "first"], None, "adapters were"),
    ("other examples", {}, None, "copy", "task examples changed"),
]


class TestMismatch:
    @pytest.mark.parametrize("case,change,names,drop_example,match", MISMATCHES, ids=[m[0] for m in MISMATCHES])
    def test_checkpoint_of_another_run_is_refused(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, case, change, names, drop_example, match
    ):
        config = D2CMergeConfig(num_clusters=2, num_iterations=4, checkpoint_every=2)
        run(tiny_assets, tiny_task_examples, tiny_tokenizer, config, checkpoint_dir=tmp_path)
        examples = dict(tiny_task_examples)
        if drop_example:
            examples[drop_example] = examples[drop_example][1:]
        other = D2CMergeConfig(**{**config.to_dict(), **change})
        model = tiny.load_peft_model(*tiny_assets)
        before = set(model.peft_config)
        with pytest.raises(CheckpointMismatchError, match=match):
            merge_adapters_d2c(
                model, examples, other, tokenizer=tiny_tokenizer, adapter_names=names, checkpoint_dir=tmp_path
            )
        assert set(model.peft_config) == before

    def test_changed_adapter_weights_are_refused(self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path):
        config = D2CMergeConfig(num_clusters=2, num_iterations=4)
        run(tiny_assets, tiny_task_examples, tiny_tokenizer, config, checkpoint_dir=tmp_path)
        model = tiny.load_peft_model(*tiny_assets)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if ".copy." in n and "lora_B" in n).add_(1e-3)
        with pytest.raises(CheckpointMismatchError, match="weights changed"):
            merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer, checkpoint_dir=tmp_path)

    @pytest.mark.parametrize("change", ["tokenizer", "base weights", "dtype", "score_fn"])
    def test_what_the_losses_depend_on_is_in_the_fingerprint(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, change
    ):
        """Resuming after changing the tokenizer, the base model's weights or dtype, or the score function used to
        reuse the old losses silently."""

        def score(model, adapter, task, examples):
            return float(len(adapter))

        def other_score(model, adapter, task, examples):
            return float(len(task))

        # `knots_ties`: the score-function case runs without a tokenizer (`regmean` would need the examples' inputs).
        config = D2CMergeConfig(num_clusters=2, num_iterations=4, combination_type="knots_ties")
        first = {"score_fn": score} if change == "score_fn" else {"tokenizer": tiny_tokenizer}
        model = tiny.load_peft_model(*tiny_assets)
        merge_adapters_d2c(model, tiny_task_examples, config, checkpoint_dir=tmp_path, **first)
        model = tiny.load_peft_model(*tiny_assets)
        kwargs = dict(first)
        if change == "tokenizer":
            tokenizer = tiny.make_tokenizer()
            tokenizer.eos_token = tokenizer.bos_token  # completions now end with another id
            kwargs["tokenizer"] = tokenizer
            match = "token ids"
        elif change == "base weights":
            with torch.no_grad():
                model.get_base_model().model.norm.weight.mul_(1.01)
            match = "base model"
        elif change == "dtype":
            model = model.double()
            match = "base model"
        else:
            kwargs["score_fn"] = other_score
            match = "score function"
        with pytest.raises(CheckpointMismatchError, match=match):
            merge_adapters_d2c(model, tiny_task_examples, config, checkpoint_dir=tmp_path, **kwargs)
