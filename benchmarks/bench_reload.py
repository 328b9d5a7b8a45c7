"""Live versions under load (issue 18): reloads and a rollback while 32 clients keep asking.

    .venv/bin/python -m benchmarks.bench_reload [--quick] [--clients 32] [--seconds 60]

One ``hnet-serve serve`` on 127.0.0.1 serves version A: 10 tasks of the MLP 784-1000-1000-10
target, a weight cache of 6 tasks, 2 of them pinned (hot). Version B is A plus one added task,
with A's tasks moved a little (their hypernetwork output layer scaled by 1.03: weight drift
about 0.03, inside add-task's 0.1, so their answers differ between A and B and a mix would
show). The load test's clients and mix (:mod:`benchmarks.load_test`: 60 % hot, 37 % cold
tasks that evict, 1 % task inference, 2 % bad requests that must get 404/400) run for the whole
phase while an admin thread makes 5 reloads alternating B, A, B, A, B (the reloads back to A
drop B's added task, so they are sent with ``force``) and then one rollback (to A), evenly
spaced.

Every answer is checked against the reference runtime (in this process) **of the version named
in its ``x-hnet-version`` header**: a failed request is any transport error or unexpected status,
a wrong one a 200 whose probabilities differ by more than 1e-4, or one naming no known version.
Latency percentiles are split between requests that started during a swap (from the admin call
to 2 s after its answer) and steady state. The worker's peak RSS (kernel VmHWM, reset after
readiness) must stay within its RSS at readiness + the unpinned cache bytes + one version's model
(its weights file) + the load test's allowance (2 generation steps + ``--slack-mib``).

Exits 1 if any check fails; writes its table to docs/benchmarks.md (section "reload").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SECTION = "reload"
HIDDEN = [1000, 1000]
MiB = 2**20
TOKEN = "bench-reload-admin-token"
SWAP_TAIL = 2.0  # seconds after a swap's answer still counted as "during the swap"


def make_versions(tasks: int, root: Path) -> tuple[Path, Path]:
    """A (``tasks`` tasks) and B (A + one task, A's tasks moved by about 3 %)."""
    import torch

    from benchmarks.bench_serving import build_model
    from hnet_serve.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(build_model(HIDDEN, tasks), root / "A")
    model = load_checkpoint(root / "A")
    model.add_task(f"t{tasks}")
    last = [m for m in model.hypernet.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1.03)
    save_checkpoint(model, root / "B")
    return root / "A", root / "B"


def reference_answers(path: Path, bodies: list) -> dict[int, np.ndarray]:
    """The version at ``path``'s probabilities for every body expecting a 200 (by index)."""
    from hnet_serve.checkpoint import load_checkpoint
    from hnet_serve.serving.config import ServingConfig
    from hnet_serve.serving.runtime import Runtime

    ref = Runtime(load_checkpoint(path), ServingConfig(cache_bytes=2**40))
    out = {}
    for i, body in enumerate(bodies):
        if body.status == 200:
            payload = json.loads(body.data)
            rows = np.asarray(payload["inputs"], dtype=np.float32)
            out[i] = ref.predict(payload["task"], rows).probabilities
    return out


def admin_schedule(url: str, a: Path, b: Path, seconds: float, log: list[dict]) -> None:
    """5 reloads (B, A, B, A, B) and a rollback, evenly spaced over ``seconds``."""
    from hnet_serve.errors import HNetError
    from hnet_serve.serving.watch import admin_call

    steps = [("reload", b, False), ("reload", a, True), ("reload", b, False),
             ("reload", a, True), ("reload", b, False), ("rollback", None, False)]
    start = time.perf_counter()
    for k, (action, target, force) in enumerate(steps, 1):
        time.sleep(max(0.0, start + k * seconds / (len(steps) + 1) - time.perf_counter()))
        body = {} if target is None else {"checkpoint": str(target), "force": force}
        t0 = time.perf_counter()
        try:
            answer = admin_call(url, action, body, token=TOKEN, timeout=120)
            error = None
        except HNetError as exc:
            answer, error = {}, str(exc)
        log.append({"action": action + (" (force)" if force else ""),
                    "target": target.name if target else "previous", "start": t0,
                    "end": time.perf_counter(), "version": answer.get("version"),
                    "added": answer.get("added"), "removed": answer.get("removed"),
                    "error": error})


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    import httpx

    from benchmarks._report import machine, table, verdict, write_section
    from benchmarks.bench_serving import free_port, server
    from benchmarks.load_test import (
        RssSampler,
        build_bodies,
        peak_rss,
        reset_peak,
        run_phase,
        server_pid,
    )
    from hnet_serve.checkpoint import WEIGHTS, checkpoint_hash, load_checkpoint
    from hnet_serve.serving.backends import nbytes_estimate
    from hnet_serve.serving.runtime import STEP_BYTES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (15 s, 8 clients)")
    p.add_argument("--clients", type=int, default=None, help="default 32 (8 with --quick)")
    p.add_argument("--seconds", type=float, default=None, help="default 60 (15 with --quick)")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--hot", type=int, default=2, help="pinned tasks")
    p.add_argument("--cache-tasks", type=int, default=6, help="cache size, in tasks")
    p.add_argument("--slack-mib", type=float, default=128.0,
                   help="allocator slack in the RSS allowance (MiB), as in the load test")
    args = p.parse_args(argv)
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    clients = args.clients or (8 if args.quick else 32)

    tmp = Path(tempfile.mkdtemp(prefix="bench_reload_"))
    a, b = make_versions(args.tasks, tmp)
    model = load_checkpoint(a)
    names = model.task_names
    hot, cold = names[: args.hot], names[args.hot:]
    task_bytes = nbytes_estimate(model)
    cache_bytes = args.cache_tasks * task_bytes
    model_bytes = (b / WEIGHTS).stat().st_size
    mix = {"hot": 0.60, "cold": 0.37, "inferred": 0.01, "bad": 0.02}
    bodies = build_bodies(model, hot, cold, mix, 384, seed=2)
    del model
    index = {id(body): i for i, body in enumerate(bodies)}
    refs = {checkpoint_hash(v): reference_answers(v, bodies) for v in (a, b)}
    print(f"{args.tasks} tasks of {task_bytes / MiB:.1f} MiB, cache {cache_bytes / MiB:.1f} MiB, "
          f"model {model_bytes / MiB:.1f} MiB; versions A {checkpoint_hash(a)[:12]}, "
          f"B {checkpoint_hash(b)[:12]}", flush=True)
    unknown_versions: list[str] = []

    def check(body, response) -> bool:
        version = response.headers.get("x-hnet-version")
        want = refs.get(version, {}).get(index[id(body)])
        if want is None:
            unknown_versions.append(str(version))
            return False
        got = np.asarray(response.json()["probabilities"], dtype=np.float32)
        return got.shape == want.shape and bool(np.allclose(got, want, atol=1e-4))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HNET_", "PROMETHEUS_"))}
    env.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                "HNET_CACHE_BYTES": str(cache_bytes), "HNET_PINNED": ",".join(hot),
                "HNET_INTRA_OP_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                "HNET_ADMIN_TOKEN": TOKEN})
    cmd = [sys.executable, "-m", "hnet_serve.cli", "serve", str(a), "--port", str(free_port())]
    trace: list[tuple[float, float, str | None]] = []
    swaps: list[dict] = []
    with server(cmd, env, tmp / "server.log") as url:
        sampler = RssSampler(server_pid())
        _, ready_worker = sampler.measure()
        worker = sampler.worker()
        exact = reset_peak(worker)
        sampler.start()
        admin = threading.Thread(target=admin_schedule, args=(url, a, b, seconds, swaps))
        admin.start()
        result = asyncio.run(run_phase("reloads under load", url, bodies, clients, seconds,
                                       check=check, trace=trace))
        admin.join()
        sampler.stop()
        peak_worker = max(sampler.peak()[1], peak_rss(worker) if exact else 0)
        final = httpx.get(url + "/tasks", timeout=30).json()
        server_log = (tmp / "server.log").read_text(errors="replace")
    pinned_bytes = final["cache"]["pinned_bytes"]
    limit = (ready_worker + (cache_bytes - pinned_bytes) + model_bytes + 2 * STEP_BYTES
             + int(args.slack_mib * MiB))

    def during(t: float) -> bool:
        return any(s["start"] <= t <= s["end"] + SWAP_TAIL for s in swaps)

    swap_lat = [lat for t0, lat, _ in trace if during(t0)]
    steady_lat = [lat for t0, lat, _ in trace if not during(t0)]
    per_version = {v: sum(1 for *_, got in trace if got == v) for v in refs}
    expected = [checkpoint_hash(v) for v in (b, a, b, a, b, a)]
    ok_swaps = ([s["version"] for s in swaps] == expected
                and all(s["error"] is None for s in swaps))
    ok_answers = result.errors == 0 and result.wrong == 0
    ok_memory = peak_worker <= limit
    tracebacks = server_log.count("Traceback")
    for s in swaps:
        print(f"{s['action']} -> {s['target']}: {s['end'] - s['start']:.2f} s, version "
              f"{(s['version'] or '-')[:12]}, added {s['added']}, removed {s['removed']}"
              + (f", ERROR {s['error']}" if s["error"] else ""), flush=True)
    print(f"{result.requests} requests, {result.errors} failed, {result.wrong} wrong "
          f"(unknown versions: {sorted(set(unknown_versions))[:3]}), statuses "
          f"{result.statuses}; p99 steady {percentile(steady_lat, 0.99) * 1e3:.0f} ms, during "
          f"swaps {percentile(swap_lat, 0.99) * 1e3:.0f} ms; worker RSS ready "
          f"{ready_worker / MiB:.0f} MiB, peak {peak_worker / MiB:.0f} MiB, limit "
          f"{limit / MiB:.0f} MiB; server log tracebacks {tracebacks}", flush=True)
    for line in result.first_errors:
        print("  error:", line)

    def ms(v: float) -> str:
        return f"{v * 1e3:.0f}"

    load = os.getloadavg()
    swap_rows = [[k, s["action"], s["target"], f"{s['end'] - s['start']:.2f}",
                  (s["version"] or "-")[:12], s["added"], s["removed"], s["error"] or "-"]
                 for k, s in enumerate(swaps, 1)]
    rows = [
        ["steady state", len(steady_lat), ms(percentile(steady_lat, 0.5)),
         ms(percentile(steady_lat, 0.99))],
        [f"during the 6 swaps (admin call to +{SWAP_TAIL:.0f} s)", len(swap_lat),
         ms(percentile(swap_lat, 0.5)), ms(percentile(swap_lat, 0.99))],
    ]
    ratio = percentile(swap_lat, 0.99) / percentile(steady_lat, 0.99)
    checks = [
        ["requests (answered with the expected status)", result.requests],
        ["failed requests (transport error or unexpected status)", result.errors],
        ["answers that differ from their x-hnet-version's reference (> 1e-4)", result.wrong],
        ["answers by version A / B", " / ".join(str(per_version[checkpoint_hash(v)])
                                                 for v in (a, b))],
        ["swaps that answered the expected version",
         f"{sum(s['version'] == e for s, e in zip(swaps, expected))} / 6"],
        ["worker RSS at readiness (MiB)", f"{ready_worker / MiB:.1f}"],
        [f"worker RSS peak ({'kernel VmHWM' if exact else 'sampled'}, MiB)",
         f"{peak_worker / MiB:.1f}"],
        [(f"limit: readiness + unpinned cache {(cache_bytes - pinned_bytes) / MiB:.1f} + one "
         f"model {model_bytes / MiB:.1f} + 2 x {STEP_BYTES / MiB:.0f} MiB steps + "
         f"{args.slack_mib:.0f} MiB slack (MiB)"),
         f"{limit / MiB:.1f} ({'within' if ok_memory else 'EXCEEDED'})"],
        ["tracebacks in the server log", tracebacks],
    ]
    body = (
        "## Live versions under load (`benchmarks/bench_reload.py`)\n\n"
        f"Machine: {machine()}; load average {load[0]:.1f} / {load[1]:.1f} at the end (the 2 "
        "cores are shared with other jobs: latencies are saturated-queue figures). Command: "
        f"`python -m benchmarks.bench_reload{' --quick' if args.quick else ''}`. "
        f"{clients} clients on 127.0.0.1 for {seconds:.0f} s with the load test's mix over "
        f"{args.tasks} tasks (784-1000-1000-10 MLP, {task_bytes / MiB:.1f} MiB each; cache "
        f"{args.cache_tasks} tasks, {args.hot} pinned). Version B = A + one task, A's tasks "
        "moved by ~3 % (inside add-task's tolerance) so that their answers differ between the "
        "versions. 5 reloads (B, A, B, A, B; back to A with `force`, as it drops B's task) and "
        "one rollback, evenly spaced.\n\n"
        + table(["#", "admin call", "to", "seconds", "version", "added", "removed", "error"],
                swap_rows)
        + "\n" + table(["requests", "n", "p50 (ms)", "p99 (ms)"], rows)
        + f"\np99 during swaps / steady state: {ratio:.2f}x.\n\n"
        + table(["check", "value"], checks)
    )
    write_section(SECTION, body)
    return verdict("bench_reload", answers=ok_answers, swaps=ok_swaps, memory=ok_memory)


if __name__ == "__main__":
    sys.exit(main())
