"""The exporter's Python API: per-task ONNX files with baked weights, and the dynamic graph.

* :func:`export_all` traces the target once (:class:`hnet_serve.onnx_graph.TaskGraph`) and writes
  ``<task>.onnx`` per task by swapping that task's generated weights in as initializers.
* :func:`to_onnx` is the one-task form with a file path of your choice.
* :func:`to_dynamic_onnx` writes one graph with inputs ``task_index`` and ``input``.

Every file is verified before it is written (:mod:`hnet_serve.export.verify`; ``verify=False`` skips it),
written to a temporary name in the destination directory, fsynced and renamed into place, so a
failure never leaves a half-written file and never touches an existing one. ``export_all``
writes only to a new or empty directory or an export directory (ONNX files only), and builds the
whole set in a hidden sibling that is swapped in at the end: ``--out`` shows the previous set or
the new one, never part of one. Task names are
validated against the naming rule and the registry before anything is traced or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from hnet_serve.checkpoint import checkpoint_hash, load_checkpoint
from hnet_serve.errors import ConfigError, ExportError, HNetError
from hnet_serve.export.dynamic_graph import dynamic_model_proto
from hnet_serve.export.quantize import QuantizeReport, compare_int8, quantize_int8
from hnet_serve.export.verify import (
    REAL_ROWS,
    TOLERANCE,
    Parity,
    session,
    verify_dynamic,
    verify_task,
)
from hnet_serve.fsutil import (
    check_output_dir,
    fsync_path,
    owned_files,
    remove_stale_siblings,
    replace_dir,
    temp_sibling,
    write_atomic,
)
from hnet_serve.model import HNetModel
from hnet_serve.onnx_graph import TaskGraph, opset_of
from hnet_serve.registry import validate_task_name

Source = str | os.PathLike | HNetModel
QUANTIZE_MODES = ("int8",)
GENERATE_GROUP = 16  # tasks generated per hypernetwork pass during export_all
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a single-file ONNX model


@dataclass
class ExportResult:
    """One written ONNX file. ``task`` is None for the dynamic graph."""

    task: str | None
    path: str
    bytes: int
    seconds: float  # generate + bake (or trace, for --dynamic) + verify + write (+ quantize)
    opset: int
    verified: bool
    max_abs_diff: float | None  # ONNX Runtime vs PyTorch, max over every input tried
    rows_checked: int
    real_rows: int  # rows of the task's real test data among rows_checked
    data_note: str = ""  # why real test inputs were not used
    quantized: QuantizeReport | None = None
    sha256: str = ""  # of the written file


# -- inputs -----------------------------------------------------------------------------------
def load_source(source: Source) -> tuple[HNetModel, str | None]:
    """A model and its checkpoint hash (None for an in-memory model: derived when exporting)."""
    if isinstance(source, HNetModel):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"expected a checkpoint directory or an HNetModel, got {type(source).__name__}")
    return load_checkpoint(source), checkpoint_hash(source)


def resolve_tasks(model: HNetModel, tasks: list[str] | None) -> list[str]:
    """Validated, known, de-duplicated task names (all tasks when ``tasks`` is None)."""
    if tasks is None:
        names = model.task_names
        if not names:
            raise ConfigError("the checkpoint has no tasks to export")
        return names
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ConfigError("no task given: name at least one task, or export all of them")
    for name in tasks:
        validate_task_name(name)
        model.registry.get(name)  # UnknownTaskError lists the known names
    return list(dict.fromkeys(tasks))


def _check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")


def _check_opset(opset: int | None) -> None:
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not 7 <= opset <= newest):
        raise ConfigError(f"opset must be an integer from 7 to {newest}, got {opset!r}")


def int8_path(path: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (the quantized file sits beside the float one)."""
    if path.suffix == ".onnx":
        return path.with_name(f"{path.stem}.int8.onnx")
    return path.with_name(f"{path.name}.int8.onnx")


