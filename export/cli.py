"""``hnet-serve export``: per-task ONNX files (weights baked in) or one dynamic graph.

    hnet-serve export DIR (--task NAME [--task NAME ...] | --all) --out OUTDIR
                      [--opset N] [--no-verify] [--quantize int8] [--json]
    hnet-serve export DIR --dynamic --out FILE [--opset N] [--no-verify] [--json]
    hnet-serve export DIR (--task NAME ... | --all) --format triton --out REPO
                      [--max-batch-size N] [--opset N] [--no-verify] [--json]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from hnet_serve.errors import ConfigError


def _describe(result: Any) -> str:
    from hnet_serve.console import human_bytes

    line = f"wrote {result.path} ({human_bytes(result.bytes)}"
    if result.verified:
        real = f", {result.real_rows} real" if result.real_rows else ""
        line += (f", max |onnx - torch| {result.max_abs_diff:.2g} over {result.rows_checked} "
                 f"rows{real}")
    else:
        line += ", not verified"
    line += ")"
    q = result.quantized
    if q is not None:
        what = "accuracy" if q.metric == "accuracy" else "argmax agreement with float"
        line += (f"\n  int8: {q.path} ({human_bytes(q.bytes)}), {what} {q.float_value:.4f} -> "
                 f"{q.int8_value:.4f} ({q.change:+.4f}) on {q.rows} rows, "
                 f"max logit change {q.max_abs_diff:.3g}")
    if result.data_note and (result.verified or q is not None):
        line += f"\n  (no real test inputs: {result.data_note})"
    return line


def _cmd_export(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json

    if args.dynamic and args.quantize:
        raise ConfigError("--quantize applies to per-task models, not to --dynamic")
    if args.format == "triton" and (args.dynamic or args.quantize):
        raise ConfigError("--format triton writes per-task float models: no --dynamic, "
                          "no --quantize")
    from hnet_serve.export import onnx_export

    t0 = time.perf_counter()
    if args.format == "triton":
        return _triton(args, t0)
    if args.dynamic:
        results = [onnx_export.to_dynamic_onnx(args.checkpoint, args.out, opset=args.opset,
                                               verify=args.verify)]
    else:
        results = onnx_export.export_all(
            args.checkpoint, args.out, None if args.all else args.tasks, opset=args.opset,
            verify=args.verify, quantize=args.quantize, progress=not args.json,
        )
    seconds = time.perf_counter() - t0
    if args.json:
        print_json({"checkpoint": args.checkpoint, "kind": "dynamic" if args.dynamic else "task",
                    "seconds": seconds, "exports": [asdict(r) for r in results]})
        return 0
    for r in results:
        print(_describe(r))
    what = "dynamic graph" if args.dynamic else f"{len(results)} task(s)"
    print(f"exported {what} in {seconds:.1f} s (opset {results[0].opset})")
    return 0


def _triton(args: argparse.Namespace, t0: float) -> int:
    from hnet_serve.console import print_json
    from hnet_serve.export.triton import export_triton

    models = export_triton(args.checkpoint, args.out, None if args.all else args.tasks,
                           opset=args.opset, verify=args.verify,
                           max_batch_size=args.max_batch_size, progress=not args.json)
    seconds = time.perf_counter() - t0
    if args.json:
        print_json({"checkpoint": args.checkpoint, "kind": "triton", "repository": args.out,
                    "seconds": seconds, "models": [asdict(m) for m in models]})
        return 0
    for m in models:
        print(_describe(m.onnx) + f"\n  Triton model {m.name!r}: {m.config}")
    print(f"wrote a Triton model repository of {len(models)} model(s) to {args.out} in "
          f"{seconds:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export tasks to ONNX (weights baked in), or one graph that takes the task index",
        description=(
            "Write OUTDIR/<task>.onnx per task (input 'input' [batch, *input_shape] float32, "
            "output 'logits'), tracing the target once; or, with --dynamic, one FILE with "
            "inputs 'task_index' (int64 scalar) and 'input' that generates the weights itself. "
            "Each file is checked (onnx checker, ONNX Runtime vs PyTorch <= 1e-4) before it "
            "is written, and written atomically."
        ),
    )
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", action="append", dest="tasks", metavar="NAME",
                       help="task to export (repeat for several)")
    which.add_argument("--all", action="store_true", help="export every task")
    which.add_argument("--dynamic", action="store_true",
                       help="write one graph for all tasks (inputs task_index, input) to FILE")
    p.add_argument("--out", required=True, metavar="OUTDIR|FILE",
                   help="output directory (per-task files) or file (--dynamic)")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the checker and the ONNX Runtime vs PyTorch comparison")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write <task>.int8.onnx (dynamic quantization) and report the "
                        "accuracy change")
    p.add_argument("--format", choices=["onnx", "triton"], default="onnx",
                   help="onnx: OUTDIR/<task>.onnx; triton: a Triton model repository, "
                        "OUTDIR/<task>/config.pbtxt, labels.txt and 1/model.onnx")
    p.add_argument("--max-batch-size", type=int, default=64, metavar="N",
                   help="--format triton: max_batch_size of every model (default 64)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_export)
