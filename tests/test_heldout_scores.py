"""Held-out scores: the whole-answer exact match next to the first word's, checked against separate generate calls."""

from __future__ import annotations

import string

import pytest
import torch

from peft_d2c import testing as tiny
from peft_d2c.evaluation.generation import normalize_whole_answer
from peft_d2c.evaluation.heldout import evaluate_routing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Paris", "paris"),
        (" New  York.\nCountry: USA", "new york"),
        ("\n\n  Red, green and Blue!\nNext:", "red, green and blue"),
        ("U.S.A.", "u.s.a"),
        ("", ""),
        ("  \n", ""),
        ("?!", ""),
    ],
)
def test_normalize_whole_answer(text, expected):
    assert normalize_whole_answer(text) == expected


def _greedy_first_lines(model, tokenizer, prompts, adapter, max_new_tokens):
    """The first line of each greedy answer, from `generate` called one prompt at a time (no batching, no padding)."""
    model.set_adapter(adapter)
    lines = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        lines.append(text.strip().split("\n")[0])
    return lines


def test_whole_match_fails_a_wrong_second_word_where_the_first_word_passes(
    tiny_peft_model, tiny_tokenizer, one_thread
):
    model, tokenizer = tiny_peft_model.eval(), tiny_tokenizer
    adapter = sorted(model.peft_config)[0]
    prompts = [e["prompt"] for e in tiny.make_examples(adapter, 4, seed=11)]
    lines = _greedy_first_lines(model, tokenizer, prompts, adapter, max_new_tokens=12)
    words = [line.split()[0] if line.split() else "" for line in lines]
    assert all(w.strip(string.punctuation) for w in words), lines  # the tiny model answers something
    # references: the answer itself (both scores hit), its first word plus a word it did not say (only the first
    # word hits), and a word it did not say (neither)
    examples = {
        "same": [{"prompt": p, "completion": " " + line} for p, line in zip(prompts, lines, strict=True)],
        "longer": [{"prompt": p, "completion": f" {w} zzzq"} for p, w in zip(prompts, words, strict=True)],
        "other": [{"prompt": p, "completion": " zzzq"} for p in prompts],
    }
    scores = evaluate_routing(model, tokenizer, examples, {task: adapter for task in examples}, max_new_tokens=12)
    # the first-line answer equals the whole reference where the tiny model's line is itself one answer line
    assert scores["same"]["whole_match"] == 1.0 and scores["same"]["exact_match"] == 1.0
    assert scores["longer"]["exact_match"] == 1.0
    assert not any(line.lower().endswith("zzzq") for line in lines)
    assert scores["longer"]["whole_match"] == 0.0
    assert scores["other"]["exact_match"] == scores["other"]["whole_match"] == 0.0
