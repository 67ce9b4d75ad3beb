"""RegMean's kept Gram sums (issue 38, the N = 40 run time): a cluster a member away from a live one updates a kept
sum instead of forming it, and every merge still equals a merge formed from scratch."""

from __future__ import annotations

import pytest
import torch
from recompute import dense_regmean

from peft_d2c import D2CMergeConfig
from peft_d2c import testing as tiny
from peft_d2c.engine.merge.gram_sums import GramSums
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger

WIDTH = 12


def factors(count: int, rows: int = 8, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, WIDTH, generator=g, dtype=dtype) for _ in range(count)]


def direct_sum(inputs) -> torch.Tensor:
    """Σ F^T F, one Gram at a time, each written entry by entry as a sum over rows (not the code under test)."""
    total = torch.zeros(WIDTH, WIDTH, dtype=torch.float64)
    for f in inputs:
        for row in f.double():
            total += torch.outer(row, row)
    return total


class TestGramSums:
    def test_a_walk_of_moves_keeps_every_sum_exact(self):
        pool = factors(12)
        g = torch.Generator().manual_seed(1)
        sums = GramSums(max_bytes=2**30)
        cluster = list(range(6))
        for step in range(30):
            if step % 2 and len(cluster) > 4:  # remove a member, else add one from outside (the search's moves)
                cluster.pop(int(torch.randint(len(cluster), (1,), generator=g)))
            else:
                outside = [i for i in range(12) if i not in cluster]
                cluster.append(outside[int(torch.randint(len(outside), (1,), generator=g))])
            inputs = [pool[i] for i in sorted(cluster)]
            total = sums.total(inputs, owner=step)
            torch.testing.assert_close(total, direct_sum(inputs), rtol=1e-12, atol=1e-12)
            sums.retain({step})  # only this cluster stays live
        assert sums.num_updated >= 28 and sums.num_formed >= 1
        # At most `max_updates` changes are chained before a sum is formed afresh.
        assert sums.num_formed >= 30 // (sums.max_updates + 1)

    def test_float32_sums_keep_their_digits_along_a_long_walk(self):
        pool = factors(16, rows=40, seed=3, dtype=torch.float32)
        sums = GramSums(max_bytes=2**30)
        previous = None
        for step in range(60):
            members = [(step + i) % 16 for i in range(8)]  # each step: one member out, the next one in
            inputs = [pool[i] for i in members]
            total = sums.total(inputs, owner=step)
            expected = direct_sum(inputs)
            assert (total.double() - expected).abs().max() <= 2e-6 * expected.abs().max()
            sums.retain({step})
            previous = total
        assert previous is not None and sums.num_updated > sums.num_formed

    def test_the_same_factors_give_the_kept_sum_itself(self):
        pool = factors(4)
        sums = GramSums(max_bytes=2**30)
        first = sums.total(pool[:3], owner="a")
        again = sums.total(pool[:3], owner="b")
        assert again is first and sums.num_formed == 1 and sums.num_updated == 0
        assert sums.nbytes == WIDTH * WIDTH * 8  # one sum, kept for two owners
        sums.retain({"b"})
        assert sums.nbytes == WIDTH * WIDTH * 8 and sums.total(pool[:3], owner="b") is first
        sums.retain(set())
        assert sums.nbytes == 0
        sums.total(pool[:3], owner="c")
        assert sums.num_formed == 2

    def test_far_clusters_and_other_layers_are_formed_afresh(self):
        pool = factors(8)
        sums = GramSums(max_bytes=2**30)
        sums.total(pool[:4], owner="a")
        sums.total(pool[4:], owner="b")  # no member in common
        sums.total([pool[0], pool[1], pool[4], pool[5]], owner="c")  # half the rows changed: no saving
        assert sums.num_formed == 3 and sums.num_updated == 0
        other_layer = factors(4, seed=9)
        torch.testing.assert_close(sums.total(other_layer, owner="d"), direct_sum(other_layer))
        assert sums.num_formed == 4

    def test_kept_bytes_are_bounded_and_retain_frees_them(self):
        pool = factors(6)
        one = WIDTH * WIDTH * 8
        sums = GramSums(max_bytes=2 * one)
        for owner, start in enumerate(range(3)):
            sums.total(pool[start : start + 3], owner=owner)
        assert sums.nbytes == 2 * one  # the third was used, not kept
        sums.retain({1})
        assert sums.nbytes == one
        sums.total(pool[1:4], owner=1)  # kept for owner 1: found, not formed again
        assert sums.num_formed == 3
        sums.clear()
        assert sums.nbytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_like_merges_equal_the_dense_regmean(tiny_peft_model, dtype):
    """A merger that moves one member at a time between clusters (as the search proposes) updates kept Gram sums,
    and every merge it serves is RegMean's dense least-squares merge of its members (recomputed from the Grams)."""
    model = tiny_peft_model.to(dtype)
    names = sorted(model.peft_config)
    inputs = tiny.random_layer_inputs(model, names, tokens=24)  # 3 members x 24 rows >= width 64: in x in sums
    config = D2CMergeConfig(num_clusters=2, combination_type="regmean", merge={"cache_size": 3, "svd_rank": 64})
    merger = AdapterMerger(model, config, sources=names)
    merger.layer_inputs = inputs
    walk = [names[:3], names[:4], names[1:4], names[1:5], names[2:5], names[2:6], names[:3], names[2:5]]
    layers = [layer for _, layer in lora_layers(model)]
    for cluster in walk:
        served = merger.adapter_for(cluster)
        checked = 0
        for index, layer in enumerate(layers):
            if lora_factors(layer, served) is None:
                continue
            updates = []
            for m in cluster:
                a, b = lora_factors(layer, m)
                updates.append(b.double() @ a.double() * layer.scaling[m])
            grams = [inputs[m][index].double().T @ inputs[m][index].double() for m in cluster]
            expected = dense_regmean(updates, grams, [1 / len(cluster)] * len(cluster), 0.9)
            a, b = lora_factors(layer, served)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 factors hold 3 digits
            assert (b.double() @ a.double()).sub(expected).abs().max() <= tolerance * expected.abs().max()
            checked += 1
        assert checked > 0
    sums = merger.gram_sums
    assert sums is not None and sums.num_updated >= 5 and sums.nbytes <= merger.layer_input_bytes
    merger.cleanup()
    assert sums.nbytes == 0
