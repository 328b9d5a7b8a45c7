"""The README's main job, end to end: train, export, serve, answer a real request, stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from hnet_serve.checkpoint import load_checkpoint
from tests.test_service_http import free_port


@pytest.mark.integration
def test_quickstart_check(tmp_path):
    exe = Path(sys.executable).with_name("hnet-serve")
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="True")
    out = tmp_path / "qs"
    proc = subprocess.run(
        [str(exe), "quickstart", "--out", str(out), "--iterations", "30", "--check", "--json",
         "--port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["tasks"] == [f"split-mnist-{i}" for i in range(5)]
    # The service answered the example request for a real test digit with a valid prediction.
    answer = summary["response"]
    assert answer["task"] == "split-mnist-0"
    assert answer["predictions"][0] in (0, 1)
    assert sum(answer["probabilities"][0]) == pytest.approx(1.0, abs=1e-4)
    assert summary["curl"].startswith("curl -s -X POST http://127.0.0.1:")
    request = json.loads(Path(summary["request"]).read_text())
    assert len(request["inputs"][0]) == 784
    # Training really learned something in 30 steps per task (2-way tasks: chance is 0.5).
    assert summary["mean_accuracy"] > 0.8
    # The checkpoint loads and the exported ONNX model runs on its own.
    model = load_checkpoint(summary["checkpoint"])
    assert model.task_names == summary["tasks"]
    sess = ort.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert sess.get_outputs()[0].name == "logits"
