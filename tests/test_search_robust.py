"""The robust search: the whole-partition objective, restarts and the final pass (issue 12).

Every claim is checked against losses recomputed independently of the search: on toy score functions by direct
evaluation of the partitions rebuilt from the history, and on the tiny model by fresh PEFT merges scored with
`peft_d2c.evaluation.generation.completion_loss`.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest
from recompute import load_reference

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.search.loop import (
    SearchState,
    balanced_random_partition,
    canonical_partition,
    d2c_search,
    partition_losses,
)
from peft_d2c.engine.search.search_robust import (
    choose_best_start,
    combine_starts,
    polish,
    restart_budgets,
    robust_search,
)
from peft_d2c.evaluation.generation import completion_loss

GROUPS = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "b3": "b", "c1": "c", "c2": "c", "c3": "c"}
OPTIMUM = [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c1", "c2", "c3"]]
NAMES = [f"t{i}" for i in range(10)]


def group_score(requests):
    """The share of the cluster's members from another group than the task's (0 for a pure cluster)."""
    return [sum(GROUPS[m] != GROUPS[t] for m in members) / len(members) for members, t in requests]


def hashed_score(requests):
    """An arbitrary but fixed loss per (cluster, task): a landscape with no structure and many local optima."""
    out = []
    for members, task in requests:
        digest = hashlib.sha256(("|".join(sorted(members)) + "#" + task).encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") / 2**64 + 0.1 * len(members))
    return out


def total(clusters, score_fn) -> float:
    """The total loss of a partition, recomputed here without the search's helpers."""
    return sum(score_fn([(tuple(sorted(c)), t)])[0] for c in clusters for t in c)


def replay(starts, history, finished=()):
    """(record, partition before it) for every record of a (robust) search history, rebuilt from the moves alone.

    A record of another start begins from that start; the first final-pass record begins from the kept start's
    final partition (the lowest `total_loss` of `finished`, the earliest on ties).
    """
    clusters = [list(c) for c in starts[0]]
    restart, in_final = 0, False
    for record in history:
        if record.get("phase") == "final" and not in_final:
            in_final = True
            best = min(range(len(finished)), key=lambda i: (finished[i]["total_loss"], i))
            clusters = [list(c) for c in finished[best]["clusters"]]
        elif record.get("phase") != "final" and record.get("restart", 0) != restart:
            restart = record["restart"]
            clusters = [list(c) for c in starts[restart]]
        yield record, [list(c) for c in clusters]
        if "relocated" in record:  # the singleton's adapter joins another cluster, the task takes its place
            clusters[record["target"]].remove(record["relocated"])
            clusters[record["joined"]] = sorted([*clusters[record["joined"]], record["relocated"]])
        if record["accepted"]:
            clusters[record["source"]].remove(record["task"])
            clusters[record["target"]] = sorted([*clusters[record["target"]], record["task"]])


