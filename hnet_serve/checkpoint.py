"""The checkpoint format: a directory with ``manifest.json`` and ``weights.safetensors``.

* No pickle: tensors live in safetensors, everything else in JSON validated by pydantic.
* ``manifest.json`` holds the format version, package version, the target and hypernetwork
  configs, the task registry, the index of per-task buffers, an index of every tensor (shape,
  dtype) and a content hash (sha256 over the weights file and the canonical manifest).
* Saving is atomic: the new directory is written to a temporary sibling, fsynced, then swapped
  in with one ``renameat2(RENAME_EXCHANGE)`` (Linux) or two renames elsewhere. A crash at any
  point leaves the previous checkpoint loadable.
* Loading validates everything and raises :class:`CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hnet_serve import __version__
from hnet_serve.errors import CheckpointError, HNetError
from hnet_serve.fsutil import fsync_path, remove_stale_siblings, temp_sibling, write_synced
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.registry import TaskRegistry
from hnet_serve.targets import TargetConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
_HNET = "hnet."
_EMB = "task_embeddings"
_BUF = "buffers/"


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    package_version: str
    target: TargetConfig
    hypernet: HypernetConfig
    tasks: list[dict[str, Any]]
    buffers: dict[str, list[str]] = Field(default_factory=dict)
    tensors: dict[str, TensorEntry]
    # The hypernetwork -> target contract: ordered name -> shape of every generated parameter.
    param_shapes: dict[str, list[int]]
    meta: dict[str, Any] = Field(default_factory=dict)
    content_hash: str = ""


# -- hashing ------------------------------------------------------------------------------
def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _content_hash(manifest: dict[str, Any], weights: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    h = hashlib.sha256()
    h.update(hashlib.sha256(weights).digest())
    h.update(_canonical(body))
    return h.hexdigest()


# -- saving -------------------------------------------------------------------------------
def state_tensors(model: HNetModel) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint stores, by key."""
    tensors: dict[str, torch.Tensor] = {}
    emb_ids = {id(p) for p in model.hypernet.task_embs}
    for name, p in model.hypernet.named_parameters():
        if id(p) not in emb_ids:
            tensors[_HNET + name] = p.detach()
    tensors[_EMB] = model.hypernet.embeddings().detach()  # (T, E)
    for task, bufs in model.task_buffers.items():
        for bname, b in bufs.items():
            tensors[f"{_BUF}{task}/{bname}"] = b.detach()
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def build_manifest(model: HNetModel, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "target": model.target_config.model_dump(mode="json"),
        "hypernet": model.hypernet_config.model_dump(mode="json"),
        "tasks": model.registry.to_list(),
        "buffers": {t: sorted(b) for t, b in model.task_buffers.items()},
        "param_shapes": {n: list(s) for n, s in model.target.param_shapes.items()},
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(tensors.items())
        },
        "meta": model.meta,
    }


