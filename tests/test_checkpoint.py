"""The checkpoint format: round trips, validation of every corruption, atomic saves, CLI info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hnet_serve.checkpoint import (
    MANIFEST,
    WEIGHTS,
    checkpoint_hash,
    load_checkpoint,
    save_checkpoint,
)
from hnet_serve.cli import main as cli_main
from hnet_serve.errors import CheckpointError
from tests.conftest import (
    tiny_adapter_model,
    tiny_columns_model,
    tiny_mlp_model,
    tiny_resnet_model,
)


def _all_logits(model, x_by_task):
    return {n: model.logits(n, x_by_task(n)) for n in model.task_names}


@pytest.mark.parametrize("factory", [tiny_mlp_model, tiny_resnet_model, tiny_columns_model,
                                     tiny_adapter_model])
def test_round_trip_identical_outputs_for_every_task(tmp_path, factory):
    model = factory()
    model.meta = {"benchmark": "unit", "seed": 3}
    model.registry.get(model.task_names[0]).metrics["accuracy"] = 0.75
    shape = model.target_config.input_shape
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.rand(5, *shape, generator=g) for n in model.task_names}
    h = save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.task_names == model.task_names
    assert loaded.meta == model.meta
    assert loaded.registry.to_list() == model.registry.to_list()
    before, after = _all_logits(model, xs.get), _all_logits(loaded, xs.get)
    for n in model.task_names:
        assert torch.equal(before[n], after[n]), n
    assert checkpoint_hash(tmp_path / "ck") == h
    # Saving the loaded model again gives the same content hash (deterministic format).
    assert save_checkpoint(loaded, tmp_path / "ck2") == h
    # No pickle anywhere in the checkpoint.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [MANIFEST, WEIGHTS]


def test_loaded_model_can_grow_and_keeps_old_tasks(tmp_path, mlp_model):
    save_checkpoint(mlp_model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    old = loaded.generate(loaded.task_names).detach().clone()
    loaded.add_task("later")
    assert torch.equal(loaded.generate(loaded.task_names[:3]).detach(), old)


# -- corruption cases, each with its own message --------------------------------------------
def _manifest(ck: Path) -> dict:
    return json.loads((ck / MANIFEST).read_text())


def _write_manifest(ck: Path, m: dict) -> None:
    (ck / MANIFEST).write_text(json.dumps(m))


def _corrupt_missing_manifest(ck: Path) -> None:
    (ck / MANIFEST).unlink()


def _corrupt_missing_weights(ck: Path) -> None:
    (ck / WEIGHTS).unlink()


def _corrupt_version(ck: Path) -> None:
    m = _manifest(ck)
    m["format_version"] = 99
    _write_manifest(ck, m)


def _corrupt_json(ck: Path) -> None:
    (ck / MANIFEST).write_text("{not json")


def _corrupt_truncate(ck: Path) -> None:
    data = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt_bitflip(ck: Path) -> None:
    data = bytearray((ck / WEIGHTS).read_bytes())
    data[-10] ^= 0x40
    (ck / WEIGHTS).write_bytes(bytes(data))


def _corrupt_shape(ck: Path) -> None:
    # The configs say a different architecture than the stored tensors (hash updated to match,
    # so only the shape check can catch it).
    from hnet_serve.checkpoint import _content_hash

    m = _manifest(ck)
    m["target"]["hidden"] = [17, 8]
    m["content_hash"] = _content_hash(m, (ck / WEIGHTS).read_bytes())
    _write_manifest(ck, m)


def _corrupt_hash(ck: Path) -> None:
    m = _manifest(ck)
    m["tasks"][0]["num_classes"] = 2  # edited by hand without updating the hash
    _write_manifest(ck, m)


def _corrupt_field(ck: Path) -> None:
    m = _manifest(ck)
    m["hypernet"]["chunk_size"] = -5
    _write_manifest(ck, m)


def _corrupt_not_dir(ck: Path) -> None:
    for p in ck.iterdir():
        p.unlink()
    ck.rmdir()
    ck.write_text("file")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_corrupt_missing_manifest, "missing manifest.json"),
        (_corrupt_missing_weights, "missing weights.safetensors"),
        (_corrupt_version, "unsupported format version 99"),
        (_corrupt_json, "not valid JSON"),
        (_corrupt_truncate, "content hash mismatch \\(file truncated or corrupt\\)"),
        (_corrupt_bitflip, "content hash mismatch"),
        (_corrupt_shape, "shape mismatch for 'buffers|shape mismatch|tensors do not match"),
        (_corrupt_hash, "content hash mismatch \\(file modified\\)"),
        (_corrupt_field, "invalid field 'hypernet.chunk_size'"),
        (_corrupt_not_dir, "does not exist"),
    ],
)
def test_corruption_raises_checkpoint_error(tmp_path, mlp_model, corrupt, message):
    ck = tmp_path / "ck"
    save_checkpoint(mlp_model, ck)
    corrupt(ck)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ck)


def test_shape_mismatch_names_the_tensor(tmp_path, mlp_model):
    ck = tmp_path / "ck"
    save_checkpoint(mlp_model, ck)
    _corrupt_shape(ck)
    with pytest.raises(CheckpointError, match="shape mismatch for .*'layers.0.weight'"):
        load_checkpoint(ck)


# -- atomic saves --------------------------------------------------------------------------
def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, mlp_model):
    ck = tmp_path / "ck"
    h0 = save_checkpoint(mlp_model, ck)
    x = torch.rand(4, 12)
    before = mlp_model.logits("task-0", x)
    mlp_model.add_task("extra")
    with torch.no_grad():
        for p in mlp_model.hypernet.shared_parameters():
            p.add_(1.0)

    def crash(_tmp):
        raise RuntimeError("simulated crash mid-save")

    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(mlp_model, ck, _before_swap=crash)
    loaded = load_checkpoint(ck)
    assert checkpoint_hash(ck) == h0
    assert loaded.task_names == ["task-0", "task-1", "task-2"]
    assert torch.equal(loaded.logits("task-0", x), before)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary sibling left behind


def test_overwrite_replaces_checkpoint(tmp_path, mlp_model):
    ck = tmp_path / "ck"
    save_checkpoint(mlp_model, ck)
    mlp_model.add_task("extra")
    save_checkpoint(mlp_model, ck)
    assert load_checkpoint(ck).task_names[-1] == "extra"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, mlp_model):
    """A real SIGKILL while the new version is being written (not an exception)."""
    ck = tmp_path / "ck"
    h0 = save_checkpoint(mlp_model, ck)
    script = f"""
