"""The files of a saved result, and atomic writes: a crash never leaves a half-written file behind.

The lowest layer of peft-d2c with `errors`: imports nothing of the package.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

# Files of a folder written by `D2CResult.save_pretrained` (besides `config.CONFIG_NAME` and one folder per merged
# adapter); the Hub push and the CLI read them by these names.
RESULT_NAME = "d2c_result.json"
ROUTING_NAME = "d2c_routing.json"


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value stored in `path` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
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
