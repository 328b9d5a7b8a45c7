"""The trainer, add-task and evaluation on tiny synthetic tasks (seconds, not minutes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hnet_serve.checkpoint import load_checkpoint
from hnet_serve.errors import ForgettingError, InputError, TaskExistsError
from hnet_serve.training.api import (
    add_task,
    evaluate_checkpoint,
    load_benchmark,
    train_tasks,
    write_report,
)
from hnet_serve.training.config import TrainConfig, build_config
from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import accuracy, continual_metrics, weight_drift
from hnet_serve.training.loop import Interrupted, run_tasks
from hnet_serve.training.methods.hnet import HNetMethod, adam_lookahead, make_adam
from hnet_serve.training.methods.registry import make_method
from tests.conftest import tiny_mlp_model

TINY_ARCH = {
    "target": {"hidden": [16, 8]},
    "hypernet": {"kind": "chunked", "hidden": [10, 10], "chunk_size": 50, "task_emb_dim": 6,
                 "chunk_emb_dim": 4},
}


def make_task(name: str, seed: int, n: int = 300, dim: int = 12, classes: int = 3) -> TaskData:
    """A linearly separable task: y = argmax(x W_seed)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, classes))
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ w).argmax(1)
    cut = n * 4 // 5
    return TaskData(name, x[:cut], y[:cut], x[cut:], y[cut:])


def tiny_config(**overrides) -> TrainConfig:
    settings = {"benchmark": "custom", "iterations": 60, "batch_size": 32, "lr": 0.01,
                **TINY_ARCH, **overrides}
    return build_config(**settings)


def files_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).iterdir())}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on 2 busy shared cores: one thread avoids OpenMP spin-wait stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tasks() -> list[TaskData]:
    return [make_task("a", 1), make_task("b", 2), make_task("c", 3)]


def _drift_of_first_task(tasks, beta: float) -> float:
    cfg = tiny_config(iterations=150, beta=beta)
    method = make_method(cfg, tasks[:1])
    run_tasks(method, tasks[:1], cfg, progress=False)
    hn = method.model.hypernet
    before = hn.generate([0]).detach().clone()
    run_tasks(method, tasks[1:2], cfg, progress=False)
    return weight_drift(before, hn.generate([0]).detach())[0]


def test_regularizer_prevents_forgetting(tasks):
    """Task 1's generated weights stay put with beta > 0 and move far without it."""
    kept = _drift_of_first_task(tasks, beta=1.0)
    moved = _drift_of_first_task(tasks, beta=0.0)
    assert kept < 0.05, kept
    assert moved > 0.3, moved
    assert moved > 10 * kept


def test_training_learns_and_fills_the_accuracy_matrix(tasks):
    cfg = tiny_config(iterations=120)
    model, result = train_tasks(tasks, cfg, progress=False)
    r = result.accuracy_matrix
    assert [len(row) for row in r] == [3, 3, 3]
    assert r[0][1] is None and r[1][2] is None and r[2][2] is not None
    assert all(result.final_accuracy[t.name] > 0.7 for t in tasks)  # chance is 1/3
    assert result.final_accuracy["a"] == accuracy(model, "a", tasks[0].x_test, tasks[0].y_test)
    assert result.mean_accuracy == pytest.approx(np.mean(list(result.final_accuracy.values())))
    assert result.steps == [120, 120, 120] and result.final_reg[0] == 0.0 < result.final_reg[2]
    assert model.task_names == ["a", "b", "c"]
    # flat inputs: each task standardized per feature with its own training statistics
    assert model.target_config.input_norm == "per-feature"
    for t in tasks:
        np.testing.assert_allclose(model.task_buffers[t.name]["input_std"].numpy(),
                                   t.x_train.std(axis=0), rtol=1e-4)
        np.testing.assert_allclose(model.task_buffers[t.name]["input_mean"].numpy(),
                                   t.x_train.mean(axis=0), rtol=1e-4, atol=1e-6)


def test_deterministic_for_a_fixed_seed(tasks):
    def run(seed):
        model, result = train_tasks(tasks[:2], tiny_config(seed=seed, iterations=30),
                                    progress=False)
        return model.hypernet.generate().detach(), result.accuracy_matrix

    w1, r1 = run(0)
    w2, r2 = run(0)
    w3, _ = run(1)
    assert torch.equal(w1, w2) and r1 == r2
    assert not torch.allclose(w1, w3)


def test_frozen_old_embeddings_do_not_move_and_trained_ones_do(tasks):
    for train_old, should_move in ((False, False), (True, True)):
        cfg = tiny_config(iterations=30, train_old_embeddings=train_old)
        method = make_method(cfg, tasks[:1])
        run_tasks(method, tasks[:1], cfg, progress=False)
        emb0 = method.model.hypernet.task_embs[0].detach().clone()
        run_tasks(method, tasks[1:2], cfg, progress=False)
        moved = not torch.equal(emb0, method.model.hypernet.task_embs[0].detach())
        assert moved == should_move