class TestPartitionObjective:
    @pytest.mark.parametrize("score_fn", [group_score, hashed_score])
    @pytest.mark.parametrize("seed", range(4))
    def test_total_loss_never_rises_on_an_accepted_move(self, score_fn, seed):
        names = list(GROUPS) if score_fn is group_score else NAMES
        rng = np.random.default_rng(seed)
        start = balanced_random_partition(names, 3, rng)
        state = d2c_search(start, score_fn, rng, num_iterations=60, objective="partition")
        clusters = [list(c) for c in start]
        previous = total(clusters, score_fn)
        accepted = 0
        for record in state.history:
            before = [list(c) for c in clusters]
            if record["accepted"]:
                accepted += 1
                clusters[record["source"]].remove(record["task"])
                clusters[record["target"]] = sorted([*clusters[record["target"]], record["task"]])
            now = total(clusters, score_fn)
            assert now == pytest.approx(record["total_loss"], abs=1e-9)
            if record["accepted"]:
                assert now < previous - 1e-12
                # the record's sums are those of the two changed clusters, before and after
                changed = (record["source"], record["target"])
                assert record["loss_before"] == pytest.approx(sum(total([before[i]], score_fn) for i in changed))
                assert record["loss_after"] == pytest.approx(sum(total([clusters[i]], score_fn) for i in changed))
            else:
                assert now == previous
            previous = now
        assert accepted > 0 and clusters == state.clusters

    def test_paper_rule_can_raise_the_total_and_the_partition_rule_cannot(self):
        """The reason for the option: the moved task's loss alone ignores the other tasks of both clusters."""
        rises = 0
        for seed in range(6):
            rng = np.random.default_rng(seed)
            start = balanced_random_partition(NAMES, 3, rng)
            state = d2c_search(start, hashed_score, rng, num_iterations=60)
            clusters = [list(c) for c in start]
            previous = total(clusters, hashed_score)
            for record in state.history:
                if record["accepted"]:
                    clusters[record["source"]].remove(record["task"])
                    clusters[record["target"]] = sorted([*clusters[record["target"]], record["task"]])
                    now = total(clusters, hashed_score)
                    rises += now > previous
                    previous = now
        assert rises > 0

    def test_unknown_objective_raises(self):
        with pytest.raises(ValueError, match="`objective` must be one of"):
            d2c_search(OPTIMUM, group_score, np.random.default_rng(0), num_iterations=1, objective="moved")


