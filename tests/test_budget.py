"""Storage budgets in bytes: sizes from real tensors, the K rule, and the final check for `cat`."""

from __future__ import annotations

import os

import pytest
from safetensors import safe_open

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.merge.budget import (
    adapter_bytes,
    check_partition_fits,
    merged_adapter_bytes,
    parse_size,
    resolve_num_clusters,
)

SIZE_CASES = [("20MB", 20_000_000), ("1.5kB", 1500), ("1KiB", 1024), ("2 mib", 2 * 2**20), ("512", 512), (4096, 4096)]
BAD_SIZES = ["20 parsecs", "MB", "-3MB", "0B", ""]


def _tensor_bytes(folder: str) -> int:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize("text,expected", SIZE_CASES)
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", BAD_SIZES)
def test_parse_size_rejects_bad_text_naming_the_argument(text):
    with pytest.raises(ValueError, match="`storage_budget`"):
        parse_size(text)


def test_config_accepts_a_size_and_keeps_it_as_given():
    config = D2CMergeConfig(storage_budget="20MB")
    assert config.storage_budget == "20MB"
    assert D2CMergeConfig.from_dict(config.to_dict()).storage_budget == "20MB"
    with pytest.raises(ValueError, match="units"):
        D2CMergeConfig(storage_budget="20 parsecs")
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        D2CMergeConfig(storage_budget=1.5)
    with pytest.raises(ValueError, match="size in bytes"):
        D2CMergeConfig(storage_budget="1MB").resolve_num_clusters(4)


def test_adapter_bytes_match_the_saved_safetensors(tiny_assets, tiny_peft_model):
    _, adapter_dirs = tiny_assets
    expected = _tensor_bytes(adapter_dirs["copy"])
    assert adapter_bytes(tiny_peft_model, "copy") == expected
    file_size = os.path.getsize(os.path.join(adapter_dirs["copy"], "adapter_model.safetensors"))
    assert expected < file_size < expected + 16_000  # the safetensors header is the only difference


