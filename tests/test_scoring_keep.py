"""Scoring keeps your columns (issue 16): --keep-columns passes columns through unchanged,
text columns that would be features are refused by name, task_inferred marks inferred rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.cli import main
from hnet_serve.errors import HNetError
from hnet_serve.scoring.scorer import score_file
from hnet_serve.serving.runtime import Runtime
from tests.conftest import tiny_mlp_model

FEATS = [f"f{i}" for i in range(12)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("keep") / "ck"
    save_checkpoint(tiny_mlp_model(3), path)
    return path


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(40, 12)).astype(np.float32)


def _csv(path, x, ids):
    table = pa.table({"id": ids, **{f: x[:, j] for j, f in enumerate(FEATS)}})
    pacsv.write_csv(table, path)


def test_csv_id_column_is_named_then_kept(tmp_path, ckpt, x, capsys):
    ids = [f"row-{i:03d}" for i in range(len(x))]
    _csv(tmp_path / "in.csv", x, ids)
    code = main(["score", str(ckpt), "--input", str(tmp_path / "in.csv"), "--output",
                 str(tmp_path / "out.parquet"), "--task", "task-1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "'id'" in err and "--keep-columns id" in err
    assert not (tmp_path / "out.parquet").exists()
    code = main(["score", str(ckpt), "--input", str(tmp_path / "in.csv"), "--output",
                 str(tmp_path / "out.parquet"), "--keep-columns", "id", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names[0] == "id" and out.column("id").to_pylist() == ids
    assert out.column("task_inferred").to_pylist() == [True] * len(x)
    want = Runtime.from_checkpoint(ckpt).predict(None, x)
    assert out.column("prediction").to_pylist() == want.predictions.tolist()
    assert out.column("task").to_pylist() == want.tasks


def test_parquet_kept_columns_keep_their_types_and_order(tmp_path, ckpt, x):
    table = pa.table({"name": [f"n{i}" for i in range(len(x))],
                      **{f: x[:, j] for j, f in enumerate(FEATS)},
                      "id": np.arange(len(x), dtype=np.int64) * 7,
                      "task": ["task-0", None, "task-2", ""] * 10})
    pq.write_table(table, tmp_path / "in.parquet")
    score_file(ckpt, tmp_path / "in.parquet", tmp_path / "out.csv", task_column="task",
               keep_columns=["id", "name"], progress=False)
    out = pacsv.read_csv(tmp_path / "out.csv")
    assert out.column_names[:2] == ["name", "id"]  # the input's order
    assert out.column("id").to_pylist() == (np.arange(len(x)) * 7).tolist()
    inferred = out.column("task_inferred").to_pylist()
    assert inferred == [False, True, False, True] * 10


def test_keep_columns_errors(tmp_path, ckpt, x):
    ids = [str(i) for i in range(len(x))]
    _csv(tmp_path / "in.csv", x, ids)
    np.save(tmp_path / "in.npy", x)
    cases = [
        (tmp_path / "in.csv", tmp_path / "o.parquet", ["nope"], "does not have: nope"),
        (tmp_path / "in.csv", tmp_path / "o.npy", ["id"], "table output"),
        (tmp_path / "in.npy", tmp_path / "o.parquet", ["id"], "table input"),
    ]
    for src, dst, keep, message in cases:
        with pytest.raises(HNetError, match=message):
            score_file(ckpt, src, dst, task="task-0", keep_columns=keep, progress=False)
        assert not dst.exists()


def test_min_confidence_leaves_uncertain_rows_without_a_task(tmp_path, ckpt, x):
    ids = [str(i) for i in range(len(x))]
    _csv(tmp_path / "in.csv", x, ids)
    rt = Runtime.from_checkpoint(ckpt)
    conf = rt.predict(None, x).confidence
    threshold = float(np.median(conf))
    report = score_file(ckpt, tmp_path / "in.csv", tmp_path / "out.parquet",
                        keep_columns=["id"], min_confidence=threshold, progress=False)
    out = pq.read_table(tmp_path / "out.parquet")
    low = conf < threshold
    assert report.rows_abstained == int(low.sum()) > 0
    assert [v is None for v in out.column("task").to_pylist()] == low.tolist()
    assert [v is None for v in out.column("prediction").to_pylist()] == low.tolist()
    assert [v is None for v in out.column("label").to_pylist()] == low.tolist()
    assert sum(report.tasks.values()) == len(x) - int(low.sum())
    np.save(tmp_path / "in.npy", x)
    with pytest.raises(HNetError, match="table output"):  # a .npy output has no null
        score_file(ckpt, tmp_path / "in.npy", tmp_path / "out.npy", min_confidence=0.5,
                   progress=False)
    assert not (tmp_path / "out.npy").exists()
