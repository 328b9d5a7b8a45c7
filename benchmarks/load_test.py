"""Load test (issue 7): 64 concurrent clients for 60 s against a real ``hnet-serve serve``.

    .venv/bin/python -m benchmarks.load_test [--quick] [--clients 64] [--seconds 60]

One server on 127.0.0.1 serves 32 tasks of the MLP 784-1000-1000-10 target (6.9 MiB of
generated weights per task) with a weight cache of 12 tasks, 4 of them pinned ("hot"). Bounded
asyncio httpx clients (one connection each, a new request as soon as the last one is answered)
post 1-8 rows per request:

* **baseline** phase: hot tasks only (always cached), the same clients;
* **mixed** phase: 60 % hot tasks, 37 % the 28 cold tasks (a cache of 8 free slots for 28 tasks:
  most cold requests miss and evict), 1 % without a task (task inference runs every task: 32
  tasks through a 12-task cache), 2 % deliberately bad requests (an unknown task, a row of the
  wrong length) that must get their 404 / 400.

Every answer is checked: an error is any transport failure or any status other than the
expected one; a wrong answer is a 200 whose probabilities differ from the reference runtime's
(computed in this process) by more than 1e-4. Resident memory (RSS) of the server's process
tree (``hnet-serve serve`` -> ``bentoml serve`` -> worker) is sampled every 0.2 s with psutil,
and the worker's exact peak read from the kernel (VmHWM, reset when the mixed phase starts).
The worker holds the cache, so its peak must stay within its RSS at readiness (pinned tasks
generated) + the unpinned cache bytes + a fixed allowance: two generation steps
(``hnet_serve.serving.runtime.STEP_BYTES``: a step's generated batch and its per-task copies) + 128 MiB
of allocator slack and request buffers (``--slack-mib``).

Exits 1 if any check fails; writes its tables to docs/benchmarks.md (section "load").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SECTION = "load"
INPUT = 784
HIDDEN = [1000, 1000]
MiB = 2**20


@dataclass
class Body:
    """One prepared request: its bytes, its class and the answer it must get."""

    data: bytes
    kind: str  # "hot", "cold", "inferred" or "bad"
    status: int
    probabilities: np.ndarray | None = None  # (rows, classes) expected for a 200


@dataclass
class PhaseResult:
    name: str
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    errors: int = 0
    wrong: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def percentile(self, q: float, kind: str | None = None) -> float:
        lat = sorted(t for k, v in self.latencies.items() if kind in (None, k) for t in v)
        return lat[min(len(lat) - 1, int(len(lat) * q))] if lat else float("nan")


def build_bodies(model, hot: list[str], cold: list[str], mix: dict[str, float], n: int,
                 seed: int) -> list[Body]:
    """``n`` request bodies drawn from ``mix``, with the reference runtime's answers."""
    from hnet_serve.serving.config import ServingConfig
    from hnet_serve.serving.runtime import Runtime

    ref = Runtime(model, ServingConfig(cache_bytes=2**40))  # each task generated once
    rng = random.Random(seed)
    g = np.random.default_rng(seed)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    bodies = []
    for kind in kinds:
        rows = g.uniform(0, 1, (rng.randint(1, 8), INPUT)).round(3).astype(np.float32)
        if kind == "bad":
            if rng.random() < 0.5:
                payload, status = {"task": f"no-such-task-{rng.randint(0, 999)}",
                                   "inputs": rows.tolist()}, 404
            else:
                payload, status = {"task": rng.choice(hot), "inputs": [[0.5] * (INPUT - 1)]}, 400
            bodies.append(Body(json.dumps(payload).encode(), kind, status))
            continue
        task = None if kind == "inferred" else rng.choice(hot if kind == "hot" else cold)
        probs = ref.predict(task, rows).probabilities
        bodies.append(Body(json.dumps({"task": task, "inputs": rows.tolist()}).encode(), kind,
                           200, probs))
    return bodies


