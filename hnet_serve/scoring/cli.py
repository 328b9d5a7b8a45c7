"""``hnet-serve score``: a file of rows in, one prediction per row out (see docs/scoring.md)."""

from __future__ import annotations

import argparse
import signal
from typing import Any

# The parser is built on every CLI start: keep this module's imports light (the scorer pulls in
# torch and pyarrow only when a command runs).
from hnet_serve.devices import DEVICE_HELP, device_arg
from hnet_serve.scoring.config import DEFAULT_BATCH_SIZE


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_score(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json
    from hnet_serve.scoring.scorer import score_file

    # SIGTERM (a scheduler stopping the job) cleans up like Ctrl-C: no output, no temp file.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = score_file(
            args.checkpoint, args.input, args.output,
            task=args.task, task_column=args.task_column, backend=args.backend,
            threads=args.threads, batch_size=args.batch_size, probabilities=args.probabilities,
            on_error=args.on_error, rejects=args.rejects, row_numbers=args.row_numbers,
            keep_columns=args.keep_columns, min_confidence=args.min_confidence,
            progress=not args.no_progress, device=args.device,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print_json(report.to_json())
        return 0
    print(f"scored {report.rows_scored:,} of {report.rows_read:,} rows in {report.seconds:.2f} s "
          f"({report.rows_per_second:,.0f} rows/s, backend {report.backend}) -> {report.output}")
    if report.rows_rejected:
        where = f" -> {report.rejects_file}" if report.rejects_file else ""
        first = ", ".join(map(str, report.rejected_rows[:10]))
        print(f"rejected {report.rows_rejected:,} rows (first: {first}){where}")
    for name, n in report.tasks.items():
        print(f"  {name:<24} {n:,} rows")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a file of rows offline (streamed, atomic output)",
        description=(
            "Stream INPUT (.npy, .npz, .csv, .parquet) through a checkpoint's tasks and write "
            "one row per input row (task, prediction) to OUTPUT (.parquet, .csv, .npy). "
            "Features: a list column named 'input', or every column except the task column. "
            "Without --task or --task-column the task is inferred per row."
        ),
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--input", required=True, help="input file: .npy, .npz, .csv or .parquet")
    p.add_argument("--output", required=True, help="output file: .parquet, .csv or .npy")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--task", help="score every row with this task")
    which.add_argument("--task-column", metavar="COL",
                       help="per-row task names in this column (empty: infer that row's task)")
    p.add_argument("--backend", choices=["torch", "onnx"], default=None,
                   help="onnx (default: the fastest here, see docs/scoring.md) or torch")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads of the backend (default: the CPUs this process may use)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"rows per chunk (memory scales with it; default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--probabilities", action="store_true",
                   help="add a 'probabilities' column (zero-padded to the most classes)")
    p.add_argument("--on-error", choices=["stop", "skip"], default=None,
                   help="bad rows (wrong width, non-numeric, NaN/inf, unknown task): stop the "
                        "run (default) or skip them (default when --rejects is given)")
    p.add_argument("--rejects", metavar="FILE",
                   help="write skipped rows here as JSON lines: row number, reason, raw row")
    p.add_argument("--row-numbers", action="store_true",
                   help="add a 'row' column (the input row number; useful with skipped rows)")
    p.add_argument("--keep-columns", metavar="COL,...",
                   help="pass these columns (e.g. an id) through to the output unchanged, first "
                        "and in the input's order; they are not features (.csv/.parquet)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="C",
                   help="task inference: rows less confident than C (0..1) abstain: their task, "
                        "prediction and label are left empty instead of a guess")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_score)
