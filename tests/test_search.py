"""The search loop on its own: toy score functions, no torch, no PEFT."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peft_d2c.engine.search.loop import (
    SearchState,
    balanced_random_partition,
    canonical_partition,
    d2c_search,
    fill_empty_clusters,
    gram_embedding,
    kmeans_partition,
    labels_to_partition,
)

GROUPS = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "b3": "b", "c1": "c", "c2": "c", "c3": "c"}
OPTIMUM = [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c1", "c2", "c3"]]


def group_score(requests):
    """Loss of task t under a cluster: the share of members from another group (0 when the cluster is pure)."""
    return [sum(GROUPS[m] != GROUPS[t] for m in members) / len(members) for members, t in requests]


class TestPurity:
    def test_search_module_imports_without_torch(self):
        """search/loop.py (it imports no other peft-d2c module) must run where torch is absent: load
        the package folder by path as a bare package whose `__init__` does not run (engine's and search's hold only
        their docstrings), in a fresh interpreter, and check sys.modules."""
        folder = Path(__file__).parents[1] / "peft_d2c"
        code = (
            "import importlib, sys, types\n"
            "package = sys.modules['pure'] = types.ModuleType('pure')\n"
            f"package.__path__ = [{str(folder)!r}]\n"
            "module = importlib.import_module('pure.engine.search.loop')\n"
            "state = module.d2c_search([['a', 'b'], ['c']], lambda r: [0.0] * len(r), __import__('numpy').random.default_rng(0), num_iterations=3)\n"
            "assert len(state.history) == 3\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('pure.'))\n"
            "assert loaded == ['pure.engine', 'pure.engine.search', 'pure.engine.search.loop'], loaded\n"
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, sorted(sys.modules)\n"
            "print('pure')\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "pure"
        assert importlib.util.find_spec("peft_d2c.engine.search.loop") is not None


class TestBalancedRandomPartition:
    @pytest.mark.parametrize("n,k", [(9, 3), (7, 3), (5, 5), (4, 1), (16, 4)])
    def test_sizes_differ_by_at_most_one(self, n, k):
        names = [f"t{i}" for i in range(n)]
        clusters = balanced_random_partition(names, k, np.random.default_rng(0))
        sizes = [len(c) for c in clusters]
        assert len(clusters) == k and max(sizes) - min(sizes) <= 1
        assert sorted(m for c in clusters for m in c) == sorted(names)

    def test_same_seed_same_partition_other_seed_differs(self):
        names = list(GROUPS)
        first = balanced_random_partition(names, 3, np.random.default_rng(1))
        assert first == balanced_random_partition(names, 3, np.random.default_rng(1))
        others = [balanced_random_partition(names, 3, np.random.default_rng(s)) for s in range(2, 8)]
        assert any(canonical_partition(o) != canonical_partition(first) for o in others)

    @pytest.mark.parametrize("k", [0, 10])
    def test_k_out_of_range_raises(self, k):
        with pytest.raises(ValueError, match="`num_clusters` must be between 1 and 9"):
            balanced_random_partition(list(GROUPS), k, np.random.default_rng(0))


class TestD2CSearch:
    def test_recovers_known_optimum_for_most_seeds(self):
        found = 0
        for seed in range(10):
            rng = np.random.default_rng(seed)
            start = balanced_random_partition(list(GROUPS), 3, rng)
            state = d2c_search(start, group_score, rng, num_iterations=200)
            found += canonical_partition(state.clusters) == OPTIMUM
        assert found >= 8

    def test_history_records_and_acceptance_rule(self):
        rng = np.random.default_rng(3)
        start = balanced_random_partition(list(GROUPS), 3, rng)
        state = d2c_search([list(c) for c in start], group_score, rng, num_iterations=50)
        assert len(state.history) == 50
        assert [h["iteration"] for h in state.history] == list(range(50))
        clusters = [list(c) for c in start]
        for record in state.history:
            assert set(record) == {"iteration", "task", "source", "target", "loss_before", "loss_after", "accepted"}
            assert record["source"] != record["target"]
            # recomputed from the toy score itself, on the partition replayed from the start
            task, source, target = record["task"], clusters[record["source"]], clusters[record["target"]]
            assert task in source
            assert record["loss_before"] == group_score([(source, task)])[0]
            assert record["loss_after"] == group_score([([*target, task], task)])[0]
            assert record["accepted"] == (group_score([([*target, task], task)])[0] < group_score([(source, task)])[0])
            if record["accepted"]:
                source.remove(task)
                target.append(task)
        assert canonical_partition(clusters) == canonical_partition(state.clusters)
        assert any(h["accepted"] for h in state.history) and any(not h["accepted"] for h in state.history)

    def test_equal_loss_is_rejected(self):
        """Keep a move only if the loss strictly drops: a constant score never moves anything."""
        start = [["a1", "b1", "c1"], ["a2", "b2"], ["a3", "b3", "c2", "c3"]]
        state = d2c_search(start, lambda reqs: [1.0] * len(reqs), np.random.default_rng(0), num_iterations=30)
        assert state.clusters == [sorted(c) for c in start]
        assert not any(h["accepted"] for h in state.history)

    def test_never_empties_a_cluster(self):
        """A score that always prefers moving would empty clusters if singletons could be picked as the source."""
        sizes_seen = []

        def always_move(requests):
            (_, _), (moved, _) = requests
            return [1.0, 0.0]

        d2c_search(
            [["a1"], ["a2", "a3"], ["b1", "b2", "b3"]],
            always_move,
            np.random.default_rng(0),
            num_iterations=100,
            on_step=lambda s: sizes_seen.append(min(len(c) for c in s.clusters)),
        )
        assert len(sizes_seen) == 100 and min(sizes_seen) >= 1

    @pytest.mark.parametrize("clusters", [[list(GROUPS)], [[n] for n in GROUPS]])
    def test_single_possible_partition_is_returned_without_search(self, clusters):
        calls = []
        state = d2c_search(
            clusters, lambda r: calls.append(r) or [0.0] * len(r), np.random.default_rng(0), num_iterations=10
        )
        assert state.history == [] and calls == []

    def test_patience_stops_after_rejections_in_a_row(self):
        state = d2c_search(OPTIMUM, group_score, np.random.default_rng(0), num_iterations=500, patience=7)
        assert len(state.history) == 7
        assert all(not h["accepted"] for h in state.history)

    @pytest.mark.parametrize("budget", [1, 9, 40])
    def test_a_cost_budget_stops_the_steps_once_spent(self, budget):
        """Cost = losses the score function computed; the steps stop before the first step that would start with
        the budget spent, and the budget only cuts the unbudgeted search short."""
        computed = []

        def counting(requests):
            computed.append(len(requests))
            return group_score(requests)

        start = balanced_random_partition(list(GROUPS), 3, np.random.default_rng(2))
        state = d2c_search(
            start,
            counting,
            np.random.default_rng(4),
            num_iterations=10_000,
            cost=lambda: sum(computed),
            max_cost=budget,
        )
        per_step = 2  # the paper's rule scores the moved task before and after: two losses a step
        assert state.spent == sum(computed) == per_step * len(state.history)
        assert state.spent >= budget and state.spent - per_step < budget
        plain = d2c_search(start, group_score, np.random.default_rng(4), num_iterations=len(state.history))
        assert plain.history == state.history and plain.clusters == state.clusters

    def test_resuming_a_state_gives_the_uninterrupted_result(self):
        start = balanced_random_partition(list(GROUPS), 3, np.random.default_rng(5))
        full = d2c_search(start, group_score, np.random.default_rng(9), num_iterations=40)
        rng = np.random.default_rng(9)
        half = d2c_search(start, group_score, rng, num_iterations=20)
        resumed = d2c_search(start, group_score, rng, num_iterations=40, state=half)
        assert resumed.clusters == full.clusters and resumed.history == full.history

    def test_rejects_invalid_partition(self):
        with pytest.raises(ValueError, match="non-empty"):
            d2c_search([["a1"], []], group_score, np.random.default_rng(0), num_iterations=1)
        with pytest.raises(ValueError, match="more than one cluster"):
            d2c_search([["a1"], ["a1", "b1"]], group_score, np.random.default_rng(0), num_iterations=1)
        assert isinstance(SearchState(clusters=[["x"]]).history, list)


class TestKMeans:
    def test_fill_empty_clusters_uses_every_label(self):
        assert sorted(set(fill_empty_clusters([0, 0, 0, 0], 3))) == [0, 1, 2]
        assert fill_empty_clusters([1, 0, 1], 2) == [1, 0, 1]
        clusters = labels_to_partition(["x", "y", "z"], [2, 2, 2], 3)
        assert sorted(len(c) for c in clusters) == [1, 1, 1]

    def test_gram_embedding_preserves_distances(self):
        rng = np.random.default_rng(0)
        features = rng.normal(size=(6, 500))
        points = gram_embedding(features @ features.T)
        expected = np.linalg.norm(features[:, None] - features[None], axis=-1)
        got = np.linalg.norm(points[:, None] - points[None], axis=-1)
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)

    def test_kmeans_on_gram_equals_kmeans_on_features(self):
        from sklearn.cluster import KMeans

        rng = np.random.default_rng(1)
        centers = rng.normal(size=(3, 300)) * 5
        features = np.concatenate([c + rng.normal(size=(4, 300)) for c in centers])
        names = [f"t{i}" for i in range(12)]
        labels = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(features)
        expected = canonical_partition(labels_to_partition(names, labels, 3))
        assert canonical_partition(kmeans_partition(names, features @ features.T, 3, seed=0)) == expected
        assert expected == canonical_partition([names[0:4], names[4:8], names[8:12]])

    def test_kmeans_svd_groups_by_direction(self):
        """Cosine normalisation: an adapter and its scaled copy belong together even if their norms differ a lot."""
        rng = np.random.default_rng(2)
        u, v = rng.normal(size=(2, 200))
        features = np.stack([u, 10 * u, 0.1 * u, v, 10 * v, 0.1 * v])
        names = ["u1", "u2", "u3", "v1", "v2", "v3"]
        clusters = kmeans_partition(names, features @ features.T, 2, seed=0, svd_components=2)
        assert canonical_partition(clusters) == [["u1", "u2", "u3"], ["v1", "v2", "v3"]]