class TestRestarts:
    def test_budgets_split_the_steps(self):
        assert restart_budgets(10, 3) == [4, 7, 10] and restart_budgets(4, 4) == [1, 2, 3, 4]

    @pytest.mark.parametrize("seed", range(5))
    def test_restarts_return_the_start_with_the_lowest_total_loss(self, seed):
        rng = np.random.default_rng(seed)
        starts = [balanced_random_partition(NAMES, 3, np.random.default_rng([seed, r])) for r in range(4)]
        state = robust_search(starts, hashed_score, rng, num_iterations=40, final_pass=False)
        assert [f["start"] for f in state.finished] == [canonical_sorted(s) for s in starts]
        assert [f["steps"] for f in state.finished] == [10, 10, 10, 10]
        # every start's final partition, rebuilt from the history, and its total recomputed here
        for record, clusters in replay(starts, state.history):  # the history is each start's own search
            assert record["restart"] in range(4) and sorted(m for c in clusters for m in c) == sorted(NAMES)
        recomputed = []
        for summary in state.finished:
            assert summary["total_loss"] == pytest.approx(total(summary["clusters"], hashed_score), abs=1e-9)
            recomputed.append(total(summary["clusters"], hashed_score))
        best = int(np.argmin(recomputed))
        assert state.clusters == state.finished[best]["clusters"] and state.phase == "done"
        assert all(total(state.clusters, hashed_score) <= r + 1e-12 for r in recomputed)

    def test_one_start_with_the_paper_rule_is_the_paper_search(self):
        start = balanced_random_partition(list(GROUPS), 3, np.random.default_rng(9))
        plain = d2c_search(start, group_score, np.random.default_rng(1), num_iterations=50)
        robust = robust_search(
            [start], group_score, np.random.default_rng(1), num_iterations=50, objective="task", final_pass=False
        )
        assert robust.clusters == plain.clusters and robust.history == plain.history

    @pytest.mark.parametrize("k", [1, 9])
    def test_single_possible_partition_is_returned_as_is(self, k):
        start = balanced_random_partition(list(GROUPS), k, np.random.default_rng(0))
        state = robust_search([start, start], group_score, np.random.default_rng(0), num_iterations=10)
        assert canonical_partition(state.clusters) == canonical_partition(start) and state.history == []

    @pytest.mark.parametrize("proposal", ["random", "sweep"])
    @pytest.mark.parametrize("shares", [[[0, 2], [1, 3]], [[3], [0, 1], [2]], [[0, 1, 2, 3], []]])
    def test_starts_searched_apart_end_as_one_search_of_them_all(self, shares, proposal):
        """Processes that each search a share of the starts, from the same generator state, and then combine
        their outcomes keep the partition and history of one process searching every start in turn."""
        starts = [balanced_random_partition(NAMES, 3, np.random.default_rng([7, r])) for r in range(4)]
        options = {"num_iterations": 40, "restart_seed": 7, "proposal": proposal, "final_pass": True}
        whole = robust_search(starts, hashed_score, np.random.default_rng(3), **options)
        parts = [
            robust_search(starts, hashed_score, np.random.default_rng(3), only_starts=share, **options)
            for share in shares
        ]
        assert all(p.phase == "search" for p in parts)
        combined = choose_best_start(combine_starts(parts, len(starts)), final_pass=True)
        combined = robust_search(starts, hashed_score, np.random.default_rng(3), state=combined, **options)
        assert combined.clusters == whole.clusters and combined.history == whole.history
        assert combined.finished == whole.finished and [f["index"] for f in whole.finished] == [0, 1, 2, 3]

    def test_each_start_draws_from_its_own_seed(self):
        """With `restart_seed`, start 1's search does not depend on what start 0 drew: a different start 0 (and
        so different draws before it) leaves start 1's records unchanged."""
        starts = [balanced_random_partition(NAMES, 3, np.random.default_rng([1, r])) for r in range(2)]
        other_first = [balanced_random_partition(NAMES, 3, np.random.default_rng(99)), starts[1]]

        def second_start(first_starts, seed):
            state = robust_search(
                first_starts,
                hashed_score,
                np.random.default_rng(0),
                num_iterations=30,
                restart_seed=seed,
                final_pass=False,
                patience=3,
            )
            return [h for h in state.history if h["restart"] == 1]

        assert second_start(starts, 5) == second_start(other_first, 5)
        assert second_start(starts, 5) != second_start(starts, 6)

    @pytest.mark.parametrize("budget", [30, 31, 100])
    def test_a_cost_budget_is_split_between_the_starts(self, budget):
        """The budget over 3 starts (shares as `restart_budgets` splits T): each start steps until its share is
        spent, counted from its own first step, whatever T allows."""
        computed, spent_after_steps = [], []

        def counting(requests):
            computed.append(len(requests))
            return hashed_score(requests)

        starts = [balanced_random_partition(NAMES, 3, np.random.default_rng([4, r])) for r in range(3)]
        state = robust_search(
            starts,
            counting,
            np.random.default_rng(0),
            num_iterations=3000,
            restart_seed=4,
            cost=lambda: sum(computed),
            max_cost=budget,
            final_pass=False,
            on_step=lambda st: spent_after_steps.append((st.restart, st.spent)),
        )
        ends = restart_budgets(budget, 3)
        shares = [ends[0], ends[1] - ends[0], ends[2] - ends[1]]
        for index, share in enumerate(shares):
            spent = [value for restart, value in spent_after_steps if restart == index]
            assert len(spent) == state.finished[index]["steps"] > 0
            assert spent[-1] >= share and (len(spent) == 1 or spent[-2] < share), (index, share, spent)
            assert spent == sorted(spent) and spent[0] > 0

    def test_combining_shares_that_miss_a_start_raises(self):
        starts = [balanced_random_partition(NAMES, 3, np.random.default_rng([2, r])) for r in range(3)]
        part = robust_search(
            starts, hashed_score, np.random.default_rng(0), num_iterations=9, restart_seed=2, only_starts=[0, 2]
        )
        with pytest.raises(ValueError, match="not each of 3 once"):
            combine_starts([part], 3)
        with pytest.raises(ValueError, match="not each of 3 once"):
            combine_starts([part, part], 3)

    def test_starts_of_other_adapters_raise(self):
        with pytest.raises(ValueError, match="same adapters"):
            robust_search([OPTIMUM, [["a1"], ["b1"], ["c1"]]], group_score, np.random.default_rng(0), num_iterations=2)


def canonical_sorted(partition):
    return [sorted(c) for c in partition]


