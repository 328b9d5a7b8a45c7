"""Batch offline scoring: formats, row order, tasks, rejects, atomic output, constant memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.cli import main
from hnet_serve.errors import ConfigError, InputError, UnknownTaskError
from hnet_serve.scoring.scorer import Scorer, ScoringConfig, runtime_for, score_batch, score_file
from hnet_serve.scoring.writers import npy_output_dtype
from hnet_serve.serving.runtime import Runtime
from tests.conftest import tiny_mlp_model, tiny_resnet_model

WIDTH = 12
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model = tiny_mlp_model(3, input_size=WIDTH)
    model.add_task("small", num_classes=2)  # fewer classes: probabilities are zero-padded
    path = tmp_path_factory.mktemp("scoring") / "ckpt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def rt(ckpt) -> Runtime:
    return Runtime.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    # Spread-out rows: the tiny random model then predicts every class somewhere.
    return (np.random.default_rng(0).normal(size=(300, WIDTH)) * 3).astype(np.float32)


FEATS = [f"f{i}" for i in range(WIDTH)]


def write_input(
    path: Path, x: np.ndarray, tasks: list | None = None, layout: str = "columns",
    row_group_size: int = 64,
) -> Path:
    """``x`` (and per-row ``tasks``) as ``path``'s format; ``layout``: 'columns' or 'list'."""
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        arrays = {"input": x} | ({"task": np.array([t or "" for t in tasks])} if tasks else {})
        np.savez(path, **arrays)
    else:
        if layout == "list":
            cols = {"input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])}
        else:
            cols = {f: pa.array(x[:, i]) for i, f in enumerate(FEATS)}
        if tasks is not None:
            cols["task"] = pa.array(tasks, pa.string())
        table = pa.table(cols)
        if suffix == ".csv":
            pacsv.write_csv(table, path)
        else:
            pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read_output(path: Path) -> dict:
    if path.suffix == ".npy":
        arr = np.load(path)
        out = {name: arr[name] for name in arr.dtype.names}
        out["task"] = out["task"].tolist()
        return out
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    out = {}
    for name in table.column_names:
        col = table[name].to_pylist()
        if name == "probabilities":
            col = [json.loads(c) if isinstance(c, str) else c for c in col]
            out[name] = np.array(col, dtype=np.float32)
        elif name == "task":
            out[name] = col
        else:
            out[name] = np.array(col)
    return out


def no_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# -- formats and row order ----------------------------------------------------------------
INPUTS = [("x.npy", "columns"), ("x.npz", "columns"), ("x.csv", "columns"),
          ("x.parquet", "columns"), ("x.parquet", "list")]


@pytest.mark.parametrize("out_name", ["out.parquet", "out.csv", "out.npy"])
@pytest.mark.parametrize(("in_name", "layout"), INPUTS)
def test_round_trip_keeps_rows_in_order(tmp_path, rt, x, in_name, layout, out_name):
    src = write_input(tmp_path / in_name, x, layout=layout)
    report = score_file(rt, src, tmp_path / out_name, task="task-1", batch_size=64,
                        probabilities=True, progress=False)
    ref = rt.predict("task-1", x)
    out = read_output(tmp_path / out_name)
    assert report.rows_read == report.rows_scored == len(x)
    assert out["task"] == ["task-1"] * len(x)
    np.testing.assert_array_equal(out["prediction"], ref.predictions)
    # Probabilities differ from row to row, so they pin down the order, not just the classes.
    np.testing.assert_allclose(out["probabilities"], ref.probabilities, rtol=1e-5, atol=1e-6)
    assert len(set(ref.predictions.tolist())) > 1
    assert no_leftovers(tmp_path) == []


def test_npy_output_layout_is_documented_structured_array(tmp_path, rt, x):
    write_input(tmp_path / "x.npy", x)
    score_file(rt, tmp_path / "x.npy", tmp_path / "o.npy", row_numbers=True, probabilities=True,
               progress=False)
    arr = np.load(tmp_path / "o.npy")
    assert arr.shape == (len(x),)
    assert arr.dtype.names == ("row", "task", "prediction", "probabilities")
    assert arr.dtype["probabilities"].shape == (3,)  # the most classes of any task
    np.testing.assert_array_equal(arr["row"], np.arange(len(x)))
    scorer = Scorer(rt, ScoringConfig.build(row_numbers=True, probabilities=True))
    assert arr.dtype == npy_output_dtype(scorer.schema)


def test_npy_fortran_order_and_other_dtypes(tmp_path, rt, x):
    ref = rt.predict("task-0", x).predictions
    for name, arr in {
        "f.npy": np.asfortranarray(x),  # rows not contiguous on disk
        "d.npy": x.astype(">f8"),  # big-endian float64
        "i.npy": np.rint(x).astype(np.int16),
    }.items():
        np.save(tmp_path / name, arr)
        score_file(rt, tmp_path / name, tmp_path / "o.npy", task="task-0", batch_size=64,
                   progress=False)
        expected = rt.predict("task-0", np.rint(x)).predictions if name == "i.npy" else ref
        np.testing.assert_array_equal(np.load(tmp_path / "o.npy")["prediction"], expected,
                                      err_msg=name)


def test_image_rows_flat_or_shaped_score_alike_on_a_conv_target(tmp_path):
    rt = Runtime(tiny_resnet_model(2))
    imgs = np.random.default_rng(3).random((40, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "shaped.npy", imgs)  # (N, *input_shape)
    write_input(tmp_path / "flat.parquet", imgs.reshape(40, -1), layout="list")
    for name in ("shaped.npy", "flat.parquet"):
        score_file(rt, tmp_path / name, tmp_path / "o.npy", task="img-1", batch_size=16,
                   progress=False)
        np.testing.assert_array_equal(np.load(tmp_path / "o.npy")["prediction"],
                                      rt.predict("img-1", imgs).predictions, err_msg=name)


def test_truncated_npy_is_an_input_error(tmp_path, rt, x):
    np.save(tmp_path / "x.npy", x)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated"):
        score_file(rt, tmp_path / "x.npy", tmp_path / "o.npy", task="task-0", progress=False)
    assert not (tmp_path / "o.npy").exists() and no_leftovers(tmp_path) == []


def test_empty_input_gives_empty_output_with_columns(tmp_path, rt):
    write_input(tmp_path / "x.parquet", np.zeros((0, WIDTH), np.float32))
    report = score_file(rt, tmp_path / "x.parquet", tmp_path / "o.parquet", task="task-0",
                        progress=False)
    table = pq.read_table(tmp_path / "o.parquet")
    assert report.rows_read == 0 and table.num_rows == 0
    assert table.column_names == ["task", "prediction", "label"]


def test_chunks_larger_than_the_runtime_row_limit_are_sliced(tmp_path, ckpt, rt, x):
    small = Runtime.from_checkpoint(ckpt, max_rows=50)  # the service's per-request limit
    write_input(tmp_path / "x.npy", x)
    score_file(small, tmp_path / "x.npy", tmp_path / "o.parquet", task="task-2", batch_size=128,
               progress=False)
    np.testing.assert_array_equal(read_output(tmp_path / "o.parquet")["prediction"],
                                  rt.predict("task-2", x).predictions)


# -- tasks --------------------------------------------------------------------------------
@pytest.mark.parametrize("in_name", ["mixed.parquet", "mixed.csv", "mixed.npz"])
def test_mixed_task_file_equals_per_task_scoring(tmp_path, rt, x, in_name):
    rng = np.random.default_rng(1)
    names = ["task-0", "task-1", "task-2", "small"]
    tasks = [names[i] for i in rng.integers(0, len(names), len(x))]
    src = write_input(tmp_path / in_name, x, tasks)
    report = score_file(rt, src, tmp_path / "o.parquet", task_column="task", batch_size=70,
                        probabilities=True, progress=False)
    out = read_output(tmp_path / "o.parquet")
    assert out["task"] == tasks
    for name in names:
        rows = np.flatnonzero(np.array(tasks) == name)
        ref = rt.predict(name, x[rows])
        np.testing.assert_array_equal(out["prediction"][rows], ref.predictions)
        c = ref.probabilities.shape[1]
        np.testing.assert_allclose(out["probabilities"][rows, :c], ref.probabilities, rtol=1e-5,
                                   atol=1e-6)
        assert (out["probabilities"][rows, c:] == 0).all()
        assert report.tasks[name] == len(rows)


def test_no_task_infers_per_row(tmp_path, rt, x):
    write_input(tmp_path / "x.parquet", x)
    report = score_file(rt, tmp_path / "x.parquet", tmp_path / "o.csv", batch_size=100,
                        progress=False)
    ref = rt.predict(None, x)
    out = read_output(tmp_path / "o.csv")
    assert out["task"] == ref.tasks
    assert len(set(ref.tasks)) > 1  # inference really chose between tasks
    np.testing.assert_array_equal(out["prediction"], ref.predictions)
    assert report.inferred and sum(report.tasks.values()) == len(x)


def test_empty_task_cell_means_infer_that_row(tmp_path, rt, x):
    tasks = ["task-0" if i % 3 else None for i in range(len(x))]
    src = write_input(tmp_path / "x.csv", x, tasks)
    score_file(rt, src, tmp_path / "o.parquet", task_column="task", progress=False)
    out = read_output(tmp_path / "o.parquet")
    inferred = rt.predict(None, x)
    for i, t in enumerate(tasks):
        assert out["task"][i] == (t or inferred.tasks[i])
        assert out["prediction"][i] == (rt.predict(t, x[i:i + 1]).predictions[0] if t
                                        else inferred.predictions[i])


# -- bad rows -----------------------------------------------------------------------------
BAD_CSV = """f0,f1,f2,f3,f4,f5,f6,f7,f8,f9,f10,f11,task
1,2,3,4,5,6,7,8,9,10,11,12,task-0
1,2,3,4,5,6,7,8,9,10,11,task-0
1,2,3,4,5,6,7,8,9,10,11,12,task-1
1,2,abc,4,5,6,7,8,9,10,11,12,task-1
1,2,3,4,5,6,7,8,9,10,11,nan,task-2
1,2,3,4,5,6,7,8,9,10,11,12,nope
1,2,3,4,5,,7,8,9,10,11,12,task-2
1,2,3,4,5,6,7,8,9,10,11,12,13,task-0
-1,2,3,4,5,6,7,8,9,10,11,12,task-2
"""


def test_rejects_file_lists_row_reason_and_raw_row(tmp_path, rt):
    (tmp_path / "bad.csv").write_text(BAD_CSV)
    report = score_file(rt, tmp_path / "bad.csv", tmp_path / "o.parquet", task_column="task",
                        rejects=str(tmp_path / "rejects.jsonl"), row_numbers=True, batch_size=3,
                        progress=False)
    rejects = [json.loads(s) for s in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1, 3, 4, 5, 6, 7]
    reasons = [r["reason"] for r in rejects]
    assert "wrong width" in reasons[0] and "12 fields" in reasons[0]
    assert "non-numeric" in reasons[1] and "'abc'" in reasons[1] and "'f2'" in reasons[1]
    assert "non-finite" in reasons[2] and "column 11" in reasons[2]
    assert "unknown task 'nope'" in reasons[3]
    assert "missing" in reasons[4] or "non-numeric" in reasons[4]
    assert "wrong width" in reasons[5] and "14 fields" in reasons[5]
    assert rejects[0]["raw"] == "1,2,3,4,5,6,7,8,9,10,11,task-0"  # the line as read
    assert rejects[1]["raw"]["f2"] == "abc" and rejects[1]["raw"]["task"] == "task-1"
    out = read_output(tmp_path / "o.parquet")
    np.testing.assert_array_equal(out["row"], [0, 2, 8])
    assert out["task"] == ["task-0", "task-1", "task-2"]
    ones = np.arange(1, WIDTH + 1, dtype=np.float32)
    minus = ones.copy()
    minus[0] = -1
    expected = [rt.predict("task-0", ones[None]).predictions[0],
                rt.predict("task-1", ones[None]).predictions[0],
                rt.predict("task-2", minus[None]).predictions[0]]
    np.testing.assert_array_equal(out["prediction"], expected)
    assert (report.rows_read, report.rows_scored, report.rows_rejected) == (9, 3, 6)
    assert report.rejected_rows == [1, 3, 4, 5, 6, 7]


def test_bad_rows_stop_the_run_by_default_and_leave_no_file(tmp_path, rt):
    (tmp_path / "bad.csv").write_text(BAD_CSV)
    with pytest.raises(InputError, match=r"row 1: wrong width.*row 3: non-numeric"):
        score_file(rt, tmp_path / "bad.csv", tmp_path / "o.parquet", task_column="task",
                   batch_size=4, progress=False)
    assert not (tmp_path / "o.parquet").exists()
    assert no_leftovers(tmp_path) == []


def test_list_column_rows_of_wrong_width_or_missing_are_rejected(tmp_path, rt, x):
    rows = [x[0].tolist(), x[1].tolist()[:5], None, [*x[3].tolist()[:-1], None], x[4].tolist()]
    pq.write_table(pa.table({"input": pa.array(rows, pa.list_(pa.float32()))}),
                   tmp_path / "l.parquet")
    score_file(rt, tmp_path / "l.parquet", tmp_path / "o.npy", task="task-0", on_error="skip",
               rejects=str(tmp_path / "r.jsonl"), row_numbers=True, progress=False)
    rejects = [json.loads(s) for s in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1, 2, 3]
    assert rejects[0]["reason"] == "wrong width: 5 values, expected 12"
    assert rejects[1]["reason"] == rejects[2]["reason"] == "missing value in column 'input'"
    assert rejects[0]["raw"]["input"] == pytest.approx(x[1][:5].tolist())
    out = np.load(tmp_path / "o.npy")
    np.testing.assert_array_equal(out["row"], [0, 4])
    np.testing.assert_array_equal(out["prediction"], rt.predict("task-0", x[[0, 4]]).predictions)


def test_skip_without_rejects_file_still_reports_rows(tmp_path, rt, x):
    bad = x.copy()
    bad[[7, 123]] = np.inf
    write_input(tmp_path / "x.npy", bad)
    report = score_file(rt, tmp_path / "x.npy", tmp_path / "o.parquet", task="task-0",
                        on_error="skip", progress=False)
    assert report.rejected_rows == [7, 123] and report.rows_scored == len(x) - 2


# -- atomic output ------------------------------------------------------------------------
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("out_name", ["o.parquet", "o.csv", "o.npy"])
def test_interrupted_run_leaves_no_output_and_keeps_the_old_one(
    tmp_path, rt, x, monkeypatch, error, out_name
):
    write_input(tmp_path / "x.npy", x)
    (tmp_path / out_name).write_bytes(b"previous results")
    calls = {"n": 0}
    real = Scorer.score_chunk

    def flaky(self, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error("interrupted")
        return real(self, chunk)

    monkeypatch.setattr(Scorer, "score_chunk", flaky)
    with pytest.raises(error):
        score_file(rt, tmp_path / "x.npy", tmp_path / out_name, task="task-0", batch_size=50,
                   rejects=str(tmp_path / "r.jsonl"), progress=False)
    assert calls["n"] == 3
    assert (tmp_path / out_name).read_bytes() == b"previous results"
    assert not (tmp_path / "r.jsonl").exists()
    assert no_leftovers(tmp_path) == []


def test_cli_sigterm_cleans_up_like_ctrl_c(tmp_path, ckpt, x, monkeypatch, capsys):
    write_input(tmp_path / "x.npy", x)
    real = Scorer.score_chunk
    calls = {"n": 0}

    def killed(self, chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler would
        return real(self, chunk)

    monkeypatch.setattr(Scorer, "score_chunk", killed)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["score", str(ckpt), "--input", str(tmp_path / "x.npy"), "--output",
               str(tmp_path / "o.parquet"), "--task", "task-0", "--batch-size", "50",
               "--backend", "torch", "--no-progress"])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    assert signal.getsignal(signal.SIGTERM) is before


# -- in-memory batches --------------------------------------------------------------------
def test_score_batch_accepts_numpy_pandas_arrow_dicts_and_lists(rt, x):
    pd = pytest.importorskip("pandas")
    ref = rt.predict("task-2", x)
    frame = pd.DataFrame(x, columns=FEATS)
    batches = {
        "numpy": x,
        "pandas": frame,
        "pandas-list": pd.DataFrame({"input": list(x)}),
        "arrow": pa.Table.from_pandas(frame),
        "record-batch": pa.RecordBatch.from_pandas(frame),
        "dict-2d": {"input": x},
        "list": x.tolist(),
    }
    for name, batch in batches.items():
        scored = score_batch(rt, batch, task="task-2")
        np.testing.assert_array_equal(scored.predictions, ref.predictions, err_msg=name)
        np.testing.assert_array_equal(scored.rows, np.arange(len(x)))
    table = score_batch(rt, x[:5], task="task-2", probabilities=True).to_arrow()
    assert table.column_names == ["task", "prediction", "label", "probabilities"]


def test_score_batch_task_column_and_rejects(rt, x):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(x[:6], columns=FEATS)
    frame["task"] = ["task-0", "task-1", "bogus", None, "small", "task-0"]
    frame.loc[5, "f3"] = np.nan
    with pytest.raises(InputError, match="row 12: unknown task 'bogus'"):
        score_batch(rt, frame, task_column="task", row_offset=10)
    scored = score_batch(rt, frame, task_column="task", on_error="skip", row_offset=10)
    assert scored.rows.tolist() == [10, 11, 13, 14]
    assert [r.row for r in scored.rejects] == [12, 15]
    assert scored.tasks[:2] == ["task-0", "task-1"] and scored.tasks[3] == "small"
    assert scored.tasks[2] == rt.predict(None, x[3:4]).tasks[0]


def test_score_batch_rejects_bad_whole_inputs(rt):
    with pytest.raises(InputError, match="12 features"):
        score_batch(rt, np.zeros((3, 5), np.float32), task="task-0")
    with pytest.raises(InputError, match="holds"):
        score_batch(rt, np.array([["a"] * WIDTH]), task="task-0")
    with pytest.raises(UnknownTaskError):
        score_batch(rt, np.zeros((3, WIDTH), np.float32), task="nope")
    with pytest.raises(InputError, match="cannot score"):
        score_batch(rt, "not rows", task="task-0")


# -- configuration and file-level errors --------------------------------------------------
def test_file_level_errors_are_clear(tmp_path, rt, x):
    write_input(tmp_path / "x.npy", x)
    np.save(tmp_path / "narrow.npy", x[:, :5])
    np.save(tmp_path / "str.npy", np.array([["a"] * WIDTH]))
    pq.write_table(pa.table({f"c{i}": [1.0] for i in range(WIDTH + 1)}), tmp_path / "wide.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    (tmp_path / "empty.csv").write_text("")
    cases = [  # (input, output, options, error, message)
        ("x.txt", "o.parquet", {}, ConfigError, "format"),
        ("x.npy", "o.json", {}, ConfigError, "format"),
        ("missing.npy", "o.npy", {}, InputError, "exist"),
        ("x.npy", "x.npy", {}, ConfigError, "input file"),
        ("x.npy", "no/o.npy", {}, ConfigError, "directory"),
        ("narrow.npy", "o.npy", {}, InputError, "12 features"),
        ("str.npy", "o.npy", {}, InputError, "numbers"),
        ("wide.parquet", "o.npy", {}, InputError, "13 feature columns"),
        ("junk.parquet", "o.npy", {}, InputError, "Parquet"),
        ("empty.csv", "o.npy", {}, InputError, "empty"),
        ("x.npy", "o.npy", {"task_column": "t"}, ConfigError, "task column"),
        ("wide.parquet", "o.npy", {"task_column": "t"}, InputError, "task column 't' not found"),
        ("x.npy", "o.npy", {"task": "task-0", "task_column": "t"}, ConfigError, "not both"),
        ("x.npy", "o.npy", {"on_error": "stop", "rejects": "r.jsonl"}, ConfigError, "skip"),
        ("x.npy", "o.npy", {"batch_size": 0}, ConfigError, "batch_size=0"),
        ("x.npy", "o.npy", {"task": "nope"}, UnknownTaskError, "nope"),
    ]
    for src, dst, options, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            score_file(rt, tmp_path / src, tmp_path / dst, progress=False, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.csv", "junk.parquet", "narrow.npy", "str.npy", "wide.parquet", "x.npy"]


# -- the CLI ------------------------------------------------------------------------------
def test_cli_score_json_and_clean_errors(tmp_path, ckpt, rt, x, capsys):
    write_input(tmp_path / "x.parquet", x)
    rc = main(["score", str(ckpt), "--input", str(tmp_path / "x.parquet"),
               "--output", str(tmp_path / "o.parquet"), "--task", "task-1", "--json",
               "--batch-size", "100"])
    captured = capsys.readouterr()
    assert rc == 0
    report = json.loads(captured.out)
    assert report["rows_scored"] == len(x) and report["tasks"] == {"task-1": len(x)}
    assert "rows/s" in captured.err  # the progress bar
    np.testing.assert_array_equal(read_output(tmp_path / "o.parquet")["prediction"],
                                  rt.predict("task-1", x).predictions)

    rc = main(["score", str(ckpt), "--input", str(tmp_path / "x.parquet"),
               "--output", str(tmp_path / "o2.parquet"), "--task", "nope"])
    err = capsys.readouterr().err
    assert rc == 1 and "unknown task 'nope'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["score", str(ckpt), "--input", "a.npy", "--output", "b.npy", "--task", "t",
              "--task-column", "c"])


def test_cli_text_summary_names_rejects(tmp_path, ckpt, capsys):
    (tmp_path / "bad.csv").write_text(BAD_CSV)
    rc = main(["score", str(ckpt), "--input", str(tmp_path / "bad.csv"), "--output",
               str(tmp_path / "o.csv"), "--task-column", "task", "--rejects",
               str(tmp_path / "r.jsonl"), "--no-progress", "--backend", "torch", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "scored 3 of 9 rows" in out and "rejected 6 rows (first: 1, 3, 4, 5, 6, 7)" in out
    assert "backend torch" in out


def test_onnx_backend_gives_the_same_predictions(tmp_path, ckpt, rt, x):
    pytest.importorskip("hnet_serve.onnx_graph")
    write_input(tmp_path / "x.npy", x)
    score_file(ckpt, tmp_path / "x.npy", tmp_path / "o.npy", backend="onnx", task="task-0",
               progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy")["prediction"],
                                  rt.predict("task-0", x).predictions)


def test_scoring_sessions_compute_no_probabilities_they_may_not_write(ckpt):
    # ORT runs every node of a graph whatever outputs are fetched: the service's sessions carry
    # a softmax output, the scorer's (probabilities are written on request only) do not
    runtime = runtime_for(ckpt, ScoringConfig(backend="onnx"))
    assert not runtime.config.onnx_softmax
    outputs = runtime.cache.get("task-0").session.get_outputs()
    assert [o.name for o in outputs] == ["logits"]


# -- constant memory ----------------------------------------------------------------------
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from hnet_serve.serving.runtime import Runtime
    from hnet_serve.scoring.scorer import score_file
    from tests.conftest import tiny_mlp_model, tiny_resnet_model

    def peak_of(path):
        # Peak RSS of this run alone: writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        score_file(rt, path, out, task="task-0", batch_size=batch, progress=False)
        with open("/proc/self/status") as f:
            return next(int(s.split()[1]) * 1024 for s in f if s.startswith("VmHWM:"))

    small, large, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rt = Runtime(tiny_mlp_model(2, input_size=256, hidden=(32,)))
    peak_of(small)  # warm up every code path and allocator pool
    base = peak_of(small)
    # The smaller of two runs: allocator pools release memory on their own schedule, which
    # only ever adds noise upwards (seen on loaded machines: +8 MB once for CSV).
    large_peak = min(peak_of(large), peak_of(large))
    print(json.dumps({"base": base, "growth": large_peak - base}))
""")


def test_memory_stays_flat_on_a_file_10x_the_chunk(tmp_path):
    """Peak RSS scoring a 3-chunk file vs a 10-chunk file, one fresh process per format."""
    batch, width = 2000, 256
    rng = np.random.default_rng(0)
    for size, rows in (("small", 3 * batch), ("large", 10 * batch)):
        xs = rng.normal(size=(rows, width)).astype(np.float32)
        table = pa.table({f"c{i}": xs[:, i] for i in range(width)})
        np.save(tmp_path / f"{size}.npy", xs)
        pacsv.write_csv(table, tmp_path / f"{size}.csv")
        # A list column: with 256 numeric columns the Parquet footer alone (row groups x
        # columns of statistics) grows with the file, which would blur what is measured here.
        write_input(tmp_path / f"{size}.parquet", xs, layout="list", row_group_size=batch)
    file_bytes = os.path.getsize(tmp_path / "large.npy")  # 20 MB of float32 features
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = {
        ext: subprocess.Popen(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / f"small.{ext}"),
             str(tmp_path / f"large.{ext}"), str(tmp_path / f"o-{ext}.parquet"), str(batch)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        for ext in ("npy", "parquet", "csv")
    }
    growth = {}
    for ext, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        growth[ext] = json.loads(out.strip().splitlines()[-1])["growth"]
    # Holding the whole 10x file would add at least its 14 MB more than the 3-chunk file's.
    assert all(g < 0.25 * file_bytes for g in growth.values()), growth


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_given_task_predictions_do_not_depend_on_writing_probabilities(tmp_path, ckpt, x, backend):
    # with one given task the scorer takes the logits' argmax and computes probabilities only
    # when it writes them: both runs, and the runtime, must agree row for row
    rt = Runtime.from_checkpoint(ckpt, backend=backend, max_rows=64)  # several slices per chunk
    np.save(tmp_path / "x.npy", x)
    outs = {}
    for probs in (False, True):
        out = tmp_path / f"o{probs}.npy"
        score_file(rt, tmp_path / "x.npy", out, task="task-1", probabilities=probs,
                   batch_size=100, progress=False)
        outs[probs] = np.load(out)
    want = rt.predict("task-1", x[:64])
    np.testing.assert_array_equal(outs[False]["prediction"], outs[True]["prediction"])
    np.testing.assert_array_equal(outs[False]["prediction"][:64], want.predictions)
    np.testing.assert_allclose(outs[True]["probabilities"][:64, :3], want.probabilities, atol=1e-6)
    assert len(np.unique(outs[False]["prediction"])) > 1
