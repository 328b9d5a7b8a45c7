"""A file cache for traced ONNX graph templates: trace a checkpoint's target once, not per run.

Tracing with the torch exporter costs seconds (ResNet targets, explicit opsets; MLP targets at
the default opset are written directly by :mod:`hnet_serve.onnx_mlp` and never traced). The
traced template holds no weights, so it is small (KBs) and safe to keep.

**Key**: sha256 over the checkpoint's content hash, the target config, the opset asked for, the
graph kind and the versions of hnet-serve, torch and onnx: a different checkpoint, target,
opset or exporter never reads an old entry.

**File**: one line of JSON (key, sha256 and size of the payload, extra fields) then the payload
(a serialized ``ModelProto``), written atomically (:func:`hnet_serve.fsutil.write_atomic`). On
load the header, key, size and digest are checked and the proto is parsed; anything wrong
(truncated, corrupted, another key) counts as a miss: the graph is traced again and the file
rewritten, and a bad file is never used. Callers still run their own check of the graph
(``TaskGraph`` runs it once in ONNX Runtime against PyTorch).

**Where**: ``$HNET_SERVE_GRAPH_CACHE`` if set (``off`` disables the cache), else a hidden
``.hnet-serve-cache/`` folder beside the checkpoint directory (never inside it: a checkpoint
directory holds only its own two files, see ``checkpoint.not_a_checkpoint``), else, when that
folder cannot be written, ``$XDG_CACHE_HOME/hnet-serve/graphs`` (``~/.cache/...``). A model that
was not loaded from or saved to a checkpoint is not cached. Write failures are ignored (a cache
is an optimization, never a reason to fail).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hnet_serve import __version__
from hnet_serve.fsutil import write_atomic

if TYPE_CHECKING:
    import onnx

    from hnet_serve.model import HNetModel

ENV_VAR = "HNET_SERVE_GRAPH_CACHE"
SIBLING_DIR = ".hnet-serve-cache"
FORMAT = "hnet-serve-graph/1"
_MAX_HEADER = 1 << 20

log = logging.getLogger(__name__)


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hnet-serve" / "graphs"


def _writable(folder: Path) -> bool:
    """``folder`` exists (created if needed) and a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cache_dir(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """Where graphs of the checkpoint at ``checkpoint_dir`` are cached; None: not cached."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "false", "no"):
            return None
        return Path(env).expanduser() if _writable(Path(env).expanduser()) else None
    if checkpoint_dir is None:
        return None
    beside = Path(checkpoint_dir).absolute().parent / SIBLING_DIR / "graphs"
    if _writable(beside):
        return beside
    user = _user_cache_dir()
    return user if _writable(user) else None


def graph_key(content_hash: str, target_config: dict[str, Any], *, kind: str,
              opset: int | None) -> str:
    """The cache key of a graph: what it was traced from and with."""
    import onnx
    import torch

    body = {
        "format": FORMAT, "content_hash": content_hash, "target": target_config, "kind": kind,
        "opset": opset, "hnet_serve": __version__, "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_entry(path: Path, key: str) -> tuple[onnx.ModelProto, dict[str, Any]] | None:
    """The cached proto and its extra fields, or None if the file is missing or not valid for
    ``key`` (wrong key, size or digest; unreadable header or proto)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        data = path.read_bytes()
    except OSError:
        return None
    end = data.find(b"\n", 0, _MAX_HEADER)
    try:
        header = json.loads(data[:end]) if end > 0 else None
    except (ValueError, UnicodeDecodeError):
        header = None
    payload = data[end + 1 :]
    if (not isinstance(header, dict) or header.get("format") != FORMAT
            or header.get("key") != key or header.get("size") != len(payload)
            or header.get("sha256") != hashlib.sha256(payload).hexdigest()):
        log.warning("ignoring invalid graph cache file %s", path)
        return None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(payload)
    except DecodeError:  # pragma: no cover - the digest matched: only a hash collision
        return None
    return proto, dict(header.get("extra") or {})


def write_entry(path: Path, key: str, proto: onnx.ModelProto, extra: dict[str, Any]) -> bool:
    """Write one entry atomically; False (and nothing written) if the folder refuses."""
    payload = proto.SerializeToString()
    header = {"format": FORMAT, "key": key, "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), "extra": extra}
    try:
        write_atomic(path, json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
    except OSError as exc:
        log.info("graph cache not written (%s): %s", path, exc)
        return False
    return True


def _entry(model: HNetModel, content_hash: str, kind: str,
           opset: int | None) -> tuple[Path, str] | None:
    """The cache file and key of ``model``'s graph of ``kind``; None: not cached."""
    folder = cache_dir(getattr(model, "checkpoint_dir", None))
    if folder is None:
        return None
    key = graph_key(content_hash, model.target_config.model_dump(mode="json"), kind=kind,
                    opset=opset)
    return folder / f"{kind}-{key[:32]}.onnxcache", key


def cached_graph(model: HNetModel, content_hash: str, *, kind: str, opset: int | None,
                 build: Callable[[], tuple[onnx.ModelProto, dict[str, Any]]],
                 ) -> tuple[onnx.ModelProto, dict[str, Any], bool]:
    """``build()``'s ``(proto, extra)`` for ``model``, read from the cache when a valid entry
    exists, else built and stored. Returns ``(proto, extra, hit)``; ``extra`` must be JSON."""
    entry = _entry(model, content_hash, kind, opset)
    if entry is not None:
        hit = read_entry(*entry)
        if hit is not None:
            return hit[0], hit[1], True
    proto, extra = build()
    if entry is not None:
        write_entry(entry[0], entry[1], proto, extra)
    return proto, extra, False


def write_graph_entry(model: HNetModel, content_hash: str, kind: str, opset: int | None,
                      proto: onnx.ModelProto, extra: dict[str, Any]) -> None:
    """Replace ``model``'s cached graph of ``kind`` (after a cached one was rejected)."""
    entry = _entry(model, content_hash, kind, opset)
    if entry is not None:
        write_entry(entry[0], entry[1], proto, extra)
