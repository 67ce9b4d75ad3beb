"""The prompt router (issue 21): features, fit, routes and answers checked against independent computations on the
tiny Llama; saved with the result, loaded by `load_d2c_collection`, updated by `add_adapter`, exported."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CResult, D2CWarning, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.engine.serving.prompt_router import (
    ROUTER_CONFIG_NAME,
    ROUTER_WEIGHTS_NAME,
    PromptRouter,
    fit_prompt_router,
    prompt_features,
)
from peft_d2c.export import export_d2c_folder
from peft_d2c.hub import load_d2c_collection
from peft_d2c.hub.cards import build_result_card

pytestmark = pytest.mark.usefixtures("one_thread")

# Tasks whose prompts differ in their symbols, so that a prompt says which task it is.
LETTERS = {"low": "abcd", "high": "efgh", "mixed": "aceg"}


def task_prompts(count: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {t: [" ".join(rng.choice(list(s), size=int(rng.integers(2, 6)))) + " =" for _ in range(count)]
            for t, s in LETTERS.items()}  # fmt: skip


def features_by_hand(model, tokenizer, prompts, layer: int = -1, ids_of=None) -> np.ndarray:
    """One prompt at a time (no padding), adapters disabled: mean of hidden state `layer` over its tokens."""
    rows = []
    with torch.no_grad(), model.disable_adapter():
        for prompt in prompts:
            ids = torch.tensor([ids_of(prompt) if ids_of else tokenizer(prompt)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
            rows.append(hidden.mean(0).double().numpy())
    return np.stack(rows)


def same_route(a, b) -> bool:
    """Same decision; the numbers equal up to the rounding of another batch composition (padding)."""
    return (a.task, a.adapter, a.known) == (b.task, b.adapter, b.known) and np.allclose(
        [a.confidence, a.similarity], [b.confidence, b.similarity], atol=1e-5
    )


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def thresholds_by_hand(own: np.ndarray, labels: np.ndarray, false_reject: float = 0.05):
    """The calibration of the module docstring, in numpy: per task mean and spread (ddof 1; at least half the pooled
    spread, the pooled one below three prompts), the split-conformal quantile of the standardised shortfalls."""
    tasks = np.unique(labels)
    groups = [own[labels == t] for t in tasks]
    dof = sum(len(g) - 1 for g in groups)
    pooled = np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)
    spreads = np.array([max(g.std(ddof=1), pooled / 2) if len(g) >= 3 else pooled for g in groups])
    means = np.array([g.mean() for g in groups])
    shortfalls = np.sort((means[labels] - own) / spreads[labels])
    quantile = shortfalls[int(np.ceil((len(own) + 1) * (1 - false_reject))) - 1]
    return means - quantile * spreads, quantile, pooled


# A chat template over the tiny vocabulary: BOS, a two-word system preamble "h h", the user turn, and "=" as the
# generation prompt. Its tokens are written out by hand in `templated_ids`.
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %} h h {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ={% endif %}"


def templated_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["<s>", "h", "h", *prompt.split(), "="])


def greedy_by_hand(model, ids: list[int], adapter: str, max_new_tokens: int) -> list[int]:
    """The greedy continuation of one unpadded prompt with `adapter` active (the active adapter given back)."""
    before = model.active_adapter
    model.set_adapter(adapter)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)  # fmt: skip
    finally:
        model.set_adapter(before)
    return out[0, len(ids) :].tolist()


@pytest.fixture
def fitted(tiny_peft_model, tiny_tokenizer):
    prompts = task_prompts(8, seed=0)
    return tiny_peft_model, prompts, fit_prompt_router(tiny_peft_model, tiny_tokenizer, prompts, batch_size=5)


class TestFit:
    def test_features_are_the_base_models_mean_last_hidden_state_and_leave_the_model_as_it_was(
        self, tiny_peft_model, tiny_tokenizer
    ):
        model = tiny_peft_model
        model.set_adapter("sort")
        model.train()
        prompts = [p for ps in task_prompts(3, seed=1).values() for p in ps]
        got = prompt_features(model, tiny_tokenizer, prompts, batch_size=4).double().numpy()  # padded batches
        assert np.allclose(got, features_by_hand(model, tiny_tokenizer, prompts), atol=1e-5)
        middle = prompt_features(model, tiny_tokenizer, prompts, batch_size=4, layer=1).double().numpy()
        assert np.allclose(middle, features_by_hand(model, tiny_tokenizer, prompts, layer=1), atol=1e-5)
        assert not np.allclose(middle, got, atol=1e-3)
        assert model.training and model.active_adapter == "sort"
        with torch.no_grad():  # the adapters are on again: the adapted output differs from the base's
            ids = torch.tensor([tiny_tokenizer(prompts[0])["input_ids"]])
            model.eval()
            adapted = model(input_ids=ids).logits
            with model.disable_adapter():
                assert not torch.allclose(adapted, model(input_ids=ids).logits)

    def test_centroids_temperature_and_threshold_follow_their_definitions(self, fitted, tiny_tokenizer):
        model, prompts, router = fitted
        tasks = sorted(prompts)
        feats = features_by_hand(model, tiny_tokenizer, [p for t in tasks for p in prompts[t]])
        labels = np.repeat(np.arange(len(tasks)), [len(prompts[t]) for t in tasks])
        mean = unit(feats).mean(0)
        f = unit(unit(feats) - mean)
        centroids = unit(np.stack([f[labels == i].mean(0) for i in range(len(tasks))]))
        assert router.tasks == tasks
        assert np.allclose(router.mean.numpy(), mean, atol=1e-5)
        assert np.allclose(router.centroids.numpy(), centroids, atol=1e-5)
        # leave-one-out: each prompt against its own task's centroid made without it
        loo = f @ centroids.T
        for i in range(len(f)):
            rest = (labels == labels[i]) & (np.arange(len(f)) != i)
            loo[i, labels[i]] = unit(f[rest].sum(0)) @ f[i]
        own = loo[np.arange(len(f)), labels]
        thresholds, quantile, pooled = thresholds_by_hand(own, labels)
        assert np.allclose(router.thresholds, thresholds, atol=1e-4)
        assert router.stats["calibration"] == pytest.approx(
            {"false_reject": 0.05, "quantile": quantile, "pooled_spread": pooled}, abs=1e-4
        )
        # on the prompts it was fitted on, those the leave-one-out rule sends to their own task are refused at most 5%
        # of the time (the conformal quantile); a misrouted prompt meets another task's threshold
        fitted_thresholds = np.array(router.thresholds)[loo.argmax(1)]
        refused = loo.max(1) < fitted_thresholds
        assert router.stats["leave_one_out_false_reject"] == pytest.approx(refused.mean())
        assert refused[loo.argmax(1) == labels].mean() <= 0.05
        assert router.stats["leave_one_out_accuracy"] == pytest.approx((loo.argmax(1) == labels).mean())

        def log_likelihood(tau):
            z = loo / tau
            z = z - z.max(1, keepdims=True)
            return (z[np.arange(len(f)), labels] - np.log(np.exp(z).sum(1))).sum()

        assert all(log_likelihood(router.temperature) >= log_likelihood(t) - 1e-6 for t in np.logspace(-3, 0, 31))

    def test_a_router_needs_two_tasks_with_prompts(self, tiny_peft_model, tiny_tokenizer):
        with pytest.raises(ValueError, match="two tasks"):
            fit_prompt_router(tiny_peft_model, tiny_tokenizer, {"low": ["a b ="]})
        with pytest.raises(ValueError, match="no prompt"):
            fit_prompt_router(tiny_peft_model, tiny_tokenizer, {"low": ["a b ="], "high": []})


class TestRoutes:
    def test_each_prompt_goes_to_the_most_similar_centroid_with_a_softmax_confidence(self, fitted, tiny_tokenizer):
        model, _, router = fitted
        routing = {"low": "copy", "high": "sort", "mixed": "copy"}
        held = [p for ps in task_prompts(5, seed=9).values() for p in ps]
        feats = features_by_hand(model, tiny_tokenizer, held)
        sims = unit(unit(feats) - router.mean.double().numpy()) @ router.centroids.double().numpy().T
        # a server that returns unit-length embeddings gets the same routes
        rescaled = router.route_features(torch.tensor(unit(feats) * 7.0, dtype=torch.float32), routing)
        routes = router.route_features(torch.tensor(feats, dtype=torch.float32), routing)
        for route, row in zip(routes, sims, strict=True):
            best = int(row.argmax())
            probs = np.exp(row / router.temperature) / np.exp(row / router.temperature).sum()
            assert route.task == router.tasks[best] and route.adapter == routing[route.task]
            assert route.similarity == pytest.approx(row[best], abs=1e-5)
            assert route.confidence == pytest.approx(probs[best], abs=1e-4)
            assert route.known == (route.similarity >= router.thresholds[best])
        assert [r.task for r in rescaled] == [r.task for r in routes]

    def test_prompts_of_no_known_task_fall_back_to_the_nearest_adapter_or_the_base(self, fitted, tiny_tokenizer):
        model, prompts, router = fitted
        strict = dataclasses.replace(router, thresholds=[1.5] * 3)  # no cosine similarity reaches it
        feats = prompt_features(model, tiny_tokenizer, prompts["low"][:3])
        routing = {t: f"adapter-{t}" for t in router.tasks}
        nearest = strict.route_features(feats, routing)
        base = strict.route_features(feats, routing, fallback="base")
        assert all(not r.known for r in nearest + base)
        assert [r.adapter for r in nearest] == [routing[r.task] for r in nearest]
        assert [r.adapter for r in base] == ["__base__"] * 3 and [r.task for r in base] == [r.task for r in nearest]
        with pytest.raises(ValueError, match="fallback"):
            strict.route_features(feats, routing, fallback="none")
        with pytest.raises(KeyError, match="no adapter"):
            strict.route_features(feats, {"low": "copy"})


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    """A D2C run whose few-shot prompts are the distinguishable ones: the six adapters, named after these tasks."""
    base_dir, adapter_dirs = tiny_assets
    names = dict(zip(["low", "high", "mixed", "low2", "high2", "mixed2"], tiny.TASK_FAMILIES, strict=True))
    model = tiny.load_peft_model(base_dir, {n: adapter_dirs[f] for n, f in names.items()})
    # "low2" draws its prompts from the letters of "low", but other ones: two tasks with the very same prompts would
    # have the same centroid, and which of the two a prompt goes to would be decided by rounding noise.
    prompts = {"": task_prompts(6, seed=3), "2": task_prompts(6, seed=4)}
    examples = {n: [{"prompt": p, "completion": " a"} for p in prompts["2" if n.endswith("2") else ""][n.rstrip("2")]]
                for n in names}  # fmt: skip
    config = D2CMergeConfig(num_clusters=3, num_iterations=3, show_progress=False, combination_type="knots_ties")
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny.make_tokenizer())
    folder = str(tmp_path_factory.mktemp("router") / "result")
    result.save_pretrained(folder)
    return result, folder, examples


class TestWithTheResult:
    def test_the_run_fits_a_router_on_its_few_shot_prompts(self, run, tiny_tokenizer):
        result, _, examples = run
        refit = fit_prompt_router(
            result.model, tiny_tokenizer, {t: [e["prompt"] for e in xs] for t, xs in examples.items()}
        )
        assert result.prompt_router.tasks == sorted(examples)
        assert torch.allclose(result.prompt_router.centroids, refit.centroids, atol=1e-6)
        assert result.stats["router_seconds"] > 0

    def test_route_and_generate_use_the_merged_adapter_of_the_prompts_task(self, run, tiny_tokenizer):
        result, _, _ = run
        held = {t: [p for p in ps if set(p.split()) - set(LETTERS["mixed"]) - {"="}]  # letters only `t` uses
                for t, ps in task_prompts(4, seed=11).items() if t != "mixed"}  # fmt: skip
        prompts = [p for ps in held.values() for p in ps]
        routes = result.route(prompts)
        assert same_route(result.route(prompts[0]), routes[0])
        for task, route in zip([t for t, ps in held.items() for _ in ps], routes, strict=True):
            # "low" and "low2" draw from the same letters: either is right, and its adapter is the routing table's
            assert route.task in (task, f"{task}2") and route.adapter == result.routing[route.task]
        for prompt, route in zip(prompts, routes, strict=True):
            answer, taken = result.generate(prompt, max_new_tokens=4)
            assert same_route(taken, route)
            expected = greedy_by_hand(result.model, tiny_tokenizer(prompt)["input_ids"], route.adapter, 4)
            assert answer == tiny_tokenizer.decode(expected, skip_special_tokens=True)

    def test_without_a_router_route_says_how_to_get_one(self, tiny_peft_model, tiny_task_examples, tiny_tokenizer):
        config = D2CMergeConfig(num_clusters=2, num_iterations=1, show_progress=False, fit_router=False)
        result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        assert result.prompt_router is None
        with pytest.raises(ValueError, match="fit_router=True"):
            result.route("a b =")

    def test_the_router_round_trips_through_the_folder_and_load_d2c_collection(self, run, tiny_assets, tiny_tokenizer):
        result, folder, _ = run
        assert {ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME} <= set(os.listdir(folder))
        saved = json.loads(open(os.path.join(folder, "d2c_result.json")).read())
        assert ROUTER_CONFIG_NAME in saved["files"] and saved["prompt_router"] == result.prompt_router.stats
        loaded = D2CResult.from_pretrained(folder).prompt_router
        assert loaded.tasks == result.prompt_router.tasks and torch.equal(
            loaded.centroids, result.prompt_router.centroids
        )
        assert (loaded.temperature, loaded.thresholds, loaded.use_chat_template) == (
            result.prompt_router.temperature,
            result.prompt_router.thresholds,
            False,
        )
        model, router = load_d2c_collection(LlamaForCausalLM.from_pretrained(tiny_assets[0]).eval(), folder)
        held = [p for ps in task_prompts(2, seed=12).values() for p in ps]
        assert router.route(held, tiny_tokenizer) == result.route(held)  # same batches: the same numbers
        answer, route = router.generate(held[0], tiny_tokenizer, max_new_tokens=4)
        assert (answer, route) == result.generate(held[0], max_new_tokens=4)

    def test_a_router_file_of_other_tasks_is_refused(self, run, tmp_path):
        result, _, _ = run
        broken = dataclasses.replace(result.prompt_router, tasks=result.prompt_router.tasks[:-1])
        broken.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="do not belong together"):
            PromptRouter.from_pretrained(tmp_path)

    def test_export_ships_the_router_and_says_how_to_use_it(self, run, tmp_path):
        _, folder, _ = run
        manifest = export_d2c_folder(folder, tmp_path / "vllm", format="vllm")
        assert manifest["router"]["files"] == [ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME]
        exported = PromptRouter.from_pretrained(tmp_path / "vllm")
        assert torch.equal(exported.centroids, PromptRouter.from_pretrained(folder).centroids)
        assert "centroids" in manifest["router"]["how"]


def test_add_adapter_teaches_the_router_the_new_task(tiny_assets, tiny_tokenizer):
    base_dir, adapter_dirs = tiny_assets
    model = tiny.load_peft_model(base_dir, {"low": adapter_dirs["copy"], "high": adapter_dirs["sort"]})
    prompts = task_prompts(6, seed=4)
    examples = {t: [{"prompt": p, "completion": " a"} for p in prompts[t]] for t in ("low", "high")}
    config = D2CMergeConfig(num_clusters=1, show_progress=False, combination_type="knots_ties")
    result = merge_adapters_d2c(model, examples, config, tokenizer=tiny_tokenizer)
    before = result.prompt_router
    model.load_adapter(adapter_dirs["first"], adapter_name="mixed")
    new = [{"prompt": p, "completion": " a"} for p in prompts["mixed"]]
    with pytest.raises(ValueError, match="tokenizer"):
        result.add_adapter("mixed", new, score_fn=lambda *a: 0.0)
    assert result.prompt_router is before and "mixed" not in result.routing  # refused before any work
    result.add_adapter("mixed", new, tokenizer=tiny_tokenizer)
    router = result.prompt_router
    assert router.tasks == ["high", "low", "mixed"] and torch.equal(router.centroids[:2], before.centroids)
    feats = features_by_hand(model, tiny_tokenizer, prompts["mixed"])
    expected = unit(unit(unit(feats) - before.mean.double().numpy()).sum(0))
    assert np.allclose(router.centroids[2].numpy(), expected, atol=1e-5)
    assert router.temperature == before.temperature and router.thresholds[:2] == before.thresholds
    # the new task's threshold: its prompts' leave-one-out similarities, with the fit's quantile and pooled spread
    f = unit(unit(feats) - before.mean.double().numpy())
    own = np.array([unit(np.delete(f, i, 0).sum(0)) @ f[i] for i in range(len(f))])
    calibration = before.stats["calibration"]
    spread = max(own.std(ddof=1), calibration["pooled_spread"] / 2)
    assert router.thresholds[2] == pytest.approx(own.mean() - calibration["quantile"] * spread, abs=1e-4)


class TestKnowingWhatItDoesNotKnow:
    def test_tasks_whose_prompts_do_not_say_the_task_are_warned_about(
        self, tiny_peft_model, tiny_tokenizer, tiny_task_examples
    ):
        # the tiny task families share their prompts' distribution by design: no feature can tell them apart
        prompts = {t: [e["prompt"] for e in xs] for t, xs in tiny_task_examples.items()}
        with pytest.warns(D2CWarning, match="no better than chance"):
            router = fit_prompt_router(tiny_peft_model, tiny_tokenizer, prompts)
        n, correct = 60, round(router.stats["leave_one_out_accuracy"] * 60)
        assert binomtest(correct, n, 1 / 6, alternative="greater").pvalue >= 0.01
        assert router.stats["above_chance"] is False and router.stats["chance_accuracy"] == pytest.approx(1 / 6)

    def test_the_card_of_such_a_run_says_to_label_requests(self, tiny_peft_model, tiny_tokenizer, tiny_task_examples,
                                                           tmp_path):  # fmt: skip
        config = D2CMergeConfig(num_clusters=2, num_iterations=1, show_progress=False, combination_type="knots_ties")
        with pytest.warns(D2CWarning, match="no better than chance"):
            result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
        result.save_pretrained(tmp_path / "out")
        card = build_result_card(tmp_path / "out").text
        assert "no better than chance" in card and "Label requests with their task" in card
        assert "about 5% of a known task's prompts are refused" in card

    def test_tasks_whose_prompts_say_the_task_are_not(self, fitted, tiny_peft_model, tiny_tokenizer, recwarn):
        _, prompts, router = fitted
        n, correct = 24, round(router.stats["leave_one_out_accuracy"] * 24)
        assert binomtest(correct, n, 1 / 3, alternative="greater").pvalue < 0.01
        assert router.stats["above_chance"] is True
        fit_prompt_router(tiny_peft_model, tiny_tokenizer, prompts)
        assert not [w for w in recwarn if issubclass(w.category, D2CWarning)]

    def test_a_router_file_of_format_1_loads_with_its_one_threshold(self, fitted, tmp_path):
        _, _, router = fitted
        router.save_pretrained(tmp_path)
        path = tmp_path / ROUTER_CONFIG_NAME
        config = json.loads(path.read_text())
        del config["thresholds"], config["use_chat_template"]
        path.write_text(json.dumps({**config, "format": 1, "threshold": 0.25}))
        loaded = PromptRouter.from_pretrained(tmp_path)
        assert loaded.thresholds == [0.25] * 3 and loaded.use_chat_template is False


def test_router_and_generate_see_the_prompt_through_the_chat_template_the_scorer_used(tiny_assets):
    base_dir, adapter_dirs = tiny_assets
    tokenizer = tiny.make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    names = {"low": "copy", "high": "sort", "mixed": "first"}
    model = tiny.load_peft_model(base_dir, {n: adapter_dirs[f] for n, f in names.items()})
    prompts = task_prompts(5, seed=5)
    examples = {t: [{"prompt": p, "completion": " a"} for p in ps] for t, ps in prompts.items()}
    config = D2CMergeConfig(num_clusters=2, num_iterations=2, show_progress=False, combination_type="knots_ties",
                            scoring={"use_chat_template": True})  # fmt: skip
    result = merge_adapters_d2c(model, examples, config, tokenizer=tokenizer)
    router = result.prompt_router
    assert router.use_chat_template
    flat = [p for t in router.tasks for p in prompts[t]]
    templated = features_by_hand(model, tokenizer, flat, ids_of=lambda p: templated_ids(tokenizer, p))
    mean = unit(templated).mean(0)
    assert np.allclose(router.mean.numpy(), mean, atol=1e-5)  # the features of the templated prompts
    assert not np.allclose(unit(features_by_hand(model, tokenizer, flat)).mean(0), mean, atol=1e-3)
    prompt = task_prompts(1, seed=21)["high"][0]
    answer, route = result.generate(prompt, max_new_tokens=4)
    f = unit(unit(features_by_hand(model, tokenizer, [prompt], ids_of=lambda p: templated_ids(tokenizer, p))) - mean)
    assert route.similarity == pytest.approx(float((f @ router.centroids.double().numpy().T).max()), abs=1e-5)
    expected = greedy_by_hand(model, templated_ids(tokenizer, prompt), route.adapter, 4)
    assert answer == tokenizer.decode(expected, skip_special_tokens=True)
