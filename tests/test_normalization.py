"""Per-task input normalization: fitted per task, stored per task, applied inside the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hnet_serve.checkpoint import load_checkpoint, save_checkpoint
from hnet_serve.errors import InputError
from hnet_serve.normalization import fit_norm, norm_shape, resolve_mode
from hnet_serve.serving import Runtime
from hnet_serve.serving.backends import Group, run_generated
from hnet_serve.storage import stored_params
from tests.conftest import normed_mlp_model, scaled_inputs


@pytest.mark.parametrize(("mode", "shape", "want"), [
    ("auto", (6,), ("per-feature", (6,))),
    ("auto", (3, 4, 4), ("per-channel", (3, 1, 1))),
    ("per-feature", (2, 3), ("per-feature", (2, 3))),
    ("per-channel", (6,), ("per-channel", (1,))),
    ("global", (3, 4, 4), ("global", (1, 1, 1))),
])
def test_modes_and_buffer_shapes(mode, shape, want):
    resolved = resolve_mode(mode, shape)
    assert (resolved, norm_shape(resolved, shape)) == want
    x = np.random.default_rng(0).normal(size=(50, *shape)) * 7 + 2
    mean, std = fit_norm(x, resolved, shape)
    assert mean.shape == std.shape == want[1] and mean.dtype == np.float32
    z = (x - mean) / std  # broadcasts against (N, *shape)
    if resolved == "per-feature":
        np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-4)
    else:
        assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 0.05


def test_constant_columns_and_outliers_stay_finite():
    x = scaled_inputs(200, (5,))
    x[:, 0] = 0.0  # all-zero column
    x[:, 1] = 1234.5  # constant column
    x[3, 2] = 3e38  # an outlier near float32's largest value
    mean, std = fit_norm(x, "per-feature", (5,))
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
    # constant columns are scaled by their own magnitude (1 for zeros), not blown up 1e6-fold
    assert std[1] == pytest.approx(1234.5) and std[0] == 1.0
    np.testing.assert_allclose(std[3:], x[:, 3:].astype(np.float64).std(axis=0), rtol=1e-5)
    z = (x.astype(np.float64) - mean) / std
    assert np.isfinite(z).all()
    with pytest.raises(InputError, match="--normalize"):
        resolve_mode("zscore", (5,))
    with pytest.raises(InputError, match="0 training rows"):
        fit_norm(np.zeros((0, 5)), "per-feature", (5,))


def test_each_task_uses_its_own_statistics_on_every_path():
    """apply_weights (training, model.logits), forward_one, forward_stacked (serving, mixed
    batches) and the Runtime answer the same for raw inputs, each task with its own values."""
    model = normed_mlp_model("per-feature", 3)
    x = torch.from_numpy(scaled_inputs(11, (6,), seed=9, shift=1))
    target = model.target
    stacked_w, stacked_b = [], {"input_mean": [], "input_std": []}
    for name in model.task_names:
        bufs = model.task_buffers[name]
        flat = model.generate([name])[0].detach()
        z = (x - bufs["input_mean"]) / bufs["input_std"]
        manual = target.forward_one(flat, z, buffers={"input_mean": torch.zeros(6),
                                                      "input_std": torch.ones(6)})
        want = model.logits(name, x)
        torch.testing.assert_close(want, manual[:, :4])
        torch.testing.assert_close(target.forward_one(flat, x, buffers=bufs), want)
        stacked_w.append(flat)
        for k, values in stacked_b.items():
            values.append(bufs[k])
    # the statistics differ per task, so do the answers
    a, b = (model.task_buffers[n]["input_mean"] for n in model.task_names[:2])
    assert not torch.equal(a, b)
    w = torch.stack(stacked_w)
    xs = x.expand(3, *x.shape).contiguous()
    y = target.forward_stacked(w, xs, buffers={k: torch.stack(v) for k, v in stacked_b.items()})
    for k, name in enumerate(model.task_names):
        torch.testing.assert_close(y[k], model.logits(name, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="normalizes per task"):
        target.forward_one(stacked_w[0], x)
    # the serving paths: mixed groups (stacked) and the Runtime (torch backend)
    groups = [Group(model.registry.get(n), x.numpy()) for n in model.task_names]
    for got, name in zip(run_generated(model, stacked_w, groups), model.task_names):
        np.testing.assert_allclose(got, model.logits(name, x).numpy(), rtol=1e-5, atol=1e-5)
    rt = Runtime(model)
    for name in model.task_names:
        want = torch.softmax(model.logits(name, x), dim=-1).numpy()
        np.testing.assert_allclose(rt.predict(name, x.numpy()).probabilities, want,
                                   rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_and_stored_count(tmp_path):
    model = normed_mlp_model("per-feature", 2)
    save_checkpoint(model, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    assert back.target_config.input_norm == "per-feature"
    x = torch.from_numpy(scaled_inputs(5, (6,), seed=3))
    for name in model.task_names:
        torch.testing.assert_close(back.task_buffers[name]["input_std"],
                                   model.task_buffers[name]["input_std"])
        torch.testing.assert_close(back.logits(name, x), model.logits(name, x))
    s = stored_params(back)
    # the config's (unused) 0/1 plus 2 tasks x (6 means + 6 stds); no batch-norm buffers
    assert s.normalization == 2 + 2 * 12 and s.task_buffers == 0


def test_add_task_needs_statistics_that_fit():
    model = normed_mlp_model("per-feature", 1)
    with pytest.raises(InputError, match="needs its input normalization"):
        model.add_task("bare")
    with pytest.raises(InputError, match="std > 0"):
        model.add_task("zero-std", input_norm=(np.zeros(6), np.zeros(6)))
    assert model.task_names == ["norm-0"]


def test_resnet_per_channel_statistics_reach_the_traced_and_dynamic_onnx_graphs():
    """Images: per-channel statistics as (C, 1, 1) buffers, through the traced per-task graph
    and the dynamic graph (a per-task table gathered by task index)."""
    import onnxruntime as ort

    from hnet_serve.export.dynamic_graph import dynamic_model_proto
    from hnet_serve.hypernet import HypernetConfig
    from hnet_serve.model import HNetModel
    from hnet_serve.onnx_graph import INPUT_NAME, OUTPUT_NAME, TASK_INDEX_NAME, TaskGraph
    from hnet_serve.targets import ResNetConfig

    model = HNetModel(
        ResNetConfig(input_shape=(3, 8, 8), num_classes=4, blocks_per_stage=1, width=4,
                     input_norm="per-channel"),
        HypernetConfig(kind="chunked", hidden=[8], task_emb_dim=5, chunk_emb_dim=3,
                       chunk_size=300), seed=0)
    rng = np.random.default_rng(0)
    for i in range(2):
        x = (rng.random((32, 3, 8, 8)) * (i + 1) * np.array([1, 10, 100]).reshape(3, 1, 1))
        model.add_task(f"img-{i}", input_norm=fit_norm(x, "per-channel", (3, 8, 8)))
    assert model.task_buffers["img-1"]["input_mean"].shape == (3, 1, 1)
    x = (rng.random((5, 3, 8, 8)) * np.array([1, 10, 100]).reshape(3, 1, 1)).astype(np.float32)
    graph = TaskGraph.build(model)
    dyn = ort.InferenceSession(dynamic_model_proto(model).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    for info in model.registry:
        want = model.logits(info.name, torch.from_numpy(x)).numpy()
        sess = ort.InferenceSession(graph.serialize(info.name), providers=["CPUExecutionProvider"])
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())
        got = dyn.run([OUTPUT_NAME], {TASK_INDEX_NAME: np.array(info.index), INPUT_NAME: x})[0]
        assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())


def test_a_checkpoint_from_before_per_task_statistics_answers_identically(tmp_path):
    """Today's manifests have no ``input_norm``: one input_mean/input_std in the target config,
    applied to every task exactly as before."""
    import json

    from hnet_serve.checkpoint import MANIFEST, WEIGHTS, _content_hash
    from tests.conftest import tiny_resnet_model

    model = tiny_resnet_model(2)  # config-level per-channel mean/std, batch-norm buffers
    save_checkpoint(model, tmp_path / "old")
    path = tmp_path / "old" / MANIFEST
    raw = json.loads(path.read_text())
    del raw["target"]["input_norm"]  # what an older hnet-serve wrote
    raw["content_hash"] = _content_hash(raw, (tmp_path / "old" / WEIGHTS).read_bytes())
    path.write_text(json.dumps(raw, indent=2, sort_keys=True))
    back = load_checkpoint(tmp_path / "old")
    assert back.target_config.input_norm == "none"
    assert back.target_config.input_mean == [0.5, 0.5, 0.5]
    x = torch.rand(4, 3, 8, 8)
    for name in model.task_names:
        torch.testing.assert_close(back.logits(name, x), model.logits(name, x), rtol=0, atol=0)


def test_independent_baseline_networks_standardize_with_their_own_task():
    """The one-network-per-task reference (add-task --reference, the benchmarks) normalizes as
    the hypernetwork does; a network shared by several tasks keeps the first task's constants."""
    from hnet_serve.training.config import build_config
    from hnet_serve.training.data import TaskData
    from hnet_serve.training.loop import run_tasks
    from hnet_serve.training.methods.baselines import make_baseline

    tasks = []
    for i in range(2):
        x = scaled_inputs(60, (6,), seed=i, shift=3 * i)
        y = (x[:, -1] > np.median(x[:, -1])).astype(np.int64)
        tasks.append(TaskData(f"t{i}", x[:48], y[:48], x[48:], y[48:]))
    cfg = build_config(benchmark="custom", iterations=2, batch_size=16,
                       target={"hidden": [4]})
    indep = make_baseline("independent", cfg, tasks)
    run_tasks(indep, tasks, cfg, progress=False)
    assert indep.target_config.input_norm == "per-feature"
    for t in tasks:
        np.testing.assert_allclose(indep.nets[t.name].input_mean.numpy(),
                                   t.x_train.mean(axis=0), rtol=1e-4)
    shared = make_baseline("finetune", cfg, tasks)
    assert shared.target_config.input_norm == "none"
    assert shared.target_config.input_mean[0] == pytest.approx(tasks[0].x_train.mean(), rel=1e-4)