@pytest.mark.parametrize("combination_type,svd_rank", [("ties", None), ("cat", None), ("svd", 4)])
def test_merged_adapter_bytes_match_a_real_merge(tmp_path, tiny_peft_model, combination_type, svd_rank):
    members = ["copy", "sort", "shift"]
    config = D2CMergeConfig(num_clusters=2, combination_type=combination_type, merge={"svd_rank": svd_rank})
    tiny_peft_model.add_weighted_adapter(
        members, [1.0] * 3, "merged", combination_type=combination_type, svd_rank=svd_rank, density=0.5
    )
    tiny_peft_model.save_pretrained(str(tmp_path), selected_adapters=["merged"])
    saved = _tensor_bytes(str(tmp_path / "merged"))
    assert merged_adapter_bytes(tiny_peft_model, members, config) == saved
    single = adapter_bytes(tiny_peft_model, "copy")
    assert saved == {"ties": single, "cat": 3 * single, "svd": single // 2}[combination_type]


def test_bytes_budget_picks_the_largest_k_that_fits(tiny_peft_model):
    names = list(tiny_peft_model.peft_config)
    single = adapter_bytes(tiny_peft_model, names[0])
    assert resolve_num_clusters(tiny_peft_model, names, D2CMergeConfig(storage_budget=int(2.5 * single))) == 2
    assert resolve_num_clusters(tiny_peft_model, names, D2CMergeConfig(storage_budget=100 * single)) == len(names)
    assert resolve_num_clusters(tiny_peft_model, names, D2CMergeConfig(storage_budget=0.5)) == 3


def test_bytes_budget_too_small_for_one_adapter_is_a_clear_error(tiny_peft_model):
    names = list(tiny_peft_model.peft_config)
    with pytest.raises(ValueError, match="too small for one merged adapter"):
        resolve_num_clusters(tiny_peft_model, names, D2CMergeConfig(storage_budget="1kB"))


def test_cat_budget_counts_every_source_rank(tiny_peft_model):
    names = list(tiny_peft_model.peft_config)
    total = sum(adapter_bytes(tiny_peft_model, n) for n in names)
    fits = D2CMergeConfig(storage_budget=total, combination_type="cat")
    assert resolve_num_clusters(tiny_peft_model, names, fits) == len(names)
    with pytest.raises(ValueError, match="`cat` stacks the ranks"):
        resolve_num_clusters(tiny_peft_model, names, D2CMergeConfig(storage_budget=total - 1, combination_type="cat"))
    tight = D2CMergeConfig(storage_budget=total // 2, combination_type="cat")
    with pytest.raises(ValueError, match="nothing was saved"):
        check_partition_fits(tiny_peft_model, [names[:3], names[3:]], tight)


def test_merge_with_a_bytes_budget_end_to_end(tiny_peft_model, tiny_tokenizer, tiny_task_examples):
    single = adapter_bytes(tiny_peft_model, "copy")
    config = D2CMergeConfig(storage_budget=f"{2 * single / 1000}kB", num_iterations=4, show_progress=False)
    result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
    assert result.num_clusters == 2


BIAS_TASKS = ["copy", "sort", "shift"]


@pytest.fixture(scope="module")
def bias_adapter_dirs(tiny_assets, tmp_path_factory):
    """Three briefly trained LoRAs with `lora_bias=True` (a bias on every lora_B: out bytes more per module)."""
    base_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("bias")
    tokenizer = tiny.make_tokenizer()
    config = tiny.lora_config(lora_bias=True)
    return {
        task: tiny.train_adapter(base_dir, tokenizer, task, str(root / task), steps=5, seed=i, config=config)
        for i, task in enumerate(BIAS_TASKS)
    }


def _weight_and_bias_bytes(folder: str) -> tuple[int, int]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    bias = sum(size for key, size in sizes.items() if key.endswith("lora_B.bias"))
    return sum(sizes.values()) - bias, bias


def test_adapter_bytes_count_the_lora_bias(tiny_assets, bias_adapter_dirs):
    model = tiny.load_peft_model(tiny_assets[0], bias_adapter_dirs)
    weights, bias = _weight_and_bias_bytes(bias_adapter_dirs["copy"])
    assert bias > 0
    assert adapter_bytes(model, "copy") == weights + bias == _tensor_bytes(bias_adapter_dirs["copy"])


# (rank allocation, byte budget from one source's weight and bias bytes): a budget between 2 weights-only adapters
# and 2 whole ones (K must be 1), and one of 7 rank-8 modules' worth (where the spectrum spends every byte).
BIAS_BUDGETS = [
    ("uniform", lambda weights, bias: 2 * weights + bias),
    ("spectrum", lambda weights, bias: 7 * weights // 6),
]


@pytest.mark.parametrize("rank_allocation,budget_of", BIAS_BUDGETS, ids=[a for a, _ in BIAS_BUDGETS])
def test_saved_merges_of_bias_adapters_never_exceed_a_byte_budget(
    tiny_assets, bias_adapter_dirs, tiny_tokenizer, tiny_task_examples, tmp_path, rank_allocation, budget_of
):
    """The bytes of the saved merged adapters (every tensor of their safetensors, the LoRA biases included) stay
    within `storage_budget`. On main at 710cc18 the budget counted only rank x (in + out): with `lora_bias=True`
    sources a `spectrum` run wrote 31,744 bytes under a 28,672-byte budget."""
    model = tiny.load_peft_model(tiny_assets[0], bias_adapter_dirs)
    budget = budget_of(*_weight_and_bias_bytes(bias_adapter_dirs["copy"]))
    config = D2CMergeConfig(
        storage_budget=budget, method="random", combination_type="core_ta", merge={"rank_allocation": rank_allocation}
    )
    examples = {task: tiny_task_examples[task] for task in BIAS_TASKS}
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny_tokenizer)
    result.save_pretrained(tmp_path / "out")
    saved = {name: _tensor_bytes(str(tmp_path / "out" / name)) for name in result.merged_adapter_names}
    assert all(_weight_and_bias_bytes(str(tmp_path / "out" / name))[1] > 0 for name in saved)  # biases were saved
    assert sum(saved.values()) <= budget
    if rank_allocation == "uniform":
        assert check_partition_fits(model, result.clusters, config) == sum(saved.values())
    else:
        assert {name: size["bytes"] for name, size in result.stats["merged_sizes"].items()} == saved
        assert sum(saved.values()) > budget - 512  # spent up to less than one rank unit (64 + 64 float32 numbers)
