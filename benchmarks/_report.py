"""Shared helpers for benchmark scripts: timing and writing sections of docs/benchmarks.md.

Each script owns one section, delimited by ``<!-- BEGIN name -->`` / ``<!-- END name -->``, and
rewrites only that section, so scripts can run in any order (or concurrently) without clobbering
each other's tables.
"""

from __future__ import annotations

import fcntl
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hnet_serve  # noqa: F401  (sets the allocator knob before any tensor is created)
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.targets import MLPConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every table here is written by a script in `benchmarks/` (named in its section); rerun the\n"
    "script to regenerate it. Ratios compare against a baseline measured in the same run.\n"
)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def timeit(fn: Callable[[], object], *, repeat: int = 10, warmup: int = 2, number: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` rounds (each of ``number`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_section(name: str, body: str, *, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with ``body``."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    lock = doc.with_suffix(".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        text = doc.read_text() if doc.exists() else HEADER
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + block.rstrip("\n") + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block
        tmp = doc.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, doc)


def verdict(name: str, **checks: bool) -> int:
    """Print ``name: PASS`` (or ``FAIL``) with every named check; the exit status for ``main``."""
    ok = all(checks.values())
    named = ", ".join(f"{k.replace('_', ' ')} ok: {v}" for k, v in checks.items())
    print(f"{name}:", "PASS" if ok else "FAIL", f"({named})")
    return 0 if ok else 1


def pmnist_model(n_tasks: int, prefix: str = "pmnist") -> HNetModel:
    """The paper's PermutedMNIST-10 sizes: MLP 784-1000-1000-10 target, chunked hypernetwork
    (chunk 78,000, hidden 25-25, task embedding 24, chunk embedding 8), ``n_tasks`` tasks."""
    model = HNetModel(
        MLPConfig(input_shape=(784,), hidden=[1000, 1000], num_classes=10),
        HypernetConfig(kind="chunked", hidden=[25, 25], task_emb_dim=24, chunk_emb_dim=8,
                       chunk_size=78_000),
        seed=0,
    )
    for i in range(n_tasks):
        model.add_task(f"{prefix}-{i}")
    return model
