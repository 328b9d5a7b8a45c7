"""Checkpoints in the BentoML model store.

``import_checkpoint(dir)`` validates a checkpoint (a full load: format, shapes, hash) and copies
it into the store as ``hnet:<first 16 hex digits of its content hash>``, labelled with its task
count and target kind. The version is the content, so importing the same checkpoint twice is a
no-op and two different checkpoints never share a tag. The store's location is BentoML's
(``$BENTOML_HOME/models``, default ``~/bentoml/models``).
"""

from __future__ import annotations

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
        stored = checkpoint_dir(existing)
        if (stored / MANIFEST).is_file():
            return str(existing.tag)
        bentoml.models.delete(tag)  # an incomplete entry: replace it
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
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as stored_model:
        dest = Path(stored_model.path) / CHECKPOINT_SUBDIR
        dest.mkdir()
        for name in (MANIFEST, WEIGHTS):
            shutil.copy2(Path(path) / name, dest / name)
    return str(stored_model.tag)


def checkpoint_dir(stored_model: Any) -> Path:
    """The checkpoint directory inside a stored BentoML model (``bentoml.Model``)."""
    path = Path(stored_model.path) / CHECKPOINT_SUBDIR
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"model {stored_model.tag} in the BentoML store holds no hnet-serve checkpoint "
            f"(expected {path / MANIFEST}); import one with `hnet-serve serve DIR`"
        )
    return path