def save_checkpoint(model: HNetModel, path: str | os.PathLike, *, _before_swap=None) -> str:
    """Write ``model`` to directory ``path`` atomically; returns the content hash.

    ``_before_swap`` is a test hook called after the temporary directory is complete.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    tensors = state_tensors(model)
    # One metadata key: safetensors writes a map's keys in no fixed order, and the file's bytes
    # must be deterministic for the content hash.
    weights = st_save(tensors, metadata={"format": f"hnet-serve/{FORMAT_VERSION}"})
    manifest = build_manifest(model, tensors)
    manifest["content_hash"] = _content_hash(manifest, weights)

    tmp = temp_sibling(path)
    try:
        tmp.mkdir()
        write_synced(tmp / WEIGHTS, weights)
        write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        fsync_path(tmp)
        if _before_swap is not None:
            _before_swap(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the previous checkpoint
        else:
            old = temp_sibling(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        fsync_path(path.parent)
        # Only now, with the new checkpoint in place: a save killed between the two renames
        # above leaves the previous checkpoint in ``.NAME.old-*``, its only copy until here.
        remove_stale_siblings(path)
    except OSError as exc:  # a full disk, a read-only directory: a clean error, nothing written
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest["content_hash"]


# -- loading ------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` only (no weights)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"missing {MANIFEST} in checkpoint {str(path)!r}")
    try:
        raw = json.loads(mpath.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{mpath}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: unsupported format version {version!r} (this hnet-serve reads "
            f"version {FORMAT_VERSION})"
        )
    try:
        Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{mpath}: invalid field {loc!r}: {first['msg']}") from None
    return raw


def load_checkpoint(path: str | os.PathLike, *, map_location: str = "cpu") -> HNetModel:
    """Load and fully validate a checkpoint directory."""
    path = Path(path)
    raw = read_manifest(path)
    man = Manifest.model_validate(raw)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"missing {WEIGHTS} in checkpoint {str(path)!r}")
    weights = wpath.read_bytes()
    if _content_hash(raw, weights) != man.content_hash:
        try:
            st_load(weights)
            why = "file modified"
        except Exception:  # noqa: BLE001 - safetensors raises several types on bad bytes
            why = "file truncated or corrupt"
        raise CheckpointError(
            f"{wpath}: content hash mismatch ({why}); expected {man.content_hash[:16]}..."
        )
    try:
        tensors = st_load(weights)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{wpath}: cannot read safetensors data ({exc})") from None

    try:
        registry = TaskRegistry.from_list(man.tasks)
        # Build on the meta device first: the configs are checked against the stored tensors
        # before anything is allocated, so a crafted manifest cannot request a huge model.
        with torch.device("meta"):
            probe = HNetModel(man.target, man.hypernet)
    except (HNetError, ValidationError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path}: invalid configs or task registry ({exc})") from None
    _check_tensors(man, tensors, wpath)
    _check_registry(registry, man, path)
    built = {n: list(s) for n, s in probe.target.param_shapes.items()}
    if built != man.param_shapes:  # JSON keys are sorted; the order comes from the target
        diff = [n for n in {**built, **man.param_shapes} if built.get(n) != man.param_shapes.get(n)]
        raise CheckpointError(
            f"{path / MANIFEST}: target config does not match the recorded parameter shapes "
            f"(shape mismatch for {diff[:3]})"
        )
    expected = {
        _HNET + n: tuple(p.shape) for n, p in probe.hypernet.named_parameters()
    }
    expected[_EMB] = (len(registry), probe.hypernet.emb_dim)
    for task in registry.names:
        for bname, shape in probe.target.buffer_shapes.items():
            expected[f"{_BUF}{task}/{bname}"] = shape
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{wpath}: tensors do not match the configs (missing: {missing[:5]}, "
            f"unexpected: {extra[:5]})"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{wpath}: shape mismatch for {key!r}: stored {list(tensors[key].shape)}, "
                f"configs require {list(shape)}"
            )

    model = HNetModel(man.target, man.hypernet, meta=man.meta)
    hn = model.hypernet
    emb_ids = {id(p) for p in hn.task_embs}
    with torch.no_grad():
        for name, p in hn.named_parameters():
            if id(p) not in emb_ids:
                p.copy_(tensors[_HNET + name])
    model.registry = registry
    for row in tensors[_EMB]:
        hn.add_task(row)
    for task in registry.names:
        model.task_buffers[task] = {
            b: tensors[f"{_BUF}{task}/{b}"].clone() for b in model.target.buffer_shapes
        }
    if map_location != "cpu":
        hn.to(map_location)
    return model


def _check_registry(registry: TaskRegistry, man: Manifest, path: Path) -> None:
    cfg = man.target
    for t in registry:
        if tuple(t.input_shape) != tuple(cfg.input_shape):
            raise CheckpointError(
                f"{path / MANIFEST}: task {t.name!r} input shape {list(t.input_shape)} differs "
                f"from the target's {list(cfg.input_shape)}"
            )
        if t.num_classes > cfg.num_classes or t.head >= cfg.num_heads:
            raise CheckpointError(
                f"{path / MANIFEST}: task {t.name!r} needs {t.num_classes} classes on head "
                f"{t.head}; the target has {cfg.num_classes} classes x {cfg.num_heads} heads"
            )


def _check_tensors(man: Manifest, tensors: dict[str, torch.Tensor], wpath: Path) -> None:
    if set(man.tensors) != set(tensors):
        raise CheckpointError(f"{wpath}: tensor index in {MANIFEST} does not match the file")
    for key, entry in man.tensors.items():
        t = tensors[key]
        if list(t.shape) != entry.shape or str(t.dtype).removeprefix("torch.") != entry.dtype:
            raise CheckpointError(f"{wpath}: tensor {key!r} differs from its manifest entry")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{wpath}: tensor {key!r} holds NaN or inf values")


def checkpoint_hash(path: str | os.PathLike) -> str:
    """The content hash recorded in a checkpoint's manifest (validated on load)."""
    return str(read_manifest(path)["content_hash"])


def checkpoint_files(path: str | os.PathLike) -> dict[str, int]:
    path = Path(path)
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
