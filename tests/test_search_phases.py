"""`search="paper_then_partition"`: the paper's steps, then partition steps within the passes they spent (issue 20).

The claims are checked against things computed apart from the two-phase search: the paper's own search run alone
from the same generator, totals recomputed from the partitions rebuilt from the history, and a cost counter
that counts the losses the toy scorer really computes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_d2c import D2CMergeConfig, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.scoring.layer_inputs import attach_layer_inputs
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.engine.search.loop import SearchState, balanced_random_partition, d2c_search
from peft_d2c.engine.search.search_phases import paper_then_partition
from peft_d2c.evaluation.estimate import estimate_run
from peft_d2c.evaluation.sweep import run_sweep
from peft_d2c.search_defaults import default_search_rule

NAMES = [f"t{i}" for i in range(12)]


class CachedToyScorer:
    """A task's loss is its squared distance to the mean of its cluster's points; `computed` counts the losses
    not asked before (the cost of a step, as the real scorer's forward passes count only cache misses)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.points = {n: rng.normal(size=3) for n in NAMES}
        self.cache: dict = {}
        self.computed = 0

    def loss(self, members, task) -> float:
        centre = np.mean([self.points[m] for m in members], axis=0)
        return float(np.sum((centre - self.points[task]) ** 2))

    def __call__(self, requests):
        out = []
        for members, task in requests:
            key = (tuple(sorted(members)), task)
            if key not in self.cache:
                self.computed += 1
                self.cache[key] = self.loss(*key)
            out.append(self.cache[key])
        return out

    def total(self, clusters) -> float:
        """The total loss of a partition, recomputed without the cache or the search's helpers."""
        return sum(self.loss(sorted(c), t) for c in clusters for t in c)


def replay_partitions(start, history):
    """The partition after every record of a history, rebuilt from its moves alone (moves and swaps)."""
    clusters = [sorted(c) for c in start]
    for record in history:
        if record["accepted"]:
            clusters[record["source"]].remove(record["task"])
            clusters[record["target"]].append(record["task"])
            if "swapped" in record:
                clusters[record["target"]].remove(record["swapped"])
                clusters[record["source"]].append(record["swapped"])
            clusters = [sorted(c) for c in clusters]
        yield [list(c) for c in clusters]


def run(seed: int, k: int, steps: int, **kwargs):
    start = balanced_random_partition(NAMES, k, np.random.default_rng([seed, 1]))
    scorer = CachedToyScorer(seed)
    state = paper_then_partition(
        start, scorer, np.random.default_rng(seed), num_iterations=steps, cost=lambda: scorer.computed, **kwargs
    )
    return start, scorer, state


class TestPhases:
    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("k", [2, 3])
    def test_first_phase_is_the_papers_search_and_the_second_only_lowers_the_total(self, seed, k):
        start, scorer, state = run(seed, k, 30)
        paper = d2c_search(start, CachedToyScorer(seed), np.random.default_rng(seed), num_iterations=30)
        assert state.history[:30] == paper.history  # the same draws and decisions
        assert all("phase" not in r for r in state.history[:30])
        second = state.history[30:]
        assert all(r["phase"] == "partition" for r in second) and len(second) <= 30
        partitions = list(replay_partitions(start, state.history))
        assert sorted(map(sorted, partitions[-1])) == sorted(map(sorted, state.clusters))
        assert sorted(map(sorted, partitions[29])) == sorted(map(sorted, paper.clusters))
        totals = [scorer.total(p) for p in partitions[29:]]  # from the paper's end on
        for record, before, after in zip(second, totals[:-1], totals[1:], strict=True):
            assert after < before - 1e-12 if record["accepted"] else after == pytest.approx(before)
        assert scorer.total(state.clusters) <= scorer.total(paper.clusters) + 1e-12

    @pytest.mark.parametrize("seed", range(6))
    def test_second_phase_spends_at_most_the_first_phases_cost_and_one_step(self, seed):
        start, scorer, state = run(seed, 2, 25)
        alone = CachedToyScorer(seed)  # what the first phase alone computes
        d2c_search(start, alone, np.random.default_rng(seed), num_iterations=25)
        assert state.budget == alone.computed
        assert state.spent == scorer.computed - alone.computed
        # A partition step at K = 2 asks for every task before and after the move: at most 2N new losses.
        assert state.spent <= state.budget + 2 * len(NAMES)
        if len(state.history) < 50:  # stopped by the budget, not by T: the step before it was still within it
            assert state.spent >= state.budget

    def test_a_first_phase_budget_caps_the_second(self):
        _, unbounded, _ = run(1, 2, 40)
        _, scorer, state = run(1, 2, 40, max_cost=5)
        assert state.budget < unbounded.computed and state.spent <= state.budget + 2 * len(NAMES)

    def test_final_pass_polishes_after_the_second_phase(self):
        start, scorer, state = run(2, 3, 10, final_pass=True)
        without = run(2, 3, 10)[2]
        assert state.phase == "done" and state.history[: len(without.history)] == without.history
        assert all(r["phase"] == "final" for r in state.history[len(without.history) :])
        assert scorer.total(state.clusters) <= scorer.total(without.clusters) + 1e-12

    @pytest.mark.parametrize("stop_after", [5, 40, 45])
    def test_interrupted_search_resumes_to_the_same_end(self, stop_after):
        """A state saved after any step (first phase, its last step, the second phase) continues exactly."""
        kwargs = {"num_iterations": 40, "proposal": "sweep"}
        start = balanced_random_partition(NAMES, 4, np.random.default_rng(7))
        full_scorer = CachedToyScorer(7)
        full = paper_then_partition(
            start, full_scorer, np.random.default_rng(7), cost=lambda: full_scorer.computed, **kwargs
        )
        assert len(full.history) > 45  # the three stops fall in the first phase, at its end and in the second

        class Stop(Exception):
            pass

        saved = []
        scorer, rng = CachedToyScorer(7), np.random.default_rng(7)

        def on_step(state):
            saved.append((state.to_dict(), rng.bit_generator.state, dict(scorer.cache)))
            if len(saved) == stop_after:
                raise Stop

        with pytest.raises(Stop):
            paper_then_partition(start, scorer, rng, cost=lambda: scorer.computed, on_step=on_step, **kwargs)
        state_dict, rng_state, cache = saved[-1]
        resumed_scorer, rng = CachedToyScorer(7), np.random.default_rng(0)
        resumed_scorer.cache, rng.bit_generator.state = cache, rng_state
        state = SearchState.from_dict(json.loads(json.dumps(state_dict)))
        resumed = paper_then_partition(
            start, resumed_scorer, rng, cost=lambda: resumed_scorer.computed, state=state, **kwargs
        )
        assert resumed.clusters == full.clusters and resumed.history == full.history
        assert (resumed.budget, resumed.phase) == (full.budget, "done")


class TestConfig:
    def test_restarts_are_refused(self):
        with pytest.raises(ValueError, match="restarts=1"):
            D2CMergeConfig(num_clusters=2, search="paper_then_partition", restarts=2)

    def test_swapping_proposals_need_a_partition_phase(self):
        assert D2CMergeConfig(num_clusters=2, search="paper_then_partition", proposal="targeted").proposal
        with pytest.raises(ValueError, match="partition rule"):
            D2CMergeConfig(num_clusters=2, search="paper", proposal="sweep")

    def test_the_first_phase_takes_the_papers_t(self):
        assert D2CMergeConfig(num_clusters=2, search="paper_then_partition").search_steps == 100
        assert D2CMergeConfig(num_clusters=2, search="paper_then_partition").search_steps_for(32) == 200
        # the second phase's proposals do not change the paper phase's T (rounds of 2N are for partition steps)
        config = D2CMergeConfig(num_clusters=2, search="paper_then_partition", proposal="misfit")
        assert config.search_steps_for(16) == 100 and config.resolved_for(16, 2).num_iterations == 100


TINY_OPTIONS = {"num_clusters": 2, "num_iterations": 15, "seed": 3, "show_progress": False}


def _tiny_run(tiny_assets, tokenizer, examples, **settings):
    """A run on the tiny model's adapters with `TINY_OPTIONS` and `settings`."""
    config = D2CMergeConfig(**TINY_OPTIONS, **settings)
    return merge_adapters_d2c(tiny.load_peft_model(*tiny_assets), examples, config, tokenizer=tokenizer)


def _scores_of(tiny_assets, tokenizer, task_examples, clusters, score: str) -> list[float]:
    """`score` of every task under its cluster's merge, from a scorer and merger of their own on a fresh model."""
    model = tiny.load_peft_model(*tiny_assets).eval()
    config = D2CMergeConfig(task_score=score, merged_adapter_prefix="check", **TINY_OPTIONS)
    examples = {t: items[: config.examples_per_task] for t, items in normalize_task_examples(task_examples).items()}
    merger = AdapterMerger(model, config)
    try:
        scorer = LossScorer.for_config(model, tokenizer, examples, merger)
        attach_layer_inputs(merger, scorer)  # the default merge, regmean, needs them
        return scorer([(c, t) for c in clusters for t in c])
    finally:
        merger.cleanup()


@pytest.mark.usefixtures("one_thread")
class TestOnTheTinyModel:
    def test_run_starts_as_the_paper_and_ends_at_no_higher_loss(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path
    ):
        paper = _tiny_run(tiny_assets, tiny_tokenizer, tiny_task_examples, search="paper")
        settings = {"search": "paper_then_partition", "task_score": "loss"}
        both = _tiny_run(tiny_assets, tiny_tokenizer, tiny_task_examples, **settings)
        assert both.history[:15] == paper.history
        second = both.history[15:]
        assert second and all(r["phase"] == "partition" for r in second)
        assert both.stats["partition_phase_steps"] == len(second)
        # Passes after the first phase's last step and at the end, from the run's own trace.
        passes = dict(both.stats["trace"])
        budget, spent = both.stats["partition_phase_budget"], both.stats["partition_phase_spent"]
        assert passes[len(both.history)] - passes[15] == spent
        assert sum(both.task_losses.values()) <= sum(paper.task_losses.values()) + 1e-9
        estimate = estimate_run(
            tiny.load_peft_model(*tiny_assets),
            tiny_task_examples,
            D2CMergeConfig(**TINY_OPTIONS, **settings),
            tokenizer=tiny_tokenizer,
            probe_evaluations=1,
        )
        assert 0 < both.stats["cache_misses"] <= estimate["max_evaluations"]
        both.save_pretrained(tmp_path / "run")
        card = (tmp_path / "run" / "README.md").read_text()
        assert f"15 paper steps, then {len(second)} partition steps within their forward passes" in card
        assert budget > 0

    def test_miss_scores_only_the_second_phase(self, tiny_assets, tiny_tokenizer, tiny_task_examples):
        """With `task_score="miss"` the first phase is still the paper's rule on the loss, draw for draw, and the
        second phase lowers the total miss from the paper's end (recomputed by a scorer of its own)."""
        paper = _tiny_run(tiny_assets, tiny_tokenizer, tiny_task_examples, search="paper")
        both = _tiny_run(tiny_assets, tiny_tokenizer, tiny_task_examples, search="paper_then_partition")
        assert both.config.task_score == "miss"  # the default of this rule
        assert both.history[:15] == paper.history
        assert all(0.0 <= miss <= 1.0 for miss in both.task_losses.values())
        paper_end = _scores_of(tiny_assets, tiny_tokenizer, tiny_task_examples, paper.clusters, "miss")
        losses = _scores_of(tiny_assets, tiny_tokenizer, tiny_task_examples, both.clusters, "loss")
        assert sum(both.task_losses.values()) <= sum(paper_end) + 1e-9
        # The mean loss of the end partition (what a sweep plots at every K), though the second phase scored the miss.
        assert both.stats["fewshot_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert paper.stats["fewshot_loss"] == pytest.approx(sum(paper.task_losses.values()) / len(paper.task_losses))

    def test_sweep_plots_the_loss_where_the_search_scored_the_miss(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples
    ):
        config = D2CMergeConfig(
            **{**TINY_OPTIONS, "num_iterations": 6}, search="paper_then_partition", fit_router=False
        )
        model = tiny.load_peft_model(*tiny_assets)
        sweep = run_sweep(model, tiny_task_examples, config, tokenizer=tiny_tokenizer, num_clusters=[2])
        (point,) = sweep["points"]
        losses = _scores_of(tiny_assets, tiny_tokenizer, tiny_task_examples, point["clusters"], "loss")
        assert sweep["metric"] == "few-shot loss" and point["score"] == pytest.approx(sum(losses) / len(losses))

    def test_progress_bar_ends_full_when_the_pass_budget_ends_the_second_phase(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, capsys, monkeypatch
    ):
        monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py silences the bars
        config = D2CMergeConfig(num_clusters=3, num_iterations=12, search="paper_then_partition", seed=3)
        result = merge_adapters_d2c(
            tiny.load_peft_model(*tiny_assets), tiny_task_examples, config, tokenizer=tiny_tokenizer
        )
        steps = len(result.history)
        assert 12 < steps < 24  # the budget ended the second phase before its T steps
        bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "D2C search" in line]
        assert "D2C search: 100%" in bar[-1] and f" {steps}/{steps} " in bar[-1]

    def test_run_interrupted_in_the_second_phase_resumes_to_the_same_end(
        self, tiny_assets, tiny_tokenizer, tiny_task_examples, tmp_path, monkeypatch
    ):
        import peft_d2c.engine.runtime.checkpoint as checkpoint_module

        config = D2CMergeConfig(
            num_clusters=3, num_iterations=12, search="paper_then_partition", checkpoint_every=1, seed=3
        )  # misfit proposals (the two-phase default): 4 partition steps, interrupted after the first, mid-round
        save, saved = checkpoint_module.save_checkpoint, []

        def save_then_interrupt(directory, payload):
            save(directory, payload)
            saved.append(payload["state"]["phase"])
            if payload["state"]["phase"] == "partition" and payload["state"]["iteration"] == 13:
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
        assert saved.count("search") == 12 and saved[-1] == "partition"
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
        assert len(full.history) > 13 and resumed.history == full.history and resumed.clusters == full.clusters
        assert resumed.stats["partition_phase_budget"] == full.stats["partition_phase_budget"]
        assert resumed.stats["cache_misses"] < full.stats["cache_misses"]  # it went on from the saved losses


class TestDefaultRule:
    """`search=None`: the two-phase search up to 16 adapters where clusters hold more than 4 on average (a partition
    step then scores more than 8 tasks), the partition search elsewhere."""

    def test_rule_against_the_mean_cluster_size(self):
        for n in range(1, 40):
            for k in range(1, n + 1):
                two_phase = n <= 16 and k >= 2 and n / k > 4
                expected = "paper_then_partition" if two_phase else "partition"
                assert default_search_rule(n, k) == expected, (n, k)
                assert default_search_rule(n, k, restarts=2) == "partition"  # the two phases search one start

    def test_resolved_config_of_the_default_and_explicit_choices_kept(self):
        config = D2CMergeConfig(num_clusters=2)
        resolved = config.resolved_for(16, 2)
        assert (resolved.search, resolved.proposal, resolved.init) == ("paper_then_partition", "misfit", "random")
        assert resolved.num_iterations == 100  # the paper's T for the first phase
        assert resolved.task_score == "miss" and config.resolved_for(16, 4).task_score == "loss"
        assert D2CMergeConfig(num_clusters=2, task_score="loss").resolved_for(16, 2).task_score == "loss"
        assert (
            D2CMergeConfig(num_clusters=2, search="partition", task_score="miss").resolved_for(16, 2).task_score
            == "miss"
        )
        assert D2CMergeConfig(num_clusters=2, search="paper_then_partition").resolved_for(64, 2).task_score == "miss"
        assert config.resolved_for(16, 4).search == "partition" and config.resolved_for(64, 2).search == "partition"
        assert D2CMergeConfig(storage_budget=0.125).search_rule_for(16) == "paper_then_partition"  # K = 2
        assert D2CMergeConfig(num_clusters=2, search="partition").resolved_for(16, 2).search == "partition"
        assert D2CMergeConfig(num_clusters=2, restarts=3).resolved_for(16, 2).search == "partition"
        with pytest.raises(ValueError, match="restarts=1"):
            D2CMergeConfig(num_clusters=2, search="paper_then_partition", restarts=3)

    @pytest.mark.usefixtures("one_thread")
    def test_default_run_takes_the_rule_of_its_n_and_k(self, tiny_assets, tiny_tokenizer, tmp_path):
        """Nine adapters (three noisy copies of three): K = 2 (4.5 a cluster) runs the two-phase search with misfit
        proposals scored by the miss, exactly as when they are asked for; K = 3 (3 a cluster) the partition search on
        the loss."""
        base_dir, adapter_dirs = tiny_assets
        dirs, examples = {}, {}
        for family in ("copy", "first", "shift"):
            for j in range(3):
                name = f"{family}{j}"
                dirs[name] = tiny.perturbed_copy(adapter_dirs[family], str(tmp_path / name), noise=0.05, seed=j)
                examples[name] = tiny.make_examples(family, 10, seed=7 + j)

        def run(**settings):
            config = D2CMergeConfig(num_iterations=8, seed=2, show_progress=False, fit_router=False, **settings)
            return merge_adapters_d2c(tiny.load_peft_model(base_dir, dirs), examples, config, tokenizer=tiny_tokenizer)

        asked = run(num_clusters=2, search="paper_then_partition", proposal="misfit", task_score="miss")
        default = run(num_clusters=2)
        assert (default.config.search, default.config.proposal) == ("paper_then_partition", "misfit")
        assert default.config.task_score == "miss" and default.task_losses == asked.task_losses
        assert default.history == asked.history and default.clusters == asked.clusters
        assert "partition_phase_budget" in default.stats
        default, asked = run(num_clusters=3), run(num_clusters=3, search="partition")
        assert default.config.search == "partition" and default.history == asked.history
        assert default.config.task_score == "loss" and default.task_losses == asked.task_losses
