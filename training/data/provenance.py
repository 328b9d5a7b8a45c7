"""Where a checkpoint's tasks came from, and getting their test data back.

``train`` and ``add-task`` record each task's source in ``meta["task_sources"]`` (a benchmark
and its settings, or a file and its sha256); :func:`recorded_tasks` rebuilds the test data from
it, for ``eval``, export verification on real rows and the no-forgetting check.
"""

from __future__ import annotations

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


def recorded_tasks(
    model: HNetModel, names: list[str] | None = None
) -> tuple[dict[str, TaskData], dict[str, str]]:
    """Rebuild the test data of the model's tasks from ``meta["task_sources"]``.

    Returns ``(tasks by name, reasons by name for tasks whose data is unavailable)``. A task from
    a file is only used if the file still has the recorded sha256.
    """
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
            path = src.get("path", "")
            try:
                if not Path(path).is_file():
                    missing[name] = f"data file {path} not found"
                elif file_sha256(path) != src.get("sha256"):
                    missing[name] = f"data file {path} changed since training"
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
                data_dir=spec.get("data_dir"), pad=bool(spec.get("pad", False)),
                first_identity=bool(spec.get("first_identity", True)),
            )
        except (HNetError, OSError) as exc:
            for name, _ in members:
                missing[name] = str(exc)
            continue
        for name, src in members:
            found[name] = built[int(src["index"])]
    return found, missing
