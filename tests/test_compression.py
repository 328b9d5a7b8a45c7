"""Compressive by default (issue 15): the chunk size is derived from --compression (the stored
size as a fraction of one target network for the planned tasks); explicit sizes override."""

from __future__ import annotations

import pytest
import torch

from hnet_serve.checkpoint import load_checkpoint
from hnet_serve.storage import stored_params
from tests.test_training_cli import run, run_json

FAST = ["--benchmark", "split-mnist", "--dataset", "mnist5k", "--tasks", "2",
        "--iterations", "15", "--no-progress", "--threads", "1"]


def test_default_training_is_compressive_and_says_so(capsys, tmp_path):
    out = tmp_path / "ck"
    summary = run_json(capsys, "train", *FAST, "--out", out, "--json")
    model = load_checkpoint(out)
    stored = stored_params(model)
    assert summary["stored_ratio"] == pytest.approx(stored.ratio)
    assert 0.9 < stored.ratio <= 1.0  # the budget is used, and never exceeded
    assert summary["stored"]["summary"].startswith(f"stores {stored.ratio:.2f}x one target")
    saved = model.meta["train_config"]["hypernet"]
    assert saved["chunk_size"] == model.hypernet_config.chunk_size  # the derived size is saved
    assert 0.5 < summary["accuracy"]["split-mnist-0"] <= 1.0
    code, text, _ = run(capsys, "train", *FAST, "--out", tmp_path / "ck2")
    assert code == 0 and "checkpoint stores" in text and "2 separate networks" in text


def test_compression_and_planned_tasks_set_the_budget(capsys, tmp_path):
    run_json(capsys, "train", *FAST, "--compression", "0.5", "--out", tmp_path / "half", "--json")
    half = stored_params(load_checkpoint(tmp_path / "half"))
    assert 0.4 < half.ratio <= 0.5
    run_json(capsys, "train", *FAST, "--planned-tasks", "10", "--out", tmp_path / "ten",
             "--json")
    ten = load_checkpoint(tmp_path / "ten")
    room = stored_params(ten).total + 8 * ten.hypernet_config.task_emb_dim  # 8 more tasks
    assert room <= ten.target.n_params


def test_explicit_sizes_override_and_bad_ratios_are_refused(capsys, tmp_path):
    run_json(capsys, "train", *FAST, "--chunk-size", "4000", "--out", tmp_path / "x", "--json")
    assert load_checkpoint(tmp_path / "x").hypernet_config.chunk_size == 4000
    for bad in ("1.5", "0", "-1"):
        code, _, err = run(capsys, "train", *FAST, "--compression", bad, "--out", tmp_path / "y")
        assert code == 1 and "compression" in err and not (tmp_path / "y").exists()


def test_a_target_too_small_to_compress(capsys, tmp_path):
    tiny = [*FAST, "--target-hidden", "2"]
    code, _, err = run(capsys, "train", *tiny, "--compression", "1.0", "--out", tmp_path / "a")
    assert code == 1 and "cannot be stored in 1.0x" in err and not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="no compressive hypernetwork fits"):
        code, _, err = run(capsys, "train", *tiny, "--out", tmp_path / "b")
    assert code == 0
    # no budget to size them from: the preset's auto corrections are left out
    assert load_checkpoint(tmp_path / "b").hypernet_config.adapter_rank == 0


def test_every_old_task_is_regularized_by_default_and_subsets_are_opt_in():
    """By default every old task is regularized every step ("all"; None, what older checkpoints
    saved, means the same); ``reg_tasks=N`` picks a fresh random N of them each step."""
    from hnet_serve.training.config import validate_config
    from hnet_serve.training.methods.hnet import HNetMethod, task_norm
    from hnet_serve.training.methods.registry import make_method
    from tests.test_training import make_task, tiny_config

    many = [make_task(f"t{i}", i) for i in range(11)]
    assert tiny_config(iterations=1).reg_tasks == "all"
    for setting, covered in [("all", 10), (None, 10), (3, 3), (8, 8), (10, 10), (50, 10)]:
        cfg = tiny_config(iterations=1, reg_tasks=setting)
        if setting is None:  # what older checkpoints saved (build_config skips None overrides)
            cfg = validate_config({**cfg.model_dump(mode="json"), "reg_tasks": None})
        method = HNetMethod(make_method(cfg, many[:1]).model, cfg)
        for t in many[1:-1]:
            method.model.add_task(t.name, num_classes=t.num_classes,
                                  input_norm=task_norm(method.model, t))
        method.begin_task(len(many) - 1, many[-1])
        picks = [method._subset() for _ in range(3)]
        for subset in picks:
            assert (10 if subset is None else len(set(subset.tolist()))) == covered
        if covered < 10:  # a fresh subset each step
            assert len({tuple(p.tolist()) for p in picks}) > 1
    with pytest.raises(Exception, match="reg_tasks"):
        tiny_config(reg_tasks=0)


