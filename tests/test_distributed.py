"""Multi-process runs on CPU: two real gloo processes (accelerate launch / debug_launcher) agree with one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.runtime.distributed import SingleProcess, get_process_group

# (config kwargs) run both in one process here and on two processes under `accelerate launch`.
RUNS = [
    {"num_clusters": 3, "num_iterations": 20, "seed": 0},
    {"num_clusters": 2, "num_iterations": 8, "seed": 1, "proposals_per_step": 3},
    # the partition rule: every task of the two changed clusters scored per step, the batches shared out
    {"num_clusters": 2, "num_iterations": 6, "seed": 2, "search": "partition"},
    # a forward-pass budget: each process counts every process's passes, so both stop at the same step
    {"num_clusters": 2, "seed": 4, "proposals_per_step": 3, "scoring": {"batch_size": 10}, "max_forward_passes": 12},
    # a start from the adapters' weights
    {"num_clusters": 3, "num_iterations": 8, "seed": 5, "init": "kmeans_svd"},
]

CHILD = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c import testing as tiny
    from peft_d2c.engine.runtime.distributed import get_process_group

    base_dir, adapters, examples, runs, out_dir = sys.argv[1:6]
    group = get_process_group()
    # Each process checks that it really is one of two processes of one gloo group.
    assert group.num_processes == 2 and os.environ["WORLD_SIZE"] == "2", group
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
    outputs = []
    for kwargs in json.loads(runs):
        model = tiny.load_peft_model(base_dir, json.loads(adapters))
        result = merge_adapters_d2c(
            model, json.loads(examples), D2CMergeConfig(show_progress=False, **kwargs), tokenizer=tiny.make_tokenizer()
        )
        outputs.append({"clusters": result.clusters, "history": result.history, "task_losses": result.task_losses,
                        "stats": result.stats})
    with open(os.path.join(out_dir, f"rank{group.process_index}.json"), "w") as f:
        json.dump({"rank": group.process_index, "num_processes": group.num_processes, "runs": outputs}, f)
    group.close()
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _map_in_two_processes():
    group = get_process_group()
    assert group.num_processes == 2, group
    assert group.map(lambda x: (x * x, group.process_index), list(range(5))) == [
        (0, 0),
        (1, 0),
        (4, 0),
        (9, 1),
        (16, 1),
    ]
    assert group.map(lambda x: x, []) == []
    assert group.broadcast(f"from {group.process_index}") == "from 0"

    def fail_on_one(x):
        if x == 3:
            raise ValueError("bad item")
        return x

    with pytest.raises((ValueError, RuntimeError), match="bad item"):
        group.map(fail_on_one, list(range(4)))  # raised on both processes, so neither waits forever


class TestProcessGroup:
    def test_single_process_without_launcher(self, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        group = get_process_group()
        assert isinstance(group, SingleProcess) and group.is_main_process
        assert group.map(str, [1, 2]) == ["1", "2"] and group.broadcast(3) == 3

    def test_map_splits_and_gathers_in_order_across_two_processes(self):
        from accelerate import debug_launcher

        debug_launcher(_map_in_two_processes, num_processes=2)


class TestAccelerateLaunch:
    def test_two_processes_give_the_single_process_clusters_and_history(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path
    ):
        """`accelerate launch --multi_gpu --num_processes 2` on CPU: same search, split scoring, same answer."""
        base_dir, adapter_dirs = tiny_assets
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(script),
            base_dir,
            json.dumps(adapter_dirs),
            json.dumps(tiny_task_examples),
            json.dumps(RUNS),
            str(tmp_path),
        ]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        env.pop("WORLD_SIZE", None)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)

        for index, kwargs in enumerate(RUNS):
            model = tiny.load_peft_model(base_dir, adapter_dirs)
            config = D2CMergeConfig(show_progress=False, **kwargs)
            single = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
            assert single.stats["num_processes"] == 1
            for rank in ranks:
                run = rank["runs"][index]
                assert run["clusters"] == single.clusters
                assert run["history"] == single.history
                assert run["task_losses"] == single.task_losses
                assert run["stats"]["num_processes"] == 2
                assert run["stats"]["search_plan"] == single.stats["search_plan"]
                assert run["stats"]["start"] == single.stats["start"]
            if "max_forward_passes" in kwargs:  # the budget, not T (= the budget), ended the steps
                assert 0 < len(single.history) < kwargs["max_forward_passes"]
            if kwargs.get("proposals_per_step", 1) > 1:
                # The work was really shared: both processes ran forward passes, fewer than one process alone.
                passes = [rank["runs"][index]["stats"]["forward_passes"] for rank in ranks]
                assert all(0 < p < single.stats["forward_passes"] for p in passes), passes


MISUSE_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from peft_d2c import D2CMergeConfig, merge_adapters_d2c
    from peft_d2c import testing as tiny
    from peft_d2c.engine.runtime.distributed import get_process_group

    base_dir, adapters, examples, case, out_dir = sys.argv[1:6]
    group = get_process_group()
    model = tiny.load_peft_model(base_dir, json.loads(adapters))
    examples = json.loads(examples)
    if case == "other examples" and group.process_index == 1:
        examples["copy"] = examples["copy"][1:]
    outcome = "finished"
    if case == "main only" and group.process_index == 1:
        time.sleep(20)  # busy elsewhere, never calls merge_adapters_d2c
        outcome = "skipped"
    else:
        try:
            merge_adapters_d2c(model, examples, D2CMergeConfig(num_clusters=2, num_iterations=2, show_progress=False),
                               tokenizer=tiny.make_tokenizer())
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
    with open(os.path.join(out_dir, f"rank{group.process_index}.txt"), "w") as f:
        f.write(outcome)
    """
)


class TestLaunchMisuse:
    @pytest.mark.parametrize("case", ["main only", "other examples"])
    def test_misuse_is_reported_instead_of_hanging_or_mixing(self, tiny_assets, tiny_task_examples, tmp_path, case):
        """A call on the main process only used to wait forever in the first gather; ranks holding other examples
        mixed their losses silently."""
        base_dir, adapter_dirs = tiny_assets
        script = tmp_path / "child.py"
        script.write_text(MISUSE_CHILD)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), base_dir, json.dumps(adapter_dirs),
            json.dumps(tiny_task_examples), case, str(tmp_path),
        ]  # fmt: skip
        env = {**os.environ, "TQDM_DISABLE": "1", "PEFT_D2C_SYNC_TIMEOUT": "5"}
        env.pop("WORLD_SIZE", None)
        subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        outcomes = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
        if case == "main only":
            assert "SingleProcess()" in outcomes[0] and "waited 5 s" in outcomes[0]
            assert outcomes[1] == "skipped"
        else:
            assert all("other settings, adapters or examples" in o for o in outcomes), outcomes
