"""GPU evidence (issue 20): training, weight generation and serving on CUDA, against the CPU and
hypnettorch in the same run.

    python -m benchmarks.bench_gpu [--quick] [--out DIR] [--device cuda:0]

Without CUDA it says so and exits 0 (nothing is measured or written). With CUDA:

1. **Training step** at the paper's PermutedMNIST-10 sizes (target MLP 1024-1000-1000-10,
   chunked hypernetwork chunk 78,000, hidden 25-25, embeddings 24/8, batch 128, task 10 with
   9 old tasks regularized): ours (``bench_training.ours``) against hypnettorch 0.0.4
   (``bench_training.hypnettorch_step``) on the same GPU, rounds interleaved; and ours on the
   CPU of the same machine.
2. **Weight generation** for 1, 10 and 100 tasks of that hypernetwork (one batched call),
   GPU against CPU.
3. **Serving** with every task's weights cached on the GPU (float32 and bfloat16): one task at
   1, 64 and 1024 rows, and 1024 rows over 32 tasks, against the CPU runtime.

Every GPU timing synchronizes the device before the clock stops. ``--out DIR`` writes the table
to ``DIR/bench_gpu.md`` (and the numbers to ``DIR/bench_gpu.json``); without it the table goes
into docs/benchmarks.md (section ``gpu``). ``--quick`` keeps the run under 4 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SECTION = "gpu"


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronize (CUDA work is asynchronous)."""
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def bench_training(device: torch.device, quick: bool) -> tuple[list[list[Any]], dict]:
    from benchmarks.bench_training import hypnettorch_step, interleaved, ours

    repeat, rounds = (5, 3) if quick else (10, 5)
    gpu_ours, _ = ours(9, device=str(device))
    fns = {"ours (GPU)": synced(gpu_ours, device)}
    try:
        fns["hypnettorch (GPU)"] = synced(hypnettorch_step(9, device=str(device)), device)
    except ImportError as exc:  # the bench extra is not installed
        print(f"hypnettorch not available ({exc}); measuring ours only", flush=True)
    gpu = interleaved(fns, repeat, rounds)
    cpu_ours, _ = ours(9, device="cpu")
    cpu = interleaved({"ours (CPU)": cpu_ours}, 1 if quick else 3, 2 if quick else 3)
    times = {**gpu, **cpu}
    base = times["ours (GPU)"]
    rows = [[name, f"{t * 1e3:.2f}", f"{t / base:.2f}x"] for name, t in times.items()]
    return rows, {k: v * 1e3 for k, v in times.items()}


def bench_generation(device: torch.device, quick: bool) -> tuple[list[list[Any]], dict]:
    from benchmarks._report import pmnist_model, timeit

    models = {"cpu": pmnist_model(100), "gpu": pmnist_model(100)}
    models["gpu"].to(device)
    rows, raw = [], {}
    for k in (1, 10, 100):
        names = models["cpu"].task_names[:k]
        t = {}
        for where, model in models.items():
            dev = device if where == "gpu" else torch.device("cpu")

            def gen(model=model, names=names) -> object:
                with torch.inference_mode():
                    return model.generate(names)

            reps = 2 if (where == "cpu" and k == 100) or quick else 5
            t[where] = timeit(synced(gen, dev), repeat=reps, warmup=1)
        rows.append([k, f"{t['gpu'] * 1e3:.2f}", f"{t['cpu'] * 1e3:.1f}",
                     f"{t['cpu'] / t['gpu']:.1f}x"])
        raw[k] = {w: v * 1e3 for w, v in t.items()}
    return rows, raw


