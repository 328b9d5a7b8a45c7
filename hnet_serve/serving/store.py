"""Checkpoints in the BentoML model store.

``import_checkpoint(dir)`` validates a checkpoint (a full load: format, shapes, hash) and copies
it into the store (then verifies the copy the same way) as ``hnet:<first 16 hex digits of its content hash>``, labelled with its task
count and target kind. The version is the content, so importing the same checkpoint twice is a
no-op and two different checkpoints never share a tag. A stored copy found damaged on a later
import (bit rot, a copy cut short) is not trusted: it is verified in full every time and
replaced from the source. The store's location is BentoML's
(``$BENTOML_HOME/models``, default ``~/bentoml/models``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from hnet_serve.checkpoint import MANIFEST, WEIGHTS, load_checkpoint, read_manifest
from hnet_serve.errors import CheckpointError

MODEL_NAME = "hnet"
CHECKPOINT_SUBDIR = "checkpoint"
TAG_VERSION_CHARS = 16


def checkpoint_tag(path: str | os.PathLike) -> str:
    """The model-store tag a checkpoint gets: ``hnet:<content hash prefix>``."""
    return f"{MODEL_NAME}:{read_manifest(path)['content_hash'][:TAG_VERSION_CHARS]}"


def import_checkpoint(path: str | os.PathLike) -> str:
    """Validate ``path`` and add it to the model store (if not there yet); returns its tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    model = load_checkpoint(path)  # full validation: never store a broken checkpoint
    tag = checkpoint_tag(path)
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if stored_copy_problem(existing) is None:
            return str(existing.tag)
        bentoml.models.delete(tag)  # incomplete or damaged (bit rot, a partial copy): replace it
    info = model.info()
    labels = {
        "tasks": str(len(model.registry)),
        "target": str(info["target"]["kind"]),
        "format": "hnet-serve",
    }
    metadata: dict[str, Any] = {
        "content_hash": read_manifest(path)["content_hash"],
        "task_names": model.registry.names[:1000],
        "target_params": info["target_params"],
        "hypernet_params": info["hypernet_params"],
        "source": str(Path(path).absolute()),
    }
    try:
        with bentoml.models.create(tag, labels=labels, metadata=metadata) as stored_model:
            dest = Path(stored_model.path) / CHECKPOINT_SUBDIR
            dest.mkdir()
            for name in (MANIFEST, WEIGHTS):
                shutil.copy2(Path(path) / name, dest / name)
    except OSError as exc:  # a full disk, a read-only store: one line, no half entry
        with contextlib.suppress(Exception):
            bentoml.models.delete(tag)
        raise CheckpointError(f"cannot import {path} into the BentoML model store: "
                              f"{exc.strerror or exc}") from None
    problem = stored_copy_problem(bentoml.models.get(tag))
    if problem is not None:
        bentoml.models.delete(tag)
        raise CheckpointError(f"the model-store copy of {path} does not verify after import "
                              f"({problem}); nothing kept")
    return str(stored_model.tag)


def stored_copy_problem(stored_model: Any) -> str | None:
    """None if the stored copy is a complete checkpoint whose files match its content hash and
    the tag's version (a full load); otherwise what is wrong with it."""
    try:
        path = checkpoint_dir(stored_model)
        load_checkpoint(path)
        content_hash = read_manifest(path)["content_hash"]
    except CheckpointError as exc:
        return str(exc)
    if not content_hash.startswith(str(stored_model.tag.version)):
        return f"its content hash {content_hash[:16]} is not its tag's version"
    return None


def checkpoint_dir(stored_model: Any) -> Path:
    """The checkpoint directory inside a stored BentoML model (``bentoml.Model``)."""
    path = Path(stored_model.path) / CHECKPOINT_SUBDIR
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"model {stored_model.tag} in the BentoML store holds no hnet-serve checkpoint "
            f"(expected {path / MANIFEST}); import one with `hnet-serve serve DIR`"
        )
    return path
