"""Faults (issue 7): one request that fails inside a batch fails alone: the requests batched
with it are answered, and the service keeps answering afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from hnet_serve.runtime import Runtime
from tests.test_service import mlp_checkpoint, start

ROOT = Path(__file__).resolve().parent.parent


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
