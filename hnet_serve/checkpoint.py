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

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hnet_serve import __version__
from hnet_serve.configs import first_problem
from hnet_serve.errors import CheckpointError, HNetError
from hnet_serve.fsutil import (
    check_output_dir,
    fsync_path,
    remove_stale_siblings,
    replace_dir,
    temp_sibling,
    write_synced,
)
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.registry import TaskRegistry
from hnet_serve.targets import TargetConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
HNET_PREFIX = "hnet."
EMBEDDINGS_KEY = "task_embeddings"
BUFFER_PREFIX = "buffers/"


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
            tensors[HNET_PREFIX + name] = p.detach()
    tensors[EMBEDDINGS_KEY] = model.hypernet.embeddings().detach()  # (T, E)
    for task, bufs in model.task_buffers.items():
        for bname, b in bufs.items():
            tensors[f"{BUFFER_PREFIX}{task}/{bname}"] = b.detach()
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}


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


def _serialize(model: HNetModel) -> tuple[bytes, dict[str, Any]]:
    """The weights file's bytes and the manifest (with its content hash) ``model`` saves as."""
    tensors = state_tensors(model)
    # One metadata key: safetensors writes a map's keys in no fixed order, and the file's bytes
    # must be deterministic for the content hash.
    weights = st_save(tensors, metadata={"format": f"hnet-serve/{FORMAT_VERSION}"})
    manifest = build_manifest(model, tensors)
    manifest["content_hash"] = _content_hash(manifest, weights)
    return weights, manifest


def state_hash(model: HNetModel) -> str:
    """The content hash :func:`save_checkpoint` would record for ``model`` now, without
    writing anything (equal to the checkpoint's hash for a model loaded and not changed)."""
    return str(_serialize(model)[1]["content_hash"])


