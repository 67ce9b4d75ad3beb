"""Multi-process runs with Accelerate: the only module of peft-d2c that imports `accelerate`.

Under `accelerate launch` (or torchrun), every process runs the same D2C search with the same seed, so every process
draws the same proposals. Only the scoring work is split: the losses not yet cached are grouped into scoring batches
whose composition never depends on the number of processes, the batches are dealt out with
`PartialState.split_between_processes`, each process merges and scores its share, and `gather_object` hands every
loss to every process. All processes therefore cache the same losses, take the same decisions, and end with the
clusters a single-process run finds with the same seed. Only the main process writes files.

On a machine without CUDA the state is created with `PartialState(cpu=True)`: under torchrun a plain
`PartialState()` silently stays single-process when no GPU is found, and `accelerate launch --cpu` starts a single
process. Launch two CPU processes with `accelerate launch --multi_gpu --num_processes 2 script.py`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

DEFAULT_SYNC_TIMEOUT_S = 300.0

T = TypeVar("T")
R = TypeVar("R")


class SingleProcess:
    """The trivial process group of a plain run: `map` is a loop, nothing is sent anywhere.

    Attributes:
        num_processes (`int`): 1.
        process_index (`int`): 0.
        is_main_process (`bool`): True.
    """

    num_processes = 1
    process_index = 0
    is_main_process = True

    @property
    def device(self):
        """The device this process should put the model on (`cuda` when available, else `cpu`)."""

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`[fn(item) for item in items]`, in order."""
        return [fn(item) for item in items]

    def broadcast(self, obj: Any) -> Any:
        """Return `obj` (there is no other process to send it to)."""
        return obj

    def gather(self, obj: Any) -> list[Any]:
        """`[obj]`: every process's `obj`, in process order (here only this one)."""
        return [obj]

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    def check_same_run(self, fingerprint: str, *, timeout_s: float | None = None) -> None:
        """Nothing to compare on one process."""

    def close(self) -> None:
        """Nothing to close."""

    def __repr__(self) -> str:
        return "SingleProcess()"


