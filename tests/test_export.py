"""Deployment exports (peft_d2c.export): llama.cpp GGUF LoRA files, vLLM folders, PEFT copies and their manifest.

The GGUF files are read back with the `gguf` package's reader and compared with PEFT's own merged update
(`LoraLayer.get_delta_weight`) of every module, with the q/k row permutation written out here independently (as an
index map) rather than reused from the exporter. The llama.cpp runtime itself is checked in
tests/test_export_llamacpp.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CResult, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.cli import main
from peft_d2c.embedded.base_model import EMBEDDED_MODEL_ID, PYPI_BASE_KEY, PYPI_GGUF_MEMBER, PYPI_PACKAGE
from peft_d2c.errors import UnsupportedAdapterError
from peft_d2c.export import (
    MANIFEST_NAME,
    base_info_from_config,
    convert_peft_adapter,
    export_d2c_folder,
    vllm_max_lora_rank,
    write_gguf_lora,
)
from peft_d2c.hub.cards import CITATION, build_result_card

VLLM_RANK_CASES = [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (100, 128), (257, 320), (512, 512)]


@pytest.fixture(scope="module")
def tiny_result(tiny_assets, tmp_path_factory):
    """A real D2C run on the tiny Llama (K=2), saved; returns (result, folder, base folder)."""
    base_dir, adapter_dirs = tiny_assets
    model = tiny.load_peft_model(base_dir, adapter_dirs)
    examples = {f: tiny.make_examples(f, 10, seed=7) for f in tiny.TASK_FAMILIES}
    config = D2CMergeConfig(num_clusters=2, num_iterations=6, show_progress=False)
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny.make_tokenizer())
    folder = str(tmp_path_factory.mktemp("result") / "d2c")
    result.save_pretrained(folder)
    return result, folder, base_dir


def llama_cpp_row_order(rows: int, n_head: int) -> np.ndarray:
    """Index map of llama.cpp's q/k layout: its row h*d + 2j + c is Hugging Face's row h*d + c*d/2 + j."""
    d = rows // n_head
    order = np.empty(rows, dtype=np.int64)
    for h in range(n_head):
        for j in range(d // 2):
            for c in range(2):
                order[h * d + 2 * j + c] = h * d + c * (d // 2) + j
    return order


def read_gguf_lora(path: str) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def peft_updates(base_dir: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW (scaling included) of every LoRA module of one adapter folder, by module name."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


def gguf_name(module: str) -> str:
    layer = module.split(".")[2]
    kind = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module.rsplit(".", 1)[-1]]  # fmt: skip
    return f"blk.{layer}.{kind}.weight"


def assert_gguf_matches_peft(path: str, updates: dict[str, torch.Tensor], n_head: int, n_head_kv: int) -> None:
    fields, tensors = read_gguf_lora(path)
    alpha = float(fields["adapter.lora.alpha"])
    assert len(tensors) == 2 * len(updates)
    for module, expected in updates.items():
        name = gguf_name(module)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.dtype == np.float32 and a.shape == (b.shape[1], expected.shape[1])
        rank = b.shape[1]  # llama.cpp reads the rank from lora_b
        if module.endswith("q_proj"):
            expected = expected[llama_cpp_row_order(expected.shape[0], n_head)]
        elif module.endswith("k_proj"):
            expected = expected[llama_cpp_row_order(expected.shape[0], n_head_kv)]
        np.testing.assert_allclose(b @ a * alpha / rank, expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=module)


class TestGGUFExport:
    def test_read_back_update_equals_peft_merged_update_per_module(self, tiny_result, tmp_path):
        """B @ A * alpha / r of every exported module is PEFT's merged ΔW, q/k rows in llama.cpp's RoPE order."""
        result, folder, base_dir = tiny_result
        manifest = export_d2c_folder(folder, tmp_path / "gguf", format="gguf")
        config = LlamaForCausalLM.from_pretrained(base_dir).config
        for name in result.merged_adapter_names:
            path = str(tmp_path / "gguf" / f"{name}.gguf")
            updates = peft_updates(base_dir, os.path.join(folder, name))
            assert any(m.endswith("q_proj") for m in updates)  # the permutation is really exercised
            assert_gguf_matches_peft(path, updates, config.num_attention_heads, config.num_key_value_heads)
            fields, _ = read_gguf_lora(path)
            assert fields["general.type"] == "adapter"
            assert fields["general.architecture"] == "llama"
            assert fields["adapter.type"] == "lora"
            assert fields["adapter.lora.task_name"].split(",") == manifest["adapters"][name]["tasks"]
            assert manifest["adapters"][name]["bytes"] == os.path.getsize(path)

    def test_without_the_permutation_q_rows_differ(self, tiny_result, tmp_path):
        """The negative control of the runtime check: an unpermuted export really is a different adapter."""
        _, folder, base_dir = tiny_result
        info = base_info_from_config(LlamaForCausalLM.from_pretrained(base_dir).config)
        name = "blk.0.attn_q.weight"
        permuted = convert_peft_adapter(os.path.join(folder, "d2c_0"), info).tensors[name][1]
        plain = convert_peft_adapter(os.path.join(folder, "d2c_0"), info, permute_qk=False).tensors[name][1]
        np.testing.assert_array_equal(permuted, plain[llama_cpp_row_order(plain.shape[0], info.n_head)])
        assert not np.allclose(permuted, plain)

    def test_manifest_routes_every_task_and_records_the_base_gguf_hash(self, tiny_result, tmp_path):
        result, folder, base_dir = tiny_result
        base_gguf = write_tiny_base_gguf(base_dir, tmp_path / "base.gguf")
        manifest = export_d2c_folder(folder, tmp_path / "out", format="gguf", base_gguf=base_gguf)
        assert manifest == json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
        assert manifest["base_model"]["gguf_sha256"] == hashlib.sha256(open(base_gguf, "rb").read()).hexdigest()
        ids = {name: i for i, name in enumerate(result.merged_adapter_names)}
        assert sorted(manifest["tasks"]) == sorted(result.routing)
        for task, entry in manifest["tasks"].items():
            adapter = result.routing[task]
            assert entry["file"] == f"{adapter}.gguf" and (tmp_path / "out" / entry["file"]).is_file()
            assert entry["server_request"]["lora"] == [{"id": ids[adapter], "scale": 1.0}]
            assert f"--lora {adapter}.gguf" in entry["llama_cli"]
        files = " ".join(f"--lora {n}.gguf" for n in result.merged_adapter_names)
        assert manifest["llama_server"] == f"llama-server -m base.gguf {files} --lora-init-without-apply"
        for name, command in manifest["lm_eval"].items():
            tasks = ",".join(sorted(t for t, a in result.routing.items() if a == name))
            assert (
                command.endswith(f"--tasks {tasks}")
                and f"peft={os.path.abspath(os.path.join(folder, name))}" in command
            )
        assert (tmp_path / "out" / "lm_eval_commands.sh").read_text().count("lm_eval --model hf") == 2

    def test_base_gguf_of_another_model_is_refused_before_writing(self, tiny_result, tmp_path):
        _, folder, _ = tiny_result
        other = tmp_path / "other"
        LlamaForCausalLM(tiny.make_base_model().config.__class__(**{**tiny.make_base_model().config.to_dict(),
                                                                     "hidden_size": 32})).save_pretrained(other)  # fmt: skip
        base_gguf = write_tiny_base_gguf(str(other), tmp_path / "other.gguf")
        with pytest.raises(UnsupportedAdapterError, match=r"model.layers.0.self_attn.\w_proj.*base GGUF"):
            export_d2c_folder(folder, tmp_path / "out", format="gguf", base_gguf=base_gguf)
        assert not (tmp_path / "out").exists()


def write_tiny_base_gguf(base_dir: str, path) -> str:
    """A model GGUF file with the tiny Llama's tensor names and shapes (f32), as convert_hf_to_gguf names them."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    for key, tensor in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight",))
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def make_result_with(folder: str, out: str, name: str, adapter_dir: str) -> str:
    """A copy of a saved result whose merged adapter `name` is replaced by `adapter_dir`."""
    shutil.copytree(folder, out)
    shutil.rmtree(os.path.join(out, name))
    shutil.copytree(adapter_dir, os.path.join(out, name))
    return out


