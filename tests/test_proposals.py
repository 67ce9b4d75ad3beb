"""The sweep proposals (issue 20): every adapter proposed in turn, moves and swaps, T scaled to N.

Checked on toy score functions whose optimum is known, by rebuilding the partition from the history and scoring it
directly, and end to end on the tiny model (the T that ran is the one the result and its saved config record).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c.engine.search.loop import SearchState, canonical_partition, d2c_search
from peft_d2c.engine.search.proposals import Move, apply_move, draw_random_move, draw_sweep_move, misfit_order
from peft_d2c.engine.search.search_robust import robust_search


def group_of(name: str) -> str:
    return name.rstrip("0123456789")


def mismatch(requests):
    """The share of the cluster's members from another group than the task's (0 for a pure cluster)."""
    return [sum(group_of(m) != group_of(t) for m in members) / len(members) for members, t in requests]


def sized_mismatch(requests):
    """`mismatch`, plus a large penalty for a cluster of another size than 2: single moves only make it worse."""
    return [loss + 10.0 * (len(members) != 2) for loss, (members, _) in zip(mismatch(requests), requests, strict=True)]


def replay(start, history):
    """The partition after the accepted records, rebuilt from the records alone."""
    clusters = [list(c) for c in start]
    for record in history:
        if not record["accepted"]:
            continue
        clusters[record["source"]].remove(record["task"])
        clusters[record["target"]].append(record["task"])
        if "swapped" in record:
            clusters[record["target"]].remove(record["swapped"])
            clusters[record["source"]].append(record["swapped"])
    return [sorted(c) for c in clusters]


def total(clusters, score_fn):
    requests = [(tuple(sorted(c)), t) for c in clusters for t in c]
    return sum(score_fn(requests))


class TestDraws:
    def test_apply_move_and_swap(self):
        clusters = [["a", "b"], ["c", "d"]]
        assert apply_move(clusters, Move(0, 1, "a")) == (("b",), ("a", "c", "d"))
        assert apply_move(clusters, Move(0, 1, "a", swapped="d")) == (("b", "d"), ("a", "c"))

    def test_random_draws_are_the_papers(self):
        """The default proposals consume the generator exactly as Algorithm 1's draw (source, target, task)."""
        clusters = [["a", "b", "c"], ["d"], ["e", "f"]]
        rng, mirror = np.random.default_rng(7), np.random.default_rng(7)
        for _ in range(50):
            move = draw_random_move(clusters, rng)
            eligible = [0, 2]
            source = eligible[mirror.integers(2)]
            target = [i for i in range(3) if i != source][mirror.integers(2)]
            task = clusters[source][mirror.integers(len(clusters[source]))]
            assert move == Move(source, target, task)

    def test_every_adapter_once_per_round_and_singletons_swap(self):
        clusters = [["a"], ["b", "c"], ["d", "e", "f"]]
        rng, queue = np.random.default_rng(0), []
        for _ in range(5):
            moves = [draw_sweep_move(clusters, rng, queue) for _ in range(6)]
            assert sorted(m.task for m in moves) == list("abcdef") and queue == []
            for move in moves:
                assert move.task in clusters[move.source] and move.target != move.source
                assert move.swapped is None or move.swapped in clusters[move.target]
                if move.task == "a":
                    assert move.swapped is not None  # the only member of its cluster can only be swapped
        kinds = collections.Counter(
            m.swapped is None for m in (draw_sweep_move(clusters, rng, queue) for _ in range(600))
        )
        # d, e, f, b, c (5 of 6) are moved or swapped half and half; a is always swapped: 250 moves expected.
        assert 200 < kinds[True] < 300