import os, signal
from hnet_serve.checkpoint import load_checkpoint, save_checkpoint
m = load_checkpoint({str(ck)!r})
m.add_task("extra")
save_checkpoint(m, {str(ck)!r}, _before_swap=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert proc.returncode == -9
    assert checkpoint_hash(ck) == h0
    assert load_checkpoint(ck).task_names == mlp_model.task_names


# -- CLI info ------------------------------------------------------------------------------
def test_cli_info_json(tmp_path, capsys, mlp_model):
    ck = tmp_path / "ck"
    save_checkpoint(mlp_model, ck)
    assert cli_main(["info", str(ck), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in out["tasks"]] == ["task-0", "task-1", "task-2"]
    assert out["tasks"][0]["input_shape"] == [12] and out["tasks"][0]["num_classes"] == 3
    assert out["target_params"] == mlp_model.target.n_params
    assert out["hypernet_params"] == mlp_model.hypernet.n_shared
    assert out["compression_ratio"] == pytest.approx(
        mlp_model.hypernet.n_shared / mlp_model.target.n_params
    )
    assert set(out["files"]) == {MANIFEST, WEIGHTS} and all(v > 0 for v in out["files"].values())


def test_cli_info_text_and_broken_checkpoint(tmp_path, capsys, mlp_model):
    ck = tmp_path / "ck"
    save_checkpoint(mlp_model, ck)
    assert cli_main(["info", str(ck)]) == 0
    text = capsys.readouterr().out
    assert "compression ratio" in text and "task-2" in text
    _corrupt_truncate(ck)
    assert cli_main(["info", str(ck)]) == 1
    err = capsys.readouterr().err
    assert "content hash mismatch" in err and "Traceback" not in err


def test_console_script_version_and_help(tmp_path, mlp_model):
    exe = Path(sys.executable).with_name("hnet-serve")
    env = dict(os.environ)
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and out.stdout.startswith("hnet-serve ")
    helped = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, check=False)
    assert helped.returncode == 0 and "info" in helped.stdout
    save_checkpoint(mlp_model, tmp_path / "ck")
    _corrupt_version(tmp_path / "ck")
    bad = subprocess.run([str(exe), "info", str(tmp_path / "ck")], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "unsupported format version" in bad.stderr and "Traceback" not in bad.stderr


def test_save_removes_only_dead_writers_leftovers(tmp_path):
    """A SIGKILLed save leaves ``.NAME.tmp-<host>-<pid>-<rand>``; the next save of NAME removes
    it when that process is gone, and leaves live writers, other hosts and other names alone."""
    from hnet_serve import fsutil

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = fsutil._host_tag()
    out = tmp_path / "ck"
    stale_dir = tmp_path / f".ck.tmp-{host}-{dead.pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "weights.safetensors").write_bytes(b"partial")
    stale_old = tmp_path / f".ck.old-{host}-{dead.pid}-89abcdef"
    stale_old.mkdir()
    keep = [
        tmp_path / f".ck.tmp-{host}-{os.getpid()}-0123abcd",  # a live writer (this process)
        tmp_path / f".ck.tmp-ffffffff-{dead.pid}-0123abcd" if host != "ffffffff"
        else tmp_path / f".ck.tmp-00000000-{dead.pid}-0123abcd",  # another host
        tmp_path / f".other.tmp-{host}-{dead.pid}-0123abcd",  # another checkpoint's
        tmp_path / ".ck.tmp-1a2b3c4d",  # an old-style name: no owner to check
    ]
    for k in keep:
        k.mkdir()
    save_checkpoint(tiny_mlp_model(), out)
    assert not stale_dir.exists() and not stale_old.exists()
    assert all(k.exists() for k in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", *(k.name for k in keep)])
    load_checkpoint(out)


def test_failed_save_keeps_a_dead_writers_previous_checkpoint(tmp_path, monkeypatch):
    """Killed between the fallback's two renames, a save leaves the previous checkpoint only in
    ``.NAME.old-*``; a later save that fails must not have removed it."""
    import errno

    from hnet_serve import checkpoint as ckpt
    from hnet_serve import fsutil

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    previous = tmp_path / f".ck.old-{fsutil._host_tag()}-{dead.pid}-0123abcd"
    save_checkpoint(tiny_mlp_model(), previous)

    def disk_full(path, data, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt, "write_synced", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tiny_mlp_model(), tmp_path / "ck")
    assert load_checkpoint(previous).task_names  # still there, still loadable