def recorded_test_data(model: HNetModel, names: list[str]
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """The recorded test data of ``names`` as ``(x, y)`` shaped for the model, and, for tasks
    without it, why. Uses ``training`` (imported lazily: a serving install has no training)."""
    try:
        from hnet_serve.training.data.provenance import recorded_tasks
    except ImportError as exc:
        return {}, {n: f"training package unavailable ({exc.name})" for n in names}
    try:
        found, missing = recorded_tasks(model, names)
    # Optional data from another package: never fail an export over it.
    except Exception as exc:  # noqa: BLE001
        why = str(exc) if isinstance(exc, (HNetError, OSError)) else f"{type(exc).__name__}: {exc}"
        return {}, {n: f"test data unavailable ({why})" for n in names}
    shape = tuple(model.target_config.input_shape)
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, task in found.items():
        x = np.asarray(task.x_test, dtype=np.float32)
        if x[0].size != int(np.prod(shape)):
            missing[name] = f"test inputs {list(x.shape[1:])} do not fit input shape {list(shape)}"
            continue
        data[name] = (np.ascontiguousarray(x.reshape(len(x), *shape)), np.asarray(task.y_test))
    return data, missing


# -- files ------------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync, then rename over ``path``."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_file_target(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file name like {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise ExportError(f"directory {path.parent} does not exist")
    return path


def _export_member(name: str) -> bool:
    """What an export directory may hold: our ONNX files (and the hidden temporary file of a
    write cut short, ``.NAME.onnx.tmp-*``)."""
    return name.endswith(".onnx") or (name.startswith(".") and ".onnx.tmp-" in name)


def _check_out_dir(out_dir: str | os.PathLike, source: Source) -> Path:
    """``out_dir`` per the output rule (:func:`hnet_serve.fsutil.check_output_dir`): new, empty,
    or an export directory (only ONNX files); never the checkpoint's folder."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    protect = {"checkpoint": source} if isinstance(source, (str, os.PathLike)) else None
    return check_output_dir(out, owned=owned_files(_export_member, "export"), protect=protect,
                            what="an export")


def _task_paths(out: Path, names: list[str], quantize: str | None) -> dict[str, tuple[Path, Path | None]]:
    """``<out>/<task>.onnx`` (+ ``<task>.int8.onnx``) per task; names are already validated, and
    every path is checked to stay directly inside ``out`` and not to collide with another."""
    paths: dict[str, tuple[Path, Path | None]] = {}
    seen: dict[Path, str] = {}
    for name in names:
        main = out / f"{name}.onnx"
        quant = int8_path(main) if quantize else None
        for p in (main, quant):
            if p is None:
                continue
            if p.parent != out or p.name in ("", ".", ".."):
                raise ExportError(f"task {name!r} would be written outside {out}")
            if p in seen:
                raise ExportError(f"tasks {seen[p]!r} and {name!r} would both write {p.name}")
            seen[p] = name
        paths[name] = (main, quant)
    return paths


# -- one task -----------------------------------------------------------------------------------
class _Writer:
    """Atomic writes on one background thread, at most one in flight.

    The fsync of file k overlaps with generating and verifying file k+1; a failed write is
    raised at the next :meth:`submit` or at :meth:`wait`. Every write is still temporary file ->
    fsync -> rename, so a failure never leaves a half-written file.
    """

    def __init__(self, background: bool) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1) if background else None
        self._pending: Future | None = None

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def submit(self, path: Path, data: bytes) -> None:
        self.wait()
        if self._pool is None:
            atomic_write(path, data)
        else:
            self._pending = self._pool.submit(atomic_write, path, data)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def close_quietly(self) -> None:
        """Close after another error: a write failing now must not mask it."""
        with contextlib.suppress(Exception):
            self.close()


def _export_task(graph: TaskGraph, task: str, weights: torch.Tensor, path: Path,
                 quant_path: Path | None, writer: _Writer, *, verify: bool, full_check: bool,
                 tolerance: float, data: dict[str, tuple[np.ndarray, np.ndarray]],
                 notes: dict[str, str]) -> ExportResult:
    t0 = time.perf_counter()
    model = graph.model
    proto = graph.model_proto(task, weights)
    blob = proto.SerializeToString()
    if len(blob) > MAX_PROTO_BYTES:  # pragma: no cover - needs a > 2 GB target
        raise ExportError(f"task {task!r}: the model is over 2 GB, too large for one ONNX file")
    parity = Parity(float("nan"), 0, 0)
    if verify:
        real = data[task][0][:REAL_ROWS] if task in data else None
        parity = verify_task(blob, proto, model, task, weights, real, tolerance,
                             full_check=full_check)
    writer.submit(path, blob)
    quantized = None
    if quant_path is not None:
        tmp = temp_sibling(quant_path)
        try:
            quantize_int8(proto, tmp)
            quantized = compare_int8(session(blob), session(str(tmp)),
                                     model.target_config.input_shape, data.get(task),
                                     notes.get(task, ""), str(quant_path), tmp.stat().st_size)
            os.replace(tmp, quant_path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(quant_path.parent)
    return ExportResult(
        task=task, path=str(path), bytes=len(blob), seconds=time.perf_counter() - t0,
        sha256=hashlib.sha256(blob).hexdigest(),
        opset=graph.opset, verified=verify,
        max_abs_diff=parity.max_abs_diff if verify else None,
        rows_checked=parity.rows, real_rows=parity.real_rows,
        data_note=notes.get(task, "") if (verify or quantized) else "", quantized=quantized,
    )


# -- public API ---------------------------------------------------------------------------------
def export_all(source: Source, out_dir: str | os.PathLike, tasks: list[str] | None = None, *,
               opset: int | None = None, verify: bool = True, quantize: str | None = None,
               tolerance: float = TOLERANCE, progress: bool = False) -> list[ExportResult]:
    """Write ``<out_dir>/<task>.onnx`` for ``tasks`` (all when None), tracing the target once.

    Everything that can be checked up front is checked before the trace and before any file is
    written: task names (rule and registry), output paths, ``opset``, ``quantize``. Every task
    gets the ONNX Runtime vs PyTorch comparison; the ONNX checker's full check runs on the first
    file only, because the others are the same graph with other initializer values, which the
    checker does not inspect (their names, shapes and sizes are still checked per file).
    """
    _check_quantize(quantize)
    _check_opset(opset)
    model, ckpt_hash = load_source(source)
    names = resolve_tasks(model, tasks)
    out = _check_out_dir(out_dir, source)
    paths = _task_paths(out, names, quantize)

    graph = TaskGraph.build(model, opset=opset, checkpoint_hash=ckpt_hash)
    data, notes = recorded_test_data(model, names) if (verify or quantize) else ({}, {})
    # The set is built in a hidden sibling holding (hard links to) the files already in ``out``
    # plus the new ones, then swapped in whole: a killed or failed export leaves ``out`` as it
    # was, never a partial set that looks complete.
    work = _start_set(out)
    results: list[ExportResult] = []
    from tqdm import tqdm

    writer = _Writer(background=len(names) > 1)
    try:
        with tqdm(total=len(names), desc="export", unit="task", file=sys.stderr,
                  disable=not progress) as bar:
            for start in range(0, len(names), GENERATE_GROUP):
                group = names[start : start + GENERATE_GROUP]
                t0 = time.perf_counter()
                with torch.no_grad():
                    weights = model.generate(group)  # (K, n_params), one pass
                share = (time.perf_counter() - t0) / len(group)  # each task's part of it
                for name, w in zip(group, weights):
                    main, quant = (None if p is None else work / p.name for p in paths[name])
                    result = _export_task(graph, name, w, main, quant, writer, verify=verify,
                                          full_check=not results, tolerance=tolerance,
                                          data=data, notes=notes)
                    result.seconds += share
                    results.append(result)
                    bar.update(1)
        t0 = time.perf_counter()
        writer.wait()
        results[-1].seconds += time.perf_counter() - t0  # the last write is nobody's overlap
        writer.close()
        _finish_set(work, out)
    except BaseException:  # Ctrl-C included
        writer.close_quietly()
        shutil.rmtree(work, ignore_errors=True)
        raise
    for r in results:  # the files' final names
        r.path = str(out / Path(r.path).name)
        if r.quantized is not None:
            r.quantized.path = str(out / Path(r.quantized.path).name)
    return results


def _start_set(out: Path) -> Path:
    """A hidden sibling of ``out`` holding hard links to (copies of, across devices) the ONNX
    files already there."""
    work = temp_sibling(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)  # a killed export's leftover
        work.mkdir()
        if out.is_dir():
            for f in sorted(out.iterdir()):
                if f.name.endswith(".onnx") and not f.name.startswith("."):
                    try:
                        os.link(f, work / f.name)
                    except OSError:
                        shutil.copy2(f, work / f.name)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return work


def _finish_set(work: Path, out: Path) -> None:
    try:
        fsync_path(work)
        replace_dir(work, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None


def to_onnx(source: Source, task: str, path: str | os.PathLike, *, opset: int | None = None,
            verify: bool = True, quantize: str | None = None,
            tolerance: float = TOLERANCE) -> ExportResult:
    """Write one task's model to ``path`` (the int8 model, if asked, to ``*.int8.onnx``)."""
    _check_quantize(quantize)
    _check_opset(opset)
    model, ckpt_hash = load_source(source)
    (name,) = resolve_tasks(model, [task])
    target = _check_file_target(Path(path))
    quant = int8_path(target) if quantize else None
    graph = TaskGraph.build(model, opset=opset, checkpoint_hash=ckpt_hash)
    data, notes = recorded_test_data(model, [name]) if (verify or quantize) else ({}, {})
    t0 = time.perf_counter()
    with torch.no_grad():
        weights = model.generate([name])[0]
    result = _export_task(graph, name, weights, target, quant, _Writer(background=False),
                          verify=verify, full_check=True, tolerance=tolerance, data=data,
                          notes=notes)
    result.seconds = time.perf_counter() - t0  # generation included
    return result


def to_dynamic_onnx(source: Source, path: str | os.PathLike, *, opset: int | None = None,
                    verify: bool = True, tolerance: float = TOLERANCE) -> ExportResult:
    """Write the dynamic graph (inputs ``task_index``, ``input``) for every task to ``path``."""
    _check_opset(opset)
    model, ckpt_hash = load_source(source)
    resolve_tasks(model, None)
    target = _check_file_target(Path(path))
    t0 = time.perf_counter()
    proto = dynamic_model_proto(model, opset=opset, checkpoint_hash=ckpt_hash)
    blob = proto.SerializeToString()
    data, notes = recorded_test_data(model, model.task_names) if verify else ({}, {})
    parity = Parity(float("nan"), 0, 0)
    if verify:
        real = {name: xy[0][:REAL_ROWS // 4] for name, xy in data.items()}
        parity = verify_dynamic(blob, proto, model, real, tolerance)
    atomic_write(target, blob)
    note = "; ".join(sorted(set(notes.values()))) if notes else ""
    return ExportResult(
        task=None, path=str(target), bytes=len(blob), seconds=time.perf_counter() - t0,
        opset=opset_of(proto), verified=verify, max_abs_diff=parity.max_abs_diff if verify else None,
        rows_checked=parity.rows, real_rows=parity.real_rows, data_note=note,
    )
