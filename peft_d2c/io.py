"""The files of a saved result, and atomic writes: a crash never leaves a half-written file or folder behind.

The lowest layer of peft-d2c with `errors`: imports nothing of the package.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import stat
import tempfile
from typing import Any

# Files of a folder written by `D2CResult.save_pretrained` (besides `config.CONFIG_NAME` and one folder per merged
# adapter); the Hub push and the CLI read them by these names.
RESULT_NAME = "d2c_result.json"
ROUTING_NAME = "d2c_routing.json"
TASK_CORES_NAME = "d2c_task_cores.safetensors"

logger = logging.getLogger(__name__)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value stored in `path` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _umask() -> int:
    umask = os.umask(0o077)  # reading the umask means setting it; restored at once (0o077 meanwhile: never looser)
    os.umask(umask)
    return umask


def ordinary_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (`0o666 & ~umask`)."""
    return 0o666 & ~_umask()


def ordinary_folder_mode() -> int:
    """The mode `os.mkdir` gives a new folder under the current umask (`0o777 & ~umask`)."""
    return 0o777 & ~_umask()


def make_ordinary(folder: str | os.PathLike) -> None:
    """Give every file and subfolder under `folder` the mode of a new one under the current umask.

    For a staging folder before `replace_folder`: `tempfile.mkdtemp` / `mkstemp` (and writers that use them, such
    as safetensors' `save_file`) create private (0700 / 0600) entries, which a saved result must not keep. Symlinks
    are left alone; `folder` itself gets its mode from `replace_folder`.
    """
    file_mode, folder_mode = ordinary_file_mode(), ordinary_folder_mode()
    for root, dirs, files in os.walk(os.fspath(folder)):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`.

    The file gets the ordinary mode of a new file (`0o666 & ~umask`), not the private one of `mkstemp`. A `path`
    that is a symlink is written through: the link stays and its target gets the new text.
    """
    path = resolve_target(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.chmod(tmp, ordinary_file_mode())  # mkstemp makes the file private; a result file is an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON to `path`, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); `False` where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(error, os.strerror(error), b)


def replace_folder(staging: str, target: str, *, owned: set[str]) -> None:
    """Make the complete folder `staging` the folder `target`, as one atomic step, keeping foreign files.

    Entries of an existing `target` that are not in `owned` (the previous result's files) and not replaced by an
    entry of `staging` are the user's: they are hard-linked (or copied) into `staging` first, so they survive. Then
    the two folders are exchanged atomically, and the previous folder (now at `staging`) is deleted. Readers see the
    old folder or the new one, never a mix; an interruption before the exchange leaves `target` untouched. Where
    the file system cannot exchange two folders, `target` is moved aside and `staging` renamed in its place.

    A `target` that is a symlink (to a folder, or dangling) is written through: the folder it resolves to is
    replaced and the link is kept, so `staging` must be on the file system of `resolve_target(target)` (create it
    next to that). The new folder keeps the mode of the folder it replaces, or gets the ordinary mode of a new folder
    (`0o777 & ~umask`) when there was none; its entries keep the modes they have in `staging` (see `make_ordinary`).
    """
    target = resolve_target(target)
    os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else ordinary_folder_mode())
    if os.path.isdir(target):
        for entry in os.listdir(target):
            if entry in owned or os.path.lexists(os.path.join(staging, entry)):
                continue
            source, copy = os.path.join(target, entry), os.path.join(staging, entry)
            if os.path.isdir(source) and not os.path.islink(source):
                shutil.copytree(source, copy, copy_function=_link_or_copy, symlinks=True)
            else:
                _link_or_copy(source, copy)
        if not _exchange(staging, target):
            aside = tempfile.mkdtemp(prefix=".d2c-old-", dir=os.path.dirname(target))
            os.rename(target, os.path.join(aside, "old"))
            os.rename(staging, target)
            shutil.rmtree(aside, ignore_errors=True)
            return
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.rename(staging, target)


def resolve_target(path: str | os.PathLike) -> str:
    """The absolute path a save into `path` writes: `path` with every symlink resolved (the user's links stay)."""
    return os.path.realpath(os.fspath(path))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)
