"""Start-up: what a fresh ``hnet-serve`` process pays before (and around) its real work.

Every path is a fresh process (what a user scoring many small files, or an autoscaled container,
pays each time), all interleaved round by round with a floor measured in the same run:

* floor: ``python -c "import hnet_serve, torch, onnxruntime, pyarrow"`` (the libraries any
  scoring run loads; nothing of ours runs);
* ``hnet-serve info`` on an MLP 784-100-100-10 checkpoint;
* ``hnet-serve score`` of 1 row (the fixed start-up) and of 300,000 rows (end to end, goal
  <= 2.5 s), .npy -> .parquet, default (onnx) backend;
* ``hnet-serve score`` of 1 row on a ResNet-20 checkpoint (a traced ONNX graph): cold graph
  cache (an empty cache directory each run) and warm;
* ``hnet-serve serve``: seconds until ``/readyz`` answers 200, MLP and ResNet (cold/warm cache).

Wall time and CPU time (user + system of the child processes) are reported, with the machine
load during the run (``benchmarks/_timing.py``).

    python -m benchmarks.bench_startup [--quick] [--rows N] [--rounds N] [--no-serve]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._report import ROOT, machine, table, write_section
from benchmarks._timing import LoadMonitor, Sample, best, interleave
from benchmarks.bench_scoring import TASK, build_model, write_npy
from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.graph_cache import ENV_VAR
from hnet_serve.quickstart import wait_ready

SECTION = "startup"
GOAL_SCORE_S = 2.5
FLOOR = "import hnet_serve, torch, onnxruntime, pyarrow"


def resnet_model():
    from hnet_serve.hypernet import HypernetConfig
    from hnet_serve.model import HNetModel
    from hnet_serve.targets import ResNetConfig

    model = HNetModel(
        ResNetConfig(input_shape=(3, 32, 32), num_classes=10, blocks_per_stage=3, width=16),
        HypernetConfig(kind="chunked", hidden=[25, 25], task_emb_dim=24, chunk_emb_dim=8,
                       chunk_size=7_000),
        seed=0,
    )
    model.add_task("img-0")
    return model


def run(args: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {proc.stderr[-2000:]}")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hnet_serve.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_ready(ckpt: Path, env: dict[str, str], timeout: float = 300.0) -> None:
    """Start ``hnet-serve serve``, wait for ``/readyz`` 200, stop it."""
    port = free_port()
    proc = subprocess.Popen(cli("serve", str(ckpt), "--port", str(port)), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout, poll=0.05)
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30k rows, one round, no serve")
    ap.add_argument("--rows", type=int, default=None, help="rows of the scored file (300,000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    ap.add_argument("--no-serve", action="store_true", help="skip the serve ready times")
    args = ap.parse_args(argv)
    rows = args.rows or (30_000 if args.quick else 300_000)
    rounds = args.rounds or (1 if args.quick else 3)
    serve = not (args.no_serve or args.quick)

    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        mlp, resnet = work / "mlp" / "ckpt", work / "resnet" / "ckpt"
        save_checkpoint(build_model(), mlp)
        save_checkpoint(resnet_model(), resnet)
        big, one, img = work / "x.npy", work / "one.npy", work / "img.npy"
        write_npy(big, rows)
        np.save(one, np.zeros((1, 784), np.float32))
        np.save(img, np.zeros((1, 3, 32, 32), np.float32))
        warm_dir, cold_dir = work / "graphs-warm", work / "graphs-cold"
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), ENV_VAR: str(warm_dir)}

        def cold_env() -> dict[str, str]:
            shutil.rmtree(cold_dir, ignore_errors=True)  # an empty cache every run
            return {**env, ENV_VAR: str(cold_dir)}

        def score(ckpt: Path, src: Path, e=None, task: str = TASK):
            return lambda: run(cli("score", str(ckpt), "--input", str(src), "--output",
                                   str(work / "out.parquet"), "--task", task, "--no-progress"),
                               e() if callable(e) else (e or env))

        run(cli("score", str(resnet), "--input", str(img), "--output", str(work / "o.parquet"),
                "--task", "img-0", "--no-progress"), env)  # prime the warm cache
        paths = {
            f"floor: `python -c \"{FLOOR}\"`": lambda: run([sys.executable, "-c", FLOOR], env),
            "`hnet-serve info` (MLP)": lambda: run(cli("info", str(mlp)), env),
            "`hnet-serve score`, 1 row (MLP: fixed start-up)": score(mlp, one),
            f"`hnet-serve score`, {rows:,} rows (MLP 100-100, end to end)": score(mlp, big),
            "`hnet-serve score`, 1 row (ResNet-20, cold graph cache)":
                score(resnet, img, cold_env, "img-0"),
            "`hnet-serve score`, 1 row (ResNet-20, warm graph cache)":
                score(resnet, img, env, "img-0"),
        }
        if serve:
            paths.update({
                "`hnet-serve serve` to `/readyz` 200 (MLP)": lambda: serve_ready(mlp, env),
                "`hnet-serve serve` to `/readyz` 200 (ResNet-20, cold graph cache)":
                    lambda: serve_ready(resnet, cold_env()),
                "`hnet-serve serve` to `/readyz` 200 (ResNet-20, warm graph cache)":
                    lambda: serve_ready(resnet, env),
            })
        with LoadMonitor() as load:
            samples = interleave(paths, rounds, log=lambda m: print(m, file=sys.stderr))
        floor = best(next(iter(samples.values())))
        table_rows = []
        for name, ss in samples.items():
            b: Sample = best(ss)
            table_rows.append([name, f"{b.wall:.2f}", f"{b.cpu:.2f}", f"{b.wall - floor.wall:+.2f}"])
        end_to_end = best(samples[f"`hnet-serve score`, {rows:,} rows (MLP 100-100, end to end)"])
        fixed = best(samples["`hnet-serve score`, 1 row (MLP: fixed start-up)"])
        body = (
            "## Start-up (`benchmarks/bench_startup.py`)\n\n"
            "Fresh processes, interleaved round by round with the floor (importing the libraries "
            f"any scoring run loads); best of {rounds} round(s); CPU = user + system seconds of "
            f"the process and its children. Machine: {machine()}.\n\n{load.note()}\n\n"
            + table(["path (fresh process)", "wall s", "CPU s", "vs floor (s)"], table_rows)
            + f"\n`hnet-serve score` end to end on {rows:,} rows: {end_to_end.wall:.2f} s (goal "
            f"<= {GOAL_SCORE_S} s{' for 300,000 rows' if rows != 300_000 else ''}: "
            f"{'met' if end_to_end.wall <= GOAL_SCORE_S else 'NOT met'}), of which "
            f"{fixed.wall:.2f} s is the fixed start-up (a 1-row file). The ResNet graph "
            "cold/warm rows show the graph cache (`hnet_serve/graph_cache.py`): a cold run "
            "traces the target with the torch exporter, a warm one reads the traced graph.\n"
        )
        if args.quick:
            body += "\n(`--quick` smoke run: small file, one round, no serve; rerun without it.)\n"
        write_section(SECTION, body)
        print(body)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
