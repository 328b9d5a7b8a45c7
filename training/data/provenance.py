"""Where a checkpoint's tasks came from, and getting their test data back.

``train`` and ``add-task`` record each task's source in ``meta["task_sources"]`` (a benchmark
and its settings, or a file and its sha256); :func:`recorded_tasks` rebuilds the test data from
it, for ``eval``, export verification on real rows and the no-forgetting check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hnet_serve.errors import HNetError
from hnet_serve.model import HNetModel
from hnet_serve.training.data.benchmarks import build_benchmark
from hnet_serve.training.data.readers import file_sha256
from hnet_serve.training.data.sources import load_task_file
from hnet_serve.training.data.task import TaskData


def _source_key(src: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in src.items() if k != "index"))


def relocate_sources(sources: dict[str, Any], old_root: str | os.PathLike | None,
                     new_root: str | os.PathLike) -> dict[str, Any]:
    """``sources`` with every file's ``path`` rewritten relative to ``new_root`` (the checkpoint
    directory being written) where possible, so that a checkpoint moved together with its data
    still finds it; ``absolute_path`` keeps where the file was when it was recorded."""
    out: dict[str, Any] = {}
    for name, src in sources.items():
        if isinstance(src, dict) and src.get("kind") == "file" and isinstance(src.get("path"), str):
            where = _candidates(src, old_root, None)
            absolute = os.path.abspath(where[0]) if where else src["path"]
            try:
                rel = os.path.relpath(absolute, os.path.abspath(new_root))
            except ValueError:  # another drive (Windows): only an absolute path works
                rel = absolute
            src = {**src, "path": rel, "absolute_path": absolute}
        out[name] = src
    return out


def _candidates(src: dict[str, Any], root: str | os.PathLike | None,
                data_dir: str | os.PathLike | None) -> list[Path]:
    """Where a recorded file may be now, most specific first: the recorded path (relative to
    the checkpoint ``root`` when it is relative), the absolute path recorded at training time,
    then ``data_dir`` joined with the relative path and with the file name."""
    path = Path(str(src.get("path", "")))
    out = []
    if path.is_absolute():
        out.append(path)
    elif root is not None:
        out.append(Path(root) / path)
    if isinstance(src.get("absolute_path"), str):
        out.append(Path(src["absolute_path"]))
    if data_dir is not None:
        if not path.is_absolute():
            out.append(Path(data_dir) / path)
        out.append(Path(data_dir) / path.name)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _find_file(src: dict[str, Any], root: str | os.PathLike | None,
               data_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The first candidate file with the recorded sha256, or None and why not."""
    changed = None
    for path in _candidates(src, root, data_dir):
        if path.is_file():
            if file_sha256(path) == src.get("sha256"):
                return path, ""
            changed = path
    if changed is not None:
        return None, f"data file {changed} changed since training (sha256 differs)"
    hint = "" if data_dir is not None else "; pass --data-dir DIR if it moved"
    return None, f"data file {src.get('path')} not found{hint}"


def recorded_tasks(
    model: HNetModel, names: list[str] | None = None, *,
    root: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, TaskData], dict[str, str]]:
    """Rebuild the test data of the model's tasks from ``meta["task_sources"]``.

    Returns ``(tasks by name, reasons by name for tasks whose data is unavailable)``. A task from
    a file is only used if a file with the recorded sha256 is found: at its path relative to the
    checkpoint directory ``root`` (default: where the model was loaded from), at its recorded
    absolute path, or in ``data_dir`` (which also replaces a benchmark's recorded data
    directory).
    """
    root = root if root is not None else model.checkpoint_dir
    sources = model.meta.get("task_sources", {})
    if not isinstance(sources, dict):  # a hand-edited manifest: report, never crash
        sources = {}
    names = model.task_names if names is None else names
    found: dict[str, TaskData] = {}
    missing: dict[str, str] = {}
    groups: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
    for name in names:
        src = sources.get(name)
        if not isinstance(src, dict) or "kind" not in src:
            missing[name] = "no data source recorded"
        elif src["kind"] == "benchmark":
            groups.setdefault(_source_key(src), []).append((name, src))
        elif src["kind"] == "file":
            try:
                path, why = _find_file(src, root, data_dir)
                if path is None:
                    missing[name] = why
                else:
                    found[name] = load_task_file(
                        path, name, test_fraction=src.get("test_fraction", 0.2),
                        seed=src.get("seed", 0),
                    )
            except (HNetError, OSError) as exc:
                missing[name] = str(exc)
        else:
            missing[name] = f"unknown data source kind {src['kind']!r}"
    for members in groups.values():
        spec = members[0][1]
        try:
            built = build_benchmark(
                spec["benchmark"], spec.get("dataset", "mnist5k"),
                tasks=max(int(s["index"]) for _, s in members) + 1, seed=int(spec.get("seed", 0)),
                data_dir=data_dir or spec.get("data_dir"), pad=bool(spec.get("pad", False)),
                first_identity=bool(spec.get("first_identity", True)),
            )
        except (HNetError, OSError) as exc:
            for name, _ in members:
                missing[name] = str(exc)
            continue
        for name, src in members:
            found[name] = built[int(src["index"])]
    return found, missing
