"""A tiny randomly initialised Llama, a word-level tokenizer, synthetic task families and real trained LoRAs.

Used by the test suite and by `peft-d2c run --quick` (a smoke test that needs no download). Everything is built
here: the tokenizer with the `tokenizers` library, the model with transformers' `LlamaForCausalLM`, the adapters
with PEFT and a short real training run, so the tests exercise real code.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .data.examples import Example
from .engine.scoring.loss import tokenize_example

SYMBOLS = list("abcdefgh")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = [*SPECIAL, *SYMBOLS, "="]


def _shift(xs: list[str]) -> list[str]:
    return [SYMBOLS[(SYMBOLS.index(x) + 1) % len(SYMBOLS)] for x in xs]


# Six task families: each maps three symbols to an answer. The prompt does not say which task it is, so one
# adapter cannot serve conflicting tasks well, which is what makes the clustering matter.
TASK_FAMILIES = {
    "copy": lambda xs: xs,
    "reverse": lambda xs: xs[::-1],
    "sort": lambda xs: sorted(xs),
    "first": lambda xs: xs[:1],
    "last": lambda xs: xs[-1:],
    "shift": _shift,
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary that, like Llama's, prepends BOS."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_base_model(seed: int = 0) -> LlamaForCausalLM:
    """Hidden size 64, 2 layers, randomly initialised from `seed`."""
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def make_examples(family: str, count: int, seed: int) -> list[dict[str, str]]:
    """`count` examples of a task family, drawn with their own seed."""
    rng = random.Random(f"{family}-{seed}")
    fn = TASK_FAMILIES[family]
    examples = []
    for _ in range(count):
        xs = [rng.choice(SYMBOLS) for _ in range(3)]
        examples.append({"prompt": " ".join(xs) + " =", "completion": " ".join(fn(xs))})
    return examples


def lora_config(r: int = 8, **kwargs) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0, **kwargs)


def train_adapter(
    base_dir: str,
    tokenizer,
    family: str,
    out_dir: str,
    *,
    steps: int = 40,
    seed: int = 0,
    config: LoraConfig | None = None,
) -> str:
    """Train one LoRA (`config`, defaults to `lora_config()`) on a task family for `steps` real optimiser steps
    (prompt masked) and save it."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config if config is not None else lora_config())
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        data = [tokenize_example(tokenizer, Example(**e)) for e in make_examples(family, 64, seed=100 + seed)]
        peft_model.train()
        for step in range(steps):
            batch = [data[(step * 16 + i) % len(data)] for i in range(16)]
            width = max(len(b.input_ids) for b in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, b in enumerate(batch):
                ids[r, : len(b.input_ids)] = torch.tensor(b.input_ids)
                mask[r, : len(b.input_ids)] = 1
                labels[r, b.completion_start : len(b.input_ids)] = torch.tensor(b.input_ids[b.completion_start :])
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    peft_model.save_pretrained(out_dir)
    return out_dir


def load_peft_model(base_dir: str, adapter_dirs: dict[str, str]) -> PeftModel:
    """A fresh base model with every adapter of `adapter_dirs` loaded under its task name, in eval mode."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    items = list(adapter_dirs.items())
    peft_model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model.eval()


def build_tiny_assets(root: str) -> tuple[str, dict[str, str]]:
    """Save the tiny base model and one trained adapter per task family under `root`."""
    tokenizer = make_tokenizer()
    base_dir = os.path.join(root, "base")
    make_base_model().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapter_dirs = {}
    for i, family in enumerate(TASK_FAMILIES):
        adapter_dirs[family] = train_adapter(base_dir, tokenizer, family, os.path.join(root, family), seed=i)
    return base_dir, adapter_dirs


def perturbed_copy(src_dir: str, out_dir: str, *, noise: float, seed: int) -> str:
    """Save a copy of an adapter with small Gaussian noise added to every LoRA weight (a "near-copy")."""

    os.makedirs(out_dir, exist_ok=True)
    tensors = load_file(os.path.join(src_dir, "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {k: v + noise * v.std() * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(noisy, os.path.join(out_dir, "adapter_model.safetensors"))
    with (
        open(os.path.join(src_dir, "adapter_config.json")) as f_in,
        open(os.path.join(out_dir, "adapter_config.json"), "w") as f_out,
    ):
        f_out.write(f_in.read())
    return out_dir


def edited_adapter_copy(src_dir: str, out_dir: str, **changes) -> str:
    """Copy an adapter folder to `out_dir` (replacing it) with `changes` set in its adapter_config.json; the weights
    stay the same (e.g. `lora_dropout=0.2`, `use_rslora=True`, another `base_model_name_or_path`)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(src_dir, out_dir)
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return out_dir


def random_layer_inputs(peft_model: PeftModel, adapters: list[str], *, tokens: int = 16, seed: int = 0) -> dict:
    """Stand-in layer inputs for the data-aware merges (`regmean`) in tests that exercise the merger rather than the
    data: per adapter and LoRA layer, `tokens` seeded Gaussian inputs scaled by 1/√tokens (a `regmean.LayerInput`),
    on the CPU where they are stored in a run (empty on `meta` for a `meta` layer) in float32. Assign the result to
    `AdapterMerger.layer_inputs`."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for adapter in adapters:
        inputs[adapter] = []
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = module.get_base_layer().weight
            size = weight.shape[1]
            if weight.device.type == "meta":
                inputs[adapter].append(torch.empty(tokens, size, device="meta"))
                continue
            inputs[adapter].append(torch.randn(tokens, size, generator=generator) / tokens**0.5)
    return inputs
