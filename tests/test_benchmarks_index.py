"""``make bench`` runs ``benchmarks.run_all``: every script it names exists, has a ``main``, and
every benchmark script in ``benchmarks/`` is in it (so none silently stops being regenerated)."""

from __future__ import annotations

import importlib
from pathlib import Path

from benchmarks import run_all

HELPERS = {"__init__", "_report", "_timing", "hypnettorch_ref", "run_all"}


def test_run_all_names_every_benchmark_script_and_each_has_a_main(capsys):
    modules = {module for _, module, _ in run_all.SCRIPTS}
    on_disk = {f"benchmarks.{p.stem}"
               for p in (Path(run_all.__file__).parent).glob("*.py") if p.stem not in HELPERS}
    assert modules == on_disk
    for module in sorted(modules):
        assert callable(importlib.import_module(module).main), module
    assert run_all.main(["--list", "--only", "serving"]) == 0
    assert capsys.readouterr().out.split() == ["serving", "python", "-m",
                                               "benchmarks.bench_serving"]