def save_variant_adapter(base_dir: str, out: str, **kwargs) -> str:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False,
                            **kwargs)  # fmt: skip
        get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).save_pretrained(out)
    return out


REFUSAL_CASES = [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
]


class TestScalesAndRefusals:
    def test_rslora_rank_and_alpha_patterns_are_folded_into_b(self, tiny_assets, tmp_path):
        """llama.cpp applies alpha / r per module; rslora and per-module patterns are folded into B exactly."""
        base_dir, _ = tiny_assets
        adapter = save_variant_adapter(
            base_dir, str(tmp_path / "a"), use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3}
        )
        config = LlamaForCausalLM.from_pretrained(base_dir).config
        converted = convert_peft_adapter(adapter, base_info_from_config(config))
        assert converted.folded_scale and set(converted.ranks.values()) == {2, 4}
        path = str(tmp_path / "a.gguf")
        write_gguf_lora(path, converted)
        assert_gguf_matches_peft(path, peft_updates(base_dir, adapter), config.num_attention_heads,
                                 config.num_key_value_heads)  # fmt: skip

    def test_vllm_folder_folds_scales_and_loads_back_to_the_same_update(self, tiny_result, tiny_assets, tmp_path):
        _, folder, base_dir = tiny_result
        adapter = save_variant_adapter(base_dir, str(tmp_path / "a"), use_rslora=True, alpha_pattern={"v_proj": 3})
        variant = make_result_with(folder, str(tmp_path / "res"), "d2c_1", adapter)
        manifest = export_d2c_folder(variant, tmp_path / "vllm", format="vllm")
        exported = tmp_path / "vllm" / "d2c_1"
        config = json.loads((exported / "adapter_config.json").read_text())
        assert config["use_rslora"] is False and config["alpha_pattern"] == {} and not config["modules_to_save"]
        scale = config["lora_alpha"] / config["r"]  # the one scale vLLM applies to every module
        tensors = load_file(str(exported / "adapter_model.safetensors"))
        for module, expected in peft_updates(base_dir, adapter).items():
            a = tensors[f"base_model.model.{module}.lora_A.weight"]
            b = tensors[f"base_model.model.{module}.lora_B.weight"]
            torch.testing.assert_close(b @ a * scale, expected, rtol=1e-5, atol=1e-6)
        assert manifest["vllm"]["max_lora_rank"] == 8
        assert [m["name"] for m in manifest["vllm"]["lora_modules"]] == ["d2c_0", "d2c_1"]
        assert all(m["base_model_name"] == base_dir for m in manifest["vllm"]["lora_modules"])
        assert (
            json.loads((tmp_path / "vllm" / "vllm_lora_modules.json").read_text()) == manifest["vllm"]["lora_modules"]
        )
        assert [manifest["adapters"][n]["lora_int_id"] for n in ("d2c_0", "d2c_1")] == [1, 2]
        assert "--enable-lora" in manifest["vllm"]["serve"] and "--max-lora-rank 8" in manifest["vllm"]["serve"]

    @pytest.mark.parametrize(("kwargs", "named"), REFUSAL_CASES)
    @pytest.mark.parametrize("format", ["gguf", "vllm"])
    def test_what_the_runtime_cannot_load_is_refused_before_writing(
        self, tiny_result, tmp_path, kwargs, named, format
    ):
        _, folder, base_dir = tiny_result
        adapter = save_variant_adapter(base_dir, str(tmp_path / "a"), **kwargs)
        variant = make_result_with(folder, str(tmp_path / "res"), "d2c_1", adapter)
        with pytest.raises(UnsupportedAdapterError, match=named):
            export_d2c_folder(variant, tmp_path / "out", format=format)
        assert not (tmp_path / "out").exists()

    def test_lora_on_an_output_layer_tied_to_the_embeddings_is_refused_naming_it(self, tiny_assets, tmp_path):
        base_dir, _ = tiny_assets
        adapter = str(tmp_path / "a")
        with torch.random.fork_rng():
            config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
            get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).save_pretrained(adapter)
        tied = {**LlamaForCausalLM.from_pretrained(base_dir).config.to_dict(), "tie_word_embeddings": True}
        with pytest.raises(UnsupportedAdapterError, match="'lm_head' is the output layer"):
            convert_peft_adapter(adapter, base_info_from_config(tied))
        untied = convert_peft_adapter(adapter, base_info_from_config({**tied, "tie_word_embeddings": False}))
        assert "output.weight" in untied.tensors

    def test_an_unknown_base_model_asks_for_the_base_gguf(self, tiny_result, tmp_path):
        _, folder, _ = tiny_result
        with pytest.raises(FileNotFoundError, match="--base-gguf"):
            export_d2c_folder(folder, tmp_path / "out", base_model_id=str(tmp_path / "no-such-model"))
        assert not (tmp_path / "out").exists()

    def test_other_architectures_are_refused(self):
        with pytest.raises(UnsupportedAdapterError, match="model_type='gpt2'"):
            base_info_from_config({"model_type": "gpt2", "num_attention_heads": 2, "num_hidden_layers": 1})