class AccelerateProcesses(SingleProcess):
    """All processes of an `accelerate launch` / torchrun run, through accelerate's `PartialState`.

    Args:
        cpu (`bool`, *optional*):
            Force the CPU (gloo) backend. Defaults to `True` when CUDA is unavailable, because a `PartialState()`
            without it silently stays single-process under torchrun on a machine without GPU.
    """

    def __init__(self, cpu: bool | None = None) -> None:
        from accelerate import PartialState  # a single-process run never imports accelerate

        if cpu is None:
            cpu = not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu)
        self.num_processes = self.state.num_processes
        self.process_index = self.state.process_index
        self.is_main_process = self.state.is_main_process

    @property
    def device(self):
        """This process's device (`cuda:<local rank>` on GPUs, `cpu` otherwise)."""
        return self.state.device

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Apply `fn` to a contiguous share of `items` on each process and return every result, in order, everywhere.

        Every process must call `map` with the same `items` (the D2C search guarantees it). An exception raised
        by `fn` on one process is sent to all of them and re-raised everywhere, so no process waits forever.

        Raises:
            RuntimeError: If `fn` failed on another process (its error is re-raised as is on the failing process).
        """
        from accelerate.utils import gather_object  # only multi-process runs get here

        if self.num_processes == 1:
            return [fn(item) for item in items]
        outcomes: list[tuple[int, bool, Any]] = []
        with self.state.split_between_processes(list(items)) as share:
            for item in share:
                try:
                    outcomes.append((self.process_index, True, fn(item)))
                except Exception as error:  # sent to the other processes below, then re-raised
                    outcomes.append((self.process_index, False, error))
                    break
        gathered = gather_object(outcomes)
        local_error = next((value for rank, ok, value in outcomes if not ok), None)
        if local_error is not None:
            raise local_error
        failed = next(((rank, value) for rank, ok, value in gathered if not ok), None)
        if failed is not None:
            rank, error = failed
            raise RuntimeError(f"Scoring failed on process {rank}: {type(error).__name__}: {error}") from error
        results = [value for _, _, value in gathered]
        if len(results) != len(items):
            raise RuntimeError(f"Gathered {len(results)} results for {len(items)} items; processes went out of step.")
        return results

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        from accelerate.utils import broadcast_object_list  # only multi-process runs get here

        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in process order, on every process (each process must call it)."""
        from accelerate.utils import gather_object  # only multi-process runs get here

        if self.num_processes == 1:
            return [obj]
        return gather_object([obj])

    def wait_for_everyone(self) -> None:
        self.state.wait_for_everyone()

    def check_same_run(self, fingerprint: str, *, timeout_s: float | None = None) -> None:
        """Check, before any work, that every process called the same run (same config, adapters and examples).

        A call on the main process only (inside `if accelerator.is_main_process:`) would otherwise wait forever in
        the first gather, and processes holding different examples or adapters would mix their losses silently. On
        the gloo (CPU) backend the processes first meet in a barrier that gives up after `timeout_s` seconds
        (default: `$PEFT_D2C_SYNC_TIMEOUT`, else 300).

        Raises:
            RuntimeError: If the other processes do not arrive in time (the message says to pass `SingleProcess()`).
            ValueError: If the processes' fingerprints differ.
        """
        from accelerate.utils import gather_object  # only multi-process runs get here

        if self.num_processes == 1:
            return
        if timeout_s is None:
            timeout_s = float(os.environ.get("PEFT_D2C_SYNC_TIMEOUT", DEFAULT_SYNC_TIMEOUT_S))
        if torch.distributed.get_backend() == "gloo":  # NCCL has no monitored barrier
            try:
                torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError as error:
                raise RuntimeError(
                    f"Process {self.process_index} of {self.num_processes} waited {timeout_s:.0f} s for the others "
                    "at the start of merge_adapters_d2c. Under `accelerate launch` every process must call it; to run "
                    "it on one process only (e.g. inside `if accelerator.is_main_process:`), pass "
                    "`process_group=peft_d2c.engine.runtime.distributed.SingleProcess()`."
                ) from error
        fingerprints = gather_object([(self.process_index, fingerprint)])
        different = sorted(rank for rank, value in fingerprints if value != fingerprints[0][1])
        if different:
            raise ValueError(
                f"Processes {different} called merge_adapters_d2c with other settings, adapters or examples than "
                "process 0; every process must pass the same config, the same adapters and the same examples."
            )

    def close(self) -> None:
        """Wait for every process, then tear the process group down.

        Call it at the end of a launched script: a gloo group left to the interpreter's shutdown can abort the
        process ("terminate called without an active exception") after all the work is done.
        """
        self.state.wait_for_everyone()
        self.state.destroy_process_group()

    def __repr__(self) -> str:
        return f"AccelerateProcesses(process {self.process_index} of {self.num_processes})"


def launched_processes() -> int:
    """Number of processes of the launch this process belongs to (`WORLD_SIZE`, set by torchrun and accelerate)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def get_process_group(cpu: bool | None = None) -> SingleProcess:
    """The process group of this run: `AccelerateProcesses` under a multi-process launch, else `SingleProcess`.

    A plain single-process run does not import accelerate at all.

    Args:
        cpu (`bool`, *optional*): Passed to `AccelerateProcesses` (defaults to "no CUDA available").

    Returns:
        `SingleProcess` or `AccelerateProcesses`.

    Example:
        ```python
        >>> group = get_process_group()
        >>> group.map(lambda x: x * x, [1, 2, 3])  # on 2 processes, each squares its half; both get the list
        [1, 4, 9]
        ```
    """
    if launched_processes() > 1:
        group = AccelerateProcesses(cpu=cpu)
        if group.num_processes != launched_processes():
            logger.warning(
                "WORLD_SIZE=%d but accelerate set up %d process(es); pass `cpu=True` on machines without CUDA.",
                launched_processes(),
                group.num_processes,
            )
        return group
    return SingleProcess()


def is_main_process() -> bool:
    """Whether this process may write files and push to the Hub (rank 0, or a plain run)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True
