"""Shared fixtures: a tiny randomly initialised Llama with six real, briefly trained LoRA adapters."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import hub_fixtures  # noqa: E402, F401, I001  (starts the Hub test server before huggingface_hub is imported)
from hub_fixtures import hub_api, hub_server  # noqa: E402, F401

import pytest  # noqa: E402
import torch  # noqa: E402
from peft_d2c import testing as tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(base model folder, {task: adapter folder}); trained once per test session."""
    return tiny.build_tiny_assets(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def one_thread():
    """One intra-op thread, as torchrun gives each process: fast on a shared 2-core machine, same numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture
def tiny_peft_model(tiny_assets):
    """A fresh PeftModel with the six task adapters loaded (named after their task families)."""
    base_dir, adapter_dirs = tiny_assets
    return tiny.load_peft_model(base_dir, adapter_dirs)


@pytest.fixture(scope="session")
def tiny_task_examples() -> dict[str, list[dict[str, str]]]:
    """Ten few-shot examples per task family, disjoint in seed from the training data."""
    return {family: tiny.make_examples(family, 10, seed=7) for family in tiny.TASK_FAMILIES}
