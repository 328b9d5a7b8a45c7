"""The ``hnet-serve`` command line.

Each subcommand lives with the code it drives: a module exposes ``register(subparsers)``, which
adds its parser and sets ``func``. Modules are imported only to build the parser (they import
their heavy dependencies inside the handler), and the training commands are optional: a serving
image without ``training/`` simply has no ``train`` command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hnet_serve import __version__
from hnet_serve.console import human_bytes, print_json
from hnet_serve.errors import HNetError

# (module, required): optional modules may be absent from a serving-only install.
COMMAND_MODULES: list[tuple[str, bool]] = [
    ("hnet_serve.training.cli", False),  # train, add-task, eval
    ("hnet_serve.quickstart", False),  # quickstart
    ("hnet_serve.export.cli", False),  # export
    ("hnet_serve.scoring.cli", False),  # score
    ("hnet_serve.serving.cli", False),  # serve
    ("hnet_serve.cli", True),  # info
]


def _cmd_info(args: argparse.Namespace) -> int:
    from hnet_serve.checkpoint import checkpoint_files, load_checkpoint
    from hnet_serve.storage import stored_params

    model = load_checkpoint(args.checkpoint)
    info = model.info()
    stored = stored_params(model)
    info["stored_params"] = stored.total
    info["stored_ratio"] = stored.ratio
    info["stored"] = {**stored.to_json(), "summary": stored.summary()}
    info["files"] = checkpoint_files(args.checkpoint)
    info["meta"] = model.meta
    if args.json:
        print_json(info)
        return 0
    print(f"checkpoint: {args.checkpoint}")
    t, h = info["target"], info["hypernet"]
    print(f"target:     {t['kind']} input {t['input_shape']} -> {t['num_classes']} classes "
          f"(reserved), {info['target_params']:,} parameters, input normalization "
          f"{t.get('input_norm', 'none')} per task")
    layers = ("first layers (their own, not generated"
              + (", over a shared basis)" if h.get("adapter_basis") == "shared" else ")")
              if h.get("adapter_mode") == "replace" else "first-layer corrections")
    adapters = (f", of which {info['adapter_params']:,} in rank-{h['adapter_rank']} private "
                f"{layers}" if h.get("adapter_rank") else "")
    if h.get("freeze") == "after-first-task":
        adapters += "; generator trained with the first task only"
    print(f"hypernet:   {h['kind']} hidden {h['hidden']}, {info['hypernet_params']:,} parameters "
          f"(+ {info['embedding_params']:,} in task embeddings{adapters})")
    print(f"compression ratio: {info['compression_ratio']:.4f} (shared hypernetwork / target)")
    print(f"stored:     {stored.total:,} parameters ({stored.shared:,} shared, "
          f"{stored.task_embeddings:,} task embeddings, {stored.task_buffers:,} per-task "
          f"buffers, {stored.normalization} normalization): {stored.summary()}")
    for name, size in info["files"].items():
        print(f"file:       {name} ({human_bytes(size)})")
    print(f"tasks ({len(info['tasks'])}):")
    for task in info["tasks"]:
        acc = task["metrics"].get("accuracy")
        acc_s = f"  accuracy {acc:.4f}" if isinstance(acc, (int, float)) else ""
        print(f"  {task['name']:<24} input {task['input_shape']}  classes {task['num_classes']}{acc_s}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: tasks, parameter counts, sizes")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hnet-serve",
        description="Train, export and serve task-conditioned hypernetworks.",
    )
    parser.add_argument("--version", action="version", version=f"hnet-serve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, required in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if required or not module.startswith(str(exc.name)):
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HNetError as exc:
        print(f"hnet-serve {args.command}: error: {exc}", file=sys.stderr)
        if getattr(args, "json", False) and not getattr(exc, "json_printed", False):
            # A script reading stdout gets an answer it can parse, not an empty string.
            print_json({"error": str(exc), "type": type(exc).__name__})
        return 1
    except KeyboardInterrupt:
        print(f"hnet-serve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
