"""Issue 14, the file side: an output never replaces anything but our own output, and a task too
small to learn from is refused. Each test fails on the code before the fix."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from hnet_serve import checkpoint as ckpt
from hnet_serve import fsutil
from hnet_serve.checkpoint import load_checkpoint, save_checkpoint
from hnet_serve.cli import main
from hnet_serve.errors import CheckpointError, InputError
from hnet_serve.training.data import TaskData
from tests.conftest import tiny_mlp_model
from tests.test_training import make_task, save_npz

TINY = ["--batch-size", "32", "--lr", "0.01", "--iterations", "2", "--no-progress",
        "--threads", "1"]  # add-task: the architecture is the checkpoint's
ARCH = ["--target-hidden", "16,8", "--hnet-hidden", "10,10", "--chunk-size", "50",
        "--task-emb-dim", "6", "--chunk-emb-dim", "4"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), links as their target text."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project folder: a checkpoint, its data and notes."""
    proj = tmp_path / "project"
    proj.mkdir()
    save_checkpoint(tiny_mlp_model(2), proj / "ck")
    save_npz(proj / "c.npz", make_task("c", 3))
    (proj / "notes.txt").write_text("three weeks of notes")
    return proj


# -- Major 1: --overwrite ------------------------------------------------------------------------
def test_add_task_overwrite_of_a_folder_holding_the_source_deletes_nothing(capsys, project):
    before = tree_digest(project)
    code, err = run(capsys, "add-task", project / "ck", "--name", "c", "--data",
                    project / "c.npz", "--out", project, "--overwrite", *TINY)
    assert code == 1
    assert "contains the source checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert tree_digest(project) == before


def test_train_overwrite_of_a_non_checkpoint_folder_deletes_nothing(capsys, tmp_path, project):
    docs = tmp_path / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.tex").write_text("chapter 1")
    (docs / "sub" / "data.csv").write_text("1,2\n")
    before = tree_digest(docs)
    code, err = run(capsys, "train", "--benchmark", "custom", "--data", project / "c.npz",
                    "--out", docs, "--overwrite", *ARCH, *TINY)
    assert code == 1 and "is not a checkpoint directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tree_digest(docs) == before
    assert not Path(f"{docs}-report").exists()


@pytest.mark.parametrize("extra", ["README.md", "weights.safetensors.bak"])
def test_overwrite_refuses_a_checkpoint_holding_other_files(tmp_path, extra):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(1), ck)
    (ck / extra).write_text("mine")
    before = tree_digest(ck)
    with pytest.raises(InputError, match=f"holds {extra!r}"):
        fsutil.check_output_dir(ck, owned=ckpt.not_a_checkpoint)
    with pytest.raises(CheckpointError, match="never replaced"):
        save_checkpoint(tiny_mlp_model(2), ck)  # the last line of defence, below the CLI
    assert tree_digest(ck) == before


def test_overwrite_still_replaces_a_checkpoint(capsys, tmp_path, project):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(1), ck)
    code, err = run(capsys, "train", "--benchmark", "custom", "--data", project / "c.npz",
                    "--out", ck, "--overwrite", *ARCH, *TINY)
    assert code == 0, err
    assert load_checkpoint(ck).task_names == ["c"]


def test_outputs_never_hold_the_working_or_home_directory(capsys, tmp_path, project,
                                                          monkeypatch):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    (home / "photo.jpg").write_bytes(b"\xff\xd8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    for out in (home, home.parent, ".", "/"):
        code, err = run(capsys, "train", "--benchmark", "custom", "--data", project / "c.npz",
                        "--out", out, "--overwrite", *ARCH, *TINY)
        assert code == 1 and ("directory" in err or "root" in err), (out, err)
    assert (home / "photo.jpg").read_bytes() == b"\xff\xd8"


def test_out_inside_the_source_or_a_symlink_is_refused(capsys, tmp_path, project):
    code, err = run(capsys, "add-task", project / "ck", "--name", "c", "--data",
                    project / "c.npz", "--out", project / "ck" / "v2", *TINY)
    assert code == 1 and "inside the source checkpoint" in err
    (tmp_path / "link").symlink_to(project)
    code, err = run(capsys, "add-task", project / "ck", "--name", "c", "--data",
                    project / "c.npz", "--out", tmp_path / "link", "--overwrite", *TINY)
    assert code == 1 and "source checkpoint" in err
    assert sorted(p.name for p in (project / "ck").iterdir()) == ["manifest.json",
                                                                   "weights.safetensors"]


def test_report_dir_holding_other_files_is_refused_before_training(capsys, tmp_path, project):
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "results.json").write_text("{}")  # ours: may be replaced
    (rep / "keep.txt").write_text("mine")
    code, err = run(capsys, "train", "--benchmark", "custom", "--data", project / "c.npz",
                    "--out", tmp_path / "ck", "--report-dir", rep, *ARCH, *TINY)
    assert code == 1 and "--report-dir" in err and "keep.txt" in err
    assert not (tmp_path / "ck").exists()
    assert (rep / "results.json").read_text() == "{}"
    code, err = run(capsys, "eval", project / "ck", "--report-dir", project)
    assert code == 1 and "--report-dir" in err


def test_owned_files_and_output_file_rules(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.onnx").write_bytes(b"x")
    onnx_only = fsutil.owned_files(lambda n: n.endswith(".onnx"), "export")
    assert fsutil.check_output_dir(d, owned=onnx_only) == d
    (d / "sub").mkdir()
    with pytest.raises(InputError, match="'sub'"):
        fsutil.check_output_dir(d, owned=onnx_only)
    with pytest.raises(InputError, match="already exists"):
        fsutil.check_output_dir(d, owned=onnx_only, overwrite=False)
    f = tmp_path / "in.csv"
    f.write_text("x\n")
    with pytest.raises(InputError, match="is or lies inside"):
        fsutil.check_output_file(tmp_path / "d" / ".." / "in.csv", protect={"input": f})
    with pytest.raises(InputError, match="is a directory"):
        fsutil.check_output_file(d)


# -- Major 4: a task needs rows and classes ------------------------------------------------------
def one_class_task(name: str, n: int = 200) -> TaskData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    return TaskData(name, x[: n * 4 // 5], y[: n * 4 // 5], x[n * 4 // 5:], y[n * 4 // 5:],
                    num_classes=3)


def test_add_task_refuses_a_one_class_task_before_training(capsys, tmp_path, project):
    npz = save_npz(tmp_path / "zeros.npz", one_class_task("z"))
    code, err = run(capsys, "add-task", project / "ck", "--name", "z", "--data", npz,
                    "--out", tmp_path / "v2", *TINY)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "'z'" in err and "zeros.npz" in err and "1 class" in err and "--min-task-classes" in err
    assert not (tmp_path / "v2").exists()


def test_train_refuses_too_few_rows_and_the_minimum_is_configurable(capsys, tmp_path):
    npz = save_npz(tmp_path / "few.npz", make_task("few", 0, n=10))  # 8 training rows
    code, err = run(capsys, "train", "--benchmark", "custom", "--data", npz,
                    "--out", tmp_path / "ck", *ARCH, *TINY)
    assert code == 1 and "'few'" in err and "8 training rows" in err and "minimum 10" in err
    assert not (tmp_path / "ck").exists()
    code, err = run(capsys, "train", "--benchmark", "custom", "--data", npz,
                    "--out", tmp_path / "ck", "--min-task-rows", "5", *ARCH, *TINY)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "ck").task_names == ["few"]