@pytest.mark.parametrize("options", [
    {"lookahead": True},
    {"lookahead": True, "reg_method": "gram"},
    {"reg_tasks": 1},
    {"reg_method": "explicit"},
])
def test_regularizer_options_keep_old_tasks(tasks, options):
    cfg = tiny_config(iterations=80, beta=1.0, **options)
    method = make_method(cfg, tasks)
    run_tasks(method, tasks[:2], cfg, progress=False)
    hn = method.model.hypernet
    before = hn.generate([0, 1]).detach().clone()
    result = run_tasks(method, tasks[2:], cfg, progress=False)
    assert max(weight_drift(before, hn.generate([0, 1]).detach())) < 0.05
    assert result.final_reg[0] > 0


def test_adam_lookahead_matches_a_real_adam_step():
    p = torch.nn.Parameter(torch.randn(5))
    opt = make_adam([p], lr=0.1)
    for _ in range(3):  # with state, then predict the 4th step
        opt.zero_grad()
        (p.sin().sum()).backward()
        delta = adam_lookahead(opt, {"p": p})["p"]
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(p.detach() - before, delta, rtol=1e-5, atol=1e-7)


def test_multi_head_assigns_heads_and_refuses_when_full(tasks):
    # reserved like classes: max(10, tasks) heads by default, so later tasks fit
    model, _ = train_tasks(tasks[:2], tiny_config(iterations=10, multi_head=True), progress=False)
    assert model.target_config.num_heads == 10
    assert [t.head for t in model.registry] == [0, 1]
    run_tasks(HNetMethod(model, tiny_config(iterations=10)), tasks[2:], tiny_config(),
              progress=False)
    assert [t.head for t in model.registry] == [0, 1, 2]
    cfg = tiny_config(iterations=10, multi_head=True, num_heads=2)
    model, _ = train_tasks(tasks[:2], cfg, progress=False)
    assert model.target_config.num_heads == 2
    method = HNetMethod(model, cfg)
    with pytest.raises(InputError, match="output heads.*num_heads"):
        run_tasks(method, tasks[2:], cfg, progress=False)


def test_resnet_keeps_batch_norm_statistics_per_task():
    rng = np.random.default_rng(0)

    def img_task(name, shift):
        x = (rng.random((64, 3, 8, 8)) + shift).astype(np.float32)
        y = (x[:, 0].mean(axis=(1, 2)) > 0.5 + shift).astype(np.int64)
        return TaskData(name, x[:48], y[:48], x[48:], y[48:])

    tasks = [img_task("i0", 0.0), img_task("i1", 2.0)]
    cfg = build_config(benchmark="custom", iterations=8, batch_size=16,
                       target={"kind": "resnet", "resnet_blocks": 1, "resnet_width": 4},
                       hypernet={"hidden": [8], "chunk_size": 300, "task_emb_dim": 5,
                                 "chunk_emb_dim": 3})
    method = make_method(cfg, tasks)
    run_tasks(method, tasks[:1], cfg, progress=False)
    bufs = method.model.task_buffers
    first = {k: v.clone() for k, v in bufs["i0"].items()}
    assert not torch.equal(first["bn1.running_mean"], torch.zeros_like(first["bn1.running_mean"]))
    run_tasks(method, tasks[1:], cfg, progress=False)
    assert all(torch.equal(first[k], bufs["i0"][k]) for k in first)  # untouched by task 2
    assert not torch.allclose(bufs["i1"]["bn1.running_mean"], first["bn1.running_mean"])
    assert method.model.target.training is False