def all_partitions(names, k):
    """Every partition of `names` into `k` non-empty clusters (as lists of sorted lists, cluster order by label)."""
    seen = set()
    for labels in itertools.product(range(k), repeat=len(names)):
        if len(set(labels)) != k:
            continue
        clusters = [sorted(n for n, label in zip(names, labels, strict=True) if label == c) for c in range(k)]
        key = tuple(map(tuple, canonical_partition(clusters)))
        if key not in seen:
            seen.add(key)
            yield clusters


SMALL_CASES = [
    # groups of the toy, K
    ({"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "b3": "b"}, 2),
    ({"a1": "a", "a2": "a", "b1": "b", "b2": "b", "c1": "c", "c2": "c"}, 3),
]


class TestFinalPass:
    @pytest.mark.parametrize(("groups", "k"), SMALL_CASES)
    def test_robust_search_finds_the_optimum_from_every_start(self, groups, k):
        def score(requests):
            return [sum(groups[m] != groups[t] for m in members) / len(members) for members, t in requests]

        optimum = canonical_partition([[n for n in groups if groups[n] == g] for g in sorted(set(groups.values()))])
        starts = list(all_partitions(list(groups), k))
        assert len(starts) > 20
        for index, start in enumerate(starts):
            state = robust_search([start], score, np.random.default_rng(index), num_iterations=5, final_pass=True)
            assert canonical_partition(state.clusters) == optimum, start
            assert total(state.clusters, score) == 0

    def test_final_pass_ends_at_a_local_optimum_of_single_moves(self):
        start = balanced_random_partition(NAMES, 3, np.random.default_rng(0))
        state = polish(d2c_search(start, hashed_score, np.random.default_rng(0), num_iterations=0), hashed_score)
        best = total(state.clusters, hashed_score)
        for source, cluster in enumerate(state.clusters):
            for task in cluster if len(cluster) > 1 else []:
                for target in range(3):
                    if target != source:
                        moved = [[m for m in c if m != task] for c in state.clusters]
                        moved[target] = [*moved[target], task]
                        assert total(moved, hashed_score) >= best - 1e-12
        finals = [h for h in state.history if h.get("phase") == "final"]
        assert finals and all(h["accepted"] for h in finals)
        assert [h["total_loss"] for h in finals] == sorted((h["total_loss"] for h in finals), reverse=True)
        assert finals[-1]["total_loss"] == pytest.approx(best, abs=1e-9)

    @pytest.mark.parametrize("seed", [45, 66])
    def test_final_pass_ends_when_totals_differ_only_by_rounding(self, seed):
        """Scores quantised to 0.1: a total summed in another order differs in its last bits, and the old final
        pass took that for an improvement, undoing and redoing the same moves for ever (these seeds looped on
        main at 898e22c). The call budget turns such a loop into a failure instead of a hang."""
        rng = np.random.default_rng(seed)
        names = [f"t{i}" for i in range(12)]
        group = {n: int(rng.integers(3)) for n in names}
        own = {n: float(rng.uniform(0, 1)) for n in names}
        calls = [0]

        def score(requests):
            calls[0] += len(requests)
            assert calls[0] < 200_000, "the final pass does not end"
            return [round(own[t] + 0.3 * sum(group[m] != group[t] for m in c) / len(c), 1) for c, t in requests]

        order = list(rng.permutation(names))
        state = robust_search([[sorted(order[i::3]) for i in range(3)]], score, rng, num_iterations=10)
        finals = [h for h in state.history if h.get("phase") == "final"]
        # Every applied change lowers the exactly recomputed total (no equal-total moves back and forth).
        totals = [h["total_loss"] for h in finals]
        assert all(later < earlier - 1e-6 for earlier, later in itertools.pairwise(totals))
        assert len(finals) < 30

    def test_final_pass_is_bounded_by_max_sweeps(self, caplog):
        """A score function whose losses keep falling (it is not a function of the partition) would make every
        sweep improve: the pass stops after `max_sweeps` and says so."""
        calls = [0]

        def drifting(requests):
            calls[0] += 1
            return [hashed_score([request])[0] - calls[0] for request in requests]

        start = balanced_random_partition(NAMES, 3, np.random.default_rng(0))
        state = d2c_search(start, drifting, np.random.default_rng(0), num_iterations=0)
        with caplog.at_level("WARNING", logger="peft_d2c.engine.search.search_robust"):
            polish(state, drifting, max_sweeps=3)
        assert "max_sweeps=3" in caplog.text
        assert calls[0] <= 1 + 3 * len(NAMES) + 3


@pytest.mark.usefixtures("one_thread")
class TestOnTheTinyModel:
    def test_explicit_paper_mode_matches_the_reference(self, tiny_assets, tiny_tokenizer, tiny_task_examples):
        config = D2CMergeConfig(num_clusters=3, num_iterations=30, seed=5, search="paper", restarts=1)
        reference = load_reference()(tiny.load_peft_model(*tiny_assets), tiny_tokenizer, tiny_task_examples, config)
        result = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets), tiny_task_examples, config, tokenizer=tiny_tokenizer
        )
        assert result.clusters == reference["clusters"] and result.history == reference["history"]

    @pytest.mark.parametrize("search", ["paper", "partition"])
    def test_a_forward_pass_budget_stops_the_search_where_the_passes_run_out(
        self, search, tiny_assets, tiny_tokenizer, tiny_task_examples
    ):
        """`max_forward_passes=B`: the steps stop at the first step that ends with B passes spent (counted by the
        scorer's forward passes; `knots_ties` runs no passes before the search), and the run is the unbudgeted
        run with that many steps."""
        budget = 7
        options = {"num_clusters": 2, "seed": 3, "search": search, "combination_type": "knots_ties", "batch_size": 10}
        model = tiny.load_peft_model(*tiny_assets)
        cut = merge_adapters_d2c(
            model, tiny_task_examples, D2CMergeConfig(max_forward_passes=budget, **options), tokenizer=tiny_tokenizer
        )
        steps = len(cut.history)
        assert cut.config.num_iterations == budget and 0 < steps < budget
        plain = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets),
            tiny_task_examples,
            D2CMergeConfig(num_iterations=steps, **options),
            tokenizer=tiny_tokenizer,
        )
        assert plain.history == cut.history and plain.clusters == cut.clusters
        passes_after = [passes for _, passes in plain.stats["trace"]]  # forward passes after each step
        assert passes_after[-1] >= budget and (steps == 1 or passes_after[-2] < budget)

    def test_accepted_moves_lower_the_total_loss_under_fresh_merges(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples
    ):
        """Replay the robust search on the tiny model: merge every cluster again with PEFT and score it."""
        config = D2CMergeConfig(  # `ties`: the replay merges with PEFT's own `add_weighted_adapter`
            num_clusters=2,
            num_iterations=12,
            seed=1,
            search="partition",
            restarts=2,
            final_pass=True,
            combination_type="ties",
        )
        result = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets), tiny_task_examples, config, tokenizer=tiny_tokenizer
        )
        model = tiny.load_peft_model(*tiny_assets)
        model.eval()
        cache: dict[tuple[tuple[str, ...], str], float] = {}

        def fresh(requests):
            out = []
            for members, task in requests:
                key = (tuple(sorted(members)), task)
                if key not in cache:
                    name = "fresh_merge"
                    weights = [1.0] * len(key[0])  # ties: the disjoint mean, weight 1 per member
                    model.add_weighted_adapter(list(key[0]), weights, name, combination_type="ties", density=0.5)
                    try:
                        cache[key] = completion_loss(
                            model, tiny_tokenizer, tiny_task_examples[task], adapter_name=name
                        )
                    finally:
                        model.delete_adapter(name)
                out.append(cache[key])
            return out

        starts = [result.initial_clusters, *(r["start"] for r in result.stats["restarts"][1:])]
        assert len(result.stats["restarts"]) == 2
        checked = 0
        for record, clusters in replay(starts, result.history, result.stats["restarts"]):
            if not record["accepted"]:
                continue
            after = [[m for m in c if m not in (record["task"], record.get("relocated"))] for c in clusters]
            if "relocated" in record:
                after[record["joined"]] = sorted([*after[record["joined"]], record["relocated"]])
            after[record["target"]] = sorted([*after[record["target"]], record["task"]])
            changed = {record["source"], record["target"], record.get("joined", record["source"])}
            assert record["loss_before"] == pytest.approx(sum(total([clusters[i]], fresh) for i in changed), rel=1e-4)
            assert record["loss_after"] == pytest.approx(sum(total([after[i]], fresh) for i in changed), rel=1e-4)
            assert total(after, fresh) < total(clusters, fresh)
            assert record["total_loss"] == pytest.approx(total(after, fresh), rel=1e-4)
            checked += 1
        assert checked > 0
        # the returned clusters are the kept start's, polished, and their losses are the fresh ones
        assert sum(result.task_losses.values()) == pytest.approx(total(result.clusters, fresh), rel=1e-4)
        assert sum(result.task_losses.values()) <= min(r["total_loss"] for r in result.stats["restarts"]) + 1e-9
        assert all(isinstance(t[1], int) for t in result.stats["trace"])
        assert partition_losses(result.clusters, fresh).keys() == set(result.task_losses)


