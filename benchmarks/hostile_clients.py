"""Hostile clients (issue 14): 32 honest clients, with and without attackers, one real server.

    .venv/bin/python -m benchmarks.hostile_clients [--seconds 60] [--honest 32]

One ``hnet-serve serve`` (torch backend, 1 intra-op thread) on 127.0.0.1 serves 4 tasks of an
MLP 784-100-10 target with the default limits (``max_rows`` 4096, ``max_request_bytes`` 64 MiB).
32 honest httpx clients post 1-row ``/predict`` requests over the tasks, each as soon as its
last answer arrived, first alone (the baseline, a third of ``--seconds``), then for
``--seconds`` while attackers, in another process (so their own CPU does not stall the honest
clients' event loop), send without pause:

* **random paths**: GET/POST to random URLs up to 8 kB long (404/405 expected);
* **huge row counts**: a 64 MiB body (just under the limit) of 16 M one-value rows (400);
* **deep nesting**: ``inputs`` nested 4,000 deep (40 kB) and 150,000 deep (300 kB) (400);
* **malformed bodies**: binary garbage, truncated JSON, wrong types, 100 kB task names (4xx);
* **slow uploads**: a valid body announced whole but sent 200 bytes every 0.25 s (200);
* **aborted uploads**: 1 MB announced, 10 kB sent, connection closed.

Reported: honest p50/p99 with and without attackers (goal: p99 at most 3x), honest failures
(goal 0), the worker's peak RSS (kernel VmHWM, reset when the attack starts) against its bound
(RSS at readiness + ``max_request_bytes`` for one body buffered at the limit + 128 MiB of
slack), ``/metrics`` size before, a third into and after the attack (flat from a third on: the
new answers' labels, 400, 404, 499, appear once, then only counts change), and the ERROR lines and tracebacks in the
server log (goal 0: every attack is a client mistake). Writes docs/benchmarks.md (section
"reliability-hostile"); exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

SECTION = "reliability-hostile"
MiB = 2**20
INPUT = 784


# -- honest clients ---------------------------------------------------------------------------
async def honest_phase(url: str, tasks: list[str], clients: int, seconds: float
                       ) -> tuple[list[float], list[str]]:
    """Latencies of the answered requests and the failures (anything but a correct 200)."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients,
                          keepalive_expiry=2.0)  # below uvicorn's 5 s (docs/reliability.md)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.perf_counter() < stop:
            task = rng.choice(tasks)
            body = {"task": task, "inputs": [[round(rng.random(), 3) for _ in range(INPUT)]]}
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/predict", json=body)
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc!r}")
                continue
            if r.status_code != 200 or len(r.json()["predictions"]) != 1:
                failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return latencies, failures


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


