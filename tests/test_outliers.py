"""Self-generated outliers (``outlier_weight``): what each kind makes, the loss, the wiring into
HNET and the baselines, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hnet_serve.errors import ConfigError
from hnet_serve.task_inference import softmax
from hnet_serve.training.api import load_benchmark
from hnet_serve.training.config import build_config
from hnet_serve.training.loop import run_tasks
from hnet_serve.training.methods.baselines import make_baseline
from hnet_serve.training.methods.registry import make_method
from hnet_serve.training.outliers import OutlierMaker, image_geometry, outlier_loss, uniform_loss


def maker(kind: str, shape=(784,), seed: int = 0) -> OutlierMaker:
    return OutlierMaker(shape, [kind], torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Eight real 28x28 digits, flat."""
    task = load_benchmark(build_config(benchmark="split-mnist", tasks=1))[0]
    return torch.from_numpy(task.x_train[:8].copy())


def tiles(img: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [img[..., r : r + size, c : c + size] for r in range(0, 4 * size, size)
            for c in range(0, 4 * size, size)]


def test_geometry_of_images_and_square_flat_inputs():
    assert image_geometry((784,)) == (1, 28, 28)
    assert image_geometry((3, 32, 32)) == (3, 32, 32)
    assert image_geometry((28, 20)) == (1, 28, 20)
    for shape in ((12,), (783,), (2, 196), (1, 2, 2), (1, 2, 3, 4)):
        with pytest.raises(ConfigError, match="need image inputs"):
            image_geometry(shape)
    with pytest.raises(ConfigError, match="'rotate' needs square images"):
        OutlierMaker((3, 32, 16), ["rotate"], torch.Generator())
    with pytest.raises(ConfigError, match="outlier kinds"):
        OutlierMaker((784,), ["twist"], torch.Generator())


def test_rotate_and_flip_turn_the_image(digits):
    img = digits.view(-1, 28, 28)
    out = maker("rotate")(digits).view(-1, 28, 28)
    turned = [torch.rot90(img, k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.equal(out, t) for t in turned)
    assert torch.equal(maker("flip")(digits), digits.flip(1))  # one channel: reversed vector


def test_patches_shuffle_the_4x4_grid():
    x = torch.rand(6, 784)  # distinct tiles (a digit's blank corners are all alike)
    out = maker("patches")(x).view(-1, 1, 28, 28)
    img = x.view(-1, 1, 28, 28)
    assert not torch.equal(out, img)
    for o, i in zip(out, img):
        src = tiles(i, 7)
        # every output tile is one input tile, each used once
        used = [next(k for k, t in enumerate(src) if torch.equal(t, ot)) for ot in tiles(o, 7)]
        assert sorted(used) == list(range(16))


def test_splice_joins_two_different_examples(digits):
    out = maker("splice")(digits).view(-1, 28, 28)
    img = digits.view(-1, 28, 28)
    assert torch.equal(out[:, :14], img[:, :14])
    for n in range(len(img)):
        donors = [m for m in range(len(img)) if torch.equal(out[n, 14:], img[m, 14:])]
        assert donors and n not in donors
    single = maker("splice")(digits[:1])  # nothing to splice with: a half turn instead
    assert torch.equal(single, digits[:1].flip(1))


def test_bands_shuffle_the_features_in_16_bands():
    x = torch.rand(8, 784)
    out = maker("bands")(x)
    assert not torch.equal(out, x)
    src = x.view(8, 16, 49)
    used = [next(k for k in range(16) if torch.equal(band, src[:, k]))
            for band in out.view(8, 16, 49).unbind(1)]
    assert sorted(used) == list(range(16))


def test_multichannel_images_keep_their_shape():
    x = torch.rand(5, 3 * 32 * 32)
    for kind in ("rotate", "flip", "patches", "splice", "bands"):
        out = maker(kind, (3, 32, 32))(x.view(5, 3, 32, 32))
        assert out.shape == (5, 3, 32, 32) and not torch.equal(out, x.view(5, 3, 32, 32))


def test_kinds_are_drawn_per_call_and_seeded(digits):
    kinds = ["rotate", "flip", "patches", "splice", "bands"]
    a = OutlierMaker((784,), kinds, torch.Generator().manual_seed(3))
    b = OutlierMaker((784,), kinds, torch.Generator().manual_seed(3))
    outs = [a(digits) for _ in range(30)]
    assert all(torch.equal(o, b(digits)) for o in outs)
    distinct = {tuple(o[0, :50].tolist()) + tuple(o[0, -50:].tolist()) for o in outs}
    assert len(distinct) >= 4  # several kinds (and draws) were used


def test_uniform_loss_is_smallest_for_equal_logits():
    flat = torch.zeros(4, 3)
    assert uniform_loss(flat).item() == pytest.approx(math.log(3))
    assert uniform_loss(torch.tensor([[5.0, 0.0, 0.0]])).item() > math.log(3)
    assert outlier_loss(None, 1.0, flat, lambda x: x) is None
    m = maker("flip", (16,))  # 4x4 images
    assert outlier_loss(m, 0.0, torch.zeros(2, 16), lambda x: x) is None
    assert outlier_loss(m, 2.0, torch.zeros(2, 16), lambda x: x[:, :3]).item() == pytest.approx(
        2 * math.log(3))


def mean_entropy(logits: np.ndarray) -> float:
    p = softmax(logits)
    return float(-(p * np.log(np.clip(p, 1e-30, None))).sum(1).mean())


@pytest.mark.parametrize("method", ["hnet", "independent"])
def test_outlier_weight_makes_the_network_uncertain_off_its_task(method):
    """With the option a task's network is markedly less certain on outliers of its own inputs
    (here: the digits turned upside down), and still learns the task."""
    base = {"benchmark": "split-mnist", "tasks": 1, "iterations": 150, "seed": 0,
            "target": {"hidden": [32, 32]},
            "hypernet": {"hidden": [20, 20], "chunk_size": 800, "task_emb_dim": 8,
                         "chunk_emb_dim": 4}}
    results = {}
    for weight in (0.0, 1.0):
        cfg = build_config(**base, method=method, outlier_weight=weight)
        tasks = load_benchmark(cfg)
        learner = (make_method(cfg, tasks) if method == "hnet"
                   else make_baseline(method, cfg, tasks))
        res = run_tasks(learner, tasks, cfg, progress=False)
        x = torch.from_numpy(tasks[0].x_test.copy())
        predict = learner.predictor(tasks[0].name)
        results[weight] = (res.mean_accuracy, mean_entropy(predict(x).numpy()),
                           mean_entropy(predict(x.flip(1)).numpy()))
    (acc0, _, out0), (acc1, own1, out1) = results[0.0], results[1.0]
    assert acc0 > 0.95 and acc1 > 0.95
    assert out1 > 0.5 and out1 > 3 * out0  # log 2 = 0.69 is the most uncertain
    assert own1 < 0.35  # its own digits stay confident (p ~ 0.95)


def test_outlier_weight_needs_inputs_with_geometry():
    from tests.test_training import make_task, tiny_config

    tasks = [make_task("a", 1)]  # 12 features: no image to make outliers from
    cfg = tiny_config(outlier_weight=0.5)
    with pytest.raises(ConfigError, match="need image inputs"):
        make_method(cfg, tasks)
    with pytest.raises(ConfigError, match="need image inputs"):
        make_baseline("finetune", cfg, tasks)
    make_method(tiny_config(), tasks)  # off by default: any inputs


def test_outliers_leave_batch_norm_statistics_alone():
    """A ResNet target's running statistics after one step come from the task's batch only:
    the same with and without the outlier loss (the step's forward uses the same weights)."""
    from hnet_serve.training.data import TaskData

    rng = np.random.default_rng(0)
    x = rng.random((48, 3, 8, 8)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0.5).astype(np.int64)
    tasks = [TaskData("img", x[:32], y[:32], x[32:], y[32:])]
    stats = {}
    for weight in (0.0, 1.0):
        cfg = build_config(benchmark="custom", iterations=1, batch_size=16, outlier_weight=weight,
                           target={"kind": "resnet", "resnet_blocks": 1, "resnet_width": 4},
                           hypernet={"hidden": [8], "chunk_size": 300, "task_emb_dim": 5,
                                     "chunk_emb_dim": 3})
        method = make_method(cfg, tasks)
        run_tasks(method, tasks, cfg, progress=False)
        stats[weight] = {k: v.clone() for k, v in method.model.task_buffers["img"].items()}
        assert method.model.target.training is False
    assert stats[0.0].keys() == stats[1.0].keys()
    assert all(torch.equal(stats[0.0][k], stats[1.0][k]) for k in stats[0.0])
    assert not torch.equal(stats[1.0]["bn1.running_mean"],
                           torch.zeros_like(stats[1.0]["bn1.running_mean"]))
