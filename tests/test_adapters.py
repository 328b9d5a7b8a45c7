"""Per-task private low-rank corrections of the target's first layer (``adapter_rank``, #15):
stored in each task's embedding row, added to the generated weights everywhere they are used,
counted, sized by ``--compression`` and frozen with their task."""

from __future__ import annotations

import copy

import pytest
import torch

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.hypernet import HypernetConfig, HyperNetwork, adapter_site, adapter_sites
from hnet_serve.model import HNetModel
from hnet_serve.storage import stored_params
from hnet_serve.targets import MLPConfig
from hnet_serve.training.methods.hnet import PLAIN_ADAPTERS
from hnet_serve.training.regularizer import make_snapshot, output_regularizer
from tests.conftest import (
    tiny_adapter_model,
    tiny_mlp_model,
    tiny_resnet_model,
    tiny_trunk_model,
)


def test_site_is_the_first_weight_tensor():
    assert adapter_site([(5,), (7, 3), (7,), (2, 7)]) == (5, 7, 3)
    resnet = tiny_resnet_model(1).target
    offset, out, fan_in = adapter_site(list(resnet.param_shapes.values()))
    first = next(s for s in resnet.param_shapes.values() if len(s) >= 2)
    assert (out, fan_in) == (first[0], first[1] * first[2] * first[3]) and offset == 0
    with pytest.raises(InputError, match="weight matrices"):
        adapter_site([(4,), (3,)])
    with pytest.raises(InputError, match="adapter_layers=3"):
        adapter_sites([(5, 2), (5,), (2, 5)], 3)
    assert adapter_sites([(5, 2), (5,), (2, 5)], 2) == [(0, 5, 2), (15, 2, 5)]
    with pytest.raises(InputError, match="param_shapes"):
        HyperNetwork(HypernetConfig(adapter_rank=2), 100)


