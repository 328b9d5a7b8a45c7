"""``hnet-serve serve``: import a checkpoint into the BentoML model store and serve it.

The checkpoint is validated and stored as ``hnet:<content hash prefix>`` (``hnet_serve.serving.store``),
then ``bentoml serve hnet_serve.serving.service:HNetService`` runs in a child process with
``HNET_MODEL_TAG`` and the serving options in its environment, until it stops or is
interrupted (Ctrl-C / SIGTERM are passed on and the child is waited for). With ``--watch`` this
process also polls DIR and reloads the service when a new checkpoint replaces it
(:mod:`hnet_serve.serving.watch`). ``hnet-serve reload URL`` is the admin call's CLI.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from hnet_serve.devices import DEVICE_HELP, device_arg
from hnet_serve.errors import ConfigError

SERVICE = "hnet_serve.serving.service:HNetService"


def port_arg(value: str) -> int:
    """argparse type for a TCP port (1-65535)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {value!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP (BentoML): POST /predict, GET /tasks",
        description="Import CHECKPOINT into the BentoML model store and run the hnet-serve "
        "BentoML service until stopped. Other settings (pinned/warm tasks, max rows, ...) come "
        "from HNET_* environment variables or --config; see docs/serving.md.",
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--port", type=port_arg, default=3000, help="port (default 3000)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    p.add_argument("--backend", choices=["torch", "onnx"], default=None,
                   help="torch (in-process generated weights) or onnx (an ORT session per task)")
    p.add_argument("--cache-bytes", default=None,
                   help="weight cache budget, bytes or with a unit: 536870912, 512MiB, 2GB")
    p.add_argument("--device", type=device_arg, default=None,
                   help="where weights are generated and run (HNET_DEVICE): " + DEVICE_HELP)
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype the cached weights are stored and multiplied in (HNET_CACHE_DTYPE; "
                   "default float32; bfloat16 halves the bytes per task, torch backend)")
    p.add_argument("--config", default=None, help="YAML/JSON serving config file (HNET_CONFIG)")
    p.add_argument("--json", action="store_true",
                   help="print the imported model tag and URL as JSON before serving")
    p.add_argument("--import-only", action="store_true",
                   help="only import the checkpoint into the BentoML model store and print its "
                   "tag (then: HNET_MODEL_TAG=<tag> bentoml build)")
    p.add_argument("--watch", action="store_true",
                   help="reload by itself when the checkpoint at CHECKPOINT is replaced (as "
                   "add-task and train write it, atomically); an incomplete one is never loaded")
    p.add_argument("--watch-interval", type=float, default=1.0, metavar="S",
                   help="seconds between two looks at CHECKPOINT with --watch (default 1)")
    p.set_defaults(func=_cmd_serve)

    r = sub.add_parser(
        "reload",
        help="reload a running service's checkpoint (POST /admin/reload) or roll it back",
        description="Ask the service at URL to load another checkpoint (a directory on the "
        "server, or a model tag hnet:<version>) without a restart; old tasks are checked first "
        "(refused if one is dropped or moved, unless --force). The admin token comes from "
        "HNET_ADMIN_TOKEN or HNET_ADMIN_TOKEN_FILE, as on the server. Prints the answer as JSON.",
    )
    r.add_argument("url", help="the service, e.g. http://127.0.0.1:3000")
    r.add_argument("--checkpoint", default=None,
                   help="directory or model tag (default: the served source, read again)")
    r.add_argument("--force", action="store_true", help="reload even if old tasks change")
    r.add_argument("--rollback", action="store_true",
                   help="swap back to the previous version instead (POST /admin/rollback)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    r.set_defaults(func=_cmd_reload, json=True)


def serve_env(args: argparse.Namespace, tag: str) -> dict[str, str]:
    """The child's environment: the model tag and the options given on the command line."""
    from hnet_serve.serving.config import ServingConfig

    env = dict(os.environ)
    env.pop("HNET_CHECKPOINT", None)  # serve what was imported, not a stray directory
    env["HNET_MODEL_TAG"] = tag
    # OpenMP worker threads that spin between torch ops starve the server's event loop (measured:
    # 5x fewer requests/s with the torch backend); let them sleep unless the user chose otherwise.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.config:
        env["HNET_CONFIG"] = os.path.abspath(args.config)
    if args.backend:
        env["HNET_BACKEND"] = args.backend
    if args.cache_bytes is not None:
        env["HNET_CACHE_BYTES"] = str(args.cache_bytes)
    for flag, var in (("device", "HNET_DEVICE"), ("cache_dtype", "HNET_CACHE_DTYPE")):
        if getattr(args, flag, None) is not None:
            env[var] = str(getattr(args, flag))
    if getattr(args, "watch", False):
        from hnet_serve.serving.admin import TOKEN_ENV, admin_token

        token = admin_token(env)
        if token is None:  # admin routes on, with a token only this process and the server know
            token = secrets.token_urlsafe(32)
            env[TOKEN_ENV] = token
        args.watch_token = token
    # Fail here, with a clear message, rather than in the server's log.
    config = ServingConfig.from_env(env)
    if env.get("HNET_DEVICE"):
        from hnet_serve.devices import resolve_device

        resolve_device(config.device)  # `cuda` on a machine without one: one line, now
    return env


def check_port_free(host: str, port: int) -> None:
    """:class:`ConfigError` ``port N is in use`` when nothing can listen on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} is in use") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


@dataclass
class Server:
    """A ``bentoml serve`` child process serving an imported checkpoint."""

    proc: subprocess.Popen
    url: str
    tag: str


def start_server(
    checkpoint: str, *, host: str = "127.0.0.1", port: int = 3000,
    args: argparse.Namespace | None = None,
) -> Server:
    """Import ``checkpoint`` and start ``bentoml serve`` in a child process.

    ``args`` carries the optional serving flags (backend, cache bytes, config file).
    """
    from hnet_serve.serving.store import import_checkpoint

    check_port_free(host, port)  # one line now, not a traceback from the child later
    opts = args or argparse.Namespace(config=None, backend=None, cache_bytes=None)
    serve_env(opts, "")  # bad settings (a missing GPU) fail before the model store is touched
    tag = import_checkpoint(checkpoint)
    env = serve_env(opts, tag)
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    sys.stdout.flush()
    # The server's log goes to stderr: stdout is kept for results (``--json``).
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr.fileno())
    return Server(proc, f"http://{host}:{port}", tag)


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Ask the server to stop (SIGINT, like Ctrl-C), kill it after ``timeout``; returns its code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _cmd_serve(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json

    if args.import_only:
        from hnet_serve.serving.store import import_checkpoint

        tag = import_checkpoint(args.checkpoint)
        if args.json:
            print_json({"model_tag": tag})
        else:
            print(tag)
        return 0

    server = start_server(args.checkpoint, host=args.host, port=args.port, args=args)
    if args.json:
        print_json({"model_tag": server.tag, "url": server.url})
    else:
        print(f"hnet-serve: checkpoint stored as {server.tag}; serving on {server.url} "
              "(Ctrl-C to stop)", file=sys.stderr)
    proc = server.proc
    watcher = start_watcher(args, server) if args.watch else None

    def _forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, _forward)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_server(proc)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if watcher is not None:
            watcher.stop()


def start_watcher(args: argparse.Namespace, server: Server) -> Any:
    """Poll ``args.checkpoint`` in a thread once the server is ready (``serve --watch``)."""
    import threading
    import time

    import httpx

    from hnet_serve.serving.store import import_checkpoint
    from hnet_serve.serving.watch import CheckpointWatcher, admin_call

    token = args.watch_token  # serve_env chose it
    watcher = CheckpointWatcher(
        args.checkpoint, stage=import_checkpoint, interval=args.watch_interval,
        reload=lambda tag: admin_call(server.url, "reload", {"checkpoint": tag}, token=token))

    def run() -> None:
        while server.proc.poll() is None:  # ready first: a reload needs a serving version
            try:
                if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        watcher.run()

    threading.Thread(target=run, name="hnet-watch", daemon=True).start()
    return watcher


def _cmd_reload(args: argparse.Namespace) -> int:
    from hnet_serve.console import print_json
    from hnet_serve.serving.watch import admin_call

    if args.rollback and (args.checkpoint or args.force):
        raise ConfigError("--rollback takes no --checkpoint or --force")
    body: dict[str, Any] = {} if args.rollback else {"checkpoint": args.checkpoint,
                                                     "force": args.force}
    print_json(admin_call(args.url, "rollback" if args.rollback else "reload", body,
                          timeout=args.timeout))
    return 0
