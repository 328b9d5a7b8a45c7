"""Start-up stays lean: ``hnet-serve info`` and ``score`` import nothing they do not use."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hnet_serve.checkpoint import save_checkpoint
from tests.conftest import tiny_mlp_model

HEAVY = ("bentoml", "ray", "onnxscript", "torch.onnx", "fastapi", "starlette")

_PROBE = (
    "import json, sys; from hnet_serve.cli import main; rc = main(sys.argv[1:]); "
    f"print(json.dumps([m for m in sys.modules if m in {HEAVY!r}])); sys.exit(rc)"
)


@pytest.mark.parametrize("command", ["info", "score"])
def test_info_and_score_do_not_import_serving_or_exporter_stacks(tmp_path, command):
    save_checkpoint(tiny_mlp_model(2), tmp_path / "ckpt")
    args = [command, str(tmp_path / "ckpt")]
    if command == "score":
        np.save(tmp_path / "x.npy", np.zeros((3, 12), np.float32))
        args += ["--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "o.parquet"),
                 "--task", "task-0", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(("given", "want"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_hnet_serve_makes_openmp_threads_wait_passively(given, want):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, hnet_serve; print(os.environ['OMP_WAIT_POLICY'])"
    proc = subprocess.run([sys.executable, "-c", code],
                          env=env, capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == want
