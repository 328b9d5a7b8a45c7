"""Faults (issue 7): crashes, a full disk, corrupted artifacts and failing requests.

* ``kill -9`` of ``hnet-serve add-task`` while it trains, while it writes the new checkpoint's
  weights, and just before it renames the new checkpoint into place (and Ctrl-C while it
  trains): the source checkpoint stays byte-identical, loads and serves identically, and
  ``--out`` holds nothing.
* A failed ``add-task`` (the disk fills up mid-write) is a clean error and leaves no partial
  checkpoint, not even a temporary directory.
* A truncated or bit-flipped ``weights.safetensors``: the service never becomes ready
  (``/readyz`` 503, one log line naming the file and the reason) and answers no prediction;
  also in a real ``bentoml serve`` process whose model-store copy rotted after import.
* One request that fails inside a batch fails alone: the requests batched with it are answered,
  and the service keeps answering afterwards.
* A batch or a task inference over many more tasks than the cache holds keeps a bounded number
  of generated weights alive at once (what keeps the server's memory within the cache budget
  plus a fixed overhead; measured under load by benchmarks/load_test.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import hnet_serve.checkpoint as ckpt
from hnet_serve.checkpoint import WEIGHTS
from hnet_serve.cli import main as cli_main
from hnet_serve.serving import backends, runtime
from hnet_serve.serving.config import ServingConfig
from hnet_serve.serving.runtime import Runtime
from hnet_serve.training.api import add_task, load_benchmark, train_tasks
from tests.conftest import tiny_mlp_model
from tests.test_service import mlp_checkpoint, start
from tests.test_service_http import child_env, free_port, serving, stop_process_group
from tests.test_training import files_digest, make_task, save_npz, tiny_config

ROOT = Path(__file__).resolve().parent.parent
ROW = [0.25] * 12


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A trained checkpoint of tasks a, b (test data recorded), with c.npz beside it."""
    d = tmp_path_factory.mktemp("faults")
    files = [str(save_npz(d / f"{t.name}.npz", t)) for t in (make_task("a", 1), make_task("b", 2))]
    save_npz(d / "c.npz", make_task("c", 3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(iterations=40, beta=1.0, data_files=files)
        train_tasks(load_benchmark(cfg), cfg, d / "v1", progress=False)
    finally:
        torch.set_num_threads(threads)
    return d / "v1"


def served(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """What a service on ``path`` answers: every task's probabilities and the inferred tasks."""
    rt = Runtime.from_checkpoint(path)
    x = np.random.default_rng(7).normal(size=(16, 12)).astype(np.float32)
    probs = {t: rt.predict(t, x).probabilities for t in rt.task_names}
    inferred = rt.predict(None, x)
    probs["*"] = inferred.probabilities
    return probs, inferred.tasks


def assert_serves_identically(path: Path, before: tuple[dict[str, np.ndarray], list[str]]) -> None:
    probs, tasks = served(path)
    assert tasks == before[1] and probs.keys() == before[0].keys()
    for name, p in probs.items():
        assert np.array_equal(p, before[0][name]), name  # bit for bit


# -- kill -9 during add-task ---------------------------------------------------------------------
# Runs the real CLI (--force: the drift guarantee is tested elsewhere). "mid-write" and
# "before-rename" kill the process from inside at the two moments of a save that matter (half of
# weights.safetensors on disk; the complete new checkpoint in its temporary directory, not yet
# renamed into place).
CLI_WITH_KILL_POINTS = """
import functools, os, signal, sys
# A shell that starts the suite in the background makes its children ignore SIGINT, and a
# Python started with SIGINT ignored keeps ignoring it: restore Ctrl-C's KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
import hnet_serve.serving.backends as backends
import hnet_serve.checkpoint as ckpt
import hnet_serve.serving.runtime as runtime
from hnet_serve.training import api as training_api

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

mode = sys.argv.pop(1)
if mode == "mid-write":
    write = ckpt.write_synced
    def write_half_then_die(path, data, **kw):
        if path.name == ckpt.WEIGHTS:
            write(path, data[: len(data) // 2], **kw)
            die()
        write(path, data, **kw)
    ckpt.write_synced = write_half_then_die
elif mode == "before-rename":
    training_api.save_checkpoint = functools.partial(ckpt.save_checkpoint, _before_swap=die)
from hnet_serve.cli import main
sys.exit(main(sys.argv[1:]))
"""
TRAINING = re.compile(rb"\| *[1-9][0-9]*/[0-9]+ \[")  # tqdm: "| 12/1000000 [" (steps done)


def run_add_task(source: Path, out: Path, mode: str, sig: signal.Signals | None,
                 log: Path) -> int:
    """Run ``hnet-serve add-task``; with ``sig``, send it once training has made progress."""
    iterations = 1_000_000 if sig else 20  # a signalled run is stopped long before the end
    cmd = [sys.executable, "-c", CLI_WITH_KILL_POINTS, mode, "add-task", str(source),
           "--name", "c", "--data", str(source.parent / "c.npz"), "--out", str(out),
           "--iterations", str(iterations), "--threads", "1", "--force"]
    if sig is None:
        cmd.append("--no-progress")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    try:
        if sig is not None:
            deadline = time.monotonic() + 120
            while not TRAINING.search(log.read_bytes()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"add-task did not train:\n{log.read_text()[-2000:]}")
                time.sleep(0.05)
            proc.send_signal(sig)
        return proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


KILLS = [
    ("SIGKILL while training", "plain", signal.SIGKILL, -9, 0),
    ("Ctrl-C while training", "plain", signal.SIGINT, 130, 0),
    ("SIGKILL mid-write of the weights", "mid-write", None, -9, 1),
    ("SIGKILL before the rename", "before-rename", None, -9, 1),
]


@pytest.mark.parametrize(("case", "mode", "sig", "code", "temporaries"), KILLS,
                         ids=[k[0] for k in KILLS])
def test_killed_add_task_keeps_the_source_and_writes_no_checkpoint(source, tmp_path, case, mode,
                                                                   sig, code, temporaries):
    before_files, before_served = files_digest(source), served(source)
    out = tmp_path / "v2"
    assert run_add_task(source, out, mode, sig, tmp_path / "stderr.log") == code, (
        (tmp_path / "stderr.log").read_text()[-2000:])
    assert files_digest(source) == before_files
    assert_serves_identically(source, before_served)
    assert not out.exists()
    # SIGKILL runs no cleanup: a save killed mid-way leaves its hidden temporary directory
    # (never at --out, never read by anything); a run killed before saving leaves nothing.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "stderr.log"]
    assert len(leftovers) == temporaries and all(n.startswith(".v2.tmp-") for n in leftovers)
    # The same command, run again, completes.
    torch_threads = torch.get_num_threads()
    try:
        _, report = add_task(source, out, name="c", data=source.parent / "c.npz", iterations=20,
                             force=True, progress=False)
    finally:
        torch.set_num_threads(torch_threads)
    assert report.saved and ckpt.load_checkpoint(out).task_names == ["a", "b", "c"]
    # ... and its save removed the killed run's leftover temporary directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.log", "v2"]


def test_disk_full_during_add_task_is_a_clean_error_and_leaves_nothing(source, tmp_path,
                                                                      monkeypatch, capsys):
    before = files_digest(source)
    write = ckpt.write_synced

    def write_until_full(path, data, **kw):
        if path.name == WEIGHTS:
            write(path, data[: len(data) // 3], **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data, **kw)

    monkeypatch.setattr(ckpt, "write_synced", write_until_full)
    out = tmp_path / "v2"
    threads = torch.get_num_threads()
    try:
        code = cli_main(["add-task", str(source), "--name", "c", "--data",
                         str(source.parent / "c.npz"), "--out", str(out), "--iterations", "10",
                         "--no-progress", "--threads", "1", "--force"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and str(out) in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary directory
    assert files_digest(source) == before


# -- corrupted weights: the service refuses to become ready -----------------------------------
def corrupt_weights(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    elif how == "bit flip in a tensor":
        data[-10] ^= 0x01  # one bit of one float: still a valid safetensors file
    else:  # "bit flip in the header": the JSON header no longer parses
        data[8] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def prometheus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prometheus")


@pytest.mark.parametrize(("how", "reason"), [
    ("truncated", "file truncated or corrupt"),
    ("bit flip in a tensor", "file modified"),
    ("bit flip in the header", "file truncated or corrupt"),
])
def test_corrupted_weights_keep_the_service_unready(monkeypatch, prometheus_dir, tmp_path,
                                                    caplog, how, reason):
    path = tmp_path / "ckpt"
    mlp_checkpoint(path)
    corrupt_weights(path / WEIGHTS, how)
    with caplog.at_level(logging.ERROR, logger="bentoml.hnet_serve"), serving(
        monkeypatch, prometheus_dir, ready=False, HNET_CHECKPOINT=path
    ) as c:
        deadline = time.monotonic() + 60
        while "failed to load" not in c.get("/tasks").text and time.monotonic() < deadline:
            assert c.get("/readyz").status_code == 503  # never ready, not even briefly
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 503 and c.get("/livez").status_code == 200
        r = c.post("/predict", json={"task": "task-0", "inputs": [ROW]})
        assert r.status_code == 503 and reason in r.json()["error"]
        assert "hnet_ready 0.0" in c.get("/metrics").text
    lines = [r.getMessage() for r in caplog.records if "NOT READY" in r.getMessage()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "content hash mismatch" in lines[0] and reason in lines[0]


@pytest.mark.integration
def test_rotten_model_store_copy_keeps_a_real_server_unready(tmp_path):
    """``bentoml serve`` on a stored checkpoint whose weights rotted after the import."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    from hnet_serve.serving.store import import_checkpoint

    home = tmp_path / "bentoml"
    (home / "models").mkdir(parents=True)
    mlp_checkpoint(tmp_path / "ckpt")
    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        tag = import_checkpoint(tmp_path / "ckpt")
    stored = home / "models" / "hnet" / tag.split(":")[1] / "checkpoint" / WEIGHTS
    corrupt_weights(stored, "bit flip in a tensor")
    port, log = free_port(), tmp_path / "serve.log"
    env = {**child_env(home), "HNET_MODEL_TAG": tag, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "bentoml", "serve", "hnet_serve.serving.service:HNetService",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while b"NOT READY" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                assert httpx.get(url + "/readyz", timeout=5).status_code == 503
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        assert httpx.get(url + "/livez", timeout=5).status_code == 200
        r = httpx.post(url + "/predict", json={"task": "task-0", "inputs": [ROW]}, timeout=10)
        assert r.status_code == 503 and "content hash mismatch (file modified)" in r.text
    finally:
        stop_process_group(proc)
    line = [ln for ln in log.read_text().splitlines() if "NOT READY" in ln]
    assert len(line) == 1 and str(stored.parent) in line[0] and "file modified" in line[0], line


# -- one failing request in a batch ----------------------------------------------------------
def test_one_failing_request_fails_alone_and_the_service_keeps_answering(monkeypatch, tmp_path):
    """A fault while generating one task's weights (e.g. out of memory) fails that request
    only: the requests batched with it are answered correctly, and the task works again once
    the fault is gone (the cache keeps no broken entry)."""
    path = tmp_path / "ckpt"
    mlp_checkpoint(path)
    ref = Runtime.from_checkpoint(path)
    svc = start(monkeypatch, HNET_CHECKPOINT=path)
    model = svc.runtime.model
    real_generate = model.generate

    def faulty_generate(names):
        if "task-2" in names:
            raise RuntimeError("injected fault: cannot generate task-2")
        return real_generate(names)

    monkeypatch.setattr(model, "generate", faulty_generate)
    g = np.random.default_rng(0)
    # The first request runs alone; the rest queue behind it and run as ONE mixed batch that
    # holds the failing request (nothing is cached yet, so the batch generates every task).
    tasks = ["task-0", "task-1", "task-2", "binary", "task-1", "task-0", "binary"]
    xs = [g.normal(size=(1 + i % 3, 12)).astype(np.float32) for i in range(len(tasks))]

    async def run_all():
        return await asyncio.gather(
            *(svc.predict(inputs=x.tolist(), task=t) for t, x in zip(tasks, xs)),
            return_exceptions=True,
        )

    results = asyncio.run(run_all())
    assert svc.batcher.batches < len(tasks)  # the failing request really shared a batch
    for task, x, got in zip(tasks, xs, results):
        if task == "task-2":
            assert isinstance(got, RuntimeError) and "injected fault" in str(got)
            continue
        assert isinstance(got, dict), (task, got)
        want = ref.predict(task, x)
        assert got["predictions"] == want.predictions.tolist()
        np.testing.assert_allclose(got["probabilities"], want.probabilities, atol=1e-5)
    # Task inference needs every task, task-2 included: it fails while the fault lasts ...
    with pytest.raises(RuntimeError, match="injected fault"):
        asyncio.run(svc.predict(inputs=xs[0].tolist()))
    # ... and everything works again once the fault is gone.
    monkeypatch.setattr(model, "generate", real_generate)
    again = asyncio.run(svc.predict(inputs=xs[2].tolist(), task="task-2"))
    assert again["predictions"] == ref.predict("task-2", xs[2]).predictions.tolist()
    assert svc.__is_ready__()
    svc.batcher.close()


# -- bounded working memory ---------------------------------------------------------------------
def test_generated_weights_alive_at_once_stay_bounded(monkeypatch):
    """12 tasks, a cache of 2 and a step of 3 tasks: task inference and a batch over every task
    never hold more than 2 + 3 tasks' generated weights at once (all 12 before the fix), and
    answer exactly like a runtime that holds them all."""
    model = tiny_mlp_model(12)
    task_bytes = backends.nbytes_estimate(model)
    big = Runtime(model, ServingConfig(cache_bytes=2**30))
    big.cache.warm(model.task_names)  # the reference holds every task, generated untracked
    monkeypatch.setattr(runtime, "STEP_BYTES", 3 * task_bytes)
    small = Runtime(model, ServingConfig(cache_bytes=2 * task_bytes))
    alive: list[weakref.ref] = []
    peak = [0]
    generate = backends.generate_weights

    def tracked(model, names):
        rows = generate(model, names)
        alive.extend(weakref.ref(w) for w in rows)
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return rows

    monkeypatch.setattr(backends, "generate_weights", tracked)
    x = np.random.default_rng(3).normal(size=(24, 12)).astype(np.float32)
    got, want = small.predict(None, x), big.predict(None, x)
    assert got.tasks == want.tasks
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
    tasks = [model.task_names[i % 12] for i in range(24)]
    got, want = small.predict_mixed(tasks, x), big.predict_mixed(tasks, x)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
    assert small.cache.stats()["evictions"] >= 10
    assert peak[0] <= 2 + 3, peak[0]


def test_batches_that_generate_hand_freed_memory_back(monkeypatch, tmp_path):
    """After a batch that generated weights (a miss, so evictions), the service trims the heap;
    after a batch of cache hits it does not (the hit path stays free of that cost)."""
    from hnet_serve.serving import batching

    batching.release_free_memory()  # the real call works here (glibc) or is a no-op
    path = tmp_path / "ckpt"
    mlp_checkpoint(path)
    calls: list[int] = []
    monkeypatch.setattr(batching, "release_free_memory", lambda: calls.append(1))
    batcher = batching.AdaptiveBatcher(Runtime.from_checkpoint(path))
    x = np.zeros((2, 12), np.float32)
    asyncio.run(batcher.predict("task-0", x))  # a miss: task-0 generated
    asyncio.run(batcher.predict("task-0", x))  # a hit
    assert calls == [1]
    asyncio.run(batcher.predict("task-1", x))
    assert calls == [1, 1]
    batcher.close()
