"""Per-task cores (issue 38, part 5): every task served in its cluster's shared rank-r basis by its own r x r core.

The references are the test's own dense maths: the basis is the top-r eigenvectors of the members' summed
ΔW·ΔW^T (left) and ΔW^T·ΔW (right), built as out x in matrices with `torch.linalg.eigh`; a task's adapter must be
the projection P_U·ΔW_t·P_V, and the rewritten merged adapter the projection of the merge the same run makes without
cores. Bytes are counted from the saved files and the module shapes, not from the budget module.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from peft import PeftModel
from recompute import task_loss
from safetensors.torch import load_file
from test_budget import BIAS_TASKS, bias_adapter_dirs  # noqa: F401 (fixture)
from test_devices import MEMBERS, half_model, meta_peft_model
from test_embedding_lora import EMBEDDING, embedding_adapter_dirs, embedding_model  # noqa: F401 (fixtures)
from test_embedding_lora import TASKS as EMBEDDING_TASKS
from transformers import LlamaForCausalLM

from peft_d2c import D2CMergeConfig, D2CResult, merge_adapters_d2c
from peft_d2c import testing as tiny
from peft_d2c.data.examples import normalize_task_examples
from peft_d2c.engine.merge.budget import partition_bytes
from peft_d2c.engine.merge.lora import lora_factors, lora_layers
from peft_d2c.engine.merge.merging import AdapterMerger
from peft_d2c.engine.merge.task_cores import add_task_adapter, fit_task_cores
from peft_d2c.engine.scoring.loss import LossScorer
from peft_d2c.errors import D2CWarning
from peft_d2c.hub import load_d2c_collection, push_d2c_folder

RANK = 4


def _config(**merge) -> D2CMergeConfig:
    return D2CMergeConfig(num_clusters=2, method="random", seed=3, fit_router=False, merge={"svd_rank": RANK, **merge})


def _update(layer, adapter) -> torch.Tensor | None:
    factors = lora_factors(layer, adapter)
    if factors is None:
        return None
    a, b = factors
    return layer.scaling[adapter] * b.double() @ a.double()


def _projectors(updates: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense projectors onto the top-`rank` left / right singular subspaces the updates share."""
    left = sum(w @ w.T for w in updates)
    right = sum(w.T @ w for w in updates)
    u = torch.linalg.eigh(left).eigenvectors[:, -rank:]
    v = torch.linalg.eigh(right).eigenvectors[:, -rank:]
    return u @ u.T, v @ v.T


@pytest.fixture
def with_cores(tiny_peft_model, tiny_task_examples, tiny_tokenizer):
    before = {k: v.clone() for k, v in tiny_peft_model.state_dict().items()}
    plain = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, _config(), tokenizer=tiny_tokenizer)
    plain_updates = {
        (module, merged): _update(layer, merged)
        for module, layer in lora_layers(tiny_peft_model)
        for merged in plain.merged_adapter_names
    }
    for name in plain.merged_adapter_names:
        tiny_peft_model.delete_adapter(name)
    result = merge_adapters_d2c(
        tiny_peft_model, tiny_task_examples, _config(task_cores=True), tokenizer=tiny_tokenizer
    )
    return tiny_peft_model, result, plain, plain_updates, before


def test_task_adapters_are_the_projections_onto_the_shared_basis(with_cores):
    model, result, plain, plain_updates, before = with_cores
    assert result.clusters == plain.clusters  # the same seed: the same partition, the cores come on top
    assert set(result.task_adapters) == set(result.routing)
    checked = 0
    for module, layer in lora_layers(model):
        for members, merged in zip(result.clusters, result.merged_adapter_names, strict=True):
            updates = {t: _update(layer, t) for t in members}
            present = [w for w in updates.values() if w is not None]
            if not present:
                continue
            p_u, p_v = _projectors(present, RANK)
            # the merged adapter: the same run's merge without cores, projected into the basis
            expected_merge = p_u @ plain_updates[(module, merged)] @ p_v
            assert torch.allclose(_update(layer, merged), expected_merge, atol=1e-4 * expected_merge.abs().max())
            for task in members:
                got = _update(layer, result.task_adapters[task])
                if updates[task] is None:
                    assert got.abs().max() == 0
                    continue
                expected = p_u @ updates[task] @ p_v
                assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max() + 1e-7)
                # the closest update in the basis: never farther from the task's own than the merge is
                assert torch.linalg.norm(got - updates[task]) <= torch.linalg.norm(
                    _update(layer, merged) - updates[task]
                )
                checked += 1
    assert checked >= len(result.routing)
    after = model.state_dict()
    for key, value in before.items():  # the user's adapters and the base model, bit for bit
        assert torch.equal(after[key], value), key


