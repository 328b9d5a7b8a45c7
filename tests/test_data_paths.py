"""Data you can move (issue 16): checkpoints record task files relative to themselves plus
their sha256; eval finds moved data with --data-dir and fails loudly when it cannot; named
custom tasks; JSON errors for --json commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hnet_serve.checkpoint import load_checkpoint
from hnet_serve.cli import main
from tests.test_training import make_task, save_npz
from tests.test_training_cli import TINY, run, run_json


@pytest.fixture
def project(tmp_path, capsys) -> Path:
    """project/data/{a,b}.npz and project/ckpt trained on them with named tasks."""
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    for n, s in (("a", 1), ("b", 2)):
        save_npz(data / f"{n}.npz", make_task(n, s))
    code = main(["train", "--benchmark", "custom", "--data", f"first={data / 'a.npz'}",
                 "--data", f"second={data / 'b.npz'}", "--iterations", "30",
                 "--out", str(tmp_path / "project" / "ckpt"), *TINY])
    assert code == 0
    capsys.readouterr()  # the training summary is not what the tests read
    return tmp_path / "project"


def test_named_tasks_and_relative_data_paths(project):
    model = load_checkpoint(project / "ckpt")
    assert model.task_names == ["first", "second"]
    src = model.meta["task_sources"]["first"]
    assert src["path"] == "../data/a.npz"  # relative to the checkpoint directory
    assert src["absolute_path"] == str(project / "data" / "a.npz")
    assert len(src["sha256"]) == 64


def test_a_project_moved_as_a_whole_still_evaluates(capsys, project, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)
    ev = run_json(capsys, "eval", moved / "ckpt", "--json")
    assert set(ev["accuracy"]) == {"first", "second"} and ev["missing"] == {}


def test_moved_data_fails_loudly_then_is_found_with_data_dir(capsys, project, tmp_path):
    shutil.move(project / "data", tmp_path / "archive")
    code, _, err = run(capsys, "eval", project / "ckpt")
    assert code == 1
    assert "no test data for 2 task(s)" in err and "--data-dir" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    ev = run_json(capsys, "eval", project / "ckpt", "--data-dir", tmp_path / "archive", "--json")
    assert set(ev["accuracy"]) == {"first", "second"}


def test_changed_data_is_not_used(capsys, project):
    save_npz(project / "data" / "a.npz", make_task("a", 9))  # same name, other rows
    code, _, err = run(capsys, "eval", project / "ckpt")
    assert code == 1 and "changed since training" in err


def test_eval_data_task_pairs_repeat(capsys, project):
    ev = run_json(capsys, "eval", project / "ckpt", "--data", project / "data" / "a.npz",
                  "--task", "first", "--data", project / "data" / "b.npz", "--task", "second",
                  "--json")
    assert set(ev["accuracy"]) == {"first", "second"}
    code, _, err = run(capsys, "eval", project / "ckpt", "--data", project / "data" / "a.npz",
                       "--task", "first", "--data", project / "data" / "b.npz")
    assert code == 1 and "go in pairs" in err


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "3"], "--tasks does not apply to --benchmark custom"),
    (["--data", "=x.npz"], "task name before '=' is empty"),
    (["--data", "bad/name=x.npz"], "task name"),
])
def test_custom_benchmark_flag_errors_write_nothing(capsys, project, tmp_path, argv, message):
    out = tmp_path / "new"
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data",
                       f"a={project / 'data' / 'a.npz'}", *argv, "--out", out, *TINY)
    assert code == 1 and message in err and not out.exists()


def test_mixing_named_and_unnamed_data_is_refused(capsys, project, tmp_path):
    code, _, err = run(capsys, "train", "--benchmark", "custom", "--data",
                       f"a={project / 'data' / 'a.npz'}", "--data", project / "data" / "b.npz",
                       "--out", tmp_path / "new", *TINY)
    assert code == 1 and "name every task" in err


def test_json_commands_print_a_json_error_object(capsys, project, tmp_path):
    code, out, err = run(capsys, "add-task", project / "ckpt", "--name", "c", "--data",
                         tmp_path / "missing.npz", "--out", tmp_path / "v2", "--json")
    assert code == 1
    body = json.loads(out)
    assert body["type"] == "DataError" and "does not exist" in body["error"]
    assert body["error"] in err
