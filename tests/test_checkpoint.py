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


class TestResume:
    def test_killed_run_resumes_to_the_uninterrupted_result(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path
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
        resumed = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config, checkpoint_dir=tmp_path / "ckpt")
        full = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config)
        assert_same_result(resumed, full)
        # The resumed run reused the saved losses instead of recomputing the first 15 steps.
        assert resumed[0].stats["cache_misses"] < full[0].stats["cache_misses"]

    def test_interrupted_multi_proposal_run_resumes(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        import peft_d2c.engine.runtime.checkpoint as checkpoint_module

        config = D2CMergeConfig(num_clusters=2, num_iterations=12, proposals_per_step=3, checkpoint_every=4, seed=4)
        save = checkpoint_module.save_checkpoint

        def save_then_interrupt(directory, payload):
            save(directory, payload)
            if payload["state"]["iteration"] == 8:
                raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_interrupt)
        model = tiny.load_peft_model(*tiny_assets)
        before = set(model.peft_config)
        with pytest.raises(KeyboardInterrupt):
            merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer, checkpoint_dir=tmp_path)
        assert set(model.peft_config) == before  # cleaned up as on any interruption
        monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)
        resumed = run(tiny_assets, tiny_task_examples, tiny_tokenizer, config, checkpoint_dir=tmp_path)
        assert_same_result(resumed, run(tiny_assets, tiny_task_examples, tiny_tokenizer, config))

    def test_finished_run_is_not_searched_again(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        import peft_d2c.engine.runtime.checkpoint as checkpoint_module

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
            num_clusters=3, num_iterations=25, checkpoint_every=3, show_progress=False, memory_limit="1TB"
        )
        again = run(tiny_assets, tiny_task_examples, tiny_tokenizer, again_config, checkpoint_dir=tmp_path)
        assert_same_result(again, first)
        assert again[0].stats["cache_misses"] <= len(tiny.TASK_FAMILIES)  # at most the final task losses


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
