"""Foundation: targets, hypernetworks, the registry and their parameter contract."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from hnet_serve.errors import InputError, TaskExistsError, UnknownTaskError
from hnet_serve.hypernet import HypernetConfig, HyperNetwork
from hnet_serve.model import HNetModel
from hnet_serve.registry import TaskRegistry, validate_task_name
from hnet_serve.storage import stored_params
from hnet_serve.targets import MLPConfig, MLPTarget, ResNetConfig, ResNetTarget
from tests.conftest import tiny_columns_model, tiny_mlp_model, tiny_resnet_model


# -- parameter counts against hand computation -------------------------------------------
@pytest.mark.parametrize(
    ("inp", "hidden", "classes", "heads", "expected"),
    [
        (784, [100, 100], 10, 1, 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10),  # 89,610
        (784, [400, 400], 10, 1, 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10),
        (784, [1000, 1000], 10, 1, 1_796_010),
        (784, [100, 100], 2, 5, 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10),  # 5 heads of 2
        (20, [], 3, 1, 20 * 3 + 3),
    ],
)
def test_mlp_param_count(inp, hidden, classes, heads, expected):
    net = MLPTarget(MLPConfig(input_shape=(inp,), hidden=hidden, num_classes=classes, num_heads=heads))
    assert net.n_params == expected
    assert sum(p.numel() for p in net.parameters()) == expected
    assert next(iter(net.param_shapes)) == "layers.0.weight"
    assert net.buffer_shapes == {}


def test_resnet32_param_count():
    net = ResNetTarget(ResNetConfig(num_classes=10))
    assert net.config.depth == 32
    # conv1 + bn1; stage 1: 10 convs 16->16; stage 2: 16->32 then 9 x 32->32; stage 3 likewise
    # with 64; each conv followed by a BN (2 * channels); fc 64 -> 10.
    convs = 3 * 16 * 9 + 10 * 16 * 16 * 9 + (16 * 32 * 9 + 9 * 32 * 32 * 9) + (32 * 64 * 9 + 9 * 64 * 64 * 9)
    bns = 2 * (16 + 10 * 16 + 10 * 32 + 10 * 64)
    assert net.n_params == convs + bns + 64 * 10 + 10 == 464_154
    # Running statistics are per-task buffers, not generated parameters: 31 BN layers x 2.
    assert len(net.buffer_shapes) == 62
    assert all(n.endswith(("running_mean", "running_var")) for n in net.buffer_shapes)


@pytest.mark.parametrize("kind", ["full", "chunked"])
def test_generated_shapes_match_target_map(kind):
    model = tiny_mlp_model(kind=kind)
    flat = model.generate(model.task_names)
    assert flat.shape == (3, model.target.n_params)
    parts = model.target.unflatten(flat[1])
    assert list(parts) == list(model.target.param_shapes)
    assert all(tuple(parts[n].shape) == s for n, s in model.target.param_shapes.items())


def test_unflatten_rejects_wrong_length(mlp_model):
    with pytest.raises(InputError, match="flat weight vector"):
        mlp_model.target.unflatten(torch.zeros(mlp_model.target.n_params + 1))


def test_chunked_truncates_last_chunk():
    model = tiny_mlp_model(chunk_size=50)
    hn = model.hypernet
    assert hn.num_chunks == -(-model.target.n_params // 50)
    assert hn.num_chunks * 50 > model.target.n_params  # the last chunk really is truncated


@pytest.mark.parametrize("kind", ["full", "chunked"])
def test_compression_ratio(kind):
    model = tiny_mlp_model(kind=kind)
    hn = model.hypernet
    cfg = hn.config
    d0, d1 = cfg.hidden
    out = hn.chunk_size
    expected = (cfg.task_emb_dim * d0 + d0) + d0 * d1 + d1 + d1 * out + out
    if kind == "chunked":
        expected += cfg.chunk_emb_dim * d0 + hn.num_chunks * cfg.chunk_emb_dim
    assert hn.n_shared == expected
    assert hn.compression_ratio() == pytest.approx(expected / model.target.n_params)


def test_paper_pmnist_hypernet_sizes():
    target = MLPTarget(MLPConfig(input_shape=(784,), hidden=[1000, 1000], num_classes=10))
    hn = HyperNetwork(HypernetConfig(chunk_size=78_000, hidden=[25, 25]), target.n_params)
    assert hn.num_chunks == 24
    # [24 + 8] -> 25 -> 25 -> 78000, plus 24 chunk embeddings of size 8.
    assert hn.n_shared == 32 * 25 + 25 + 25 * 25 + 25 + 25 * 78_000 + 78_000 + 24 * 8


# -- batched generation and the growing table -------------------------------------------
@pytest.mark.parametrize("kind", ["full", "chunked"])
def test_batched_generation_equals_single(kind):
    model = tiny_mlp_model(n_tasks=5, kind=kind)
    with torch.no_grad():
        batched = model.generate(model.task_names)
        for k, name in enumerate(model.task_names):
            single = model.generate([name])[0]
            torch.testing.assert_close(batched[k], single, rtol=1e-5, atol=1e-6)
    # Different tasks really get different weights.
    assert not torch.allclose(batched[0], batched[1])


def test_growing_table_keeps_old_outputs_bit_identical():
    model = tiny_mlp_model(n_tasks=3)
    with torch.no_grad():
        before = model.generate(model.task_names).clone()
        shared_before = [p.clone() for p in model.hypernet.shared_parameters()]
        for i in range(4):
            model.add_task(f"new-{i}")
        after = model.generate(model.task_names[:3])
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(shared_before, model.hypernet.shared_parameters()))
    assert model.hypernet.num_tasks == 7 == len(model.registry)


def test_initialization_follows_the_paper():
    model = tiny_mlp_model(kind="chunked")
    hn = model.hypernet
    for layer in [hn.in_task, *hn.hidden, hn.head]:
        assert torch.count_nonzero(layer.bias) == 0
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound + 1e-6
    big = HyperNetwork(HypernetConfig(task_emb_dim=512), 100)
    big.add_task()
    assert abs(float(big.task_embs[0].std()) - 1.0) < 0.15


def test_embedding_shape_is_checked():
    hn = HyperNetwork(HypernetConfig(task_emb_dim=4), 10)
    with pytest.raises(InputError, match=r"\(4,\)"):
        hn.add_task(torch.zeros(5))
    with pytest.raises(InputError):
        hn(torch.zeros(2, 3))


# -- targets run with generated weights -------------------------------------------------
def test_mlp_apply_matches_manual_forward(mlp_model):
    x = torch.rand(7, 12)
    flat = mlp_model.generate(["task-1"])[0].detach()
    p = mlp_model.target.unflatten(flat)
    h = torch.relu(x @ p["layers.0.weight"].T + p["layers.0.bias"])
    h = torch.relu(h @ p["layers.1.weight"].T + p["layers.1.bias"])
    expected = h @ p["layers.2.weight"].T + p["layers.2.bias"]
    torch.testing.assert_close(mlp_model.logits("task-1", x), expected)


def test_mlp_forward_stacked_matches_per_task(mlp_model):
    x = torch.rand(3, 5, 12)  # (K, B, in)
    with torch.no_grad():
        flat = mlp_model.generate(mlp_model.task_names)
        stacked = mlp_model.target.forward_stacked(flat, x)
    for k, name in enumerate(mlp_model.task_names):
        torch.testing.assert_close(stacked[k], mlp_model.logits(name, x[k]), rtol=1e-5, atol=1e-6)


def test_mlp_serving_layout_is_the_transposed_weights(mlp_model):
    """to_serving_layout keeps the numbers, with each matrix stored (in, out); forward_stacked
    reads it (K tasks and one) to the same logits as the generated layout."""
    target = mlp_model.target
    x = torch.rand(3, 5, 12)
    with torch.no_grad():
        flat = mlp_model.generate(mlp_model.task_names)  # (3, n_params)
        served = target.to_serving_layout(flat)
        assert served.shape == flat.shape and served.is_contiguous()
        assert torch.equal(served.sort(-1).values, flat.sort(-1).values)  # same numbers
        p = target.unflatten(flat[1])
        w0 = p["layers.0.weight"]  # (out, in)
        torch.testing.assert_close(served[1, : w0.numel()].view(w0.shape[1], w0.shape[0]), w0.T)
        torch.testing.assert_close(target.to_serving_layout(flat[1]), served[1])
        want = target.forward_stacked(flat, x)
        torch.testing.assert_close(target.forward_stacked(served, x, transposed=True), want)
        one = target.forward_stacked(served[2:], x[2:], transposed=True)
        torch.testing.assert_close(one[0], want[2], rtol=1e-5, atol=1e-6)


def test_multi_head_selects_the_task_head():
    model = HNetModel(
        MLPConfig(input_shape=(6,), hidden=[5], num_classes=2, num_heads=3),
        HypernetConfig(kind="full", hidden=[4], task_emb_dim=3),
        seed=0,
    )
    model.add_task("a", head=0)
    model.add_task("b", head=2)
    x = torch.rand(4, 6)
    flat = model.generate(["b"])[0].detach()
    full = model.target.apply_weights(flat, x, head=0)  # num_heads>1: narrow to head 0
    all_heads = torch.func.functional_call(
        model.target, model.target.unflatten(flat), (x,), {"head": 2}
    )
    assert model.logits("b", x).shape == (4, 2)
    torch.testing.assert_close(model.logits("b", x), all_heads)
    assert not torch.allclose(full, all_heads)
    with pytest.raises(InputError, match="head"):
        model.add_task("c", head=3)


def test_resnet_uses_per_task_batchnorm_statistics(resnet_model):
    x = torch.rand(3, 3, 8, 8)
    flat = resnet_model.generate(["img-0"])[0].detach()
    out_own = resnet_model.target.apply_weights(flat, x, resnet_model.task_buffers["img-0"])
    out_other = resnet_model.target.apply_weights(flat, x, resnet_model.task_buffers["img-1"])
    assert out_own.shape == (3, 4)
    assert not torch.allclose(out_own, out_other)  # statistics matter and are per task
    with pytest.raises(InputError, match="buffers"):
        resnet_model.target.apply_weights(flat, x)


def test_resnet_training_mode_updates_only_that_tasks_statistics(resnet_model):
    target = resnet_model.target
    flat = resnet_model.generate(["img-0"])[0].detach()
    other_before = {k: v.clone() for k, v in resnet_model.task_buffers["img-1"].items()}
    own_before = {k: v.clone() for k, v in resnet_model.task_buffers["img-0"].items()}
    target.train()
    try:
        target.apply_weights(flat, torch.rand(8, 3, 8, 8), resnet_model.task_buffers["img-0"])
    finally:
        target.eval()
    assert all(torch.equal(v, resnet_model.task_buffers["img-1"][k]) for k, v in other_before.items())
    assert any(not torch.equal(v, resnet_model.task_buffers["img-0"][k]) for k, v in own_before.items())


def test_normalization_is_part_of_the_model():
    cfg = MLPConfig(input_shape=(4,), hidden=[], num_classes=2, input_mean=[0.5], input_std=[0.25])
    model = HNetModel(cfg, HypernetConfig(kind="full", hidden=[3], task_emb_dim=2), seed=0)
    model.add_task("t")
    x = torch.rand(3, 4)
    p = model.target.unflatten(model.generate(["t"])[0].detach())
    expected = ((x - 0.5) / 0.25) @ p["layers.0.weight"].T + p["layers.0.bias"]
    torch.testing.assert_close(model.logits("t", x), expected)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_classes", 0, "num_classes"),
        ("hidden", [10, -1], "hidden"),
        ("input_std", [0.0], "input_std"),
        ("input_shape", (0,), "input_shape"),
        ("activation", "swish", "activation"),
    ],
)
def test_target_config_errors_name_the_field(field, value, match):
    kwargs = {"input_shape": (4,), "num_classes": 2, field: value}
    with pytest.raises(ValidationError, match=match):
        MLPConfig(**kwargs)


def test_hypernet_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="chunk_size"):
        HypernetConfig(chunk_size=0)
    with pytest.raises(ValidationError, match="kind"):
        HypernetConfig(kind="deconv")


# -- registry -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "task-1", "split_mnist.0", "A" * 64, "0"])
def test_valid_task_names(name):
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A" * 65, "../etc", "a/b", "a b", "é", ".", "..", None, 3, "name\n"]
)
def test_invalid_task_names(name):
    with pytest.raises(InputError, match="invalid task name"):
        validate_task_name(name)


def test_registry_add_get_and_errors():
    reg = TaskRegistry()
    t = reg.add("first", input_shape=(4,), num_classes=2, label_names=["no", "yes"])
    reg.add("second", input_shape=(4,), num_classes=3)
    assert reg.index_of("second") == 1 and t.index == 0
    assert reg.names == ["first", "second"] and "first" in reg and len(reg) == 2
    with pytest.raises(TaskExistsError, match="first"):
        reg.add("first", input_shape=(4,), num_classes=2)
    with pytest.raises(UnknownTaskError, match="'third'.*first, second"):
        reg.get("third")
    with pytest.raises(InputError):
        reg.add("bad name", input_shape=(4,), num_classes=2)
    with pytest.raises(ValidationError, match="label names"):
        reg.add("labels", input_shape=(4,), num_classes=3, label_names=["a"])
    again = TaskRegistry.from_list(reg.to_list())
    assert again.to_list() == reg.to_list()


def test_model_add_task_rejects_duplicates_and_keeps_table_aligned(mlp_model):
    with pytest.raises(TaskExistsError):
        mlp_model.add_task("task-0")
    with pytest.raises(InputError):
        mlp_model.add_task("ok-name", embedding=torch.zeros(99))
    assert len(mlp_model.registry) == mlp_model.hypernet.num_tasks == 3
    with pytest.raises(InputError, match="classes"):
        mlp_model.add_task("too-many", num_classes=99)


def test_unknown_task_generation(mlp_model):
    with pytest.raises(UnknownTaskError, match="nope"):
        mlp_model.generate(["nope"])


def test_tiny_resnet_model_builds():
    assert tiny_resnet_model(n_tasks=3).task_names == ["img-0", "img-1", "img-2"]


@pytest.mark.parametrize("use_bias", [True, False])
def test_mlp_forward_one_matches_the_module(use_bias):
    """The serving fast path equals functional_call on the module, in both weight layouts, for
    multi-head targets with input normalization, with and without biases."""
    model = HNetModel(
        MLPConfig(input_shape=(2, 3), hidden=[5, 4], num_classes=3, num_heads=2,
                  use_bias=use_bias, input_mean=[0.5, -0.2], input_std=[2.0, 0.5]),
        HypernetConfig(kind="chunked", hidden=[6], chunk_size=17, task_emb_dim=3,
                       chunk_emb_dim=2),
        seed=0,
    )
    model.add_task("a")
    target = model.target
    x = torch.randn(7, 2, 3)
    with torch.no_grad():
        flat = model.generate(["a"])[0]
        for head in (0, 1):
            want = target.apply_weights(flat, x, head=head)
            torch.testing.assert_close(target.forward_one(flat, x, head=head), want)
            served = target.to_serving_layout(flat)
            torch.testing.assert_close(target.forward_one(served, x, head=head, transposed=True),
                                       want)


# -- column layout and task-conditioned chunk embeddings --------------------------------------
@pytest.mark.parametrize("factory", [tiny_columns_model,
                                     lambda: tiny_resnet_model(layout="columns")])
def test_columns_layout_places_every_column(factory):
    """Chunk j of a weight (out, in, *k) is its column W[:, j] from the tensor's own output
    layer, scaled by 1/sqrt(in * prod(k)); a bias is one chunk scaled like its weight."""
    model = factory()
    hn = model.hypernet
    shapes = list(model.target.param_shapes.values())
    assert hn.num_chunks == sum(s[1] if len(s) >= 2 else 1 for s in shapes)
    assert hn.head is None and len(hn.heads) == len(shapes)
    with torch.no_grad():
        emb = hn.embeddings()  # (K, E)
        feats = hn.features(emb)[1]  # (C, d) task 1
        params = model.target.unflatten(hn(emb)[1])  # task 1's tensors
    chunk, scale = 0, 1.0
    for layer, (name, shape) in zip(hn.heads, model.target.param_shapes.items()):
        w = params[name]
        if len(shape) >= 2:
            scale = 1 / math.sqrt(math.prod(shape[1:]))
            for j in range(shape[1]):
                torch.testing.assert_close(w[:, j].reshape(-1), scale * layer(feats[chunk]))
                chunk += 1
        else:
            torch.testing.assert_close(w, scale * layer(feats[chunk]))
            chunk += 1
    assert chunk == hn.num_chunks


@pytest.mark.parametrize("factory", [tiny_columns_model,
                                     lambda: tiny_mlp_model(5, task_chunk_emb_dim=3)])
def test_task_chunk_codes_batched_equals_single(factory):
    model = factory()
    hn = model.hypernet
    cfg = hn.config
    assert hn.emb_dim == cfg.task_emb_dim + hn.num_chunks * cfg.task_chunk_emb_dim
    assert hn.task_embs[0].shape == (hn.emb_dim,)
    with torch.no_grad():
        batched = model.generate(model.task_names)
        for k, name in enumerate(model.task_names):
            torch.testing.assert_close(batched[k], model.generate([name])[0], rtol=1e-5, atol=1e-6)
        # a task's per-chunk codes are its own: changing task 0's codes moves only task 0
        hn.task_embs[0][cfg.task_emb_dim:].add_(1.0)
        after = model.generate(model.task_names)
    assert not torch.allclose(after[0], batched[0])
    torch.testing.assert_close(after[1:], batched[1:], rtol=0, atol=0)


@pytest.mark.parametrize("factory", [tiny_mlp_model, tiny_columns_model, tiny_resnet_model])
def test_stored_params_count_every_stored_tensor(factory):
    model = factory()
    hn = model.hypernet
    shared = sum(p.numel() for p in hn.shared_parameters())
    embs = sum(p.numel() for p in hn.task_embs)
    buffers = sum(b.numel() for t in model.task_buffers.values() for b in t.values())
    stored = stored_params(model)  # what the checkpoint writes (tests/test_storage.py)
    assert stored.total - stored.normalization == shared + embs + buffers == hn.n_stored + buffers
    assert hn.n_stored == hn.n_shared + hn.num_tasks * hn.emb_dim
    if factory is tiny_resnet_model:
        assert buffers > 0  # per-task batch-norm statistics are stored, so counted


def test_default_config_keeps_the_old_parameter_names():
    """Checkpoints written before the new options load: same tensors, same names."""
    hn = tiny_mlp_model().hypernet
    assert sorted(n for n, _ in hn.named_parameters() if not n.startswith("task_embs")) == [
        "chunk_embs", "head.bias", "head.weight", "hidden.0.bias", "hidden.0.weight",
        "in_chunk.weight", "in_task.bias", "in_task.weight"]
    assert hn.emb_dim == hn.config.task_emb_dim


def test_new_options_need_a_chunked_hypernet():
    with pytest.raises(ValidationError, match="kind='chunked'"):
        HypernetConfig(kind="full", layout="columns")
    with pytest.raises(ValidationError, match="kind='chunked'"):
        HypernetConfig(kind="full", task_chunk_emb_dim=2)
    with pytest.raises(InputError, match="param_shapes"):
        HyperNetwork(HypernetConfig(layout="columns"), 100)


# -- sizes from a storage ratio ------------------------------------------------------------
@pytest.mark.parametrize("n,tasks,ratio,hidden", [
    (89_610, 10, 1.0, (50, 50)),
    (89_610, 10, 0.5, (50, 50)),
    (328_810, 100, 1.0, (60, 60)),
    (371, 3, 3.0, (10, 10)),
])
def test_derive_hypernet_stays_within_the_ratio_and_uses_it(n, tasks, ratio, hidden):
    from hnet_serve.sizing import derive_hypernet

    cfg = derive_hypernet(n, tasks, ratio, hidden=hidden)
    hn = HyperNetwork(cfg, n)
    for _ in range(tasks):
        hn.add_task()
    assert hn.n_stored <= ratio * n  # everything stored, every task embedding included
    # one more row per chunk would not fit: the budget is used
    bigger = HyperNetwork(cfg.model_copy(update={"chunk_size": cfg.chunk_size + 1}), n)
    if cfg.chunk_size < n:
        assert bigger.n_shared + tasks * cfg.task_emb_dim > ratio * n


def test_derive_hypernet_refuses_an_impossible_ratio():
    from hnet_serve.sizing import derive_hypernet

    with pytest.raises(InputError, match="cannot be stored"):
        derive_hypernet(1_000, 10, 0.5)