async def run_phase(name: str, url: str, bodies: list[Body], clients: int,
                    seconds: float, *, check: Any = None, trace: list | None = None
                    ) -> PhaseResult:
    """``clients`` concurrent loops posting ``bodies`` (each client its own order).

    ``check(body, response) -> bool`` replaces the comparison with ``body.probabilities``
    (False: a wrong answer); ``trace`` collects ``(start, seconds, x-hnet-version)`` of every
    request answered with its expected status (benchmarks/bench_reload.py uses both)."""
    import httpx

    result = PhaseResult(name, seconds)
    stop = time.perf_counter() + seconds
    # Idle connections expire on the client before the server's keep-alive timeout (uvicorn:
    # 5 s, httpx's default expiry too): reusing one the server is closing at that very moment
    # fails with a ReadError the server never saw (docs/reliability.md).
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients,
                          keepalive_expiry=2.0)
    headers = {"content-type": "application/json"}

    def fail(message: str) -> None:
        result.errors += 1
        if len(result.first_errors) < 5:
            result.first_errors.append(message)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        order = list(range(len(bodies)))
        random.Random(i).shuffle(order)
        k = 0
        while time.perf_counter() < stop:
            body = bodies[order[k % len(order)]]
            k += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/predict", content=body.data, headers=headers)
            except httpx.HTTPError as exc:
                fail(f"{body.kind}: {type(exc).__name__} after {time.perf_counter() - t0:.2f} s "
                     f"(request {k}, {stop - time.perf_counter():.1f} s before the end): "
                     f"{exc!r} <- {exc.__cause__!r}")
                continue
            elapsed = time.perf_counter() - t0
            result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
            if r.status_code != body.status:
                fail(f"{body.kind}: HTTP {r.status_code} (expected {body.status}): {r.text[:200]}")
                continue
            result.latencies.setdefault(body.kind, []).append(elapsed)
            if trace is not None:
                trace.append((t0, elapsed, r.headers.get("x-hnet-version")))
            if body.probabilities is not None and check is not None:
                result.wrong += not check(body, r)
            elif body.probabilities is not None:
                got = np.asarray(r.json()["probabilities"], dtype=np.float32)
                if got.shape != body.probabilities.shape or not np.allclose(
                        got, body.probabilities, atol=1e-4):
                    result.wrong += 1

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return result


