"""Regenerate every table of docs/benchmarks.md (``make bench``): each benchmark script in turn.

Each script runs in its own process (its thread settings and allocator state stay its own) and
rewrites only its own section, so a failed script leaves the other sections as they were. The
whole run takes hours on 2 cores (the reproduction runs dominate); ``--only`` picks scripts.

    python -m benchmarks.run_all [--only serving scoring ...] [--list]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# (name, module, arguments): the order puts the quick, machine-sensitive measurements first.
SCRIPTS: list[tuple[str, str, list[str]]] = [
    ("generation", "benchmarks.bench_generation", []),
    ("training", "benchmarks.bench_training", []),
    ("training-default", "benchmarks.bench_default_training", []),
    ("export", "benchmarks.bench_export", []),
    ("serving", "benchmarks.bench_serving", []),
    ("bf16", "benchmarks.bench_bf16", []),
    # without CUDA it prints that and exits 0 (the GPU table stays pending)
    ("gpu", "benchmarks.bench_gpu", []),
    ("protocols", "benchmarks.bench_protocols", []),
    ("scoring", "benchmarks.bench_scoring", []),
    ("startup", "benchmarks.bench_startup", []),
    ("accuracy", "benchmarks.bench_accuracy", []),
    ("own-data", "benchmarks.bench_own_data", []),
    ("reproduction-split-mnist", "benchmarks.bench_reproduction",
     ["--benchmark", "split-mnist"]),
    ("reproduction-permuted-fmnist", "benchmarks.bench_reproduction",
     ["--benchmark", "permuted-fmnist"]),
    ("cl3-grid", "benchmarks.bench_cl3_grid", []),
    ("repro-long", "benchmarks.bench_repro_long", []),
    # cached per run in docs/img/capacity.json: a rerun only trains what is missing
    ("capacity-splitmnist", "benchmarks.bench_capacity",
     ["--benchmark", "splitmnist", "--variants", "independent", "flat-1500",
      "--seeds", "0", "1", "2"]),
    ("capacity-pfmnist10", "benchmarks.bench_capacity", ["--benchmark", "pfmnist10"]),
    ("load-test", "benchmarks.load_test", []),
    ("hostile-clients", "benchmarks.hostile_clients", []),
    ("reload", "benchmarks.bench_reload", []),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [name for name, _, _ in SCRIPTS]
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                    help=f"run only these ({', '.join(names)})")
    ap.add_argument("--list", action="store_true", help="print the scripts and exit")
    args = ap.parse_args(argv)
    chosen = [s for s in SCRIPTS if not args.only or s[0] in args.only]
    if args.list:
        for name, module, extra in chosen:
            print(f"{name:<30} python -m {module} {' '.join(extra)}".rstrip())
        return 0
    failed = []
    for name, module, extra in chosen:
        print(f"== {name}: python -m {module} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", module, *extra])
        print(f"== {name}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)} (their sections were left as they were)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