@pytest.mark.parametrize(("rank", "expected"), VLLM_RANK_CASES)
def test_vllm_max_lora_rank_rounds_up_to_an_accepted_value(rank, expected):
    assert vllm_max_lora_rank(rank) == expected


class TestEntryPoints:
    def test_peft_format_copies_the_adapters_unchanged(self, tiny_result, tmp_path):
        result, folder, _ = tiny_result
        manifest = export_d2c_folder(folder, tmp_path / "peft", format="peft")
        for name in result.merged_adapter_names:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                assert (tmp_path / "peft" / name / f).read_bytes() == open(os.path.join(folder, name, f), "rb").read()
        assert manifest["tasks"] == {t: {"adapter": a, "file": a} for t, a in result.routing.items()}

    def test_in_memory_result_exports_like_its_saved_folder(self, tiny_result, tmp_path):
        result, folder, _ = tiny_result
        from_memory = result.export(tmp_path / "a", format="gguf")
        from_folder = export_d2c_folder(folder, tmp_path / "b", format="gguf")
        for name in result.merged_adapter_names:
            assert (tmp_path / "a" / f"{name}.gguf").read_bytes() == (tmp_path / "b" / f"{name}.gguf").read_bytes()
        assert from_memory["tasks"] == from_folder["tasks"]
        with pytest.raises(ValueError, match="export its folder instead"):
            D2CResult.from_pretrained(folder).export(tmp_path / "c")

    def test_in_memory_result_exports_after_its_base_model_folder_is_deleted(
        self, tiny_assets, tiny_task_examples, tiny_tokenizer, tmp_path
    ):
        """`D2CResult.export` re-read the base model's config by its recorded name (`AutoConfig.from_pretrained`), so
        the GGUF export failed with FileNotFoundError once that folder was gone, although the model is in memory."""
        base_dir, adapter_dirs = tiny_assets
        moved = str(tmp_path / "moved-base")
        shutil.copytree(base_dir, moved)
        copies = {}
        for task, path in adapter_dirs.items():  # adapters trained on the folder that will be deleted
            copies[task] = shutil.copytree(path, tmp_path / "adapters" / task)
            config_path = copies[task] / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config_path.write_text(json.dumps({**config, "base_model_name_or_path": moved}))
        model = tiny.load_peft_model(moved, {t: str(p) for t, p in copies.items()})
        config = D2CMergeConfig(num_clusters=2, num_iterations=2, show_progress=False)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        assert result.base_model == moved
        names = result.merged_adapter_names
        adapter_files = [f"{n}/{f}" for n in names for f in ("adapter_config.json", "adapter_model.safetensors")]
        formats = {"gguf": [f"{n}.gguf" for n in names], "vllm": adapter_files, "peft": adapter_files}
        before = {f: result.export(tmp_path / f"before-{f}", format=f) for f in formats}
        shutil.rmtree(moved)
        for format, files in formats.items():
            after = result.export(tmp_path / f"after-{format}", format=format)
            assert after["tasks"] == before[format]["tasks"] and after["base_model"] == {"name": moved}
            for file in files:
                written = (tmp_path / f"after-{format}" / file).read_bytes()
                assert written == (tmp_path / f"before-{format}" / file).read_bytes(), (format, file)

    def test_cli_export_writes_the_manifest(self, tiny_result, tmp_path, capsys):
        _, folder, _ = tiny_result
        assert main(["export", folder, "--format", "gguf", "--output", str(tmp_path / "cli"), "--quiet"]) == 0
        assert "llama-server -m BASE.gguf" in capsys.readouterr().out
        assert json.loads((tmp_path / "cli" / MANIFEST_NAME).read_text())["format"] == "gguf"

    def test_cli_export_help_exits_0(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--base-gguf" in out and "{gguf,vllm,peft}" in out

    def test_cli_export_of_a_refused_adapter_exits_2_with_one_line(self, tiny_result, tmp_path, capsys):
        _, folder, base_dir = tiny_result
        adapter = save_variant_adapter(base_dir, str(tmp_path / "a"), use_dora=True)
        variant = make_result_with(folder, str(tmp_path / "res"), "d2c_1", adapter)
        assert main(["export", variant, "--output", str(tmp_path / "out"), "--quiet"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("peft-d2c: error:") and "DoRA" in error and "\n" not in error
        assert not (tmp_path / "out").exists()

    def test_result_card_cites_the_paper_in_its_author_order(self, tiny_result):
        _, folder, _ = tiny_result
        card = str(build_result_card(folder, base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct"))
        assert "@inproceedings{lee2026d2c," in card and CITATION in card
        authors = ["Lee, Kyeng-Hun", "Ko, Hyeonmok", "Bohdal, Ondrej", "Michieli, Umberto", "Ozay, Mete", "Ceritli",
                   "Moon"]  # fmt: skip
        positions = [card.index(a) for a in authors]
        assert positions == sorted(positions)
        assert "d2c_routing.json" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card


class TestResultCard:
    def test_local_base_model_path_is_not_card_metadata(self, tiny_result):
        """A local folder is not a valid Hub `base_model`; the card named the machine-local path there."""
        _, folder, base_dir = tiny_result
        card = build_result_card(folder)
        assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
        assert base_dir in card.text  # still named in the text
        card.validate()
        hub = build_result_card(folder, base_model_id=EMBEDDED_MODEL_ID)
        assert hub.data.base_model == EMBEDDED_MODEL_ID and hub.data.to_dict()["base_model_relation"] == "adapter"

    def test_main_job_card_names_the_hub_id_and_the_gguf_copy_of_the_embedded_base(self, tiny_result, tmp_path):
        """The main job's card named the machine-local cache folder of the dequantised PyPI copy as `base_model`."""
        from peft_d2c.embedded.mainjob import write_embedded_card

        _, folder, base_dir = tiny_result
        output = shutil.copytree(folder, tmp_path / "d2c_output")
        source_info = {"source": "pypi-gguf", "package": PYPI_PACKAGE, "file": PYPI_GGUF_MEMBER,
                       "model_id": EMBEDDED_MODEL_ID, "path": base_dir, "base_key": PYPI_BASE_KEY}  # fmt: skip
        assert write_embedded_card(output, source_info)
        card = ModelCard.load(output / "README.md")
        assert card.data.base_model == EMBEDDED_MODEL_ID and base_dir not in card.content
        assert "dequantised GGUF copy" in card.text and PYPI_PACKAGE in card.text
        assert "`SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 quantisation)" in card.text
        assert f"# D2C adapter collection for `{EMBEDDED_MODEL_ID}`" in card.text
        assert f'from_pretrained("{EMBEDDED_MODEL_ID}"), "d2c_output")' in card.text

    def test_main_job_card_of_another_base_or_a_users_readme_is_left_alone(self, tiny_result, tmp_path):
        from peft_d2c.embedded.mainjob import write_embedded_card

        _, folder, _ = tiny_result
        output = shutil.copytree(folder, tmp_path / "quick")
        before = (output / "README.md").read_text()
        assert not write_embedded_card(output, {"source": "tiny-random", "model_id": str(output)})
        assert (output / "README.md").read_text() == before
        mine = shutil.copytree(folder, tmp_path / "mine")
        (mine / "README.md").write_text("my notes\n")
        result = json.loads((mine / "d2c_result.json").read_text())
        result["files"] = [f for f in result["files"] if f != "README.md"]
        (mine / "d2c_result.json").write_text(json.dumps(result))
        assert not write_embedded_card(mine, {"source": "hub", "model_id": EMBEDDED_MODEL_ID})
        assert (mine / "README.md").read_text() == "my notes\n"