def test_results_serve_each_task_with_its_own_adapter(with_cores, tiny_task_examples, tiny_tokenizer):
    model, result, _, _, _ = with_cores
    for task in result.routing:
        assert result.adapter_for(task) == result.task_adapters[task] == f"d2c_task_{task}"
        assert result.serving_routing[task] == result.task_adapters[task]
    # task losses are those of the task adapters, as the model's own `labels=` loss gives them
    for task in sorted(result.routing)[:2]:
        expected = task_loss(model, result.task_adapters[task], tiny_tokenizer, tiny_task_examples[task])
        assert result.task_losses[task] == pytest.approx(expected, rel=1e-4)
        merged = task_loss(model, result.routing[task], tiny_tokenizer, tiny_task_examples[task])
        assert result.task_losses[task] != pytest.approx(merged, rel=1e-4)


def test_bytes_count_one_core_per_task_and_module(with_cores, tmp_path):
    model, result, plain, _, _ = with_cores
    modules = sum(1 for _, layer in lora_layers(model) if lora_factors(layer, result.merged_adapter_names[0]))
    cores_bytes = len(result.routing) * modules * RANK * RANK * 4
    assert partition_bytes(model, result.clusters, result.config) == (
        partition_bytes(model, plain.clusters, plain.config) + cores_bytes
    )
    folder = result.save_pretrained(tmp_path / "out")
    saved = load_file(os.path.join(folder, "d2c_task_cores.safetensors"))
    assert sum(t.numel() * t.element_size() for t in saved.values()) == cores_bytes
    assert all(t.dtype == torch.float32 and t.shape == (RANK, RANK) for t in saved.values())


