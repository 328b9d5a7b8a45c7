"""Serving benchmarks (issue 5): runtime latency, cold misses, mixed-task batches, HTTP throughput.

    .venv/bin/python -m benchmarks.bench_serving [--quick] [--skip-http]

Every figure is a ratio against a baseline measured in the same run, on the same machine:

1. In-process latency of a cached task, batch 1 and 64: ``Runtime.predict`` (onnx backend) vs a
   bare ONNX Runtime session running the same exported per-task model with the same session
   options (goal: <= 1.2x). Timings are interleaved round by round (A, B, A, B, ...) and the
   ratio is the median of the per-round ratios, so load from other processes hits both alike;
   a breakdown of the batch-1 time by layer of ``Runtime.predict`` follows.
2. Cold miss: generate and cache one task of the MLP 1000-1000 target (torch and onnx backends),
   next to a cached call.
3. 1024 rows over 32 tasks vs 1024 rows of one task, throughput ratio (goal >= 0.7x), for the
   per-task path and the stacked batched-matmul path on a large and a small MLP.
4. HTTP: 32 concurrent clients over 10 tasks against ``hnet-serve serve`` vs a minimal BentoML
   service serving one static ONNX model of the same target (``StaticOnnxService`` below), both
   through ``bentoml serve`` on 127.0.0.1 (goal >= 0.8x throughput, zero errors; p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

SECTION = "serving"
INPUT = 784
CLASSES = 10
BIG = [1000, 1000]  # the "MLP 1000-1000" target
SMALL = [100, 100]
TINY = [20, 20]
# Untimed calls before each timed block of the latency runs: two sessions' weights (2 x 7 MiB)
# did not stay in this machine's shared L3 together, and the first calls after a switch paid
# ~0.2 ms each to reload them (1 settle call: bare 0.107 ms, 3 or more: 0.102-0.104 ms).
SETTLE = 5


# -- the HTTP baseline: a minimal BentoML service around one static ONNX model ----------------
@bentoml.service(name="static-onnx", workers=1, traffic={"timeout": 300})
class StaticOnnxService:
    """One ONNX Runtime session, no routing, no cache: the floor for the HTTP benchmark."""

    def __init__(self) -> None:
        import onnxruntime as ort

        from hnet_serve.serving.backends import session_options

        threads = int(os.environ.get("BENCH_THREADS", "1"))
        self.session = ort.InferenceSession(
            os.environ["BENCH_ONNX"], sess_options=session_options(threads),
            providers=["CPUExecutionProvider"],
        )

    @bentoml.api(route="/predict")
    def predict(self, inputs: list[list[float]], task: str | None = None) -> dict[str, Any]:
        from hnet_serve.task_inference import softmax

        x = np.asarray(inputs, dtype=np.float32)
        (logits,) = self.session.run(["logits"], {"input": x})
        p = softmax(logits)
        return {"task": task, "predictions": p.argmax(1).tolist(), "probabilities": p.tolist()}


# -- helpers ----------------------------------------------------------------------------------
def build_model(hidden: list[int], n_tasks: int, seed: int = 0):
    from hnet_serve.hypernet import HypernetConfig
    from hnet_serve.model import HNetModel
    from hnet_serve.targets import MLPConfig

    model = HNetModel(
        MLPConfig(input_shape=(INPUT,), hidden=hidden, num_classes=CLASSES),
        HypernetConfig(kind="chunked", hidden=[25, 25], chunk_size=50_000),
        seed=seed,
    )
    for i in range(n_tasks):
        model.add_task(f"t{i}")
    return model


def paired(fa: Callable[[], object], fb: Callable[[], object], *, rounds: int, number: int
           ) -> tuple[float, float, float]:
    """Interleaved timing: (median s/call of a, of b, median of per-round b/a ratios)."""
    from benchmarks._timing import paired as timed

    r = timed(fa, fb, rounds=rounds, number=number)
    return r.a.wall, r.b.wall, r.ratio


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


# -- 1. in-process latency ------------------------------------------------------------------
def bench_latency(model, threads: int, quick: bool) -> str:
    import onnxruntime as ort

    from benchmarks._report import table
    from benchmarks._timing import paired as timed
    from hnet_serve.serving.backends import session_options
    from hnet_serve.serving.config import ServingConfig
    from hnet_serve.serving.runtime import Runtime

    default = ServingConfig().backend  # what `hnet-serve serve` uses unless told otherwise
    other = "torch" if default == "onnx" else "onnx"
    rts = {b: Runtime(model, ServingConfig(backend=b, intra_op_threads=threads))
           for b in (default, other)}
    task = "t0"
    graph = rts["onnx"].backend.graph
    data = graph.serialize(task, weights=model.generate([task])[0])
    bare = ort.InferenceSession(data, sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    rts["onnx"].predict(task, np.zeros((1, INPUT), np.float32))
    same_session_options(bare, rts["onnx"].cache.get(task).session)
    rows = []
    for batch in (1, 64):
        x = np.random.default_rng(batch).uniform(0, 1, (batch, INPUT)).astype(np.float32)
        for rt in rts.values():
            rt.predict(task, x)  # cached from here on
        number = (20 if batch == 1 else 3) if not quick else 5
        rounds = 5 if quick else 41

        def run_bare(x: np.ndarray = x) -> object:
            return bare.run(["logits"], {"input": x})

        res = {b: timed(run_bare, lambda x=x, rt=rt: rt.predict(task, x), rounds=rounds,
                        number=number, settle=SETTLE) for b, rt in rts.items()}
        d, o = res[default], res[other]
        ok = "yes" if d.ratio <= 1.2 else "NO"
        rows.append([batch, ms(d.a.wall), ms(d.a.cpu), ms(d.b.wall), ms(d.b.cpu),
                     f"{d.ratio:.3f}", ok, ms(o.b.wall), f"{o.ratio:.3f}"])
        print(f"latency batch {batch}: bare {ms(d.a.wall)} ms, runtime({default}, default) "
              f"{ms(d.b.wall)} ms ({d.ratio:.3f}x), runtime({other}) {ms(o.b.wall)} ms "
              f"({o.ratio:.3f}x)")
    x1 = np.random.default_rng(1).uniform(0, 1, (1, INPUT)).astype(np.float32)
    return (
        f"**In-process latency, cached task** (MLP {INPUT}-{'-'.join(map(str, BIG))}-{CLASSES}, "
        f"{model.target.n_params:,} target parameters; ORT intra-op threads = {threads} for "
        f"every session; median over interleaved rounds, each block of calls after {SETTLE} "
        "untimed ones (the other session's weights left the CPU caches); CPU = user + system "
        "ms per call). "
        f"**The default serving backend is `{default}`** (`ServingConfig.backend`); `{other}` "
        "is shown beside it. Goal: the default path <= 1.2x the bare ORT session on the same "
        "exported per-task model (the script checks that both sessions have the same options: "
        "threads, execution mode, optimization level, arena, spinning; and provider).\n\n"
        + table(["batch", "bare ORT (ms)", "bare CPU (ms)", f"default: {default} (ms)",
                 f"{default} CPU (ms)", "ratio", "<= 1.2x", f"{other} (ms)", f"{other} ratio"],
                rows)
        + "\n" + latency_breakdown(rts["onnx"], bare, task, x1, quick)
    )


def same_session_options(a, b) -> None:
    """Refuse to compare sessions whose options differ (threads, execution mode, optimization
    level, memory arena and patterns, spinning) or that run on other providers."""
    oa, ob = a.get_session_options(), b.get_session_options()
    attrs = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode",
             "graph_optimization_level", "enable_cpu_mem_arena", "enable_mem_pattern")
    keys = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")

    def entry(o, key: str) -> str | None:
        try:
            return o.get_session_config_entry(key)
        except Exception:  # ORT raises for a key never set (its default applies)  # noqa: BLE001
            return None

    diff = [n for n in attrs if getattr(oa, n) != getattr(ob, n)]
    diff += [k for k in keys if entry(oa, k) != entry(ob, k)]
    if diff or a.get_providers() != b.get_providers():
        raise RuntimeError(f"the bare and the runtime's sessions differ in {diff or 'providers'}")


def latency_breakdown(rt, bare, task: str, x: np.ndarray, quick: bool) -> str:
    """Where the onnx path's batch-1 time goes: the bare session and each layer of
    ``Runtime.predict``, all interleaved in one run (bare, layer 1, layer 2, ..., round after
    round, ``SETTLE`` untimed calls before each block as in ``paired``); each line includes
    the lines above it, so the difference between lines is what that layer adds."""
    from benchmarks._report import table
    from benchmarks._timing import Sample, measure, median_ratio
    from hnet_serve.serving.backends import _BOTH

    session = rt.cache.get(task).session
    number, rounds = (5, 5) if quick else (20, 41)
    paths = {
        "bare ORT session: `run([logits])`": lambda: bare.run(["logits"], {"input": x}),
        "the task's cached session: `run([logits, probabilities])` (+ the Softmax node)":
            lambda: session.run(_BOTH, {"input": x}),
        "`Runtime.predict(task, x, validated=True)` (+ task lookup, cache hit, argmax, labels, "
        "result)": lambda: rt.predict(task, x, validated=True),
        "`Runtime.predict(task, x)` (+ input validation: dtype, shape, NaN/inf)":
            lambda: rt.predict(task, x),
    }
    samples: dict[str, list[Sample]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, fn in paths.items():
            for _ in range(SETTLE):  # this path's data back in cache
                fn()
            s = measure(lambda fn=fn: [fn() for _ in range(number)])
            samples[label].append(Sample(s.wall / number, s.cpu / number))
    base = next(iter(samples.values()))
    bare_us = statistics.median(s.wall for s in base) * 1e6
    rows, prev = [], 0.0
    for label, got in samples.items():
        ratio = median_ratio(base, got)
        extra = (ratio - 1) * bare_us  # us over bare, from the per-round ratio
        rows.append([label, ms(statistics.median(s.wall for s in got)), f"{ratio:.3f}",
                     f"{extra:+.1f}", f"{extra - prev:+.1f}"])
        prev = extra
        print(f"breakdown: {label}: {ratio:.3f}x ({extra:+.1f} us)", flush=True)
    return (
        "**Where the default path's batch-1 time goes** (onnx backend, same model and session "
        f"options; the four paths interleaved in one run, {number} calls per path per round "
        f"after {SETTLE} untimed ones; each line includes the lines above; 'us over bare' = (median "
        "per-round ratio - 1) x the bare time, 'adds' = the difference to the line above; "
        "expect +-2 us of noise on a busy machine).\n\n"
        + table(["path", "ms", "ratio vs bare", "us over bare", "adds (us)"], rows)
    )


# -- 2. cold miss -----------------------------------------------------------------------------
def bench_cold_miss(model, threads: int, quick: bool) -> str:
    from benchmarks._report import table
    from hnet_serve.serving.config import ServingConfig
    from hnet_serve.serving.runtime import Runtime

    x = np.zeros((1, INPUT), np.float32)
    rows = []
    reps = 3 if quick else 7
    for backend in ("torch", "onnx"):
        rt = Runtime(model, ServingConfig(backend=backend, intra_op_threads=threads))
        rt.predict("t1", x)  # build lazily-initialised state outside the timing
        cold, warm = [], []
        for i in range(reps):
            task = f"t{2 + i % 8}"
            rt.cache.invalidate(task)
            t0 = time.perf_counter()
            rt.predict(task, x)
            t1 = time.perf_counter()
            rt.predict(task, x)
            t2 = time.perf_counter()
            cold.append(t1 - t0)
            warm.append(t2 - t1)
        names = [f"t{i}" for i in range(model.hypernet.num_tasks)]
        batched = []
        for _ in range(reps):
            rt.cache.invalidate()
            t0 = time.perf_counter()
            rt.cache.warm(names)  # every task in one batched generation
            batched.append(time.perf_counter() - t0)
        t_all = statistics.median(batched)
        c, w = statistics.median(cold), statistics.median(warm)
        rows.append([backend, ms(c), ms(w), f"{c / w:.0f}x", ms(t_all / len(names)),
                     f"{rt.cache.stats()['bytes'] / len(names) / 2**20:.1f}"])
        print(f"cold miss {backend}: {ms(c)} ms (cached call {ms(w)} ms)")
    return (
        f"**Cold miss** (generate + cache one task of the MLP 1000-1000 target, "
        f"{model.target.n_params:,} parameters, then predict 1 row), median of {reps}; "
        f"'per task, batched' is the cost per task when all {model.hypernet.num_tasks} tasks "
        "are generated in one batched call (warm-up), median of as many runs.\n\n"
        + table(["backend", "cold miss (ms)", "cached call (ms)", "cold / cached",
                 "per task, batched (ms)", "MiB cached per task"], rows)
    )


# -- 3. mixed-task batches -----------------------------------------------------------------------
def bench_mixed(threads: int, quick: bool) -> str:
    import torch

    from hnet_serve.serving import backends
    from hnet_serve.serving.config import ServingConfig
    from hnet_serve.serving.runtime import Runtime

    torch.set_num_threads(threads)
    n_tasks = 32
    rows = []
    # (hidden, backend, path, rows in the batch): 1024 rows = 32 per task (the goal's case);
    # 64 rows = 2 per task, where per-task overhead dominates and stacking can pay off.
    cases = [(BIG, "torch", "auto", 1024), (BIG, "torch", "stacked", 1024),
             (BIG, "onnx", "per task", 1024),
             (SMALL, "torch", "auto", 1024), (SMALL, "torch", "stacked", 1024),
             (SMALL, "torch", "auto", 64), (SMALL, "torch", "stacked", 64),
             (TINY, "torch", "auto", 64), (TINY, "torch", "per task", 64)]
    models: dict[str, Any] = {}
    default_max = backends.STACK_MAX_PARAMS
    for hidden, backend, path, rows_total in cases:
        key = "-".join(map(str, hidden))
        model = models.setdefault(key, build_model(hidden, n_tasks))
        backends.PACK_WEIGHTS = path == "auto"  # a forced path runs the flat weights
        rt = Runtime(model, ServingConfig(backend=backend, intra_op_threads=threads,
                                          cache_bytes=2 * 2**30))
        backends.PACK_WEIGHTS = True
        names = [f"t{i}" for i in range(n_tasks)]
        rt.cache.warm(names)
        x = np.random.default_rng(0).uniform(0, 1, (rows_total, INPUT)).astype(np.float32)
        tasks = [names[i % n_tasks] for i in range(rows_total)]
        backends.STACK_MAX_PARAMS = {"stacked": 10**12, "per task": 0}.get(path, default_max)
        stacked = model.target.n_params <= backends.STACK_MAX_PARAMS and backend == "torch"
        try:
            t_one, t_mixed, ratio = paired(lambda rt=rt, x=x: rt.predict("t0", x),
                                           lambda rt=rt, x=x, t=tasks: rt.predict_mixed(t, x),
                                           rounds=3 if quick else 9,
                                           number=1 if rows_total > 64 else 5)
        finally:
            backends.STACK_MAX_PARAMS = default_max
        inv = 1 / ratio  # throughput ratio = time(one task) / time(mixed)
        how = ("packed oneDNN layers per task" if getattr(rt.backend, "packed", False)
               else "stacked bmm" if stacked else "matmuls per task")
        label = f"{path} ({how})"
        rows.append([f"{INPUT}-{key}-{CLASSES}", f"{model.target.n_params:,}", backend, label,
                     rows_total, f"{rows_total / t_one:,.0f}", f"{rows_total / t_mixed:,.0f}",
                     f"{inv:.2f}"])
        print(f"mixed {key} {backend} {path} {rows_total} rows: one task "
              f"{rows_total / t_one:,.0f} rows/s, {n_tasks} tasks {rows_total / t_mixed:,.0f} "
              f"rows/s ({inv:.2f}x)", flush=True)
    return (
        mixed_table(rows, n_tasks, threads, default_max)
        + "\n" + bench_mixed_bound(models["-".join(map(str, BIG))], n_tasks, threads, quick)
    )


def bench_mixed_bound(model, n_tasks: int, threads: int, quick: bool,
                      cache_dtype: str = "float32", packed: bool = False) -> str:
    """Where the mixed batch's time goes, for the big target on the torch backend.

    The same 32 groups of 32 rows, run (a) each under its own task (the mixed batch), (b) all
    under task t0's weights, which stay in cache (the cost of 32 small matmul chains, no
    memory traffic), and (c) only reading every task's cached weights once (``sum``, no
    matmul). If (a) ~ (b) + (c), memory and compute do not overlap, and the bound on the
    ratio is set by the bytes to stream (32 tasks x the weights) and the core's bandwidth.
    ``packed``: the weights cached pre-packed for oneDNN (serving/packed.py); (c) then reads
    the same bytes in the flat layout (packed tensors have no ``sum``).
    """
    import torch

    from benchmarks._report import table
    from hnet_serve.serving import backends
    from hnet_serve.serving.backends import Group
    from hnet_serve.serving.config import ServingConfig
    from hnet_serve.serving.runtime import Runtime

    def runtime(pack: bool) -> Runtime:
        backends.PACK_WEIGHTS = pack
        try:
            return Runtime(model, ServingConfig(backend="torch", intra_op_threads=threads,
                                                cache_bytes=2 * 2**30, cache_dtype=cache_dtype))
        finally:
            backends.PACK_WEIGHTS = True

    names = [f"t{i}" for i in range(n_tasks)]
    rt = runtime(packed)
    by_name = rt.cache.get_many(names)
    entries = [by_name[n] for n in names]
    flat = rt if not packed else runtime(False)
    flat_by_name = flat.cache.get_many(names)
    flat_entries = [flat_by_name[n] for n in names]
    x = np.random.default_rng(1).uniform(0, 1, (32 * n_tasks, INPUT)).astype(np.float32)
    groups = [Group(model.registry.get(n), x[i::n_tasks].copy()) for i, n in enumerate(names)]
    one = [entries[0]] * n_tasks
    rounds, number = (3, 1) if quick else (9, 3)

    def stream() -> float:
        with torch.inference_mode():
            return float(sum(t.sum() for e in flat_entries for t in e.stored()))

    t_one, t_mixed, _ = paired(lambda: rt.predict("t0", x),
                               lambda: rt.backend.logits(entries, groups),
                               rounds=rounds, number=number)
    t_warm, t_stream, _ = paired(lambda: rt.backend.logits(one, groups), stream,
                                 rounds=rounds, number=number)
    mib = sum(e.nbytes for e in entries) / 2**20
    rows = [["1024 rows of one task (runtime.predict)", ms(t_one), "1.00"],
            [f"(a) {n_tasks} groups x 32 rows, each its own task", ms(t_mixed),
             f"{t_one / t_mixed:.2f}"],
            [f"(b) the same {n_tasks} groups, all under t0's (cache-warm) weights", ms(t_warm),
             f"{t_one / t_warm:.2f}"],
            [f"(c) read the {n_tasks} tasks' weights once ({mib:.0f} MiB), no matmul",
             ms(t_stream), f"{mib / 1024 / t_stream:.1f} GiB/s"],
            ["(b) + (c): no overlap of compute and memory", ms(t_warm + t_stream),
             f"{t_one / (t_warm + t_stream):.2f}"]]
    layout = "pre-packed" if packed else "flat"
    print(f"mixed bound {cache_dtype} {layout}: one {ms(t_one)} a {ms(t_mixed)} "
          f"b {ms(t_warm)} c {ms(t_stream)} ms", flush=True)
    return (
        f"**Where the mixed batch's time goes** (MLP {INPUT}-{'-'.join(map(str, BIG))}-"
        f"{CLASSES}, torch backend, {cache_dtype} weights, {layout} layout, "
        f"threads = {threads}; backend calls without the runtime's row grouping). (a) is the 0.7x goal's case; (b) removes the memory traffic, (c) is "
        f"the memory traffic alone. When (a) is close to (b) + (c), reading each task's "
        f"weights from memory does not overlap with the matmuls: the batch is bound by the "
        f"bytes to stream ({n_tasks} tasks x the weights, for 32 rows each) at one core's "
        f"bandwidth, not by the runtime's overhead.\n\n"
        + table(["run", "time (ms)", "throughput vs one task / bandwidth"], rows)
    )


def mixed_table(rows: list[list[Any]], n_tasks: int, threads: int, default_max: int) -> str:
    from benchmarks._report import table

    return (
        f"**Mixed-task batches: N rows over {n_tasks} tasks vs N rows of one task** (all tasks "
        f"cached; threads = {threads}; median of interleaved rounds). Goal: >= 0.7x the "
        f"single-task throughput for 1024 rows. 'auto' is the runtime's choice (stack when the "
        f"target has <= {default_max:,} parameters); 'stacked' / 'per task' force a path.\n\n"
        + table(["target", "params", "backend", "path", "rows", "1 task (rows/s)",
                 f"{n_tasks} tasks (rows/s)", "ratio"], rows)
    )


# -- 4. HTTP ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Run a ``bentoml serve`` child on 127.0.0.1, wait for /readyz, yield its URL, stop it."""
    import httpx

    port = int(cmd[cmd.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after 240 s; see {log}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def load(url: str, bodies: list[bytes], clients: int, seconds: float, warmup: float,
               paths: list[str] | None = None, headers: list[dict[str, str]] | None = None
               ) -> dict[str, Any]:
    """``clients`` concurrent loops posting ``bodies`` (body i to ``paths[i]`` with
    ``headers[i]``; default ``/predict`` with a JSON content type) round robin for ``warmup + seconds``; returns the latencies of the requests started
    after the warm-up, errors and statuses."""
    import aiohttp

    lat: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds
    json_header = {"content-type": "application/json"}

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            body = bodies[k % len(bodies)]
            head = headers[k % len(bodies)] if headers else json_header
            path = paths[k % len(bodies)] if paths else "/predict"
            k += clients
            try:
                async with session.post(url + path, data=body, headers=head) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = -1
            t1 = time.perf_counter()
            if t0 >= measure_from:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    lat.append(t1 - t0)

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return {"latencies": lat, "statuses": statuses, "seconds": seconds,
            "errors": sum(n for s, n in statuses.items() if s != 200)}


def summarize(slices: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(t for s in slices for t in s["latencies"])
    n = len(lat)
    seconds = sum(s["seconds"] for s in slices)
    return {
        "requests": n,
        "errors": sum(s["errors"] for s in slices),
        "throughput": n / seconds,
        "p50": lat[n // 2] if n else float("nan"),
        "p99": lat[min(n - 1, int(n * 0.99))] if n else float("nan"),
    }


def bench_http(model, threads: int, seconds: float, clients: int, n_tasks: int) -> str:
    """All servers run side by side (idle ones sleep: ORT spinning off, OMP passive); the load
    goes to one at a time, in interleaved slices, so background load hits each alike."""
    from benchmarks._report import table
    from hnet_serve.checkpoint import save_checkpoint
    from hnet_serve.onnx_graph import TaskGraph

    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    ckpt = tmp / "ckpt"
    save_checkpoint(model, ckpt)
    onnx_path = tmp / "t0.onnx"
    onnx_path.write_bytes(TaskGraph.build(model).serialize("t0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HNET_", "PROMETHEUS_"))}
    env.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_WAIT_POLICY": "PASSIVE"})
    g = random.Random(0)
    names = [f"t{i}" for i in range(n_tasks)]
    bodies = [
        json.dumps({"task": names[i % n_tasks],
                    "inputs": [[round(g.random(), 4) for _ in range(INPUT)]]}).encode()
        for i in range(4 * n_tasks)
    ]
    py = sys.executable
    variants = [
        ("minimal BentoML + static ONNX (baseline)",
         [py, "-m", "bentoml", "serve", "benchmarks.bench_serving:StaticOnnxService"],
         {"BENCH_ONNX": str(onnx_path), "BENCH_THREADS": str(threads)}),
        ("hnet-serve serve, onnx backend (default)",
         [py, "-m", "hnet_serve.cli", "serve", str(ckpt), "--backend", "onnx"],
         {"HNET_INTRA_OP_THREADS": str(threads), "HNET_WARM": ",".join(names)}),
        ("hnet-serve serve, torch backend",
         [py, "-m", "hnet_serve.cli", "serve", str(ckpt), "--backend", "torch"],
         {"HNET_INTRA_OP_THREADS": str(threads), "HNET_WARM": ",".join(names)}),
    ]
    rounds = 3
    slices: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    with contextlib.ExitStack() as stack:
        urls = []
        for n, (label, cmd, extra) in enumerate(variants):
            port = free_port()
            urls.append((label, stack.enter_context(
                server([*cmd, "--port", str(port)], {**env, **extra}, tmp / f"server{n}.log"))))
        for _ in range(rounds):
            for label, url in urls:
                res = asyncio.run(load(url, bodies, clients, seconds / rounds, warmup=2.0))
                slices[label].append(res)
                print(f"http {label}: {len(res['latencies']) / res['seconds']:.1f} req/s, "
                      f"statuses {res['statuses']}", flush=True)
    base_label = variants[0][0]
    rows = []
    for label, _, _ in variants:
        res = summarize(slices[label])
        ratio = statistics.median(
            len(a["latencies"]) / max(1, len(b["latencies"]))
            for a, b in zip(slices[label], slices[base_label])
        )
        rows.append([label, f"{res['throughput']:.1f}", f"{ratio:.2f}", res["errors"],
                     ms(res["p50"]), ms(res["p99"])])
    return (
        f"**HTTP** ({clients} concurrent clients, 1 row per request, spread over {n_tasks} tasks "
        f"(the baseline ignores the task), {seconds:.0f} s per server in {rounds} interleaved "
        f"slices after a 2 s warm-up each; all servers through `bentoml serve` on 127.0.0.1, "
        f"ORT/torch threads = {threads}; the load generator (aiohttp) shares the cores). "
        "'vs baseline' is the median over slices of the throughput ratio. Goal: hnet-serve "
        ">= 0.8x the baseline with zero errors.\n\n"
        + table(["server", "requests/s", "vs baseline", "errors", "p50 (ms)", "p99 (ms)"], rows)
    )


def main(argv: list[str] | None = None) -> int:
    from benchmarks._report import machine, write_section

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (smaller numbers)")
    p.add_argument("--skip-http", action="store_true", help="in-process benchmarks only")
    p.add_argument("--threads", type=int, default=1,
                   help="ORT/torch intra-op threads for every session and server (default 1)")
    p.add_argument("--seconds", type=float, default=None, help="HTTP duration (default 30)")
    args = p.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 30.0)

    from benchmarks._timing import LoadMonitor

    big = build_model(BIG, 10)
    with LoadMonitor() as load:
        parts = [bench_latency(big, args.threads, args.quick),
                 bench_cold_miss(big, args.threads, args.quick),
                 bench_mixed(args.threads, args.quick)]
        if not args.skip_http:
            parts.append(bench_http(big, args.threads, seconds, clients=32, n_tasks=10))
    header = (
        "## Serving (`benchmarks/bench_serving.py`)\n\n"
        f"Machine: {machine()}. Command: `python -m benchmarks.bench_serving"
        f"{' --quick' if args.quick else ''}{' --skip-http' if args.skip_http else ''}`.\n\n"
        f"{load.note()}\n"
    )
    write_section(SECTION, header + "\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