class TestSweepSearch:
    def test_sweep_needs_the_partition_objective(self):
        with pytest.raises(ValueError, match="partition"):
            d2c_search([["a1", "b1"], ["a2"]], mismatch, np.random.default_rng(0), num_iterations=2, proposal="sweep")
        with pytest.raises(ValueError, match="proposal"):
            d2c_search([["a1"], ["a2"]], mismatch, np.random.default_rng(0), num_iterations=1, proposal="greedy")
        with pytest.raises(ValueError, match="sweep"):
            D2CMergeConfig(num_clusters=2, search="paper", proposal="sweep")

    @pytest.mark.parametrize("seed", range(5))
    def test_every_adapter_proposed_exactly_twice_in_2n_steps(self, seed):
        names = [f"{g}{i}" for g in "abcd" for i in range(8)]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(names))
        start = [sorted(names[j] for j in order[i::4]) for i in range(4)]
        state = d2c_search(
            start, mismatch, rng, num_iterations=2 * len(names), objective="partition", proposal="sweep"
        )
        assert collections.Counter(r["task"] for r in state.history) == {n: 2 for n in names}
        rebuilt = replay(start, state.history)
        assert rebuilt == [sorted(c) for c in state.clusters]
        # The partition objective: every record's total is the rebuilt partition's, and it never rises.
        totals = [r["total_loss"] for r in state.history]
        assert all(b <= a + 1e-12 for a, b in zip(totals, totals[1:], strict=False))  # sums in another order
        assert totals[-1] == pytest.approx(total(rebuilt, mismatch), abs=1e-12)

    def test_swaps_leave_a_single_move_optimum_that_random_moves_cannot(self):
        """Sizes must stay 2: no single move ever helps, so the paper's proposals are stuck; swaps reach the optimum."""
        start = [["a1", "b1"], ["a2", "c1"], ["b2", "c2"]]
        optimum = [["a1", "a2"], ["b1", "b2"], ["c1", "c2"]]
        stuck = d2c_search(start, sized_mismatch, np.random.default_rng(0), num_iterations=60, objective="partition")
        assert not any(r["accepted"] for r in stuck.history)
        for seed in range(5):
            state = d2c_search(
                start,
                sized_mismatch,
                np.random.default_rng(seed),
                num_iterations=60,
                objective="partition",
                proposal="sweep",
            )
            assert canonical_partition(state.clusters) == optimum
            assert total(state.clusters, sized_mismatch) == 0.0 < total(start, sized_mismatch)
            assert any("swapped" in r for r in state.history if r["accepted"])

    def test_resumed_mid_round_gives_the_uninterrupted_run(self):
        """The queue of the round travels in the state: stopping after 7 steps and resuming changes nothing."""
        start = [["a1", "b1", "c1"], ["a2", "b2", "c2"], ["a3", "b3", "c3"]]
        whole = d2c_search(
            start, mismatch, np.random.default_rng(3), num_iterations=18, objective="partition", proposal="sweep"
        )
        rng = np.random.default_rng(3)
        half = d2c_search(start, mismatch, rng, num_iterations=7, objective="partition", proposal="sweep")
        assert 0 < len(half.queue) < 9
        state = SearchState.from_dict(half.to_dict())
        resumed = d2c_search(
            start, mismatch, rng, num_iterations=18, objective="partition", proposal="sweep", state=state
        )
        assert resumed.history == whole.history and resumed.clusters == whole.clusters

    def test_restarts_begin_a_fresh_round(self):
        starts = [[["a1", "b1"], ["a2", "b2"]], [["a1", "a2"], ["b1", "b2"]]]
        state = robust_search(starts, mismatch, np.random.default_rng(0), num_iterations=8, proposal="sweep")
        for restart in (0, 1):
            tasks = [r["task"] for r in state.history if r.get("restart") == restart]
            assert sorted(tasks) == ["a1", "a2", "b1", "b2"]


class TestTargeted:
    def test_the_target_is_the_cluster_that_fits_the_task_best(self):
        """Every record's target is the other cluster under whose members (rebuilt from the records so far) the
        task's loss is lowest, recomputed here from the toy score; the partition still only improves."""
        names = [f"{g}{i}" for g in "abcd" for i in range(4)]
        rng = np.random.default_rng(1)
        order = rng.permutation(len(names))
        start = [sorted(names[j] for j in order[i::4]) for i in range(4)]
        state = d2c_search(start, mismatch, rng, num_iterations=32, objective="partition", proposal="targeted")
        assert collections.Counter(r["task"] for r in state.history) == {n: 2 for n in names}
        for index, record in enumerate(state.history):
            clusters = replay(start, state.history[:index])
            task = record["task"]
            others = [i for i, c in enumerate(clusters) if task not in c]
            losses = {i: mismatch([(tuple(clusters[i]), task)])[0] for i in others}
            best = min(losses.values())
            assert record["target"] == min(i for i in others if losses[i] == best)
        assert replay(start, state.history) == [sorted(c) for c in state.clusters]

    @pytest.mark.parametrize("seed", range(5))
    def test_lower_total_than_uniform_targets_in_the_same_steps(self, seed):
        names = [f"{g}{i}" for g in "abcdefgh" for i in range(8)]
        ends = {}
        for proposal in ("sweep", "targeted"):
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(names))
            start = [sorted(names[j] for j in order[i::8]) for i in range(8)]
            state = d2c_search(start, mismatch, rng, num_iterations=128, objective="partition", proposal=proposal)
            ends[proposal] = total(state.clusters, mismatch)
        assert ends["targeted"] < ends["sweep"] < total(start, mismatch)