def test_saved_cores_rebuild_the_same_task_adapters(with_cores, tiny_assets, tmp_path):
    model, result, _, _, _ = with_cores
    folder = result.save_pretrained(tmp_path / "out")
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert f"`d2c_task_cores.safetensors`, {len(result.routing)} cores" in card
    base_dir, _ = tiny_assets
    loaded, router = load_d2c_collection(LlamaForCausalLM.from_pretrained(base_dir).eval(), folder)
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    model.eval()
    for task in sorted(result.routing)[:3]:
        name = router.adapter_for(task)
        assert name == result.task_adapters[task]
        with torch.no_grad():
            want = model(input_ids=ids, adapter_names=[name]).logits
            got = loaded(input_ids=ids, adapter_names=[name]).logits
        assert torch.allclose(got, want, atol=1e-5)
    reread = D2CResult.from_pretrained(folder)
    assert reread.task_adapters == result.task_adapters
    for task, cores in result.task_cores.items():
        assert reread.task_cores[task].keys() == cores.keys()
        assert all(torch.equal(reread.task_cores[task][m], cores[m]) for m in cores)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"combination_type": "ties", "merge": {"task_cores": True}}, "task_cores"),
        ({"num_clusters": 2, "merge": {"task_cores": True, "rank_allocation": "spectrum"}}, "rank_allocation"),
    ],
)
def test_refused_where_cores_cannot_be_fitted_or_counted(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        D2CMergeConfig(**{"num_clusters": 2, **kwargs})


def test_a_result_with_cores_takes_no_new_adapter(with_cores, tiny_task_examples, tiny_tokenizer):
    model, result, _, _, _ = with_cores
    with pytest.raises(ValueError, match="task cores"):
        result.add_adapter("extra", tiny_task_examples["copy"], tokenizer=tiny_tokenizer)


def test_exports_carry_one_plain_lora_per_task(with_cores, tiny_assets, tmp_path):
    model, result, _, _, _ = with_cores
    manifest = result.export(tmp_path / "peft", format="peft")
    assert sorted(manifest["adapters"]) == sorted(result.task_adapters.values())
    ids = torch.tensor([[4, 8, 11, 6, 2]])
    model.eval()
    for task in sorted(result.routing)[:2]:
        entry = manifest["tasks"][task]
        assert entry["adapter"] == result.task_adapters[task]
        # PEFT itself loads the exported folder, with no peft-d2c code in between
        base = LlamaForCausalLM.from_pretrained(tiny_assets[0]).eval()
        exported = PeftModel.from_pretrained(base, str(tmp_path / "peft" / entry["file"])).eval()
        with torch.no_grad():
            want = model(input_ids=ids, adapter_names=[result.task_adapters[task]]).logits
            assert torch.allclose(exported(input_ids=ids).logits, want, atol=1e-5)
    gguf = result.export(tmp_path / "gguf", format="gguf")
    assert {entry["file"] for entry in gguf["tasks"].values()} == {f"{n}.gguf" for n in result.task_adapters.values()}
    for record in gguf["adapters"].values():
        assert os.path.isfile(os.path.join(record["peft_path"], "adapter_model.safetensors"))


def test_the_hub_round_trip_brings_the_cores(with_cores, tiny_assets, hub_server, tmp_path):
    model, result, _, _, _ = with_cores
    folder = result.save_pretrained(tmp_path / "out")
    ids = torch.tensor([[3, 7, 9, 5, 2]])
    model.eval()
    for layout in ("subfolders", "repos"):
        repo_id = f"cores-org/tiny-d2c-{layout}-{os.getpid()}"
        push_d2c_folder(folder, repo_id, base_model_id="tiny-org/tiny-llama", layout=layout)
        with pytest.warns(D2CWarning):  # pushed for a Hub id, loaded with a local base model
            loaded, router = load_d2c_collection(LlamaForCausalLM.from_pretrained(tiny_assets[0]).eval(), repo_id)
        for task in sorted(result.routing):
            assert router.adapter_for(task) == result.task_adapters[task]
        task = sorted(result.routing)[-1]
        with torch.no_grad():
            want = model(input_ids=ids, adapter_names=[result.task_adapters[task]]).logits
            with router.task(task):
                assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)


def _bytes(model, names, k: int, rank: int, cored: int | None = None) -> int:
    """K merged adapters of rank r on every module the sources adapt, and one r x r float32 core per task (of the
    `cored` tasks in clusters of two or more; all by default) and module, from the modules' shapes (float32)."""
    widths = [sum(lora_factors(layer, names[0])[0].shape[1:]) + lora_factors(layer, names[0])[1].shape[0]
              for _, layer in lora_layers(model) if lora_factors(layer, names[0]) is not None]  # fmt: skip
    cored = len(names) if cored is None else cored
    return 4 * (k * rank * sum(widths) + cored * len(widths) * rank * rank)


