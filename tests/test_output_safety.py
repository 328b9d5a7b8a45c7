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


# -- Minor items ---------------------------------------------------------------------------------
def rewrite_manifest(ck: Path, edit) -> None:
    """Edit the manifest and recompute its content hash (as an attacker could)."""
    import json

    m = json.loads((ck / ckpt.MANIFEST).read_text())
    edit(m)
    m["content_hash"] = ckpt._content_hash(m, (ck / ckpt.WEIGHTS).read_bytes())
    (ck / ckpt.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("field,value", [("input_mean", [float("nan")]),
                                         ("input_mean", [float("inf")]),
                                         ("input_std", [float("nan")])])
def test_non_finite_normalization_is_refused_on_load(tmp_path, field, value):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(1), ck)
    rewrite_manifest(ck, lambda m: m["target"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(ck)


def test_eval_with_task_sources_not_a_mapping_is_a_clean_answer(capsys, tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(2), ck)
    rewrite_manifest(ck, lambda m: m["meta"].update(task_sources="oops", results="oops"))
    code = main(["eval", str(ck), "--report-dir", str(tmp_path / "rep")])
    out, err = capsys.readouterr()
    # A clean answer (issue 16: eval fails when a task's data cannot be found): the report
    # names both tasks, then one line on stderr and status 1, never a traceback.
    assert code == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "no test data for 2 task(s)" in err
    assert out.count("not evaluated: no data source recorded") == 2


def test_weights_larger_than_the_manifest_needs_are_not_read(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(1), ck)
    with open(ck / ckpt.WEIGHTS, "ab") as f:
        f.truncate((ck / ckpt.WEIGHTS).stat().st_size + (1 << 40))  # sparse: 1 TiB more
    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: read.append(self.name) or real(self))
    with pytest.raises(CheckpointError, match="more than the .* its manifest's tensors take"):
        load_checkpoint(ck)
    assert ckpt.WEIGHTS not in read


def test_symlinked_members_are_not_followed(capsys, tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(1), ck)
    (tmp_path / "secret").write_text("x" * 100)
    (ck / "extra").symlink_to(tmp_path / "secret")
    code = main(["info", str(ck), "--json"])
    out = capsys.readouterr().out
    assert code == 0 and "extra" not in out
    (ck / "extra").unlink()
    (ck / ckpt.WEIGHTS).rename(tmp_path / "w")
    (ck / ckpt.WEIGHTS).symlink_to(tmp_path / "w")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(ck)


# scoring
@pytest.fixture
def scoring_setup(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(tiny_mlp_model(1), ck)
    rows = np.random.default_rng(0).normal(size=(4, 12)).round(3)
    header = ",".join(f"f{i}" for i in range(12))
    lines = [",".join(map(str, r)) for r in rows]
    csv = tmp_path / "in.csv"
    csv.write_text("\n".join([header, lines[0], "", lines[1], "  ", lines[2], lines[3], "", ""]))
    return ck, csv


def test_blank_csv_lines_are_skipped_and_keep_their_numbers(tmp_path, scoring_setup):
    from hnet_serve.scoring.scorer import score_file

    ck, csv = scoring_setup
    report = score_file(ck, csv, tmp_path / "o.npy", task="task-0", row_numbers=True,
                        rejects=str(tmp_path / "r.jsonl"), progress=False)
    assert report.rows_rejected == 0 and report.rows_scored == 4
    assert np.load(tmp_path / "o.npy")["row"].tolist() == [0, 2, 4, 5]


def test_rejects_naming_the_output_by_another_spelling_is_refused(tmp_path, scoring_setup,
                                                                  monkeypatch):
    from hnet_serve.errors import ConfigError
    from hnet_serve.scoring.scorer import score_file

    ck, csv = scoring_setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "link.csv").symlink_to(tmp_path / "out.csv")
    for rejects in ("./out.csv", "link.csv", "d/../out.csv", str(tmp_path / "out.csv")):
        with pytest.raises(ConfigError, match="same file"):
            score_file(ck, csv, "out.csv", task="task-0", rejects=rejects, progress=False)
    with pytest.raises(InputError, match="inside the checkpoint"):
        score_file(ck, csv, ck / "out.csv", task="task-0", progress=False)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("fault", ["unwritable directory", "disk full"])
def test_score_write_failures_are_one_line(capsys, tmp_path, scoring_setup, monkeypatch, fault):
    from hnet_serve.scoring import writers

    ck, csv = scoring_setup
    if fault == "unwritable directory":  # (tests run as root: chmod would not stop us)
        def denied(path, kind="tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(writers, "temp_sibling", denied)
    else:
        def full(path):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(writers, "fsync_path", full)
    code, err = run(capsys, "score", ck, "--input", csv, "--output", tmp_path / "o.csv",
                    "--task", "task-0", "--no-progress")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("Permission denied" if fault == "unwritable directory" else "No space left") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "in.csv"]


# export
def test_killed_export_all_leaves_the_previous_set(tmp_path, monkeypatch):
    from hnet_serve.export import onnx_export

    model = tiny_mlp_model(4)
    out = tmp_path / "onnx"
    onnx_export.export_all(model, out, ["task-0"], verify=False)
    before = tree_digest(out)
    real = onnx_export._export_task
    calls = []

    def killed_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_task", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_all(model, out, verify=False)
    assert tree_digest(out) == before  # not 2 of 4 new files next to the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    monkeypatch.setattr(onnx_export, "_export_task", real)
    onnx_export.export_all(model, out, ["task-1"], verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["task-0.onnx", "task-1.onnx"]


def test_export_out_holding_other_files_or_the_checkpoint_is_refused(capsys, tmp_path):
    save_checkpoint(tiny_mlp_model(1), tmp_path / "ck")
    (tmp_path / "notes.txt").write_text("mine")
    before = tree_digest(tmp_path)
    for out in (tmp_path, tmp_path / "ck"):
        code, err = run(capsys, "export", tmp_path / "ck", "--all", "--out", out, "--no-verify")
        assert code == 1 and "Traceback" not in err and "checkpoint" in err, err
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("mine")
    code, err = run(capsys, "export", tmp_path / "ck", "--all", "--out", tmp_path / "docs",
                    "--no-verify")
    assert code == 1 and "'a.txt'" in err and "not an export directory" in err
    assert (tmp_path / "docs" / "a.txt").read_text() == "mine"
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("docs")} == before


# model store
@pytest.fixture
def model_store(tmp_path):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    (tmp_path / "models").mkdir()
    with BentoMLContainer.model_store.patch(ModelStore(str(tmp_path / "models"))):
        yield tmp_path / "models"


def test_a_damaged_store_copy_is_replaced_on_the_next_import(tmp_path, model_store):
    import bentoml

    from hnet_serve.serving.store import checkpoint_dir, import_checkpoint

    save_checkpoint(tiny_mlp_model(2), tmp_path / "ck")
    tag = import_checkpoint(tmp_path / "ck")
    stored = checkpoint_dir(bentoml.models.get(tag)) / ckpt.WEIGHTS
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x40  # bit rot
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(stored.parent)
    assert import_checkpoint(tmp_path / "ck") == tag
    assert load_checkpoint(checkpoint_dir(bentoml.models.get(tag))).task_names == [
        "task-0", "task-1"]


def test_serve_import_only_on_a_full_disk_is_one_line(capsys, tmp_path, model_store,
                                                      monkeypatch):
    import bentoml

    from hnet_serve.serving import store

    save_checkpoint(tiny_mlp_model(2), tmp_path / "ck")

    def full(src, dst, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.shutil, "copy2", full)
    code, err = run(capsys, "serve", tmp_path / "ck", "--import-only")
    assert code == 1 and "No space left" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    from bentoml.exceptions import NotFound

    with pytest.raises(NotFound):
        bentoml.models.list("hnet")