def test_reg_pairs_draws_chunks_for_every_old_task():
    """``reg_pairs=N``: every old task each step, on a fresh random ceil(N / K) of the chunks
    (every chunk while K x C <= N); with ``reg_tasks`` too, K is the subset's size. The
    default, ``auto``, is N = REG_PAIRS_TASKS x C (every pair up to that many old tasks), and
    every pair with the explicit form."""
    from hnet_serve.training.config import REG_PAIRS_TASKS
    from hnet_serve.training.methods.hnet import HNetMethod, task_norm
    from hnet_serve.training.methods.registry import make_method
    from tests.test_training import make_task, tiny_config

    many = [make_task(f"t{i}", i) for i in range(11)]
    assert tiny_config(iterations=1).reg_pairs == "auto" and REG_PAIRS_TASKS == 10
    for pairs, reg_tasks, method_ in [("all", "all", "auto"), (10_000, "all", "auto"),
                                      (25, "all", "auto"), (7, "all", "auto"), (4, 2, "auto"),
                                      ("auto", "all", "auto"), ("auto", "all", "explicit")]:
        cfg = tiny_config(iterations=1, reg_pairs=pairs, reg_tasks=reg_tasks,
                          reg_method=method_, hypernet={"chunk_size": 30})
        method = HNetMethod(make_method(cfg, many[:1]).model, cfg)
        for t in many[1:-1]:
            method.model.add_task(t.name, num_classes=t.num_classes,
                                  input_norm=task_norm(method.model, t))
        method.begin_task(len(many) - 1, many[-1])
        c = method.snapshot.num_chunks
        assert c > 3
        k = 10 if reg_tasks == "all" else reg_tasks
        if pairs == "auto":  # 10 old tasks: every pair; 11 and more: 10 tasks' worth
            assert method._chunks(10) is None
            if method_ == "explicit":
                assert method._chunks(11) is None and method._chunks(500) is None
            else:
                assert len(method._chunks(11)) == -(-10 * c // 11)
                assert len(method._chunks(500)) == 1
            continue
        picks = [method._chunks(k) for _ in range(4)]
        if pairs == "all" or k * c <= pairs:
            assert picks == [None] * 4
            continue
        want = -(-pairs // k)
        for chunks in picks:
            assert len(set(chunks.tolist())) == len(chunks) == want
            assert 0 <= int(chunks.min()) and int(chunks.max()) < c
        assert len({tuple(sorted(p.tolist())) for p in picks}) > 1  # fresh each step
        stats = method.train_step(torch.from_numpy(many[-1].x_train[:8]),
                                  torch.from_numpy(many[-1].y_train[:8]))
        assert stats.reg >= 0
    with pytest.raises(Exception, match="reg_pairs"):
        tiny_config(reg_pairs=0)
    with pytest.raises(Exception, match="Gram form"):
        tiny_config(reg_pairs=8, reg_method="explicit")


@pytest.mark.parametrize("value, ok", [("all", True), ("4", True), ("0", False), ("x", False)])
def test_reg_tasks_flag(capsys, tmp_path, value, ok):
    argv = ["train", *FAST, "--reg-tasks", value, "--out", tmp_path / "r"]
    if not ok:
        with pytest.raises(SystemExit):  # argparse: usage + one line, exit status 2
            run(capsys, *argv)
        err = capsys.readouterr().err
        assert "--reg-tasks" in err and "positive integer or 'all'" in err
        assert not (tmp_path / "r").exists()
    else:
        assert run(capsys, *argv)[0] == 0
        assert load_checkpoint(tmp_path / "r").meta["train_config"]["reg_tasks"] == (
            "all" if value == "all" else int(value))


def test_checkpoints_from_before_reg_pairs_keep_every_pair():
    from hnet_serve.training.api import saved_settings
    assert saved_settings({"train_config": {"beta": 0.1}}) == {"beta": 0.1, "reg_pairs": "all"}
    assert saved_settings({"train_config": {"reg_pairs": 64}})["reg_pairs"] == 64
    assert saved_settings({}) == {}


def test_reg_pairs_flag(capsys, tmp_path):
    assert run(capsys, "train", *FAST, "--reg-pairs", "64", "--out", tmp_path / "r")[0] == 0
    assert load_checkpoint(tmp_path / "r").meta["train_config"]["reg_pairs"] == 64
    assert run(capsys, "train", *FAST, "--reg-pairs", "auto", "--out", tmp_path / "a")[0] == 0
    with pytest.raises(SystemExit):
        run(capsys, "train", *FAST, "--reg-pairs", "0", "--out", tmp_path / "s")
    assert "--reg-pairs" in capsys.readouterr().err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("value, ok", [("auto", True), ("3", True), ("0", True), ("-1", False),
                                       ("x", False)])
def test_adapter_rank_flag(capsys, tmp_path, value, ok):
    argv = ["train", *FAST, "--adapter-rank", value, "--out", tmp_path / "a"]
    if not ok:
        with pytest.raises(SystemExit):
            run(capsys, *argv)
        assert "--adapter-rank" in capsys.readouterr().err and not (tmp_path / "a").exists()
        return
    assert run(capsys, *argv)[0] == 0
    model = load_checkpoint(tmp_path / "a")
    rank = model.hypernet_config.adapter_rank
    assert isinstance(rank, int) and (rank == int(value) if value != "auto" else rank > 0)
    assert 0.9 < stored_params(model).ratio <= 1.0  # sized within the budget either way
    hn = model.hypernet
    if rank:  # trained: every task's correction moved away from its zero start
        for row in hn.task_embs:
            assert row[hn.code_dim:hn.code_dim + 100 * rank].abs().sum() > 0


def test_add_task_keeps_old_corrections_and_trains_a_new_one(capsys, tmp_path):
    import numpy as np
    import torch

    from hnet_serve.training.data import build_benchmark

    run_json(capsys, "train", *FAST, "--adapter-rank", "4", "--out", tmp_path / "v1", "--json")
    new = build_benchmark("split-mnist", "mnist5k", tasks=3, seed=0)[2]
    np.savez(tmp_path / "c.npz", x_train=new.x_train, y_train=new.y_train, x_test=new.x_test,
             y_test=new.y_test)
    code, _, err = run(capsys, "add-task", tmp_path / "v1", "--name", "c", "--data",
                       tmp_path / "c.npz", "--iterations", "15", "--out", tmp_path / "v2",
                       "--force")  # 15-step tasks: the drift check is not what this tests
    assert code == 0, err
    v1, v2 = load_checkpoint(tmp_path / "v1"), load_checkpoint(tmp_path / "v2")
    assert v2.hypernet_config.adapter_rank == 4
    hn1, hn2 = v1.hypernet, v2.hypernet
    for a, b in zip(hn1.task_embs, hn2.task_embs):  # old rows, corrections included: frozen
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    u = hn2.task_embs[2][hn2.code_dim:hn2.code_dim + 100 * 4]
    assert u.abs().sum() > 0  # the new task's correction was trained from zero
    assert stored_params(v2).total == stored_params(v1).total + hn2.emb_dim + 2  # + its mean/std


def test_emb_init_previous_starts_a_task_from_the_last_ones_row():
    """``emb_init='previous'``: a new task's row starts as a copy of the most recent task's
    row (so it starts from that network); the default draws a fresh one."""
    from hnet_serve.training.methods.hnet import HNetMethod
    from hnet_serve.training.methods.registry import make_method
    from tests.test_training import make_task, tiny_config

    tasks = [make_task(f"t{i}", i) for i in range(3)]
    for init in ("random", "previous"):
        cfg = tiny_config(iterations=2, emb_init=init)
        method = HNetMethod(make_method(cfg, tasks[:1]).model, cfg)
        hn = method.model.hypernet
        method.begin_task(0, tasks[0])
        method.train_step(torch.from_numpy(tasks[0].x_train[:8]),
                          torch.from_numpy(tasks[0].y_train[:8]))
        method.end_task(0, tasks[0])
        first = hn.task_embs[0].detach().clone()
        method.begin_task(1, tasks[1])
        same = torch.equal(hn.task_embs[1].detach(), first)
        assert same == (init == "previous")
        assert torch.equal(hn.task_embs[0].detach(), first)  # the old row is untouched
        method.train_step(torch.from_numpy(tasks[1].x_train[:8]),
                          torch.from_numpy(tasks[1].y_train[:8]))
        assert torch.equal(hn.task_embs[0].detach(), first)
        assert not torch.equal(hn.task_embs[1].detach(), first)  # its own copy, trained
    with pytest.raises(Exception, match="emb_init"):
        tiny_config(emb_init="zeros")