class TestResume:
    @pytest.mark.parametrize("stop_after", [3, 11, 17])
    def test_interrupted_robust_search_resumes_to_the_same_end(self, stop_after):
        """What `merge_adapters_d2c` checkpoints (state + generator, during the steps only) resumes exactly."""
        starts = [balanced_random_partition(NAMES, 3, np.random.default_rng([4, r])) for r in range(3)]
        kwargs = {"num_iterations": 24, "objective": "partition", "final_pass": True}
        full = robust_search(starts, hashed_score, np.random.default_rng(4), **kwargs)

        saved = []

        class Stop(Exception):
            pass

        def on_step(state):
            if state.phase == "search":
                saved.append((state.to_dict(), rng.bit_generator.state))
            if len(saved) == stop_after:
                raise Stop

        rng = np.random.default_rng(4)
        with pytest.raises(Stop):
            robust_search(starts, hashed_score, rng, on_step=on_step, **kwargs)
        state_dict, rng_state = saved[-1]
        rng = np.random.default_rng(0)
        rng.bit_generator.state = rng_state
        resumed = robust_search(
            starts, hashed_score, rng, state=SearchState.from_dict(json.loads(json.dumps(state_dict))), **kwargs
        )
        assert resumed.clusters == full.clusters and resumed.history == full.history
        assert resumed.finished == full.finished and resumed.phase == "done"

    @pytest.mark.usefixtures("one_thread")
    def test_killed_robust_run_resumes_from_its_checkpoint(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        import peft_d2c.engine.runtime.checkpoint as checkpoint_module  # the module whose checkpoint writer is interrupted

        config = D2CMergeConfig(
            num_clusters=2,
            num_iterations=12,
            seed=2,
            search="partition",
            restarts=2,
            final_pass=True,
            checkpoint_every=4,
        )
        save = checkpoint_module.save_checkpoint

        def save_then_interrupt(directory, payload):
            save(directory, payload)
            if payload["state"]["iteration"] == 8:  # in the second start
                raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            merge_adapters_d2c(
                tiny.load_peft_model(*tiny_assets),
                tiny_task_examples,
                config,
                tokenizer=tiny_tokenizer,
                checkpoint_dir=tmp_path,
            )
        monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)
        resumed = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets),
            tiny_task_examples,
            config,
            tokenizer=tiny_tokenizer,
            checkpoint_dir=tmp_path,
        )
        full = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets), tiny_task_examples, config, tokenizer=tiny_tokenizer
        )
        assert resumed.clusters == full.clusters and resumed.history == full.history
        assert resumed.task_losses == full.task_losses and resumed.stats["restarts"] == full.stats["restarts"]
