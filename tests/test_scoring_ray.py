"""Ray Data scoring gives the same answers as local scoring (one test: a Ray start is slow)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")

from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.scoring.ray import score_dataset
from hnet_serve.scoring.scorer import score_file
from tests.conftest import tiny_mlp_model

QUIET_RAY = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


@pytest.fixture
def local_ray(monkeypatch):
    for key, value in QUIET_RAY.items():
        monkeypatch.setenv(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_ray_data_scores_like_the_local_path(tmp_path, local_ray):
    model = tiny_mlp_model(3, input_size=12)
    save_checkpoint(model, tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    n = 600
    x = (rng.normal(size=(n, 12)) * 3).astype(np.float32)
    # Mixed tasks, some rows left to task inference (empty task).
    tasks = [["task-0", "task-1", "task-2", None][i] for i in rng.integers(0, 4, n)]
    table = pa.table({
        "id": np.arange(n),
        "input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 12),
        "task": pa.array(tasks, pa.string()),
    })
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=100)

    ds = ray.data.read_parquet(str(src), override_num_blocks=2)  # work for both actors
    scored = score_dataset(ds, tmp_path / "ckpt", task_column="task", probabilities=True,
                           keep_columns=["id"], concurrency=2, batch_size=128)
    scored.write_parquet(str(tmp_path / "ray_out"))
    remote = pq.read_table(tmp_path / "ray_out").sort_by("id")

    score_file(tmp_path / "ckpt", src, tmp_path / "local.parquet", task_column="task",
               probabilities=True, progress=False)
    local = pq.read_table(tmp_path / "local.parquet")

    assert remote["id"].to_pylist() == list(range(n))
    assert remote["task"].to_pylist() == local["task"].to_pylist()
    assert remote["prediction"].to_pylist() == local["prediction"].to_pylist()
    np.testing.assert_allclose(np.array(remote["probabilities"].to_pylist()),
                               np.array(local["probabilities"].to_pylist()), rtol=1e-5, atol=1e-6)
    inferred = [i for i, t in enumerate(tasks) if t is None]
    assert len({remote["task"][i].as_py() for i in inferred}) > 1  # inference really ran
    assert os.listdir(tmp_path / "ray_out")