def save_checkpoint(model: HNetModel, path: str | os.PathLike, *, _before_swap=None) -> str:
    """Write ``model`` to directory ``path`` atomically; returns the content hash.

    ``_before_swap`` is a test hook called after the temporary directory is complete.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    # The last line of defence of the output rule (fsutil.check_output_dir): the swap below
    # deletes what was at ``path``, so it must be nothing or a checkpoint.
    why = not_a_checkpoint(path) if path.is_dir() and any(path.iterdir()) else None
    if path.is_symlink() or why is not None:
        raise CheckpointError(f"{path} is not a checkpoint directory ({why or 'a symbolic link'})"
                              "; it is never replaced")
    weights, manifest = _serialize(model)

    tmp = temp_sibling(path)
    try:
        tmp.mkdir()
        write_synced(tmp / WEIGHTS, weights)
        write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        fsync_path(tmp)
        if _before_swap is not None:
            _before_swap(tmp)
        replace_dir(tmp, path)
        # Only now, with the new checkpoint in place: a save killed between the two renames
        # above leaves the previous checkpoint in ``.NAME.old-*``, its only copy until here.
        remove_stale_siblings(path)
    except OSError as exc:  # a full disk, a read-only directory: a clean error, nothing written
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    model.checkpoint_dir = Path(path).absolute()
    return manifest["content_hash"]


def not_a_checkpoint(path: str | os.PathLike) -> str | None:
    """None if ``path`` is a checkpoint directory that a save may replace: only our two files,
    neither a symlink, and a manifest that reads as a checkpoint. Otherwise why not."""
    path = Path(path)
    for entry in sorted(path.iterdir()):
        if entry.name not in (MANIFEST, WEIGHTS):
            return f"it holds {entry.name!r}, which is not a checkpoint file"
        if entry.is_symlink() or not entry.is_file():
            return f"its {entry.name} is not a regular file"
    try:
        read_manifest(path)
    except CheckpointError as exc:
        return f"no checkpoint manifest: {exc}"
    return None


def check_checkpoint_out(out: str | os.PathLike, *, overwrite: bool,
                         protect: dict[str, str | os.PathLike] | None = None) -> Path:
    """The absolute ``out`` path, if a checkpoint may be written there (see
    :func:`hnet_serve.fsutil.check_output_dir`): new, empty, or (``overwrite``) a checkpoint."""
    return check_output_dir(out, owned=not_a_checkpoint, overwrite=overwrite, protect=protect,
                            what="a checkpoint")


# -- loading ------------------------------------------------------------------------------
def _regular_member(path: Path, name: str) -> Path:
    """``path/name``, refusing a symlink (a checkpoint's members are its own files)."""
    member = path / name
    if member.is_symlink():
        raise CheckpointError(f"{member} is a symbolic link; a checkpoint's files must be its own")
    return member


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` only (no weights)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    mpath = _regular_member(path, MANIFEST)
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
        loc, msg = first_problem(exc)
        raise CheckpointError(f"{mpath}: invalid field {loc!r}: {msg}") from None
    return raw


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> HNetModel:
    """Load and fully validate a checkpoint directory; its tensors end up on ``map_location``
    (read on the CPU first: the file is device-free)."""
    path = Path(path)
    raw = read_manifest(path)
    man = Manifest.model_validate(raw)
    wpath = _regular_member(path, WEIGHTS)
    if not wpath.is_file():
        raise CheckpointError(f"missing {WEIGHTS} in checkpoint {str(path)!r}")
    _check_weights_size(man, wpath)
    try:
        weights = wpath.read_bytes()
    except (OSError, MemoryError) as exc:
        raise CheckpointError(f"{wpath}: cannot read ({exc})") from None
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
        HNET_PREFIX + n: tuple(p.shape) for n, p in probe.hypernet.named_parameters()
    }
    expected[EMBEDDINGS_KEY] = (len(registry), probe.hypernet.emb_dim)
    for task in registry.names:
        for bname, shape in probe.target.buffer_shapes.items():
            expected[f"{BUFFER_PREFIX}{task}/{bname}"] = shape
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
                p.copy_(tensors[HNET_PREFIX + name])
    model.registry = registry
    for row in tensors[EMBEDDINGS_KEY]:
        hn.add_task(row)
    for task in registry.names:
        model.task_buffers[task] = {
            b: tensors[f"{BUFFER_PREFIX}{task}/{b}"].clone() for b in model.target.buffer_shapes
        }
    if str(map_location) != "cpu":
        model.to(map_location)  # hypernetwork, target and per-task buffers together
    model.checkpoint_dir = Path(path).absolute()
    return model


_MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header


def _check_weights_size(man: Manifest, wpath: Path) -> None:
    """Refuse, before reading it, a weights file larger than the manifest's tensor index needs
    (8-byte length + header + data): a file larger than memory is never read whole. A smaller
    one is read and reported by the content hash check."""
    data = 0
    for key, entry in man.tensors.items():
        dtype = getattr(torch, entry.dtype, None)
        if not isinstance(dtype, torch.dtype) or any(d < 0 for d in entry.shape):
            raise CheckpointError(f"{wpath.parent / MANIFEST}: invalid tensor entry {key!r}")
        data += math.prod(entry.shape) * torch.empty((), dtype=dtype).element_size()
    try:
        size = wpath.stat().st_size
        with open(wpath, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
    except OSError as exc:
        raise CheckpointError(f"{wpath}: cannot read ({exc})") from None
    limit = 8 + min(header, _MAX_HEADER) + data
    if size > limit:
        raise CheckpointError(
            f"{wpath}: {size:,} bytes, more than the {limit:,} its manifest's tensors take "
            "(file modified or not this checkpoint's); not read")


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
    """Name -> size of the checkpoint's regular files (symlinks are not followed or listed)."""
    path = Path(path)
    return {p.name: p.stat().st_size for p in sorted(path.iterdir())
            if not p.is_symlink() and p.is_file()}