class TestMisfit:
    def test_each_round_starts_with_the_task_that_fits_another_cluster_best(self):
        """At the start of every round (the records 0, N, 2N, ...) the rounds' order is the one recomputed here:
        the gap between the task's loss under its own cluster and under the best other cluster, largest first."""
        names = [f"{g}{i}" for g in "abc" for i in range(4)]
        rng = np.random.default_rng(3)
        order = rng.permutation(len(names))
        start = [sorted(names[j] for j in order[i::3]) for i in range(3)]
        state = d2c_search(start, mismatch, rng, num_iterations=24, objective="partition", proposal="misfit")
        for round_start in (0, 12):
            clusters = replay(start, state.history[:round_start])
            gaps = {}
            for i, members in enumerate(clusters):
                for task in members:
                    others = [mismatch([(tuple(c), task)])[0] for j, c in enumerate(clusters) if j != i]
                    gaps[task] = mismatch([(tuple(members), task)])[0] - min(others)
            expected = sorted(names, key=lambda t: (-gaps[t], t))
            assert [r["task"] for r in state.history[round_start : round_start + 12]] == expected
        assert total(state.clusters, mismatch) < total(start, mismatch)

    def test_misfit_order_against_the_losses(self):
        clusters = [["a", "b"], ["c"], ["d", "e"]]
        table = {("a", 0): 1.0, ("a", 1): 0.2, ("a", 2): 0.9, ("b", 0): 0.5, ("b", 1): 0.6, ("b", 2): 0.7}
        table |= {("c", 1): 0.4, ("c", 0): 0.1, ("c", 2): 0.3, ("d", 2): 0.2, ("d", 0): 0.2, ("d", 1): 0.2}
        table |= {("e", 2): 0.0, ("e", 0): 0.5, ("e", 1): 0.6}
        index = {tuple(sorted(c)): i for i, c in enumerate(clusters)}
        order = misfit_order(clusters, lambda requests: [table[(t, index[m])] for m, t in requests])
        # gaps: a 0.8, c 0.3, d 0.0, b -0.1, e -0.5
        assert order == ["a", "c", "d", "b", "e"]

    def test_misfit_needs_the_partition_objective(self):
        with pytest.raises(ValueError, match="partition"):
            d2c_search([["a1", "b1"], ["a2"]], mismatch, np.random.default_rng(0), num_iterations=2, proposal="misfit")


class TestStepsScaleWithN:
    def test_sweep_t_is_two_rounds_and_an_explicit_t_wins(self):
        config = D2CMergeConfig(num_clusters=4, proposal="sweep")  # the partition rule at N = 16 too (N <= 4K)
        assert [config.search_steps_for(n) for n in (16, 64, 256)] == [32, 128, 512]
        assert D2CMergeConfig(num_clusters=2, proposal="sweep", num_iterations=5).search_steps_for(64) == 5
        random_moves = D2CMergeConfig(num_clusters=2, proposal="random")
        assert random_moves.search_steps_for(64) == 120  # the random rule scales too: 30 x 64 / 16
        assert D2CMergeConfig(num_clusters=2, proposal="targeted").search_steps_for(64) == 128

    def test_the_result_records_the_t_that_ran(self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path):
        from peft_d2c import testing as tiny

        base_dir, adapter_dirs = tiny_assets
        model = tiny.load_peft_model(base_dir, adapter_dirs)
        config = D2CMergeConfig(num_clusters=2, proposal="sweep", show_progress=False, seed=1)
        result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        n = len(adapter_dirs)
        assert result.config.num_iterations == 2 * n and config.num_iterations is None
        assert len(result.history) == 2 * n
        assert collections.Counter(r["task"] for r in result.history) == {name: 2 for name in adapter_dirs}
        assert replay(result.initial_clusters, result.history) == [sorted(c) for c in result.clusters]
        result.save_pretrained(tmp_path / "out")
        assert D2CMergeConfig.from_pretrained(tmp_path / "out").num_iterations == 2 * n
        card = (tmp_path / "out" / "README.md").read_text()
        assert f"`partition` search, {2 * n} proposed moves (`sweep`: every adapter in turn, moves and swaps)" in card

    def test_targeted_keeps_every_cluster_merge_live_with_the_same_result(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples
    ):
        """A targeted step needs every current cluster's merge: a cache below K + 2 is raised to it (recorded in the
        result's config), which changes how many merges are built, never the search."""
        from peft_d2c import testing as tiny

        base_dir, adapter_dirs = tiny_assets
        runs = {}
        for cache in (2, 5, 8):
            config = D2CMergeConfig(
                num_clusters=3, proposal="targeted", merge_cache_size=cache, seed=2, show_progress=False
            )
            model = tiny.load_peft_model(base_dir, adapter_dirs)
            runs[cache] = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        assert [runs[c].config.merge_cache_size for c in (2, 5, 8)] == [5, 5, 8]
        assert runs[2].history == runs[5].history == runs[8].history
        assert runs[2].stats["num_merges"] == runs[5].stats["num_merges"]
        # the same merge requests (the losses asked for do not depend on the cache); LRU never misses more in more room
        assert runs[8].stats["num_merges"] <= runs[5].stats["num_merges"]
