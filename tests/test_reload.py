"""Live versions (issue 18): ``POST /admin/reload`` and ``/admin/rollback`` through ``to_asgi()``
+ TestClient (200/400/401/403/409, no mix of versions under concurrent requests), the admin log,
and ``serve --watch``'s watcher with an atomic replace and with a half-written directory."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from hnet_serve.checkpoint import MANIFEST, WEIGHTS, checkpoint_hash, save_checkpoint
from hnet_serve.serving.runtime import Runtime
from tests.conftest import save_service_checkpoint, tiny_mlp_model
from tests.test_service_http import ROW, serving

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """v1 (the service tests' checkpoint), v2 = v1 + one task, and candidates to refuse."""
    root = tmp_path_factory.mktemp("versions")
    v1 = save_service_checkpoint(root / "v1")
    model = tiny_mlp_model(3)
    model.add_task("binary", num_classes=2, label_names=["no", "yes"])
    model.add_task("task-new")
    save_checkpoint(model, root / "v2")
    model.add_task("task-newer")
    save_checkpoint(model, root / "v3")
    drifted = tiny_mlp_model(3)
    drifted.add_task("binary", num_classes=2, label_names=["no", "yes"])
    with torch.no_grad():
        for p in drifted.hypernet.parameters():
            p.mul_(1.5)
    save_checkpoint(drifted, root / "drifted")
    save_checkpoint(tiny_mlp_model(2), root / "dropped")
    wide = tiny_mlp_model(4, input_size=10)
    save_checkpoint(wide, root / "other-shape")
    bad = root / "bad-hash"
    shutil.copytree(v1, bad)
    data = bytearray((bad / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (bad / WEIGHTS).write_bytes(bytes(data))
    notckpt = root / "not-a-checkpoint"
    notckpt.mkdir()
    (notckpt / "notes.txt").write_text("hello")
    return {"v1": v1, "v2": root / "v2", "v3": root / "v3", "drifted": root / "drifted",
            "dropped": root / "dropped", "other-shape": root / "other-shape", "bad-hash": bad,
            "not-a-checkpoint": notckpt, "missing": root / "nowhere"}


@pytest.fixture(scope="module")
def prometheus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prometheus")


@pytest.fixture
def admin(versions, prometheus_dir, monkeypatch):
    with serving(monkeypatch, prometheus_dir, HNET_CHECKPOINT=versions["v1"],
                 HNET_ADMIN_TOKEN=TOKEN, HNET_WARM="task-0") as c:
        yield c


def reload(client, checkpoint, **body):
    return client.post("/admin/reload", json={"checkpoint": str(checkpoint), **body},
                       headers=AUTH)


def test_reload_adds_a_task_then_rollback_swaps_back(admin, versions):
    v1, v2 = checkpoint_hash(versions["v1"]), checkpoint_hash(versions["v2"])
    r = reload(admin, versions["v2"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"version": v2, "previous": v1, "added": ["task-new"], "removed": [],
                    "tasks": ["task-0", "task-1", "task-2", "binary", "task-new"]}
    assert r.headers["x-hnet-version"] == v2
    p = admin.post("/predict", json={"task": "task-new", "inputs": [ROW]})
    assert p.status_code == 200 and p.headers["x-hnet-version"] == v2
    want = Runtime.from_checkpoint(versions["v2"]).predict("task-new", np.array([ROW]))
    np.testing.assert_allclose(p.json()["probabilities"], want.probabilities, atol=1e-6)
    version = admin.get("/version").json()
    assert (version["version"], version["previous"]) == (v2, v1)
    assert version["source"] == str(versions["v2"].resolve())
    tasks = admin.get("/tasks").json()
    assert tasks["version"] == v2 and tasks["cache"]["entries"] >= 1  # warm task rebuilt
    assert "task-0" in {t["name"] for t in tasks["tasks"] if t["cached"]}
    assert f'hnet_checkpoint_info{{version="{v2}"}} 1.0' in admin.get("/metrics").text

    r = admin.post("/admin/rollback", json={}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"version": v1, "previous": v2, "added": [], "removed": ["task-new"],
                        "tasks": ["task-0", "task-1", "task-2", "binary"]}
    gone = admin.post("/predict", json={"task": "task-new", "inputs": [ROW]})
    assert gone.status_code == 404 and gone.headers["x-hnet-version"] == v1
    # The same content again changes nothing.
    again = reload(admin, versions["v1"])
    assert again.status_code == 200 and again.json()["unchanged"] is True


REFUSED = [
    # (candidate, body, status, message)
    ("missing", {}, 400, "does not exist"),
    ("not-a-checkpoint", {}, 400, "is not a checkpoint"),
    ("bad-hash", {}, 400, "not usable"),
    ("other-shape", {}, 400, "inputs of shape [10]"),
    ("dropped", {}, 409, "drops served tasks ['task-2', 'binary']"),
    ("drifted", {}, 409, "weight drift"),
    ("v2", {"force": "yes"}, 400, "force must be a bool"),
    ("v2", {"extra": 1}, 400, "unknown fields ['extra']"),
]


@pytest.mark.parametrize(("candidate", "body", "status", "message"), REFUSED,
                         ids=[f"{c[0]}-{c[2]}" for c in REFUSED])
def test_a_refused_reload_changes_nothing(admin, versions, candidate, body, status, message):
    v1 = checkpoint_hash(versions["v1"])
    r = reload(admin, versions[candidate], **body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert admin.get("/version").json() == {**admin.get("/version").json(), "version": v1,
                                            "previous": None}
    assert admin.post("/predict", json={"task": "task-0", "inputs": [ROW]}).headers[
        "x-hnet-version"] == v1
    assert admin.get("/tasks").json()["cache"]["capacity_bytes"] == 512 * 2**20  # as it was


def test_force_accepts_a_drifted_or_dropping_candidate(admin, versions):
    r = reload(admin, versions["drifted"], force=True)
    assert r.status_code == 200, r.text
    assert set(r.json()["moved"]) == {"task-0", "task-1", "task-2", "binary"}
    r = reload(admin, versions["dropped"], force=True)
    assert r.status_code == 200 and r.json()["removed"] == ["task-2", "binary"]


@pytest.mark.parametrize(("env", "headers", "status"), [
    ({}, AUTH, 403),  # no token configured: admin routes off
    ({"HNET_ADMIN_TOKEN": TOKEN}, {}, 401),
    ({"HNET_ADMIN_TOKEN": TOKEN}, {"Authorization": "Bearer wrong"}, 401),
    ({"HNET_ADMIN_TOKEN": TOKEN}, {"Authorization": f"Basic {TOKEN}"}, 401),
    ({"HNET_ADMIN_TOKEN": TOKEN}, {"Authorization": TOKEN}, 401),
], ids=["no-token-403", "missing-401", "wrong-401", "basic-401", "no-scheme-401"])
def test_admin_needs_the_token(versions, prometheus_dir, monkeypatch, env, headers, status,
                               caplog):
    v1 = checkpoint_hash(versions["v1"])
    with serving(monkeypatch, prometheus_dir, HNET_CHECKPOINT=versions["v1"], **env) as c, \
            caplog.at_level(logging.INFO, logger="bentoml.hnet_serve"):
        for route, body in (("reload", {"checkpoint": str(versions["v2"])}), ("rollback", {})):
            r = c.post(f"/admin/{route}", json=body, headers=headers)
            assert r.status_code == status, r.text
            assert r.json()["type"] == ("Forbidden" if status == 403 else "Unauthorized")
        assert c.get("/version").json()["version"] == v1
    lines = [rec.getMessage() for rec in caplog.records if "admin:" in rec.getMessage()]
    assert len(lines) == 2 and all(f"-> {status}" in ln for ln in lines)
    assert all("testclient" in ln for ln in lines)  # who: the client's address
    assert not any(TOKEN in rec.getMessage() for rec in caplog.records)


def test_token_file_and_log_without_the_token(versions, prometheus_dir, monkeypatch, tmp_path,
                                              caplog):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with serving(monkeypatch, prometheus_dir, HNET_CHECKPOINT=versions["v1"],
                 HNET_ADMIN_TOKEN_FILE=token_file) as c, \
            caplog.at_level(logging.INFO, logger="bentoml.hnet_serve"):
        assert reload(c, versions["v2"]).status_code == 200
        assert c.post("/admin/rollback", headers=AUTH).status_code == 200
        assert c.post("/admin/rollback", headers=AUTH).status_code == 200  # back to v2
    lines = [rec.getMessage() for rec in caplog.records if "admin:" in rec.getMessage()]
    assert any(f"reload {versions['v2']} from testclient -> 200" in ln for ln in lines), lines
    assert any("rollback from testclient -> 200" in ln for ln in lines), lines
    assert not any(TOKEN in rec.getMessage() for rec in caplog.records)


def test_rollback_without_a_previous_version_is_409(admin):
    r = admin.post("/admin/rollback", headers=AUTH)
    assert r.status_code == 409 and "no previous version" in r.json()["error"]


def test_reload_by_model_tag(versions, prometheus_dir, monkeypatch, tmp_path):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    from hnet_serve.serving.store import import_checkpoint

    (tmp_path / "models").mkdir()
    with BentoMLContainer.model_store.patch(ModelStore(str(tmp_path / "models"))):
        tag = import_checkpoint(versions["v2"])
        with serving(monkeypatch, prometheus_dir, HNET_CHECKPOINT=versions["v1"],
                     HNET_ADMIN_TOKEN=TOKEN) as c:
            r = reload(c, tag)
            assert r.status_code == 200, r.text
            assert c.get("/version").json()["source"] == tag
            r = reload(c, "hnet:0000000000000000")
            assert r.status_code == 400 and "model store" in r.json()["error"]


def test_no_request_sees_a_mix_of_versions(admin, versions):
    """Concurrent requests while reloading back and forth between two versions whose old tasks
    answer differently: every answer is its x-hnet-version's reference answer."""
    refs = {checkpoint_hash(versions[k]): Runtime.from_checkpoint(versions[k])
            for k in ("v1", "drifted")}
    rng = np.random.default_rng(0)
    bodies = [{"task": t, "inputs": rng.normal(size=(3, 12)).round(3).tolist()}
              for t in ("task-0", "task-1", None, "binary") * 10]
    stop = threading.Event()

    def swap() -> int:
        n = 0
        while not stop.is_set():
            target = versions["drifted"] if n % 2 == 0 else versions["v1"]
            assert reload(admin, target, force=True).status_code == 200
            n += 1
        return n

    def call(body):
        r = admin.post("/predict", json=body)
        return body, r

    with ThreadPoolExecutor(8) as pool:
        swapper = pool.submit(swap)
        results = list(pool.map(call, bodies * 3))
        stop.set()
        swaps = swapper.result()
    assert swaps >= 2
    seen = set()
    for body, r in results:
        assert r.status_code == 200, r.text
        version = r.headers["x-hnet-version"]
        seen.add(version)
        want = refs[version].predict(body["task"], np.array(body["inputs"], dtype=np.float32))
        np.testing.assert_allclose(r.json()["probabilities"], want.probabilities, atol=1e-5)
    assert len(seen) == 2


# -- serve --watch ----------------------------------------------------------------------------
def replace_atomically(src: Path, dst: Path) -> None:
    """What add-task/train do: write beside, then swap in (fsutil.replace_dir)."""
    from hnet_serve.fsutil import replace_dir, temp_sibling

    tmp = temp_sibling(dst)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dst)


def test_watch_reloads_an_atomic_replace_never_a_half_written_one(admin, versions, tmp_path):
    from hnet_serve.serving.watch import AdminCallError, CheckpointWatcher, admin_call

    watched = tmp_path / "live"
    shutil.copytree(versions["v1"], watched)
    staged = tmp_path / "staged"  # stands for the model store: a copy that outlives the dir

    def stage(path: str) -> str:
        from hnet_serve.checkpoint import load_checkpoint

        load_checkpoint(path)  # full validation, as import_checkpoint does
        out = staged / checkpoint_hash(path)[:16]
        if not out.exists():
            shutil.copytree(path, out)
        return str(out)

    def call(target: str) -> dict:
        r = reload(admin, target)
        if r.status_code != 200:
            raise AdminCallError(r.json()["error"])
        return r.json()

    watcher = CheckpointWatcher(str(watched), stage=stage, reload=call, interval=0.01)
    assert watcher.poll() is None  # nothing new
    # Half-written: v2's manifest is there, its weights not yet complete.
    (watched / MANIFEST).write_bytes((versions["v2"] / MANIFEST).read_bytes())
    (watched / WEIGHTS).write_bytes((versions["v2"] / WEIGHTS).read_bytes()[:100])
    for _ in range(3):
        assert watcher.poll() is None
    assert admin.get("/version").json()["version"] == checkpoint_hash(versions["v1"])
    # Complete now: picked up.
    (watched / WEIGHTS).write_bytes((versions["v2"] / WEIGHTS).read_bytes())
    answer = watcher.poll()
    assert answer is not None and answer["added"] == ["task-new"]
    # An atomic replace by a checkpoint that drops a served task: refused (409), not retried.
    replace_atomically(versions["v1"], watched)
    assert watcher.poll() is None and watcher.poll() is None
    assert admin.get("/version").json()["version"] == checkpoint_hash(versions["v2"])
    # An atomic replace by the next version: reloaded; the rollback still finds v2 (its staged
    # copy), though the directory no longer holds it.
    replace_atomically(versions["v3"], watched)
    answer = watcher.poll()
    assert answer is not None and answer["added"] == ["task-newer"]
    assert watcher.poll() is None
    r = admin.post("/admin/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == checkpoint_hash(versions["v2"])
    # The admin client against an unreachable server: one line.
    with pytest.raises(Exception, match="cannot reach"):
        admin_call("http://127.0.0.1:9", "reload", token=TOKEN, timeout=2)


@pytest.mark.integration
def test_serve_watch_and_reload_cli_end_to_end(versions, tmp_path):
    """A real `hnet-serve serve DIR --watch`: an atomic replace of DIR is served without a
    restart; `hnet-serve reload URL --rollback` and `--checkpoint` drive the admin routes."""
    import subprocess
    import sys
    import time

    import httpx

    from tests.test_service_http import child_env, free_port, live_server

    watched = tmp_path / "live"
    shutil.copytree(versions["v1"], watched)
    env = {**child_env(tmp_path / "bentoml"), "HNET_ADMIN_TOKEN": TOKEN}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    exe = str(Path(sys.executable).with_name("hnet-serve"))

    def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
        e = {k: v for k, v in env.items() if k != "HNET_ADMIN_TOKEN"}
        if token:
            e["HNET_ADMIN_TOKEN"] = token
        return subprocess.run([exe, "reload", url, *args], env=e, capture_output=True, text=True,
                              timeout=120, check=False)

    def version(http: httpx.Client, want: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while http.get("/version").json()["version"] != want:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    v1, v2 = checkpoint_hash(versions["v1"]), checkpoint_hash(versions["v2"])
    cmd = [exe, "serve", str(watched), "--port", str(port), "--watch", "--watch-interval", "0.2"]
    with live_server(cmd, env, log, port) as (http, _):
        replace_atomically(versions["v2"], watched)
        version(http, v2)
        r = http.post("/predict", json={"task": "task-new", "inputs": [ROW]})
        assert r.status_code == 200 and r.headers["x-hnet-version"] == v2
        done = cli("--rollback")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["version"] == v1
        done = cli("--checkpoint", str(versions["dropped"]))
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith(
            "hnet-serve reload: error: reload refused (409): the candidate drops")
        done = cli(token="wrong")
        assert done.returncode == 1 and "(401)" in done.stderr
        assert http.get("/version").json()["version"] == v1
    text = log.read_text()
    assert "Traceback" not in text
    assert TOKEN not in text


def test_reload_cli_errors_are_one_line(monkeypatch, capsys):
    from hnet_serve.cli import main

    for key in ("HNET_ADMIN_TOKEN", "HNET_ADMIN_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    assert main(["reload", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("hnet-serve reload: error: no admin token: set HNET_ADMIN_TOKEN or "
                   "HNET_ADMIN_TOKEN_FILE to the server's")
    monkeypatch.setenv("HNET_ADMIN_TOKEN", TOKEN)
    assert main(["reload", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    out = capsys.readouterr()
    assert len(out.err.strip().splitlines()) == 1 and "cannot reach" in out.err
    assert json.loads(out.out)["type"] == "AdminCallError"  # JSON like the other commands
    assert main(["reload", "http://127.0.0.1:9", "--rollback", "--force"]) == 1
    assert "--rollback takes no" in capsys.readouterr().err
