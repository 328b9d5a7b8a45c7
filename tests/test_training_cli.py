"""``hnet-serve train`` / ``add-task`` / ``eval``: the contracts of issue 3, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hnet_serve.checkpoint import load_checkpoint
from hnet_serve.cli import main
from tests.test_training import files_digest, make_task, save_npz

TINY = ["--target-hidden", "16,8", "--hnet-hidden", "10,10", "--chunk-size", "50",
        "--task-emb-dim", "6", "--chunk-emb-dim", "4", "--batch-size", "32", "--lr", "0.01",
        "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {n: save_npz(d / f"{n}.npz", make_task(n, s)) for n, s in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture(scope="module")
def custom_ckpt(tmp_path_factory, npz_files) -> Path:
    out = tmp_path_factory.mktemp("ck") / "v1"
    code = main(["train", "--benchmark", "custom", "--data", str(npz_files["a"]), "--data",
                 str(npz_files["b"]), "--iterations", "80", "--beta", "1", "--out", str(out),
                 *TINY])
    assert code == 0
    return out


def test_train_split_mnist_interface(capsys, tmp_path):
    """The documented command line, shortened: stable task names, recorded provenance."""
    out = tmp_path / "ck"
    summary = run_json(capsys, "train", "--benchmark", "split-mnist", "--dataset", "mnist5k",
                       "--tasks", "2", "--iterations", "20", "--seed", "0", "--out", out,
                       "--json", *TINY)
    assert summary["task_names"] == ["split-mnist-0", "split-mnist-1"]
    assert 0.5 < summary["mean_accuracy"] <= 1.0
    model = load_checkpoint(out)
    assert model.meta["benchmark"] == "split-mnist" and model.meta["dataset"] == "mnist5k"
    assert model.meta["seed"] == 0 and model.meta["train_config"]["iterations"] == 20
    assert model.registry.get("split-mnist-1").label_names == ["2", "3"]
    assert model.target_config.input_shape == (784,)
    # per-task normalization recorded: the digits' pixels per channel (one), each task its own
    assert model.target_config.input_norm == "per-channel"
    means = [float(model.task_buffers[t]["input_mean"]) for t in model.task_names]
    assert all(0.05 < m < 0.25 for m in means) and means[0] != means[1]
    assert (Path(f"{out}-report") / "accuracy_matrix.png").is_file()

    ev = run_json(capsys, "eval", out, "--json")
    assert ev["accuracy"] == pytest.approx(summary["accuracy"])
    assert ev["mean_accuracy"] == pytest.approx(summary["mean_accuracy"])
    # the same data named explicitly; a task the checkpoint lacks is ignored
    ev2 = run_json(capsys, "eval", out, "--benchmark", "split-mnist", "--dataset", "mnist5k",
                   "--tasks", "3", "--json")
    assert ev2["accuracy"] == pytest.approx(summary["accuracy"])

    code, _, err = run(capsys, "train", "--benchmark", "split-mnist", "--tasks", "1",
                       "--iterations", "1", "--out", out, *TINY)
    assert code == 1 and "already exists" in err


def test_eval_human_output_and_report(capsys, custom_ckpt, tmp_path):
    code, out, _ = run(capsys, "eval", custom_ckpt, "--report-dir", tmp_path / "rep")
    assert code == 0 and "mean accuracy" in out and "a " in out
    assert (tmp_path / "rep" / "eval.json").is_file()
    assert (tmp_path / "rep" / "embeddings.png").is_file()


def test_eval_on_a_given_file(capsys, custom_ckpt, npz_files):
    ev = run_json(capsys, "eval", custom_ckpt, "--data", npz_files["a"], "--task", "a", "--json")
    assert set(ev["accuracy"]) == {"a"} and set(ev["missing"]) == {"b"}
    code, _, err = run(capsys, "eval", custom_ckpt, "--data", npz_files["a"])
    assert code == 1 and "--task" in err
    wide = save_npz(npz_files["a"].parent / "wide.npz", make_task("w", 5, dim=7))
    code, _, err = run(capsys, "eval", custom_ckpt, "--data", wide, "--task", "a")
    assert code == 1 and "do not match" in err


def test_add_task_json_contract(capsys, custom_ckpt, npz_files, tmp_path):
    before = files_digest(custom_ckpt)
    new = tmp_path / "v2"
    report = run_json(capsys, "add-task", custom_ckpt, "--name", "c", "--data",
                      npz_files["c"], "--out", new, "--iterations", "80", "--json",
                      "--max-accuracy-drop", "0.05", *TINY[-3:])
    assert report["new_task"]["name"] == "c" and 0 <= report["new_task"]["accuracy"] <= 1
    assert set(report["old_tasks"]) == {"a", "b"}
    for figs in report["old_tasks"].values():
        assert set(figs) >= {"before", "after", "drift"} and figs["drift"] < 0.05
    assert files_digest(custom_ckpt) == before
    assert load_checkpoint(new).task_names == ["a", "b", "c"]
    ev = run_json(capsys, "eval", new, "--json")
    assert set(ev["accuracy"]) == {"a", "b", "c"}


def test_add_task_refusal_prints_figures_and_writes_nothing(capsys, custom_ckpt, npz_files,
                                                            tmp_path):
    new = tmp_path / "v2"
    code, out, err = run(capsys, "add-task", custom_ckpt, "--name", "c", "--data",
                         npz_files["c"], "--out", new, "--iterations", "30", "--beta", "0",
                         "--max-drift", "0.001", "--json", *TINY[-3:])
    assert code == 1
    assert "error:" in err and "drift" in err and "--force" in err
    report = json.loads(out)
    assert report["saved"] is False and report["violations"]
    assert not new.exists()


@pytest.mark.parametrize("argv,message", [
    (["--name", "c"], "exactly one of --data"),
    (["--data", "MISSING.npz", "--name", "c"], "does not exist"),
    (["--name", "a", "--data", "C"], "already exists"),
    (["--name", "bad/name", "--data", "C"], "invalid task name"),
    (["--name", "c", "--data", "C", "--max-drift", "-1"], "must be >= 0"),
    (["--name", "c", "--data", "C", "--lr", "-1"], "lr"),
])
def test_add_task_bad_input_is_a_clean_error(capsys, custom_ckpt, npz_files, tmp_path, argv,
                                             message):
    argv = [str(npz_files["c"]) if a == "C" else a for a in argv]
    code, _, err = run(capsys, "add-task", custom_ckpt, "--out", tmp_path / "x", *argv,
                         "--iterations", "1", "--no-progress")
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_add_task_to_missing_checkpoint(capsys, tmp_path, npz_files):
    code, _, err = run(capsys, "add-task", tmp_path / "nope", "--name", "c", "--data",
                       npz_files["c"], "--out", tmp_path / "x")
    assert code == 1 and "does not exist" in err


def test_train_config_file_and_validation(capsys, tmp_path, npz_files):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("iterations: 3\nbeta: 0.5\ntarget:\n  hidden: [7]\n")
    out = tmp_path / "ck"
    summary = run_json(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--config", cfg, "--out", out, "--json", "--lr", "0.02",
                       "--no-progress", "--threads", "1")
    assert summary["steps"] == [3]
    model = load_checkpoint(out)
    assert model.target_config.hidden == [7]
    assert model.meta["train_config"]["beta"] == 0.5 and model.meta["train_config"]["lr"] == 0.02

    cfg.write_text("iterations: -3\n")
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--config", cfg, "--out", tmp_path / "ck2")
    assert code == 1 and "iterations=-3" in err
    cfg.write_text("not_a_setting: 1\n")
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--config", cfg, "--out", tmp_path / "ck2")
    assert code == 1 and "not_a_setting" in err
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--method", "magic", "--out", tmp_path / "ck2", "--iterations", "1")
    assert code == 1 and "unknown training method 'magic'" in err
    code, _, err = run(capsys, "train", "--benchmark", "permuted-mnist", "--dataset", "idx-dir",
                       "--out", tmp_path / "ck2")
    assert code == 1 and "--data-dir" in err
    assert not (tmp_path / "ck2").exists()


def test_train_a_baseline_writes_a_report_not_a_checkpoint(capsys, tmp_path, npz_files):
    out = tmp_path / "ft"
    summary = run_json(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--data", npz_files["b"], "--method", "finetune", "--iterations", "20",
                       "--out", out, "--json", *TINY)
    assert summary["method"] == "finetune" and summary["out"] is None
    assert summary["task_names"] == ["a", "b"] and len(summary["accuracy_matrix"]) == 2
    assert not out.exists()
    assert json.loads((tmp_path / "ft-report" / "results.json").read_text())["accuracy"]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "add-task", "eval"):
        assert cmd in out


def test_baseline_strength_flags_reach_the_learner(capsys, tmp_path, npz_files):
    """--ewc-lambda / --ewc-gamma / --fisher-samples / --si-c / --si-xi land in the config's
    method_options (recorded in the report) and change what the baseline learns."""
    data = ["--benchmark", "custom", "--data", npz_files["a"], "--data", npz_files["b"],
            "--iterations", "30", "--json", *TINY]

    def report(name: str, *flags: str) -> dict:
        run_json(capsys, "train", *data, "--out", tmp_path / name, *flags)
        return json.loads((tmp_path / f"{name}-report" / "results.json").read_text())

    weak = report("ewc0", "--method", "ewc", "--ewc-lambda", "0")
    strong = report("ewc1", "--method", "ewc", "--ewc-lambda", "1e9", "--ewc-gamma", "0.5",
                    "--fisher-samples", "64")
    assert weak["config"]["method_options"] == {"ewc_lambda": 0.0}
    assert strong["config"]["method_options"] == {
        "ewc_lambda": 1e9, "ewc_gamma": 0.5, "fisher_samples": 64}
    # a huge EWC penalty pins the network to task a: task b learns less than without it
    assert strong["accuracy_matrix"][1][1] < weak["accuracy_matrix"][1][1]
    si = report("si", "--method", "si", "--si-c", "2.5", "--si-xi", "0.01")
    assert si["config"]["method_options"] == {"si_c": 2.5, "si_xi": 0.01}


@pytest.mark.parametrize("flags, message", [
    (["--method", "si", "--ewc-lambda", "5"], "--ewc-lambda applies to --method ewc"),
    (["--ewc-lambda", "5"], "not to --method hnet"),
    (["--method", "ewc", "--ewc-gamma", "2"], "ewc_gamma=2.0"),
    (["--method", "si", "--si-xi", "0"], "si_xi=0.0"),
])
def test_baseline_strength_flags_are_checked(capsys, tmp_path, npz_files, flags, message):
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--out", tmp_path / "ck", "--iterations", "1", *flags, *TINY)
    assert code == 1 and message in err, err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck-report").exists()


def test_outlier_flags_reach_the_checkpoint_config(capsys, tmp_path):
    out = tmp_path / "ck"
    run_json(capsys, "train", "--benchmark", "split-mnist", "--tasks", "1", "--iterations", "5",
             "--outlier-weight", "0.5", "--outlier-kinds", "rotate, splice", "--out", out,
             "--json", *TINY)
    cfg = load_checkpoint(out).meta["train_config"]  # add-task continues with them
    assert cfg["outlier_weight"] == 0.5 and cfg["outlier_kinds"] == ["rotate", "splice"]


@pytest.mark.parametrize("flags, message", [
    (["--outlier-weight", "0.5", "--outlier-kinds", "twist"], "outlier_kinds.0='twist'"),
    (["--outlier-weight", "-1"], "outlier_weight=-1.0"),
    (["--outlier-weight", "0.5", "--outlier-kinds", "flip,flip"], "must be distinct"),
    (["--outlier-weight", "0.5"], "need image inputs"),  # 12 features: no image geometry
])
def test_outlier_flags_are_checked(capsys, tmp_path, npz_files, flags, message):
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data", npz_files["a"],
                       "--out", tmp_path / "ck", "--iterations", "1", *flags, *TINY)
    assert code == 1 and message in err, err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck-report").exists()


def test_add_task_reference_trains_a_fresh_network_of_the_same_architecture(
        capsys, custom_ckpt, npz_files, tmp_path):
    """--reference: new_task.reference_accuracy is a fresh network of the checkpoint's target,
    trained with the same steps on the same data (the same number as reference_accuracy)."""
    from hnet_serve.training.api import reference_accuracy
    from hnet_serve.training.config import build_config
    from hnet_serve.training.data import load_task_file

    report = run_json(capsys, "add-task", custom_ckpt, "--name", "c", "--data", npz_files["c"],
                      "--out", tmp_path / "v2", "--iterations", "80", "--reference", "--json",
                      "--max-accuracy-drop", "0.05", *TINY[-3:])
    new = report["new_task"]
    model = load_checkpoint(custom_ckpt)
    config = build_config(base=model.meta["train_config"], iterations=80)
    assert config.target.hidden == list(model.target_config.hidden)
    expected = reference_accuracy(load_task_file(npz_files["c"], "c", seed=config.seed), config)
    assert new["reference_accuracy"] == pytest.approx(expected)
    assert new["reference_gap"] == pytest.approx(expected - new["accuracy"])
    assert ("capacity_warning" in new) == (new["reference_gap"] > 0.02)


def test_reference_report_warns_only_past_the_capacity_gap():
    from hnet_serve.training.api import reference_report

    assert "capacity_warning" not in reference_report(0.85, 0.86)
    warned = reference_report(0.80, 0.86)
    assert warned["reference_gap"] == pytest.approx(0.06)
    assert "80.00 %" in warned["capacity_warning"] and "86.00 %" in warned["capacity_warning"]
