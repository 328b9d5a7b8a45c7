"""``hnet-serve train``, ``add-task`` and ``eval``.

Parsers only here; torch and the training code are imported inside the handlers so that
``hnet-serve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hnet_serve.devices import DEVICE_HELP, device_arg
from hnet_serve.errors import ConfigError
from hnet_serve.normalization import NORM_MODES
from hnet_serve.training import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MAX_DRIFT, OUTLIER_KINDS

BENCHMARK_CHOICES = ["permuted-mnist", "split-mnist", "split-cifar", "custom"]
DATASET_CHOICES = ["mnist5k", "fashion-mnist", "idx-dir", "cifar"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = [v for v in text.replace(" ", "").split(",") if v]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _int_or(word: str, least: int, expected: str, *more: str) -> Callable[[str], int | str]:
    """An argparse type: ``word`` (or one of ``more``) itself, or an integer >= ``least``
    (else ``expected ...``)."""
    def parse(text: str) -> int | str:
        if text == word or text in more:
            return text
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {expected} or {word!r}, got {text!r}")
        return value
    return parse


_reg_tasks = _int_or("all", 1, "a positive integer")
_adapter_rank = _int_or("auto", 0, "a rank >= 0")
_reg_pairs = _int_or("all", 1, "a positive integer, 'auto'", "auto")


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training settings (override the preset and --config)")
    g.add_argument("--config", metavar="FILE", help="YAML/JSON file of training settings")
    g.add_argument("--iterations", type=int, help="optimizer steps per task")
    g.add_argument("--epochs", type=float, help="epochs per task (overrides --iterations)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--beta", type=float, help="strength of the output regularizer")
    g.add_argument("--seed", type=int)
    _bool_flag(g, "lookahead", "regularize the lookahead f_h(e, Θ + ΔΘ)")
    g.add_argument("--reg-method", choices=["auto", "gram", "explicit"])
    g.add_argument("--reg-tasks", type=_reg_tasks, metavar="N|all",
                   help="regularize a random subset of N old tasks per step (a flat step cost "
                   "on long sequences, but more forgetting), or all of them (default)")
    g.add_argument("--reg-pairs", type=_reg_pairs, metavar="N|auto|all",
                   help="about N (old task, chunk) pairs regularized per step, every old task "
                   "on a random share of the chunks; auto (default): 10 tasks' worth; all")
    _bool_flag(g, "train-old-embeddings", "keep training old task embeddings (paper: frozen)")
    g.add_argument("--outlier-weight", type=float, metavar="W",
                   help="weight of the uniform-prediction loss on outliers made from each batch "
                   "(sharper task inference by entropy; not in the paper; default 0: off)")
    g.add_argument("--device", type=device_arg, default=None,
                   help="where to train: " + DEVICE_HELP)
    g.add_argument("--outlier-kinds", type=_name_list, metavar="K1,K2",
                   help=f"outliers to draw from ({', '.join(OUTLIER_KINDS)}; default: all)")
    g.add_argument("--min-task-rows", type=int, metavar="N",
                   help="refuse a task with fewer training rows (default 10)")
    g.add_argument("--min-task-classes", type=int, metavar="N",
                   help="refuse a task with fewer distinct training labels (default 2)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


# Baseline strength flags: flag -> (BaselineOptions field, the methods that use it).
STRENGTH_FLAGS: dict[str, tuple[str, tuple[str, ...], type, str]] = {
    "ewc-lambda": ("ewc_lambda", ("ewc",), float, "EWC strength lambda (default 100)"),
    "ewc-gamma": ("ewc_gamma", ("ewc",), float,
                  "online EWC decay of the old Fisher, 0..1 (default 1: no decay)"),
    "fisher-samples": ("fisher_samples", ("ewc",), int,
                       "examples per task for EWC's diagonal Fisher (default 500)"),
    "si-c": ("si_c", ("si",), float, "Synaptic Intelligence strength c (default 1)"),
    "si-xi": ("si_xi", ("si",), float, "Synaptic Intelligence damping xi (default 0.1)"),
}


def _add_strength_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("baseline strengths (--method ewc / si)")
    for flag, (_, _, kind, text) in STRENGTH_FLAGS.items():
        g.add_argument(f"--{flag}", type=kind, help=text)


def _method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """``method_options`` from the strength flags given; a flag the method does not use is an
    error rather than silently ignored."""
    options: dict[str, Any] = {}
    for flag, (field, methods, _, _) in STRENGTH_FLAGS.items():
        value = getattr(args, field)
        if value is None:
            continue
        if method not in methods:
            raise ConfigError(f"--{flag} applies to --method {' / '.join(methods)}, "
                              f"not to --method {method}")
        options[field] = value
    return options


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "iterations": args.iterations, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "beta": args.beta, "seed": args.seed, "lookahead": args.lookahead,
        "reg_method": args.reg_method, "reg_tasks": args.reg_tasks,
        "reg_pairs": args.reg_pairs,
        "train_old_embeddings": args.train_old_embeddings,
        "outlier_weight": args.outlier_weight, "outlier_kinds": args.outlier_kinds,
        "min_task_rows": args.min_task_rows, "min_task_classes": args.min_task_classes,
        "device": args.device,
    }


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


# -- train ----------------------------------------------------------------------------------
def _data_args(values: list[str]) -> tuple[list[str], list[str]]:
    """``--data FILE`` or ``--data NAME=FILE`` (repeated) -> (absolute files, names or [])."""
    from hnet_serve.registry import validate_task_name

    files, names = [], []
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or Path(value).exists():  # a file whose name holds "=" stays a file
            name, file = "", value
        elif not name:
            raise ConfigError(f"--data {value!r}: the task name before '=' is empty")
        files.append(str(Path(file).absolute()))
        names.append(validate_task_name(name) if name else "")
    if any(names) and not all(names):
        raise ConfigError("--data: name every task (NAME=FILE) or none of them")
    return files, names if any(names) else []


def _cmd_train(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json
    from hnet_serve.training.api import (
        check_out_dir,
        check_report_dir,
        load_benchmark,
        train_tasks,
    )
    from hnet_serve.training.config import build_config
    from hnet_serve.training.loop import Interrupted

    _set_threads(args)
    target = {"hidden": args.target_hidden} if args.target_hidden else {}
    if args.target_kind:
        target["kind"] = args.target_kind
    hnet = {k: v for k, v in {
        "kind": args.hnet_kind, "hidden": args.hnet_hidden, "chunk_size": args.chunk_size,
        "task_emb_dim": args.task_emb_dim, "chunk_emb_dim": args.chunk_emb_dim,
        "adapter_rank": args.adapter_rank,
    }.items() if v is not None}
    files, names = _data_args(args.data)
    config = build_config(
        args.config, benchmark=args.benchmark, dataset=args.dataset, tasks=args.tasks,
        data_dir=args.data_dir, data_files=files or None, data_names=names or None,
        pad=args.pad, first_identity=args.first_identity, multi_head=args.multi_head,
        method=args.method, target=target, hypernet=hnet, compression=args.compression,
        planned_tasks=args.planned_tasks, normalize=args.normalize,
        max_classes=args.max_classes, **_training_overrides(args),
    )
    if config.benchmark == "custom" and args.tasks is not None:
        raise ConfigError("--tasks does not apply to --benchmark custom: it trains one task per "
                          "--data file")
    options = _method_options(args, config.method)
    if options:  # flags override the config file's method_options, key by key
        config = config.model_copy(
            update={"method_options": {**config.method_options, **options}})
        from hnet_serve.training.methods.baselines import BaselineOptions

        BaselineOptions.from_config(config)  # range-check the flags before loading data
    # Only the hypernetwork makes a servable checkpoint; baselines (--method finetune, ewc, ...)
    # are for comparison and write their report only.
    out = args.out if config.method == "hnet" else None
    report_dir = args.report_dir or f"{Path(args.out).absolute()}-report"
    if out is not None:  # before spending time on data
        check_out_dir(out, args.overwrite)
    check_report_dir(report_dir, out)
    tasks = load_benchmark(config)
    try:
        model, result = train_tasks(tasks, config, out, overwrite=args.overwrite,
                                progress=not args.no_progress, report_dir=report_dir)
    except Interrupted as stop:
        done = stop.result.completed
        where = f"checkpoint {out} holds {len(done)} task(s): {', '.join(done)}" if done and out \
            else "no checkpoint was written"
        print(f"hnet-serve train: interrupted; {where}", file=sys.stderr)
        return 130
    summary = {"out": str(Path(out).absolute()) if out else None,
               "report_dir": str(report_dir), "method": config.method, **result.to_dict()}
    stored = None
    if out and config.method == "hnet":
        from hnet_serve.storage import stored_params

        stored = stored_params(model)
        summary.update(stored_params=stored.total, stored_ratio=stored.ratio,
                       stored={**stored.to_json(), "summary": stored.summary()})
    if args.json:
        print_json(summary)
        return 0
    if out:
        print(f"trained {len(result.completed)} tasks -> {out} (report: {report_dir})")
    else:
        print(f"trained {len(result.completed)} tasks with the {config.method!r} baseline; "
              f"no checkpoint (baselines are not served), report: {report_dir}")
    for name, acc in result.final_accuracy.items():
        print(f"  {name:<28} {_pct(acc)}")
    m = result.metrics
    print(f"mean accuracy {_pct(m['mean_accuracy'])}   BWT {_pct(m['bwt'])}   "
          f"forgetting {_pct(m['forgetting'])}")
    if stored is not None:
        print(f"checkpoint {stored.summary()} ({stored.total:,} parameters)")
    return 0


# -- add-task -------------------------------------------------------------------------------
def _cmd_add_task(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json
    from hnet_serve.errors import ForgettingError
    from hnet_serve.training.api import add_task

    _set_threads(args)
    try:
        _, report = add_task(
            args.checkpoint, args.out, name=args.name, data=args.data,
            benchmark_task=args.benchmark_task, max_drift=args.max_drift,
            max_accuracy_drop=args.max_accuracy_drop, force=args.force,
            overwrite=args.overwrite, progress=not args.no_progress, config_file=args.config,
            reference=args.reference, **_training_overrides(args),
        )
    except ForgettingError as exc:
        refused = getattr(exc, "report", None)
        if args.json and refused is not None:
            print_json({**refused.to_dict(), "error": str(exc), "type": type(exc).__name__})
            exc.json_printed = True  # type: ignore[attr-defined]
        raise
    if args.json:
        print_json(report.to_dict())
        return 0
    new = report.new_task
    print(f"added task {new['name']!r} (accuracy {_pct(new['accuracy'])}) -> {report.out}")
    if "reference_accuracy" in new:
        print(f"  a fresh network of the same architecture reaches "
              f"{_pct(new['reference_accuracy'])} on this task")
    if "capacity_warning" in new:
        print(f"warning: {new['capacity_warning']}", file=sys.stderr)
    for name, figs in report.old_tasks.items():
        print(f"  {name:<28} accuracy {_pct(figs['before'])} -> {_pct(figs['after'])}  "
              f"drift {figs['drift']:.2e}")
    for v in report.violations:
        print(f"  forced past: {v}")
    return 0


# -- eval -----------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    from hnet_serve.checkpoint import read_manifest
    from hnet_serve.console import print_json
    from hnet_serve.training.api import evaluate_checkpoint
    from hnet_serve.training.data import build_benchmark, load_task_file

    _set_threads(args)
    tasks = None
    if args.data or args.task:
        if len(args.data) != len(args.task):
            raise ConfigError(
                f"--data and --task go in pairs (--data FILE --task NAME, repeated): got "
                f"{len(args.data)} --data and {len(args.task)} --task")
        tasks = [load_task_file(f, t) for f, t in zip(args.data, args.task, strict=True)]
    elif args.benchmark or args.dataset:
        meta = read_manifest(args.checkpoint).get("meta", {})
        spec = dict(meta.get("train_config") or {})
        tasks = build_benchmark(
            args.benchmark or meta.get("benchmark") or "split-mnist",
            args.dataset or meta.get("dataset") or "mnist5k",
            args.tasks or meta.get("tasks"),
            meta.get("seed", 0) if args.seed is None else args.seed,
            args.data_dir or meta.get("data_dir"),
            pad=spec.get("pad", False), first_identity=spec.get("first_identity", True),
        )
    report = evaluate_checkpoint(args.checkpoint, tasks=tasks, batch_size=args.batch_size,
                                 report_dir=args.report_dir, data_dir=args.data_dir,
                                 device=args.device)
    if args.json:
        print_json(report)
    else:
        print(f"checkpoint {args.checkpoint}")
        for name, acc in report["accuracy"].items():
            print(f"  {name:<28} {_pct(acc)}")
        for name, why in report["missing"].items():
            print(f"  {name:<28} not evaluated: {why}")
        print(f"mean accuracy {_pct(report['mean_accuracy'])}")
    # Named data evaluates the tasks it names; otherwise every task must have its data.
    if report["missing"] and tasks is None:
        first, why = next(iter(report["missing"].items()))
        print(f"hnet-serve eval: error: no test data for {len(report['missing'])} task(s) "
              f"(first {first!r}: {why})", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a task-conditioned hypernetwork on a sequence of tasks",
        description="Train tasks one after another; a checkpoint is saved after every task.",
    )
    p.add_argument("--benchmark", choices=BENCHMARK_CHOICES, default="split-mnist")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=None,
                   help="image source (default mnist5k: 5,000 real MNIST digits)")
    p.add_argument("--tasks", type=int, help="number of tasks (default: the benchmark's)")
    p.add_argument("--out", required=True,
                   help="checkpoint directory to write (baselines write only OUT-report)")
    p.add_argument("--data-dir", help="IDX directory (idx-dir, fashion-mnist) or CIFAR binaries")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]FILE",
                   help="custom benchmark: one task per .npz/.npy/.csv file (repeat); NAME=FILE "
                        "names the task (default: the file name)")
    _bool_flag(p, "pad", "pad 28x28 images to 32x32 (permuted-mnist, as in the paper)")
    _bool_flag(p, "first-identity", "first permuted task is the unpermuted data")
    _bool_flag(p, "multi-head", "one output head per task")
    p.add_argument("--normalize", choices=NORM_MODES, default=None,
                   help="per-task input normalization from each task's own training inputs "
                        "(default auto: per-channel for images, per-feature for flat inputs); "
                        "add-task uses the checkpoint's")
    p.add_argument("--max-classes", type=int, metavar="N",
                   help="output width reserved for later tasks (default: max(10, the largest "
                        "task's classes)); add-task refuses a task with more")
    p.add_argument("--method", help="continual-learning method (default hnet)")
    _add_strength_flags(p)
    g = p.add_argument_group("architecture")
    g.add_argument("--target-kind", choices=["mlp", "resnet"])
    g.add_argument("--target-hidden", type=_int_list, metavar="H1,H2", help="MLP hidden sizes")
    g.add_argument("--hnet-kind", choices=["full", "chunked"])
    g.add_argument("--hnet-hidden", type=_int_list, metavar="H1,H2")
    g.add_argument("--chunk-size", type=int,
                   help="chunk size (default: derived from --compression)")
    g.add_argument("--task-emb-dim", type=int)
    g.add_argument("--chunk-emb-dim", type=int)
    g.add_argument("--adapter-rank", type=_adapter_rank, metavar="R|auto",
                   help="rank of each task's private low-rank first layer (permuted-mnist) or "
                        "correction of it (other presets), stored with its embedding, counted in "
                        "--compression (0: none; default auto: sized from the budget)")
    g.add_argument("--compression", type=float, metavar="R",
                   help="stored size (every weight the checkpoint keeps) as a fraction of one "
                        "target network for the planned tasks, at most 1.0 (default 1.0); "
                        "the chunk size is derived from it unless --chunk-size is given")
    g.add_argument("--planned-tasks", type=int, metavar="N",
                   help="tasks the checkpoint should hold within --compression, add-task's "
                        "later ones included (default: the tasks of this run)")
    _add_training_flags(p)
    p.add_argument("--report-dir", help="where results.json and the PNGs go (default OUT-report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "add-task", help="train one more task onto a checkpoint (writes a new checkpoint)",
        description="Train a new task onto CHECKPOINT and write the result to --out. Old tasks' "
        "weight drift and accuracy change are reported; beyond the tolerances nothing is "
        "written unless --force. The source checkpoint is never modified.",
    )
    p.add_argument("checkpoint", help="source checkpoint directory")
    p.add_argument("--name", help="name of the new task (required with --data)")
    p.add_argument("--data", metavar="FILE",
                   help=".npz with x_train, y_train, x_test, y_test (or .npy/.csv)")
    p.add_argument("--benchmark-task", type=int, metavar="INDEX",
                   help="instead of --data: task INDEX of the checkpoint's benchmark")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--max-drift", type=float, default=DEFAULT_MAX_DRIFT,
                   help="max relative L2 change of an old task's generated weights "
                   "(default %(default)s)")
    p.add_argument("--max-accuracy-drop", type=float, default=DEFAULT_MAX_ACCURACY_DROP,
                   help="max drop of an old task's test accuracy, as a fraction "
                   "(default %(default)s)")
    p.add_argument("--force", action="store_true", help="write even beyond the tolerances")
    p.add_argument("--reference", action="store_true",
                   help="also train a fresh network of the same architecture on the task and "
                        "report its accuracy (new_task.reference_accuracy): a checkpoint that "
                        "has used its capacity learns new tasks worse")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_training_flags(p)
    p.set_defaults(func=_cmd_add_task)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on its recorded (or given) test data",
        description="Re-evaluate every task of CHECKPOINT on the test data recorded at training "
        "time, or on a benchmark / data file given here.",
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--benchmark", choices=BENCHMARK_CHOICES)
    p.add_argument("--dataset", choices=DATASET_CHOICES)
    p.add_argument("--data-dir",
                   help="where to look for the recorded data when it moved: task files by their "
                        "path relative to DIR or their name; a benchmark's IDX/CIFAR directory")
    p.add_argument("--tasks", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--data", metavar="FILE", action="append", default=[],
                   help="test data for one task, with --task (repeat the pair for more tasks)")
    p.add_argument("--task", action="append", default=[],
                   help="the checkpoint task that the --data before it belongs to")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--report-dir", help="write eval.json and the PNGs here")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_eval)