def test_the_bytes_choose_k_rank_and_cores_by_the_shipped_adapters_loss(
    tiny_peft_model, tiny_task_examples, tiny_tokenizer
):
    names = sorted(tiny_task_examples)
    budget = _bytes(tiny_peft_model, names, 1, 12)  # room for one adapter of rank 12 and its cores, or more of less
    config = D2CMergeConfig(
        storage_budget=budget, method="random", seed=1, fit_router=False,
        merge={"svd_rank": "auto", "task_cores": True},
    )  # fmt: skip
    result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
    shapes = result.stats["shapes"]
    cored = [s for s in shapes if s["task_cores"]]
    plain = [s for s in shapes if not s["task_cores"]]
    assert plain and cored  # the shapes without cores stay candidates
    for shape in cored:  # every K with the highest rank (any integer) whose bytes fit, every task's core counted
        k, rank = shape["num_clusters"], shape["rank"]
        with_cores = sum(len(c) for c in shape["clusters"] if len(c) > 1)  # one-member clusters have no core
        assert shape["bytes"] == _bytes(tiny_peft_model, names, k, rank, with_cores) <= budget
        assert _bytes(tiny_peft_model, names, k, rank) <= budget < _bytes(tiny_peft_model, names, k, rank + 1)
    for shape in plain:  # powers of two, no cores
        k, rank = shape["num_clusters"], shape["rank"]
        assert rank & (rank - 1) == 0
        assert shape["bytes"] == _bytes(tiny_peft_model, names, k, rank, 0) <= budget
    assert any(s["rank"] & (s["rank"] - 1) for s in cored)  # a rank that is no power of two
    chosen = min(shapes, key=lambda s: s["objective"])
    shipped = (len(result.clusters), result.config.merge.svd_rank, result.config.merge.task_cores)
    assert shipped == (chosen["num_clusters"], chosen["rank"], chosen["task_cores"])
    # the objective of a shape with cores is the mean loss of the task adapters it ships, recomputed by the model
    best_cored = min(cored, key=lambda s: s["objective"])
    again = merge_adapters_d2c(
        tiny_peft_model, tiny_task_examples,
        dataclasses.replace(config, storage_budget=None, num_clusters=best_cored["num_clusters"],
                            merge={"svd_rank": best_cored["rank"], "task_cores": True}, merged_adapter_prefix="again"),
        tokenizer=tiny_tokenizer,
    )  # fmt: skip
    assert again.clusters == best_cored["clusters"]
    losses = [task_loss(tiny_peft_model, again.adapter_for(t), tiny_tokenizer, tiny_task_examples[t]) for t in names]
    assert best_cored["objective"] == pytest.approx(sum(losses) / len(names), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cores_are_fitted_where_the_adapters_live(dtype):
    """On `meta` (what a model off the CPU looks like to code that makes tensors on the CPU): the rewritten merged
    adapter, the cores and a task adapter stay on `meta`, in the sources' dtype and shapes."""
    model = meta_peft_model(dtype)
    merger = AdapterMerger(model, D2CMergeConfig(num_clusters=1, combination_type="core_ta", merge={"cache_size": 2}))
    merged = merger.merge(MEMBERS, "merged")
    cores = fit_task_cores(model, [MEMBERS], [merged])
    add_task_adapter(model, merged, cores[MEMBERS[0]], "task")
    for module, layer in lora_layers(model):
        source_a, source_b = lora_factors(layer, MEMBERS[0])
        for name in (merged, "task"):
            for new, source in zip(lora_factors(layer, name), (source_a, source_b), strict=True):
                assert (new.device.type, new.dtype, new.shape) == ("meta", dtype, source.shape)
        core = cores[MEMBERS[1]][module]
        assert (core.device.type, core.dtype, core.shape) == ("meta", torch.float32, (source_a.shape[0],) * 2)


def test_half_precision_task_adapters_keep_the_dtype_and_the_projection(
    tiny_assets, tiny_task_examples, tiny_tokenizer
):
    model = half_model(tiny_assets, torch.bfloat16)
    config = D2CMergeConfig(num_clusters=1, method="random", fit_router=False, merge={"task_cores": True})
    result = merge_adapters_d2c(model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
    task = sorted(result.routing)[0]
    for _, layer in lora_layers(model):
        members = [t for t in result.clusters[0] if lora_factors(layer, t) is not None]
        a, b = lora_factors(layer, result.task_adapters[task])
        assert a.dtype == b.dtype == torch.bfloat16
        rank = a.shape[0]
        p_u, p_v = _projectors([_update(layer, t) for t in members], rank)
        expected = p_u @ _update(layer, task) @ p_v
        error = torch.linalg.norm(_update(layer, result.task_adapters[task]) - expected) / torch.linalg.norm(expected)
        assert error < 0.03  # bf16 factors: about 8 bits of mantissa


def test_a_task_alone_in_its_cluster_is_served_by_its_merge_without_a_core(
    tiny_peft_model, tiny_task_examples, tiny_tokenizer
):
    config = D2CMergeConfig(
        num_clusters=5, method="random", fit_router=False, merge={"svd_rank": 2, "task_cores": True}
    )
    result = merge_adapters_d2c(tiny_peft_model, tiny_task_examples, config, tokenizer=tiny_tokenizer)
    (pair,) = [c for c in result.clusters if len(c) == 2]
    assert sorted(result.task_adapters) == sorted(pair) == sorted(result.task_cores)
    for task, merged in result.routing.items():
        assert result.adapter_for(task) == (result.task_adapters[task] if task in pair else merged)
    for _, layer in lora_layers(tiny_peft_model):  # a one-member merge: the source's best rank-2 update, untouched
        for members, merged in zip(result.clusters, result.merged_adapter_names, strict=True):
            if len(members) == 1 and lora_factors(layer, members[0]) is not None:
                u, s, vh = torch.linalg.svd(_update(layer, members[0]))
                expected = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
                error = torch.linalg.norm(_update(layer, merged) - expected) / torch.linalg.norm(expected)
                assert error < 1e-4, error  # float32 factors and RegMean's float32 solve


def test_embedding_loras_get_cores_too(embedding_model, tiny_task_examples, tiny_tokenizer):  # noqa: F811
    """LoRA on `embed_tokens` (factors in `lora_embedding_A` / `_B`) with a data-free update-space merge: the task
    adapter there is the projection of the task's own update, as in every linear layer."""
    tasks = EMBEDDING_TASKS
    config = D2CMergeConfig(num_clusters=1, method="random", combination_type="core_ta", fit_router=False,
                            merge={"task_cores": True})  # fmt: skip
    result = merge_adapters_d2c(
        embedding_model, {t: tiny_task_examples[t] for t in tasks}, config, tokenizer=tiny_tokenizer
    )
    layer = dict(lora_layers(embedding_model))[EMBEDDING]
    updates = [_update(layer, t) for t in tasks]
    rank = lora_factors(layer, result.merged_adapter_names[0])[0].shape[0]
    p_u, p_v = _projectors(updates, rank)
    for task, update in zip(tasks, updates, strict=True):
        expected = p_u @ update @ p_v
        assert torch.allclose(_update(layer, result.task_adapters[task]), expected, atol=1e-4 * expected.abs().max())


def test_the_search_scores_each_task_under_the_adapter_that_will_serve_it(
    tiny_peft_model, tiny_task_examples, tiny_tokenizer
):
    """With cores the search's loss of (cluster, task) is the loss under the task adapter that cluster would ship:
    a slot holding U·C_t·V^T (dense projectors here), the same loss as the shipped adapter built by the merge,
    `fit_task_cores` and `add_task_adapter`, recomputed by the model; no merge is computed for it."""
    model = tiny_peft_model.eval()
    names = sorted(tiny_task_examples)
    config = _config(task_cores=True)
    cluster, task = tuple(names[:3]), names[1]
    merger = AdapterMerger(model, config, sources=names)
    scorer = LossScorer.for_config(model, tiny_tokenizer, normalize_task_examples(tiny_task_examples), merger)
    loss = scorer([(cluster, task)])[0]
    assert scorer.merger.num_merges == 1 and not scorer.merger.layer_inputs  # refilled, no regmean merge
    slot = scorer.merger.adapter_for(cluster, task=task)
    for _, layer in lora_layers(model):
        p_u, p_v = _projectors([_update(layer, t) for t in cluster], RANK)
        expected = p_u @ _update(layer, task) @ p_v
        assert torch.allclose(_update(layer, slot), expected, atol=1e-5 * expected.abs().max())
    # The shipping path: the cluster's merge, rewritten in its basis, and the task's adapter from its core.
    shipper = AdapterMerger(model, dataclasses.replace(config, merged_adapter_prefix="ship"))
    shipper.layer_inputs = tiny.random_layer_inputs(model, names)
    shipper.merge(cluster, "shipped")
    cores = fit_task_cores(model, [cluster], ["shipped"])
    add_task_adapter(model, "shipped", cores[task], "shipped_task")
    expected = task_loss(model, "shipped_task", tiny_tokenizer, tiny_task_examples[task])
    assert loss == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="cross_fit_folds"):
        D2CMergeConfig(num_clusters=2, merge={"task_cores": True}, scoring={"cross_fit_folds": 2})


@pytest.mark.parametrize("kind", ["regmean", "knots_ties"])
def test_scored_task_updates_carry_the_merged_lora_bias(tiny_assets, bias_adapter_dirs, tiny_tokenizer, kind):  # noqa: F811
    """With `lora_bias=True` sources the scored task update has the bias the shipped task adapter copies from its
    cluster's merge (`update_layers`' rule for the type: a mean for `regmean`, TIES for `knots_ties`), so the search's
    loss is the shipped adapter's."""
    model = tiny.load_peft_model(tiny_assets[0], bias_adapter_dirs).eval()
    examples = {t: tiny.make_examples(t, 10, seed=7) for t in BIAS_TASKS}
    config = dataclasses.replace(_config(task_cores=True), combination_type=kind)
    merger = AdapterMerger(model, config, sources=BIAS_TASKS)
    scorer = LossScorer.for_config(model, tiny_tokenizer, normalize_task_examples(examples), merger)
    cluster, task = tuple(BIAS_TASKS), BIAS_TASKS[2]
    loss = scorer([(cluster, task)])[0]
    slot = merger.adapter_for(cluster, task=task)
    shipper = AdapterMerger(model, dataclasses.replace(config, merged_adapter_prefix="ship"))
    shipper.layer_inputs = tiny.random_layer_inputs(model, BIAS_TASKS)
    shipper.merge(cluster, "shipped")
    add_task_adapter(model, "shipped", fit_task_cores(model, [cluster], ["shipped"])[task], "shipped_task")
    biases = 0
    for _, layer in lora_layers(model):
        if "shipped_task" in layer.lora_B:
            expected = layer.lora_B["shipped_task"].bias
            assert expected.abs().max() > 0
            torch.testing.assert_close(layer.lora_B[slot].bias, expected, rtol=1e-5, atol=1e-7)
            biases += 1
    assert biases > 0
    assert loss == pytest.approx(task_loss(model, "shipped_task", tiny_tokenizer, examples[task]), rel=1e-4)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_scored_task_updates_in_half_precision(tiny_assets, tiny_task_examples, tiny_tokenizer, dtype, tolerance):
    """On a bf16 / fp16 model the scored task update keeps the adapters' dtype, is the dense projection to the
    precision of its factors, and its loss is the shipped task adapter's (both in that dtype)."""
    model = half_model(tiny_assets, dtype).eval()
    names = sorted(tiny_task_examples)
    config = dataclasses.replace(_config(task_cores=True), combination_type="knots_ties")
    merger = AdapterMerger(model, config, sources=names)
    scorer = LossScorer.for_config(model, tiny_tokenizer, normalize_task_examples(tiny_task_examples), merger)
    cluster, task = tuple(names[:3]), names[0]
    loss = scorer([(cluster, task)])[0]
    slot = merger.adapter_for(cluster, task=task)
    for _, layer in lora_layers(model):
        a, b = lora_factors(layer, slot)
        assert a.dtype == b.dtype == dtype
        p_u, p_v = _projectors([_update(layer, t) for t in cluster], RANK)
        expected = p_u @ _update(layer, task) @ p_v
        assert torch.linalg.norm(_update(layer, slot) - expected) / torch.linalg.norm(expected) < tolerance
    shipper = AdapterMerger(model, dataclasses.replace(config, merged_adapter_prefix="ship"))
    shipper.merge(cluster, "shipped")
    add_task_adapter(model, "shipped", fit_task_cores(model, [cluster], ["shipped"])[task], "shipped_task")
    assert loss == pytest.approx(task_loss(model, "shipped_task", tiny_tokenizer, tiny_task_examples[task]), rel=2e-2)
