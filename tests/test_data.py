"""Data: IDX and CIFAR readers (on generated files in the real formats), user files, benchmarks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from hnet_serve.errors import InputError
from hnet_serve.training.data import (
    DataError,
    TaskData,
    build_benchmark,
    input_stats,
    load_cifar10,
    load_cifar100,
    load_idx_dir,
    load_task_file,
    read_cifar_bin,
    read_idx,
)


# -- IDX ------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = write(tmp_path / "imgs", idx_bytes(images), gz)
    np.testing.assert_array_equal(read_idx(p), images)
    floats = np.linspace(-1, 1, 6, dtype=np.float32)
    p = write(tmp_path / "f", idx_bytes(floats, 0x0D), gz)
    np.testing.assert_array_equal(read_idx(p), floats)


def _valid() -> bytes:
    return idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))


CORRUPT_IDX = {
    "empty": b"",
    "short header": b"\x00\x00\x08",
    "bad magic": b"\x01" + _valid()[1:],
    "unknown type": b"\x00\x00\x07" + _valid()[3:],
    "zero dims": b"\x00\x00\x08\x00",
    "too many dims": b"\x00\x00\x08\x09" + b"\x00\x00\x00\x01" * 9,
    "zero-sized dim": b"\x00\x00\x08\x02" + struct.pack(">II", 0, 5),
    "truncated dims": b"\x00\x00\x08\x03" + struct.pack(">I", 3),
    "truncated data": _valid()[:-1],
    "trailing data": _valid() + b"\x00",
    "huge header": b"\x00\x00\x08\x03" + struct.pack(">III", 2**31, 2**31, 2**31),
    "foreign file": b"%PDF-1.7 this is not an IDX file at all",
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPT_IDX))
def test_read_idx_rejects_corrupted(tmp_path, case, gz):
    p = write(tmp_path / "bad", CORRUPT_IDX[case], gz)
    with pytest.raises(DataError):
        read_idx(p)


def test_read_idx_rejects_broken_gzip(tmp_path):
    good = gzip.compress(_valid())
    p = write(tmp_path / "bad.gz", good[:12] + bytes(len(good) - 12))
    with pytest.raises(DataError):
        read_idx(p)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")
    assert issubclass(DataError, InputError)


def make_idx_dir(d: Path, n_train=20, n_test=10, gz=True, classes=10) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        write(d / f"{split}-images-idx3-ubyte{suffix}", idx_bytes(imgs), gz)
        write(d / f"{split}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)
    return d


def test_load_idx_dir(tmp_path):
    src = load_idx_dir(make_idx_dir(tmp_path / "mnist"))
    assert src.x_train.shape == (20, 1, 28, 28) and src.x_test.shape == (10, 1, 28, 28)
    assert src.x_train.dtype == np.float32 and 0 <= src.x_train.min() and src.x_train.max() <= 1
    assert src.y_train.tolist() == [i % 10 for i in range(20)]
    assert src.label_names == [str(i) for i in range(10)]


def test_load_idx_dir_rejects_mismatch(tmp_path):
    d = make_idx_dir(tmp_path / "m", gz=False)
    write(d / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(9, dtype=np.uint8)))
    with pytest.raises(DataError, match="9 labels"):
        load_idx_dir(d)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no IDX test labels"):
        load_idx_dir(d)
    with pytest.raises(DataError, match="does not exist"):
        load_idx_dir(tmp_path / "missing")


def test_permuted_benchmark_on_idx_dir(tmp_path):
    d = make_idx_dir(tmp_path / "mnist")
    tasks = build_benchmark("permuted-mnist", "idx-dir", tasks=3, seed=1, data_dir=d)
    assert [t.name for t in tasks] == ["permuted-mnist-0", "permuted-mnist-1", "permuted-mnist-2"]
    base = tasks[0].x_train
    assert base.shape == (20, 784)
    for t in tasks[1:]:
        x = t.x_train
        assert not np.array_equal(x, base)
        # a permutation of the same pixels, per image
        np.testing.assert_array_equal(np.sort(x, axis=1), np.sort(base, axis=1))
        np.testing.assert_array_equal(t.y_train, tasks[0].y_train)
    # task t's permutation does not depend on how many tasks were built; seed matters
    more = build_benchmark("permuted-mnist", "idx-dir", tasks=5, seed=1, data_dir=d)
    np.testing.assert_array_equal(more[2].x_test, tasks[2].x_test)
    other = build_benchmark("permuted-mnist", "idx-dir", tasks=2, seed=2, data_dir=d)
    assert not np.array_equal(other[1].x_test, tasks[1].x_test)
    assert tasks[2].source["index"] == 2 and tasks[2].source["seed"] == 1
    padded = build_benchmark("permuted-mnist", "idx-dir", tasks=1, data_dir=d, pad=True)
    assert padded[0].input_shape == (1024,)
    assert padded[0].x_train.reshape(20, 32, 32)[:, :2].sum() == 0  # zero border


def test_split_mnist_task_incremental():
    tasks = build_benchmark("split-mnist", "mnist5k", seed=0)
    assert [t.name for t in tasks] == [f"split-mnist-{i}" for i in range(5)]
    for i, t in enumerate(tasks):
        assert t.num_classes == 2 and t.label_names == [str(2 * i), str(2 * i + 1)]
        assert set(np.unique(t.y_train)) == {0, 1} and set(np.unique(t.y_test)) == {0, 1}
        assert len(t.y_train) == 800 and len(t.y_test) == 200  # 80/20 of 500 digits each
        assert t.input_shape == (784,) and t.x_train.dtype == np.float32
    with pytest.raises(DataError, match="at most 5"):
        build_benchmark("split-mnist", "mnist5k", tasks=6)


# -- CIFAR binary ---------------------------------------------------------------------------
def cifar_records(n: int, label_bytes: int, classes: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1).tobytes(), labels


def make_cifar_dir(d: Path, n: int = 30) -> Path:
    c10 = d / "cifar-10-batches-bin"
    c100 = d / "cifar-100-binary"
    c10.mkdir(parents=True)
    c100.mkdir(parents=True)
    for i in range(1, 6):
        (c10 / f"data_batch_{i}.bin").write_bytes(cifar_records(n, 1, 10, i)[0])
    (c10 / "test_batch.bin").write_bytes(cifar_records(n, 1, 10, 9)[0])
    (c10 / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    (c100 / "train.bin").write_bytes(cifar_records(20 * n, 2, 100, 7)[0])
    (c100 / "test.bin").write_bytes(cifar_records(10 * n, 2, 100, 8)[0])
    return d


def test_read_cifar_bin_values(tmp_path):
    raw, labels = cifar_records(4, 2, 100)
    p = tmp_path / "train.bin"
    p.write_bytes(raw)
    x, y = read_cifar_bin(p, label_bytes=2, num_classes=100)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(y, labels[:, 1])  # fine label
    rec = np.frombuffer(raw, np.uint8).reshape(4, -1)
    np.testing.assert_allclose(x[2, 1, 3, 4], rec[2, 2 + 1024 + 3 * 32 + 4] / 255)


@pytest.mark.parametrize("case", ["truncated", "empty", "bad label", "wrong variant"])
def test_read_cifar_bin_rejects_corrupted(tmp_path, case):
    raw, _ = cifar_records(3, 1, 10)
    if case == "truncated":
        raw = raw[:-100]
    elif case == "empty":
        raw = b""
    elif case == "bad label":
        raw = bytes([200]) + raw[1:]
    p = tmp_path / "batch.bin"
    p.write_bytes(raw)
    label_bytes = 2 if case == "wrong variant" else 1
    with pytest.raises(DataError):
        read_cifar_bin(p, label_bytes=label_bytes, num_classes=10)


def test_split_cifar_from_binary_files(tmp_path):
    d = make_cifar_dir(tmp_path)
    c10, c100 = load_cifar10(d), load_cifar100(d)
    assert c10.x_train.shape == (150, 3, 32, 32) and c10.label_names[3] == "class3"
    assert c100.x_test.shape == (300, 3, 32, 32)
    tasks = build_benchmark("split-cifar", "cifar", data_dir=d)
    assert [t.name for t in tasks] == [f"split-cifar-{i}" for i in range(6)]
    assert all(t.num_classes == 10 and t.input_shape == (3, 32, 32) for t in tasks)
    assert len(tasks[0].y_train) == 150
    # task k holds CIFAR-100 classes 10(k-1)..10k-1 relabelled 0..9
    mask = (c100.y_train >= 10) & (c100.y_train < 20)
    np.testing.assert_array_equal(tasks[2].y_train, c100.y_train[mask] - 10)
    (d / "cifar-100-binary" / "test.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError, match="whole number"):
        build_benchmark("split-cifar", "cifar", data_dir=d)


# -- user files -----------------------------------------------------------------------------
def test_custom_npz_npy_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 5)).astype(np.float32)
    y = np.arange(40) % 3
    np.savez(tmp_path / "four.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:],
             label_names=np.array(["a", "b", "c"]))
    t = load_task_file(tmp_path / "four.npz")
    assert t.name == "four" and t.num_classes == 3 and t.label_names == ["a", "b", "c"]
    np.testing.assert_array_equal(t.x_test, x[30:])
    assert t.source["kind"] == "file" and len(t.source["sha256"]) == 64

    np.savez(tmp_path / "xy.npz", x=x, y=y)
    t2 = load_task_file(tmp_path / "xy.npz", "my-task", test_fraction=0.25)
    assert (len(t2.y_train), len(t2.y_test)) == (30, 10)
    np.testing.assert_array_equal(np.sort(np.concatenate([t2.y_train, t2.y_test])), np.sort(y))

    np.save(tmp_path / "table.npy", np.column_stack([x, y]))
    t3 = load_task_file(tmp_path / "table.npy")
    assert t3.input_shape == (5,) and len(t3.y_train) + len(t3.y_test) == 40

    with open(tmp_path / "t.csv", "w") as f:
        f.write("label,f1,f2\n" + "".join(f"{i % 2},{i},{i * 0.5}\n" for i in range(10)))
    t4 = load_task_file(tmp_path / "t.csv")
    assert t4.input_shape == (2,) and t4.num_classes == 2
    rows = np.concatenate([t4.x_train, t4.x_test])
    labels = np.concatenate([t4.y_train, t4.y_test])
    np.testing.assert_array_equal(labels, rows[:, 0].astype(int) % 2)

    custom = build_benchmark("custom", data_files=[str(tmp_path / "four.npz"),
                                                   str(tmp_path / "table.npy")])
    assert [t.name for t in custom] == ["four", "table"]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    x = np.zeros((4, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    files = {}

    def npz(name, **arrays):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        files[name] = tmp_path / f"{name}.npz"

    npz("missing-keys", a=x)
    npz("nan", x_train=x + np.nan, y_train=y, x_test=x, y_test=y)
    npz("float-labels", x_train=x, y_train=y + 0.5, x_test=x, y_test=y)
    # Labels may be any integers (they become classes in sorted order); with label_names they
    # are indices into it, so a negative or an out-of-range index is an error.
    names = np.array(["a", "b", "c"])
    npz("negative-labels", x_train=x, y_train=-y, x_test=x, y_test=y, label_names=names)
    npz("huge-label", x_train=x, y_train=y * 10**12, x_test=x, y_test=y)
    npz("too-many-classes", x_train=x, y_train=y * 10**6, x_test=x, y_test=y,
        label_names=names)
    npz("length-mismatch", x_train=x, y_train=y[:3], x_test=x, y_test=y)
    npz("shape-mismatch", x_train=x, y_train=y, x_test=x[:, :2], y_test=y)
    npz("empty", x_train=x[:0], y_train=y[:0], x_test=x, y_test=y)
    npz("strings", x_train=np.array([["a"]] * 4), y_train=y, x_test=x, y_test=y)
    np.savez(tmp_path / "obj.npz", x_train=np.array([{}, 1], dtype=object))
    files["object-array"] = tmp_path / "obj.npz"
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 4), np.float32))
    raw = good.read_bytes()
    files["npy-lying-header"] = tmp_path / "lie.npy"
    files["npy-lying-header"].write_bytes(raw.replace(b"(4, 4)", b"(9999999, 4)"))
    files["npy-truncated"] = tmp_path / "trunc.npy"
    files["npy-truncated"].write_bytes(raw[:-8])
    files["not-a-zip"] = tmp_path / "nz.npz"
    files["not-a-zip"].write_bytes(b"PK\x03\x04garbage")
    files["csv-text"] = tmp_path / "bad.csv"
    files["csv-text"].write_text("1,2,0\n3,four,1\n")
    files["csv-header-mismatch"] = tmp_path / "header.csv"
    files["csv-header-mismatch"].write_text("a,b,label\n1,0\n2,1\n")
    files["csv-ragged"] = tmp_path / "ragged.csv"
    files["csv-ragged"].write_text("1,2,0\n3,1\n")
    files["unknown-suffix"] = tmp_path / "data.txt"
    files["unknown-suffix"].write_text("1,2,3")
    return files


BAD_FILES = [
    "missing-keys", "nan", "float-labels", "negative-labels", "huge-label", "too-many-classes", "length-mismatch",
    "shape-mismatch", "empty", "strings", "object-array", "npy-lying-header", "npy-truncated",
    "not-a-zip", "csv-text", "csv-ragged", "csv-header-mismatch", "unknown-suffix",
]


@pytest.mark.parametrize("case", BAD_FILES)
def test_custom_files_rejected(tmp_path, case):
    files = _bad_files(tmp_path)
    assert sorted(files) == sorted(BAD_FILES)
    with pytest.raises(DataError):
        load_task_file(files[case], "t")


def test_task_data_validation_and_stats():
    x = np.full((4, 2, 3, 3), 0.5, np.float32)
    x[:, 1] = 1.0
    y = np.array([0, 1, 2, 1])
    t = TaskData("imgs", x, y, x, y)
    mean, std = input_stats(t)
    assert mean == pytest.approx([0.5, 1.0]) and std == pytest.approx([1.0, 1.0])  # 0 std -> 1
    with pytest.raises(InputError):
        TaskData("bad name!", x, y, x, y)
    with pytest.raises(DataError, match=">= num_classes"):
        TaskData("t", x, y, x, y, num_classes=2)
    with pytest.raises(DataError, match="float32"):
        TaskData("t", x.astype(np.float64), y, x, y)


def test_with_test_rows_cuts_the_test_split_only():
    rng = np.random.default_rng(0)
    base = TaskData("t", rng.random((20, 4), dtype=np.float32), np.arange(20) % 3,
                    rng.random((10, 4), dtype=np.float32), np.arange(10) % 3,
                    transform=lambda x: x[:, ::-1])
    cut = base.with_test_rows(4)
    assert len(cut.y_test) == 4 and len(base.y_test) == 10
    np.testing.assert_array_equal(cut.x_test, base.x_test[:4])  # the transform still applies
    assert cut.x_train.shape == base.x_train.shape and cut.name == "t"
    assert len(base.with_test_rows(100).y_test) == 10
    with pytest.raises(DataError, match="n > 0"):
        base.with_test_rows(0)