def bench_serving(device: torch.device, quick: bool) -> tuple[list[list[Any]], dict]:
    from benchmarks._report import pmnist_model, timeit
    from hnet_serve.serving import Runtime, ServingConfig

    names = [f"s-{i}" for i in range(32)]
    runtimes = {
        "cpu float32": Runtime(pmnist_model(32, "s"), ServingConfig(device="cpu", warm=names,
                                                                     cache_bytes=2**31)),
    }
    for dtype in ("float32", "bfloat16"):
        runtimes[f"gpu {dtype}"] = Runtime(
            pmnist_model(32, "s"), ServingConfig(device=str(device), cache_dtype=dtype,
                                                 warm=names, cache_bytes=2**31))
    x = np.random.default_rng(0).uniform(0, 1, (1024, 784)).astype(np.float32)
    mixed = [names[i % 32] for i in range(1024)]
    cases: list[tuple[str, Callable[[Runtime], object], int]] = [
        ("one task, 1 row", lambda rt: rt.predict("s-0", x[:1]), 1),
        ("one task, 64 rows", lambda rt: rt.predict("s-0", x[:64]), 64),
        ("one task, 1024 rows", lambda rt: rt.predict("s-0", x), 1024),
        ("1024 rows over 32 tasks", lambda rt: rt.predict_mixed(mixed, x), 1024),
    ]
    rows, raw = [], {}
    for label, call, n in cases:
        t = {}
        for name, rt in runtimes.items():
            # predict returns numpy: the device-to-host copy already synchronizes
            t[name] = timeit(lambda rt=rt, call=call: call(rt), repeat=5 if quick else 20,
                             warmup=2)
        rows.append([label, *(f"{t[k] * 1e3:.3f}" for k in runtimes),
                     *(f"{n / t[k]:,.0f}" for k in runtimes if k.startswith("gpu")),
                     f"{t['cpu float32'] / t['gpu float32']:.1f}x"])
        raw[label] = {k: v * 1e3 for k, v in t.items()}
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    from benchmarks._report import machine, table, write_section
    from hnet_serve.devices import resolve_device
    from hnet_serve.errors import ConfigError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (< 4 minutes on an H100)")
    p.add_argument("--out", help="write bench_gpu.md and bench_gpu.json here (default: the "
                   "gpu section of docs/benchmarks.md)")
    p.add_argument("--device", default="cuda", help="the GPU to measure (default cuda)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_gpu: torch {torch.__version__} sees no CUDA device; nothing measured "
              "(the GPU table stays pending)")
        return 0
    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"bench_gpu: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    gpu_name = torch.cuda.get_device_name(device)
    train_rows, train_raw = bench_training(device, args.quick)
    print(table(["step", "ms", "vs ours (GPU)"], train_rows), flush=True)
    gen_rows, gen_raw = bench_generation(device, args.quick)
    print(table(["tasks", "GPU (ms)", "CPU (ms)", "speed-up"], gen_rows), flush=True)
    serve_rows, serve_raw = bench_serving(device, args.quick)
    serve_headers = ["request", "CPU fp32 (ms)", "GPU fp32 (ms)", "GPU bf16 (ms)",
                     "GPU fp32 rows/s", "GPU bf16 rows/s", "GPU fp32 vs CPU"]
    print(table(serve_headers, serve_rows), flush=True)
    text = (
        "## GPU (`benchmarks/bench_gpu.py`)\n\n"
        f"GPU: {gpu_name} (torch {torch.__version__}, CUDA {torch.version.cuda}); host: "
        f"{machine()}. Command: `python -m benchmarks.bench_gpu"
        f"{' --quick' if args.quick else ''}`. GPU timings synchronize before the clock "
        "stops; CPU baselines ran in the same process.\n\n"
        "**Training step**, PermutedMNIST-10 at the paper's sizes (task 10, 9 old tasks "
        "regularized, batch 128), ms per step.\n\n"
        + table(["step", "ms", "vs ours (GPU)"], train_rows)
        + "\n**Weight generation** (the PermutedMNIST hypernetwork, one batched call).\n\n"
        + table(["tasks", "GPU (ms)", "CPU (ms)", "speed-up"], gen_rows)
        + "\n**Serving with cached weights** (MLP 784-1000-1000-10, 32 tasks cached; "
        "`Runtime.predict` / `predict_mixed`, numpy in and out).\n\n"
        + table(serve_headers, serve_rows)
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.md").write_text(text)
        (out / "bench_gpu.json").write_text(json.dumps(
            {"gpu": gpu_name, "quick": args.quick, "training_ms": train_raw,
             "generation_ms": gen_raw, "serving_ms": serve_raw}, indent=2))
        print(f"bench_gpu: wrote {out / 'bench_gpu.md'}")
    else:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