def test_a_fresh_task_starts_from_the_generated_weights():
    model = tiny_mlp_model(3, adapter_rank=4)  # input 12, first layer 16
    hn = model.hypernet
    assert hn.adapter_dim == 4 * (16 + 12)
    assert hn.emb_dim == hn.config.task_emb_dim + hn.adapter_dim
    for row in hn.task_embs:
        u = row[hn.code_dim : hn.code_dim + 16 * 4]
        v = row[hn.code_dim + 16 * 4 :]
        assert torch.count_nonzero(u) == 0 and torch.count_nonzero(v) == v.numel()
    with torch.no_grad():
        plain = hn.project(hn.features(hn.embeddings()))
        torch.testing.assert_close(hn.generate(), plain, rtol=0, atol=0)
    # the embedding part is drawn first, as before adapters existed (training seeds a
    # generator per task, so every task's e is what it was without adapters)
    old = tiny_mlp_model(1)
    torch.testing.assert_close(hn.task_embs[0][: hn.code_dim], old.hypernet.task_embs[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_the_correction_is_u_v_on_the_first_layers_of_its_own_task_only(layers):
    model = tiny_adapter_model(3, layers=layers)
    hn = model.hypernet
    with torch.no_grad():
        flat = hn.generate()
        plain = hn.project(hn.features(hn.embeddings()))
    sites = hn._adapters
    assert [(o, i) for _, o, i in sites] == [(16, 12), (8, 16)][:layers]  # the MLP's layers
    r = hn.config.adapter_rank
    assert hn.adapter_dim == sum(r * (o + i) for _, o, i in sites)
    for k, row in enumerate(hn.task_embs):
        delta = (flat[k] - plain[k]).detach()
        c, covered = hn.code_dim, torch.zeros_like(delta, dtype=torch.bool)
        for offset, out, fan_in in sites:
            u = row[c : c + out * r].reshape(out, r)
            v = row[c + out * r : c + r * (out + fan_in)].reshape(r, fan_in)
            c += r * (out + fan_in)
            torch.testing.assert_close(delta[offset : offset + out * fan_in],
                                       (u @ v).reshape(-1).detach())
            covered[offset : offset + out * fan_in] = True
        assert torch.count_nonzero(delta[~covered]) == 0  # biases and later layers untouched
    offset, out, fan_in = sites[0]
    # the target's first layer is what moves: logits follow the generated weights
    w = model.target.unflatten(flat[0].detach())
    first = next(iter(w.values()))
    assert first.shape == (out, fan_in)


@pytest.mark.parametrize("method", ["gram", "explicit"])
@pytest.mark.parametrize("mode", ["add", "replace"])
def test_regularizer_is_exact_and_zero_at_the_snapshot(method, mode):
    model = tiny_adapter_model(4) if mode == "add" else tiny_trunk_model(4, basis="private")
    hn = model.hypernet
    frozen = copy.deepcopy(hn)
    old = [0, 1, 2]
    snap = make_snapshot(hn, old)
    assert output_regularizer(hn, snap, method=method).item() == 0.0
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in hn.shared_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with torch.no_grad():
        ref = (hn.generate(old) - frozen.generate(old)).pow(2).sum(1).mean()
    value = output_regularizer(hn, snap, method=method)
    assert value.item() == pytest.approx(ref.item(), rel=1e-4)


def test_stored_count_and_derived_sizes_include_the_corrections():
    from hnet_serve.training.config import build_config
    from hnet_serve.training.methods.hnet import hypernet_config_for

    target = MLPConfig(input_shape=(784,), hidden=[300, 300], num_classes=10)
    for rank, tasks in [(0, 10), (8, 10), (16, 10), (2, 30)]:
        cfg = build_config(benchmark="permuted-mnist",
                           hypernet={"adapter_rank": rank, **PLAIN_ADAPTERS})
        hcfg = hypernet_config_for(cfg, target, tasks)
        assert hcfg.adapter_rank == rank
        assert "adapter_rank" in hcfg.model_dump()  # saved, so add-task keeps it
        model = HNetModel(target, hcfg, seed=0)
        for i in range(tasks):
            model.add_task(f"t{i}")
        s = stored_params(model)
        assert s.task_embeddings == tasks * (hcfg.task_emb_dim + rank * (300 + 784))
        assert 0.97 < s.ratio <= 1.0, (rank, tasks, s.ratio)  # the budget is used, not exceeded


def test_old_embeddings_cannot_be_trained_with_corrections():
    from hnet_serve.training.methods.hnet import HNetMethod
    from tests.test_training import tiny_config

    cfg = tiny_config(iterations=1, train_old_embeddings=True)
    with pytest.raises(ConfigError, match="adapter_rank"):
        HNetMethod(tiny_adapter_model(2), cfg)


def test_training_freezes_old_corrections_and_keeps_old_answers():
    """Two tasks trained with corrections: task 0's row is bit-identical after task 1, and
    its answers barely move (the output regularizer holds the generated part)."""
    from hnet_serve.training.loop import run_tasks
    from hnet_serve.training.methods.registry import make_method
    from tests.test_training import make_task, tiny_config

    tasks = [make_task("a", 0), make_task("b", 1)]
    cfg = tiny_config(iterations=40, beta=1.0, hypernet={"kind": "chunked", "hidden": [8],
                                                          "chunk_size": 64, "adapter_rank": 2})
    method = make_method(cfg, tasks[:1])
    run_tasks(method, tasks[:1], cfg, progress=False)
    hn = method.model.hypernet
    row0 = hn.task_embs[0].detach().clone()
    assert torch.count_nonzero(row0[hn.code_dim : hn.code_dim + hn._adapters[0][1] * 2]) > 0  # U
    x = torch.from_numpy(tasks[0].x_test)
    before = method.model.logits("a", x)
    run_tasks(method, tasks[1:], cfg, progress=False)
    torch.testing.assert_close(hn.task_embs[0].detach(), row0, rtol=0, atol=0)
    after = method.model.logits("a", x)
    assert (after.argmax(1) == before.argmax(1)).float().mean() > 0.9


def test_auto_rank_takes_its_share_of_the_budget():
    from hnet_serve.training.config import build_config
    from hnet_serve.training.methods.hnet import (
        ADAPTER_MAX_RANK,
        ADAPTER_MIN_RANK,
        ADAPTER_SHARE,
        hypernet_config_for,
    )

    target = MLPConfig(input_shape=(784,), hidden=[300, 300], num_classes=10)
    n = 328_810
    for tasks, compression in [(10, 1.0), (10, 0.5), (100, 1.0), (1, 1.0)]:
        cfg = build_config(benchmark="permuted-mnist",
                           hypernet={"adapter_rank": "auto", **PLAIN_ADAPTERS},
                           compression=compression)
        hcfg = hypernet_config_for(cfg, target, tasks)
        rank = hcfg.adapter_rank
        assert isinstance(rank, int) and 0 <= rank <= ADAPTER_MAX_RANK
        share = tasks * rank * (300 + 784) / (compression * n)
        assert share <= ADAPTER_SHARE  # never more than its share ...
        if ADAPTER_MIN_RANK <= rank < ADAPTER_MAX_RANK:  # ... and one more would exceed it
            assert tasks * (rank + 1) * (300 + 784) / (compression * n) > ADAPTER_SHARE
        if rank == 0:  # too low a rank to be worth its numbers: the hypernetwork gets them
            assert tasks * ADAPTER_MIN_RANK * (300 + 784) / (compression * n) > ADAPTER_SHARE
        assert rank == {(10, 1.0): 15, (10, 0.5): 0, (100, 1.0): 0, (1, 1.0): 64}[
            (tasks, compression)]
        model = HNetModel(target, hcfg, seed=0)
        for i in range(tasks):
            model.add_task(f"t{i}")
        assert stored_params(model).ratio <= compression
    # corrections on two layers share the same half of the budget: rank 9 = 0.5 x 328,810 /
    # (10 x (300 + 784 + 300 + 300))
    cfg = build_config(benchmark="permuted-mnist",
                       hypernet={"adapter_rank": "auto", "adapter_layers": 2, **PLAIN_ADAPTERS})
    two = hypernet_config_for(cfg, target, 10)
    assert two.adapter_rank == 9
    model = HNetModel(target, two, seed=0)
    for i in range(10):
        model.add_task(f"t{i}")
    assert model.hypernet.adapter_dim == 9 * (300 + 784 + 300 + 300)
    assert stored_params(model).ratio <= 1.0
    # no budget, no derivation: none
    cfg = build_config(benchmark="permuted-mnist",
                       hypernet={"adapter_rank": "auto", **PLAIN_ADAPTERS})
    cfg = cfg.model_copy(update={"compression": None})  # (a None flag is "not given")
    assert hypernet_config_for(cfg, target, 10).adapter_rank == 0
    # explicit sizes: nothing is derived, so no corrections either
    cfg = build_config(benchmark="permuted-mnist", hypernet={"chunk_size": 5000})
    assert cfg.hypernet.adapter_rank == "auto"  # the preset's
    assert hypernet_config_for(cfg, target, 10).adapter_rank == 0
    with pytest.raises(InputError, match="auto"):
        HyperNetwork(HypernetConfig(adapter_rank="auto"), 100, [(10, 10)])


@pytest.mark.parametrize("basis", ["shared", "private"])
def test_replace_mode_the_first_layer_is_u_v_and_the_generator_covers_the_rest(basis):
    model = tiny_trunk_model(3, basis=basis)
    hn = model.hypernet
    n, first = hn.n_params, 16 * 12
    assert hn.n_generated == n - first and hn.num_chunks == -(-(n - first) // 30)
    shared = basis == "shared"
    assert hn.adapter_dim == 2 * (12 + (0 if shared else 16))
    assert (hn.adapter_u is not None) == shared
    if shared:  # U is a shared weight: trained, saved and counted with the generator
        assert any(p is hn.adapter_u[0] for p in hn.shared_parameters())
        assert stored_params(model).shared == hn.n_shared
        assert hn.n_shared == sum(p.numel() for p in hn.parameters()) - 3 * hn.emb_dim
    with torch.no_grad():
        flat = hn.generate()
        gen = hn.project(hn.features(hn.embeddings()))
    assert flat.shape == (3, n) and gen.shape == (3, n - first)
    torch.testing.assert_close(flat[:, first:], gen, rtol=0, atol=0)  # the rest: generated
    for k, row in enumerate(hn.task_embs):
        c = hn.code_dim
        u = hn.adapter_u[0] if shared else row[c : c + 32].reshape(16, 2)
        v = row[c + (0 if shared else 32):].reshape(2, 12)
        torch.testing.assert_close(flat[k, :first], (u @ v).reshape(-1).detach())
        # a fresh layer: U V has the scale of a 1/sqrt(fan_in) initialization, not zero
        assert 0.1 < float(flat[k, :first].std() * 12**0.5) < 3
    assert next(iter(model.target.unflatten(flat[1]).values())).shape == (16, 12)


def test_add_mode_with_a_shared_basis_starts_from_the_generated_weights():
    model = tiny_trunk_model(2, mode="add")
    hn = model.hypernet
    assert hn.n_generated == hn.n_params
    with torch.no_grad():
        torch.testing.assert_close(hn.generate(), hn.project(hn.features(hn.embeddings())),
                                   rtol=0, atol=0)  # V = 0: U V = 0


def test_factor_options_are_validated():
    with pytest.raises(ValueError, match="freeze"):
        HypernetConfig(adapter_rank=2, adapter_basis="shared")
    with pytest.raises(ValueError, match="flat"):
        HypernetConfig(adapter_rank=2, adapter_mode="replace", layout="columns")
    with pytest.raises(InputError, match="nothing to generate"):  # a one-tensor target
        HyperNetwork(HypernetConfig(adapter_rank=2, adapter_mode="replace"), 12, [(3, 4)])
    old = HypernetConfig()  # older checkpoints: what they meant is the default
    assert (old.adapter_mode, old.adapter_basis, old.freeze) == ("add", "private", "never")


def test_a_checkpoint_with_a_shared_basis_round_trips(tmp_path):
    from hnet_serve.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_trunk_model(3)
    with torch.no_grad():
        model.hypernet.adapter_u[0].mul_(1.5)  # as after training: not its initial value
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.hypernet.generate(), model.hypernet.generate(),
                               rtol=0, atol=0)
    assert loaded.hypernet_config.freeze == "after-first-task"


def test_frozen_after_the_first_task_later_tasks_move_nothing_else():
    """freeze after-first-task: task 0 trains the generator (and the shared U); tasks 1 and 2
    train only their own rows, starting from task 0's embedding with fresh factors; every old
    answer is bit-identical afterwards, and no regularizer runs."""
    from hnet_serve.training.loop import run_tasks
    from hnet_serve.training.methods.registry import make_method
    from tests.test_training import make_task, tiny_config

    tasks = [make_task(name, i) for i, name in enumerate("abc")]
    cfg = tiny_config(iterations=30, hypernet={
        "kind": "chunked", "hidden": [8], "chunk_size": 64, "adapter_rank": 2,
        "adapter_mode": "replace", "adapter_basis": "shared", "freeze": "after-first-task"})
    method = make_method(cfg, tasks[:1])
    hn = method.model.hypernet
    init = {n: p.detach().clone() for n, p in hn.named_parameters() if "task_embs" not in n}
    run_tasks(method, tasks[:1], cfg, progress=False)
    after_first = {n: p.detach().clone() for n, p in hn.named_parameters()
                   if "task_embs" not in n}
    assert any(not torch.equal(init[n], after_first[n]) for n in init)  # task 0 trained them
    assert not torch.equal(init["adapter_u.0"], after_first["adapter_u.0"])
    x = torch.from_numpy(tasks[0].x_test)
    before = method.model.logits("a", x)
    row0 = hn.task_embs[0].detach().clone()
    run_tasks(method, tasks[1:], cfg, progress=False)
    assert method.snapshot is None
    for n, p in hn.named_parameters():
        if "task_embs" not in n:
            torch.testing.assert_close(p.detach(), after_first[n], rtol=0, atol=0)
            assert p.requires_grad  # restored for a later add-task
    torch.testing.assert_close(hn.task_embs[0].detach(), row0, rtol=0, atol=0)
    torch.testing.assert_close(method.model.logits("a", x), before, rtol=0, atol=0)
    for k in (1, 2):  # each learned its own row: embedding moved away from task 0's start
        assert not torch.equal(hn.task_embs[k].detach(), row0)


def test_replace_auto_rank_leaves_the_generator_one_task_at_full_rank():
    import warnings

    from hnet_serve.targets import build_target
    from hnet_serve.training.config import build_config
    from hnet_serve.training.methods.hnet import ADAPTER_MIN_RANK, _derive, hypernet_config_for

    trunk = {"adapter_rank": "auto", "adapter_mode": "replace", "adapter_basis": "shared",
             "freeze": "after-first-task"}
    target = MLPConfig(input_shape=(784,), hidden=[100, 100], num_classes=10)
    for tasks, want in [(10, 9), (5, 18)]:
        cfg = build_config(benchmark="permuted-mnist", hypernet=trunk, planned_tasks=tasks)
        hcfg = hypernet_config_for(cfg, target, tasks)
        assert (hcfg.adapter_rank, hcfg.adapter_mode) == (want, "replace")
        model = HNetModel(target, hcfg, seed=0)
        for i in range(tasks):
            model.add_task(f"t{i}")
        hn = model.hypernet
        assert hn.n_generated == 89_610 - 78_400
        assert hn.num_chunks <= hn.config.hidden[-1] + 1  # one task at full rank
        assert hn.adapter_dim == want * 784
        s = stored_params(model)
        assert 0.99 < s.ratio <= 1.0
        # one more rank would not leave the generator that room within the budget
        with torch.device("meta"):
            net = build_target(target)
        try:
            chunk = _derive(cfg, hcfg, net, tasks, want + 1).chunk_size
        except InputError:
            chunk = 0
        assert chunk == 0 or -(-hn.n_generated // chunk) > hn.config.hidden[-1] + 1
    # 100 tasks: no rank >= 8 fits 1.0x of this target, so the generated layer stays (told)
    cfg = build_config(benchmark="permuted-mnist", hypernet=trunk, planned_tasks=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hcfg = hypernet_config_for(cfg, target, 100)
    assert any(f"rank >= {ADAPTER_MIN_RANK}" in str(w.message) for w in caught)
    assert (hcfg.adapter_mode, hcfg.adapter_basis, hcfg.freeze) == ("add", "private", "never")


def test_replace_with_rank_zero_is_the_plain_generator():
    from hnet_serve.training.config import build_config
    from hnet_serve.training.methods.hnet import hypernet_config_for

    target = MLPConfig(input_shape=(784,), hidden=[100, 100], num_classes=10)
    cfg = build_config(benchmark="permuted-mnist", hypernet={"adapter_rank": 0})
    assert cfg.hypernet.adapter_mode == "replace"  # the preset's
    hcfg = hypernet_config_for(cfg, target, 10)
    assert (hcfg.adapter_rank, hcfg.adapter_mode, hcfg.freeze) == (0, "add", "never")
