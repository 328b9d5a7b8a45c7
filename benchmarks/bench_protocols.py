"""Protocol benchmark (issue 19): the Open Inference Protocol's JSON and binary routes next to
``/predict`` and the serving benchmark's minimal static BentoML+ONNX service.

    .venv/bin/python -m benchmarks.bench_protocols [--seconds 12] [--threads 1]

32 concurrent clients over HTTP, 1 and 64 rows per request (MLP 784-1000-1000-10, 10 tasks,
requests spread over them; onnx backend). Routes, all against the same ``hnet-serve serve``:
``/predict`` (JSON rows), ``POST /v2/models/<task>/infer`` with JSON tensors, and the same with
the binary tensor extension (inputs and outputs); the baseline is ``StaticOnnxService`` from
``bench_serving`` (one static ONNX model, JSON rows). Every route answers predictions and
probabilities. The load goes to one route at a time in interleaved slices, so background load
hits each alike; ratios are medians over slices of rows/s against the baseline (and
``/predict``) at the same rows per request. Goals: binary at 64 rows >= 1.5x ``/predict``; no
route below 0.8x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_serving import BIG, INPUT, build_model, free_port, load, server, summarize

SECTION = "protocols"
CLIENTS = 32
N_TASKS = 10
OUTPUTS = [{"name": "predictions"}, {"name": "probabilities"}]


def requests_for(route: str, n_rows: int, tasks: list[str]
                 ) -> tuple[list[bytes], list[str], list[dict[str, str]]]:
    """(bodies, paths, headers) of ``route`` for requests of ``n_rows`` rows, 2 per task."""
    g = np.random.default_rng(n_rows)
    bodies, paths, headers = [], [], []
    for i in range(2 * len(tasks)):
        task = tasks[i % len(tasks)]
        x = g.uniform(0, 1, (n_rows, INPUT)).astype(np.float32).round(4)
        plain = {"content-type": "application/json"}
        if route in ("baseline", "/predict"):
            bodies.append(json.dumps({"task": task, "inputs": x.tolist()}).encode())
            paths.append("/predict")
            headers.append(plain)
            continue
        paths.append(f"/v2/models/{task}/infer")
        tensor = {"name": "input", "shape": [n_rows, INPUT], "datatype": "FP32"}
        if route == "v2 JSON":
            bodies.append(json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}],
                                      "outputs": OUTPUTS}).encode())
            headers.append(plain)
        else:
            head = json.dumps({
                "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                "outputs": [{**o, "parameters": {"binary_data": True}} for o in OUTPUTS],
            }).encode()
            bodies.append(head + x.tobytes())
            headers.append({"inference-header-content-length": str(len(head)),
                            "content-type": "application/octet-stream"})
    return bodies, paths, headers


def main(argv: list[str] | None = None) -> int:
    from benchmarks._report import machine, table, write_section
    from hnet_serve.checkpoint import save_checkpoint
    from hnet_serve.onnx_graph import TaskGraph

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=12.0,
                   help="measured seconds per route and row count (default 12)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved slices (default 3)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--no-write", action="store_true", help="print, do not update the docs")
    args = p.parse_args(argv)

    model = build_model(BIG, N_TASKS)
    tasks = model.task_names
    tmp = Path(tempfile.mkdtemp(prefix="bench_protocols_"))
    save_checkpoint(model, tmp / "ckpt")
    onnx_path = tmp / "t0.onnx"
    onnx_path.write_bytes(TaskGraph.build(model).serialize(tasks[0]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HNET_", "PROMETHEUS_"))}
    env.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_WAIT_POLICY": "PASSIVE"})
    py = sys.executable
    routes = ["baseline", "/predict", "v2 JSON", "v2 binary"]
    sizes = [1, 64]
    slices: dict[tuple[str, int], list[dict[str, Any]]] = {(r, n): [] for r in routes
                                                           for n in sizes}
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(server(
            [py, "-m", "bentoml", "serve", "benchmarks.bench_serving:StaticOnnxService",
             "--port", str(free_port())],
            {**env, "BENCH_ONNX": str(onnx_path), "BENCH_THREADS": str(args.threads)},
            tmp / "baseline.log"))
        hnet_url = stack.enter_context(server(
            [py, "-m", "hnet_serve.cli", "serve", str(tmp / "ckpt"), "--backend", "onnx",
             "--port", str(free_port())],
            {**env, "HNET_INTRA_OP_THREADS": str(args.threads), "HNET_WARM": ",".join(tasks)},
            tmp / "hnet.log"))
        work = {(r, n): requests_for(r, n, tasks) for r in routes for n in sizes}
        order = [(r, n) for n in sizes for r in routes]
        for _ in range(args.rounds):
            random.Random(len(slices[order[0]])).shuffle(order)
            for route, n in order:
                bodies, paths, headers = work[(route, n)]
                url = base_url if route == "baseline" else hnet_url
                res = asyncio.run(load(url, bodies, CLIENTS, args.seconds / args.rounds,
                                       warmup=1.0, paths=paths, headers=headers))
                slices[(route, n)].append(res)
                print(f"{route:>10} x{n:<3} {len(res['latencies']) * n / res['seconds']:9.1f} "
                      f"rows/s  statuses {res['statuses']}", flush=True)

    def rate(s: dict[str, Any], n: int) -> float:
        return len(s["latencies"]) * n / s["seconds"]

    rows = []
    for n in sizes:
        for route in routes:
            res = summarize(slices[(route, n)])
            vs = [statistics.median(rate(a, n) / max(rate(b, n), 1e-9) for a, b in
                                    zip(slices[(route, n)], slices[(other, n)]))
                  for other in ("baseline", "/predict")]
            rows.append([n, route, f"{res['throughput'] * n:.0f}", f"{vs[0]:.2f}",
                         f"{vs[1]:.2f}", res["errors"], f"{res['p50'] * 1e3:.1f}",
                         f"{res['p99'] * 1e3:.1f}"])
    text = (
        "## Protocols (`benchmarks/bench_protocols.py`)\n\n"
        f"Machine: {machine()}; **busy**: 2 cores shared with other jobs while it ran, so "
        "absolute figures are noisy; the ratios come from interleaved slices. Command: "
        f"`python -m benchmarks.bench_protocols --seconds {args.seconds:g}`.\n\n"
        f"{CLIENTS} concurrent clients (aiohttp, on the same cores), MLP {INPUT}-"
        f"{'-'.join(map(str, BIG))}-10 over {N_TASKS} tasks, onnx backend, ORT threads = "
        f"{args.threads}; {args.seconds:g} s per route and row count in {args.rounds} "
        "interleaved slices after a 1 s warm-up each. Every route returns predictions and "
        "probabilities (v2: the `predictions` and `probabilities` outputs; binary: binary "
        "inputs and outputs). 'vs' columns: median over slices of the rows/s ratio at the same "
        "rows per request. Goals: v2 binary at 64 rows >= 1.5x `/predict`; every route >= 0.8x "
        "the baseline (`StaticOnnxService` of bench_serving, JSON rows, no routing or cache).\n\n"
        + table(["rows/request", "route", "rows/s", "vs baseline", "vs /predict", "errors",
                 "p50 (ms)", "p99 (ms)"], rows)
    )
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
