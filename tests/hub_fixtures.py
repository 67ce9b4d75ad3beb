"""Starts the local Hub test server at import time, before `huggingface_hub` is imported, and provides fixtures.

`huggingface_hub` and `datasets` read `HF_ENDPOINT`, `HF_HUB_DISABLE_XET` and the cache paths once, when they are
first imported, so this module must be imported first (the top of `tests/conftest.py` does it). Everything the test
session downloads or caches lives in a temporary folder; nothing reaches the real Hub or the user's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

if "huggingface_hub" in sys.modules:
    raise RuntimeError(
        "`hub_fixtures` must be imported before `huggingface_hub` (directly or through transformers, peft, datasets "
        "or peft_d2c): the Hub client reads `HF_ENDPOINT` at import time and would otherwise talk to the real Hub. "
        "Import it at the very top of tests/conftest.py."
    )

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_server import HubServer, start_hub_server  # noqa: E402

HUB_TOKEN = "dummy-token"

_TMP = tempfile.mkdtemp(prefix="peft-d2c-hub-")
_SERVER = start_hub_server(os.path.join(_TMP, "server"))

os.environ["HF_ENDPOINT"] = _SERVER.url
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_ETAG_TIMEOUT"] = "30"
os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = "30"
os.environ["HF_TOKEN"] = HUB_TOKEN
os.environ["HF_HOME"] = os.path.join(_TMP, "hf_home")
os.environ["HF_HUB_CACHE"] = os.path.join(_TMP, "hf_home", "hub")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_TMP, "hf_home", "datasets")
os.environ["HF_XET_CACHE"] = os.path.join(_TMP, "hf_home", "xet")
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_DATASETS_OFFLINE", None)
os.environ.pop("HUGGINGFACE_CO_STAGING", None)


def _shutdown() -> None:
    _SERVER.stop()
    shutil.rmtree(_TMP, ignore_errors=True)


atexit.register(_shutdown)


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The running local Hub server (`.url`, `.add_collection`, `.fail_next`, `.commits`, ...)."""
    yield _SERVER
    _SERVER.stop()


@pytest.fixture
def hub_api(hub_server: HubServer):
    """A `huggingface_hub.HfApi` talking to the local server with a dummy token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_server.url, token=HUB_TOKEN)