# -- attackers (a separate process) ----------------------------------------------------------
def request(path: str, body: bytes = b"", method: str = "POST", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {n}\r\nconnection: close\r\n\r\n").encode() + body


async def exchange(port: int, head: bytes, chunks: list[bytes] = (), delay: float = 0.0,
                   read: bool = True) -> int:
    """Send ``head`` then ``chunks`` (``delay`` s apart); the status answered (0: none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(head)
        await writer.drain()
        for chunk in chunks:
            await asyncio.sleep(delay)
            writer.write(chunk)
            await writer.drain()
        if not read:
            return 0
        line = await asyncio.wait_for(reader.readline(), 120)
        await reader.read()
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (ConnectionError, asyncio.TimeoutError, IndexError, ValueError):
        return 0
    finally:
        writer.close()


async def attack(port: int, seconds: float) -> dict[str, Counter]:
    rng = random.Random(7)
    stop = time.perf_counter() + seconds
    huge = b'{"task": "t0", "inputs": [' + b"[0]," * (16 * MiB - 8) + b"[0]]}"
    nested_small = b'{"inputs": ' + b"[" * 4000 + b"]" * 4000 + b"}"
    nested_big = b'{"inputs": ' + b"[" * 150_000 + b"]" * 150_000 + b"}"
    valid = json.dumps({"task": "t1", "inputs": [[0.5] * INPUT]}).encode()
    malformed = [bytes(rng.randrange(256) for _ in range(2000)), valid[:-7], b'{"inputs": "x"}',
                 b'{"task": 7, "inputs": [[1]]}', b"[" + b"1," * 5000 + b"1]", b"",
                 json.dumps({"task": "x" * 100_000, "inputs": [[0.5] * INPUT]}).encode(),
                 b'{"task": "t0", "inputs": [[true' + b", 0.5" * (INPUT - 1) + b"]]}"]
    counts: dict[str, Counter] = {}

    def junk(n: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.~") for _ in range(n))

    async def loop(kind: str, make) -> None:
        counts[kind] = Counter()
        while time.perf_counter() < stop:
            counts[kind][await make()] += 1

    async def random_path() -> int:
        path = "/" + "/".join(junk(rng.randint(1, 400)) for _ in range(rng.randint(1, 20)))
        return await exchange(port, request(path, method=rng.choice(["GET", "POST"])))

    async def huge_rows() -> int:
        return await exchange(port, request("/predict", huge))

    async def nested() -> int:
        return await exchange(port, request("/predict", rng.choice([nested_small, nested_big])))

    async def bad_body() -> int:
        return await exchange(port, request("/predict", rng.choice(malformed)))

    async def slow_upload() -> int:
        chunks = [valid[i:i + 200] for i in range(0, len(valid), 200)]
        return await exchange(port, request("/predict", b"", length=len(valid)), chunks, 0.25)

    async def aborted_upload() -> int:
        await exchange(port, request("/predict", b'{"inputs": [[' + b"0," * 5000, length=MiB),
                       read=False)
        await asyncio.sleep(0.05)
        return 0

    await asyncio.gather(
        loop("random paths", random_path), loop("random paths", random_path),
        loop("huge row count (64 MiB, 16 M rows)", huge_rows),
        loop("deep nesting", nested), loop("malformed bodies", bad_body),
        *(loop(f"slow uploads #{i}", slow_upload) for i in range(4)),
        loop("aborted uploads", aborted_upload),
    )
    return counts


def attacker_process(port: int, seconds: float, queue: multiprocessing.Queue) -> None:
    counts = asyncio.run(attack(port, seconds))
    merged: dict[str, dict[int, int]] = {}
    for kind, c in counts.items():
        kind = kind.split(" #")[0]
        for status, n in c.items():
            merged.setdefault(kind, {})
            merged[kind][status] = merged[kind].get(status, 0) + n
    queue.put(merged)


# -- the run ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import httpx

    from benchmarks._report import machine, table, write_section
    from benchmarks.bench_serving import build_model, free_port, server
    from benchmarks.load_test import RssSampler, peak_rss, reset_peak, server_pid
    from hnet_serve.checkpoint import save_checkpoint
    from hnet_serve.serving.config import ServingConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="attack phase (default 60)")
    p.add_argument("--honest", type=int, default=32, help="honest clients")
    p.add_argument("--slack-mib", type=float, default=128.0)
    args = p.parse_args(argv)
    baseline_seconds = max(5.0, args.seconds / 3)

    model = build_model([100], 4)
    tasks = model.task_names
    tmp = Path(tempfile.mkdtemp(prefix="hostile_"))
    save_checkpoint(model, tmp / "ckpt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HNET_", "PROMETHEUS_"))}
    env.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                "HNET_INTRA_OP_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    port = free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "hnet_serve.cli", "serve", str(tmp / "ckpt"), "--port", str(port)]
    limit_bytes = ServingConfig().max_request_bytes
    with server(cmd, env, log) as url:
        sampler = RssSampler(server_pid())
        worker = sampler.worker()
        _, ready_worker = sampler.measure()
        base_lat, base_fail = asyncio.run(honest_phase(url, tasks, args.honest, baseline_seconds))
        metrics_before = len(httpx.get(url + "/metrics", timeout=60).content)
        log_before = log.read_text(errors="replace")
        exact = reset_peak(worker)
        sampler.start()
        queue: multiprocessing.Queue = multiprocessing.Queue()
        attacker = multiprocessing.Process(target=attacker_process,
                                           args=(port, args.seconds, queue))
        attacker.start()
        # /metrics a third into the attack: every kind of answer has been labelled by then, so
        # from there to the end only counter values may change (bounded label sets).
        metrics_third: list[int] = []
        scraper = threading.Timer(args.seconds / 3, lambda: metrics_third.append(
            len(httpx.get(url + "/metrics", timeout=60).content)))
        scraper.start()
        atk_lat, atk_fail = asyncio.run(honest_phase(url, tasks, args.honest, args.seconds))
        scraper.join()
        attacks = queue.get(timeout=300)
        attacker.join(60)
        sampler.stop()
        peak_worker = max(sampler.peak()[1], peak_rss(worker) if exact else 0)
        t0 = time.perf_counter()
        metrics_after = len(httpx.get(url + "/metrics", timeout=60).content)
        scrape = time.perf_counter() - t0
        time.sleep(1.0)
    new_log = log.read_text(errors="replace")[len(log_before):].splitlines()
    error_lines = [ln for ln in new_log if "[ERROR]" in ln]
    tracebacks = sum("Traceback" in ln for ln in new_log)
    limit = ready_worker + limit_bytes + int(args.slack_mib * MiB)

    p50_0, p99_0 = percentile(base_lat, 0.5), percentile(base_lat, 0.99)
    p50_1, p99_1 = percentile(atk_lat, 0.5), percentile(atk_lat, 0.99)
    ratio = p99_1 / p99_0
    ok = (ratio <= 3.0 and not base_fail and not atk_fail and peak_worker <= limit
          and metrics_after - metrics_third[0] < 4 * 1024 and not error_lines and not tracebacks)
    for line in (base_fail + atk_fail)[:5]:
        print("  honest failure:", line)
    for line in error_lines[:5]:
        print("  server ERROR:", line[:300])

    def ms(v: float) -> str:
        return f"{v * 1e3:.1f}"

    rows = [["honest alone (baseline)", f"{baseline_seconds:.0f}", len(base_lat), len(base_fail),
             ms(p50_0), ms(p99_0), "-"],
            ["honest under attack", f"{args.seconds:.0f}", len(atk_lat), len(atk_fail), ms(p50_1),
             ms(p99_1), f"{ratio:.2f}x"]]
    attack_rows = [[kind, sum(c.values()),
                    ", ".join(f"{s or 'none'}: {n}" for s, n in sorted(c.items()))]
                   for kind, c in attacks.items()]
    checks = [
        ["honest p99 under attack / alone (goal <= 3x)", f"{ratio:.2f}x"],
        ["honest failures (goal 0)", len(base_fail) + len(atk_fail)],
        [f"worker peak RSS, attack phase ({'kernel VmHWM' if exact else 'sampled'})",
         f"{peak_worker / MiB:.1f} MiB"],
        [(f"bound: RSS at readiness {ready_worker / MiB:.1f} MiB + max_request_bytes "
         f"{limit_bytes / MiB:.0f} MiB + {args.slack_mib:.0f} MiB slack"),
         f"{limit / MiB:.1f} MiB ({'within' if peak_worker <= limit else 'EXCEEDED'})"],
        [("/metrics size before / a third into / after the attack (goal: flat from a third on, "
         "once every kind of answer has its labels)"),
         (f"{metrics_before / 1024:.1f} / {metrics_third[0] / 1024:.1f} / "
         f"{metrics_after / 1024:.1f} kB (last scrape {scrape * 1e3:.0f} ms)")],
        ["server log during the attack: ERROR lines / tracebacks (goal 0)",
         f"{len(error_lines)} / {tracebacks}"],
    ]
    body = (
        "## Hostile clients (`benchmarks/hostile_clients.py`)\n\n"
        f"Machine: {machine()}. Command: `python -m benchmarks.hostile_clients"
        f"{'' if args.seconds == 60 else f' --seconds {args.seconds:g}'}`. One `hnet-serve serve` "
        "(torch backend, 1 intra-op thread, default limits) on 127.0.0.1, 4 tasks of an MLP "
        f"784-100-10; {args.honest} honest httpx clients post 1-row requests back to back, first "
        "alone, then while attackers in another process (same machine, sharing its 2 cores) send "
        "random paths, 64 MiB bodies of 16 M rows, deeply nested and malformed bodies, slow and "
        "aborted uploads without pause.\n\n"
        + table(["phase", "seconds", "answered", "failures", "p50 (ms)", "p99 (ms)",
                 "p99 vs alone"], rows)
        + "\n" + table(["check", "result"], checks)
        + "\nAttacks sent (status answered: count; none: no answer read, as intended for "
        "aborted uploads):\n\n" + table(["attack", "requests", "statuses"], attack_rows)
    )
    write_section(SECTION, body)
    print(body)
    print("hostile clients:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