def test_ctrl_c_keeps_the_last_completed_checkpoint(tasks, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = HNetMethod.train_step

    def interrupting(self, x, y):
        calls["n"] += 1
        if calls["n"] == 45:  # during the second task (30 steps each)
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(HNetMethod, "train_step", interrupting)
    out = tmp_path / "ck"
    with pytest.raises(Interrupted) as stop:
        train_tasks(tasks, tiny_config(iterations=30), out, progress=False)
    assert stop.value.result.completed == ["a"]
    saved = load_checkpoint(out)
    assert saved.task_names == ["a"]
    assert saved.meta["results"]["accuracy"].keys() == {"a"}
    assert not list(tmp_path.glob(".ck.tmp-*"))


def test_train_refuses_to_overwrite(tasks, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="already exists"):
        train_tasks(tasks[:1], tiny_config(iterations=2), out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"


# -- add-task -------------------------------------------------------------------------------
def save_npz(path: Path, task: TaskData) -> Path:
    np.savez(path, x_train=task.x_train, y_train=task.y_train, x_test=task.x_test,
             y_test=task.y_test)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tasks) -> Path:
    """A checkpoint of tasks a, b trained from .npz files (so their test data is recorded)."""
    d = tmp_path_factory.mktemp("ck")
    files = [str(save_npz(d / f"{t.name}.npz", t)) for t in tasks[:2]]
    cfg = tiny_config(iterations=100, beta=1.0, data_files=files)
    train_tasks(load_benchmark(cfg), cfg, d / "v1", progress=False)
    return d / "v1"


def test_add_task_leaves_old_checkpoint_intact(trained, tasks, tmp_path):
    before = files_digest(trained)
    npz = save_npz(tmp_path / "c.npz", tasks[2])
    _, report = add_task(trained, tmp_path / "v2", name="c", data=npz, iterations=250,
                         progress=False)
    assert files_digest(trained) == before
    new = load_checkpoint(tmp_path / "v2")
    assert new.task_names == ["a", "b", "c"]
    old = load_checkpoint(trained)
    assert old.task_names == ["a", "b"]
    d = report.to_dict()
    # chance is 1/3; this tiny network under beta=1.0 learns 'c' only partly
    assert d["new_task"]["name"] == "c" and d["new_task"]["accuracy"] > 0.5
    assert set(d["old_tasks"]) == {"a", "b"}
    for name, figs in d["old_tasks"].items():
        assert figs["drift"] < 0.05
        assert figs["before"] == pytest.approx(old.registry.get(name).metrics["accuracy"])
        assert abs(figs["after"] - figs["before"]) <= 0.05
    # the new checkpoint evaluates all three tasks from its recorded data
    ev = evaluate_checkpoint(tmp_path / "v2")
    assert set(ev["accuracy"]) == {"a", "b", "c"} and not ev["missing"]
    assert ev["accuracy"]["c"] == pytest.approx(d["new_task"]["accuracy"])
    assert new.meta["history"][0]["added_task"] == "c"


def test_add_task_refuses_forgetting_and_writes_nothing(trained, tasks, tmp_path):
    before = files_digest(trained)
    npz = save_npz(tmp_path / "c.npz", tasks[2])
    out = tmp_path / "v2"
    with pytest.raises(ForgettingError) as err:
        add_task(trained, out, name="c", data=npz, iterations=40, beta=0.0, max_drift=0.01,
                 progress=False)
    report = err.value.report.to_dict()
    assert report["violations"] and not report["saved"]
    assert max(f["drift"] for f in report["old_tasks"].values()) > 0.01
    assert "drift" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".v2*"))
    assert files_digest(trained) == before
    # --force writes it anyway and says so
    _, forced = add_task(trained, out, name="c", data=npz, iterations=40, beta=0.0,
                         max_drift=0.01, force=True, progress=False)
    assert forced.saved and forced.violations and load_checkpoint(out).task_names[-1] == "c"


def test_add_task_accuracy_tolerance(trained, tasks, tmp_path):
    npz = save_npz(tmp_path / "c.npz", tasks[2])
    with pytest.raises(ForgettingError, match="accuracy"):
        add_task(trained, tmp_path / "v2", name="c", data=npz, iterations=60, beta=0.0,
                 lr=0.05, max_drift=100.0, max_accuracy_drop=0.0, progress=False)


def test_add_task_rejects_bad_requests(trained, tasks, tmp_path):
    npz = save_npz(tmp_path / "c.npz", tasks[2])
    with pytest.raises(TaskExistsError):
        add_task(trained, tmp_path / "x", name="a", data=npz, progress=False)
    with pytest.raises(InputError, match="source checkpoint"):
        add_task(trained, trained, name="c", data=npz, progress=False)
    wide = save_npz(tmp_path / "wide.npz", make_task("w", 5, dim=7))
    with pytest.raises(InputError, match="inputs shaped"):
        add_task(trained, tmp_path / "y", name="w", data=wide, iterations=1, progress=False)
    # 10 classes are reserved by default; past them the error names --max-classes
    many = save_npz(tmp_path / "many.npz", make_task("m", 5, n=600, classes=11))
    with pytest.raises(InputError, match=r"11 classes .* reserves 10.*--max-classes 11"):
        add_task(trained, tmp_path / "z", name="m", data=many, iterations=1, progress=False)
    with pytest.raises(InputError, match="exactly one"):
        add_task(trained, tmp_path / "z", name="m", progress=False)
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


# -- evaluation -----------------------------------------------------------------------------
def test_continual_metrics_by_hand():
    r = [[0.9, None, None], [0.8, 0.95, None], [0.7, 0.9, 0.99]]
    m = continual_metrics(r)
    assert m["mean_accuracy"] == pytest.approx((0.7 + 0.9 + 0.99) / 3)
    assert m["bwt"] == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)
    assert continual_metrics([[0.5]]) == {"mean_accuracy": 0.5, "bwt": 0.0, "forgetting": 0.0}


def test_weight_drift_is_relative():
    before = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    after = torch.tensor([[3.0, 4.5], [1.0, 0.0]])
    assert weight_drift(before, after) == pytest.approx([0.1, 0.0])


def test_report_files(tasks, tmp_path):
    model, result = train_tasks(tasks[:2], tiny_config(iterations=5), progress=False)
    files = write_report(result, tmp_path / "rep", model)
    for key in ("accuracy_matrix", "embeddings"):
        data = Path(files[key]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert '"accuracy_matrix"' in (tmp_path / "rep" / "results.json").read_text()


def test_accuracy_uses_recorded_normalization():
    model = tiny_mlp_model(1)
    x = np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32)
    logits = model.logits("task-0", torch.from_numpy(x))
    y = logits.argmax(1).numpy()
    assert accuracy(model, "task-0", x, y, batch_size=7) == 1.0
    assert accuracy(model, "task-0", x, (y + 1) % 3) == 0.0