class RssSampler:
    """Samples the RSS of a process tree every ``interval`` s in a background thread."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (time, tree rss, worker rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def worker(self) -> int:
        """The pid of the worker: the tree's largest process (it holds the runtime)."""
        procs = [self.root, *self.root.children(recursive=True)]
        return max(procs, key=lambda p: p.memory_info().rss).pid

    def measure(self) -> tuple[int, int]:
        """(RSS of the whole tree, RSS of the worker: the tree's largest process)."""
        import psutil

        rss = []
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                rss.append(p.memory_info().rss)
            except psutil.Error:  # a process that just exited
                pass
        return sum(rss), max(rss, default=0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter(), *self.measure()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, since: float = 0.0) -> tuple[int, int]:
        picked = [s for s in self.samples if s[0] >= since] or [(0.0, 0, 0)]
        return max(s[1] for s in picked), max(s[2] for s in picked)


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of ``pid`` (Linux >= 4.0); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(pid: int) -> int:
    """The kernel's peak RSS (VmHWM) of ``pid`` since its start or last reset, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def server_pid() -> int:
    """The ``hnet-serve serve`` child this process started (``bench_serving.server``)."""
    import psutil

    for child in psutil.Process().children():
        if "hnet_serve.cli" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("no hnet-serve server among this process's children")


def main(argv: list[str] | None = None) -> int:
    import httpx

    from benchmarks._report import machine, table, verdict, write_section
    from benchmarks.bench_serving import build_model, free_port, server
    from hnet_serve.checkpoint import save_checkpoint
    from hnet_serve.serving.backends import nbytes_estimate
    from hnet_serve.serving.runtime import STEP_BYTES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (10 s)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=None, help="mixed phase (default 60)")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--hot", type=int, default=4, help="pinned tasks")
    p.add_argument("--cache-tasks", type=int, default=12, help="cache size, in tasks")
    p.add_argument("--slack-mib", type=float, default=128.0,
                   help="allocator slack in the RSS allowance (MiB), on top of 2 x STEP_BYTES")
    args = p.parse_args(argv)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    baseline_seconds = min(15.0, seconds / 4)

    model = build_model(HIDDEN, args.tasks)
    names = model.task_names
    hot, cold = names[: args.hot], names[args.hot:]
    task_bytes = nbytes_estimate(model)
    cache_bytes = args.cache_tasks * task_bytes
    print(f"{args.tasks} tasks of {task_bytes / MiB:.1f} MiB, cache {cache_bytes / MiB:.1f} MiB "
          f"({args.cache_tasks} tasks, {args.hot} pinned)", flush=True)
    t0 = time.perf_counter()
    baseline_bodies = build_bodies(model, hot, cold, {"hot": 1.0}, 128, seed=1)
    mix = {"hot": 0.60, "cold": 0.37, "inferred": 0.01, "bad": 0.02}
    mixed_bodies = build_bodies(model, hot, cold, mix, 512, seed=2)
    print(f"reference answers for {len(baseline_bodies) + len(mixed_bodies)} bodies in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="load_test_"))
    save_checkpoint(model, tmp / "ckpt")
    del model
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HNET_", "PROMETHEUS_"))}
    env.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                "HNET_CACHE_BYTES": str(cache_bytes), "HNET_PINNED": ",".join(hot),
                "HNET_INTRA_OP_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    port = free_port()
    cmd = [sys.executable, "-m", "hnet_serve.cli", "serve", str(tmp / "ckpt"), "--port", str(port)]
    with server(cmd, env, tmp / "server.log") as url:
        sampler = RssSampler(server_pid())
        ready_tree, ready_worker = sampler.measure()
        sampler.start()
        base = asyncio.run(run_phase("baseline: hot tasks only (cached)", url, baseline_bodies,
                                     args.clients, baseline_seconds))
        worker = sampler.worker()
        exact = reset_peak(worker)
        mixed_start = time.perf_counter()
        mixed = asyncio.run(run_phase("mixed: hot + cold (evicting) + inferred + bad", url,
                                      mixed_bodies, args.clients, seconds))
        sampler.stop()
        if exact:
            hwm = peak_rss(worker)
        stats = httpx.get(url + "/tasks", timeout=30).json()["cache"]
    peak_tree, peak_worker = sampler.peak(since=mixed_start)
    if exact:  # the kernel's high-water mark catches peaks between two samples
        peak_worker = max(peak_worker, hwm)
    allowance = 2 * STEP_BYTES + int(args.slack_mib * MiB)
    limit = ready_worker + (cache_bytes - stats["pinned_bytes"]) + allowance
    # Growth over the mixed phase: the worker's peak in its last third vs. its first third.
    third = seconds / 3
    early = max((s[2] for s in sampler.samples if mixed_start <= s[0] < mixed_start + third),
                default=0)
    late = max((s[2] for s in sampler.samples if s[0] >= mixed_start + 2 * third), default=0)

    windows = [max((s[2] for s in sampler.samples
                    if mixed_start + w <= s[0] < mixed_start + w + 10), default=0)
               for w in range(0, int(seconds), 10)]
    ok_errors = base.errors == 0 and mixed.errors == 0 and base.wrong == 0 and mixed.wrong == 0
    ok_memory = peak_worker <= limit
    ok_evictions = stats["evictions"] > 0 and stats["bytes"] <= stats["capacity_bytes"]
    for phase in (base, mixed):
        print(f"{phase.name}: {phase.requests} ok, {phase.errors} errors, {phase.wrong} wrong, "
              f"statuses {phase.statuses}, p50 {phase.percentile(0.5) * 1e3:.1f} ms, "
              f"p99 {phase.percentile(0.99) * 1e3:.1f} ms", flush=True)
        for line in phase.first_errors:
            print("  error:", line)
    print(f"worker RSS: ready {ready_worker / MiB:.0f} MiB, peak {peak_worker / MiB:.0f} MiB, "
          f"limit {limit / MiB:.0f} MiB; cache {stats}", flush=True)

    def ms(v: float) -> str:
        return f"{v * 1e3:.1f}"

    rows = []
    for phase in (base, mixed):
        rows.append([phase.name, f"{phase.requests / phase.seconds:.1f}", phase.requests,
                     phase.errors, phase.wrong, ms(phase.percentile(0.5)),
                     ms(phase.percentile(0.99)), ms(phase.percentile(0.5, "hot")),
                     ms(phase.percentile(0.99, "hot")), ms(phase.percentile(0.5, "cold")),
                     ms(phase.percentile(0.99, "cold")), ms(phase.percentile(0.5, "inferred"))])
    ratio_tp = (mixed.requests / mixed.seconds) / max(1e-9, base.requests / base.seconds)
    ratio_p50 = mixed.percentile(0.5) / base.percentile(0.5)
    mem_rows = [
        ["configured cache", f"{cache_bytes / MiB:.1f}"],
        ["worker RSS at readiness (pinned tasks generated)", f"{ready_worker / MiB:.1f}"],
        [f"worker RSS peak, mixed phase ({'kernel VmHWM' if exact else 'sampled'})",
         f"{peak_worker / MiB:.1f}"],
        ["worker peak - readiness", f"{(peak_worker - ready_worker) / MiB:.1f}"],
        [(f"limit: readiness + unpinned cache + 2 x {STEP_BYTES / MiB:.0f} MiB steps + "
          f"{args.slack_mib:.0f} MiB slack"),
         f"{limit / MiB:.1f} ({'within' if ok_memory else 'EXCEEDED'})"],
        ["worker peak, first / last third of the mixed phase",
         f"{early / MiB:.1f} / {late / MiB:.1f}"],
        ["worker sampled peak per 10 s of the mixed phase",
         " / ".join(f"{w / MiB:.0f}" for w in windows)],
        ["server tree RSS at readiness / peak (3 processes)",
         f"{ready_tree / MiB:.1f} / {peak_tree / MiB:.1f}"],
    ]
    cache_row = [[stats["hits"], stats["misses"], stats["coalesced"], stats["evictions"],
                  stats["generated"], f"{stats['bytes'] / MiB:.1f}",
                  f"{stats['capacity_bytes'] / MiB:.1f}"]]
    body = (
        "## Load (`benchmarks/load_test.py`)\n\n"
        f"Machine: {machine()}. Command: `python -m benchmarks.load_test"
        f"{' --quick' if args.quick else ''}`. One `hnet-serve serve` (torch backend, 1 intra-op "
        f"thread) on 127.0.0.1; {args.clients} concurrent httpx clients (same machine, sharing "
        f"its cores), each posting 1-8 rows per request as soon as its last answer arrived. "
        f"{args.tasks} tasks of the MLP {INPUT}-{'-'.join(map(str, HIDDEN))}-10 target "
        f"({task_bytes / MiB:.1f} MiB of weights each); cache {args.cache_tasks} tasks "
        f"({cache_bytes / MiB:.1f} MiB), {args.hot} of them pinned (hot). Baseline phase "
        f"{baseline_seconds:.0f} s of hot tasks only; mixed phase {seconds:.0f} s: 60 % hot, "
        f"37 % the {len(cold)} cold tasks (evictions), 1 % task inference (all {args.tasks} "
        "tasks), 2 % bad requests that must get 404/400. "
        "Errors: transport failures or unexpected statuses; wrong: 200s whose probabilities "
        "differ from the reference runtime's by > 1e-4.\n\n"
        + table(["phase", "req/s", "requests", "errors", "wrong", "p50 (ms)", "p99 (ms)",
                 "hot p50", "hot p99", "cold p50", "cold p99", "inferred p50"], rows)
        + f"\nMixed vs baseline: throughput {ratio_tp:.2f}x, p50 latency {ratio_p50:.2f}x.\n\n"
        "**Memory** (RSS sampled every 0.2 s with psutil; the worker process holds the "
        "cache):\n\n" + table(["measure", "MiB"], mem_rows)
        + "\n**Cache after the run** (`GET /tasks`):\n\n"
        + table(["hits", "misses", "coalesced", "evictions", "generated", "bytes (MiB)",
                 "capacity (MiB)"], cache_row)
    )
    write_section(SECTION, body)
    return verdict("load test", errors=ok_errors, memory=ok_memory, evictions=ok_evictions)


if __name__ == "__main__":
    sys.exit(main())
