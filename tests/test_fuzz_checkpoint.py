"""Fuzzing the checkpoint loader: every malformed manifest or weights file raises CheckpointError.

Mutations keep the content hash consistent where it matters (an attacker can recompute a hash),
so the checks behind it are exercised too, and a crafted manifest must not trigger a huge
allocation (the configs are checked on the meta device before anything is built).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hnet_serve.checkpoint import MANIFEST, WEIGHTS, _content_hash, load_checkpoint, save_checkpoint
from hnet_serve.errors import CheckpointError
from tests.conftest import tiny_mlp_model

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("pristine") / "ck"
    save_checkpoint(tiny_mlp_model(), ck)
    return ck


def _fresh(pristine: Path, tmp: Path) -> Path:
    ck = tmp / "ck"
    if ck.exists():
        shutil.rmtree(ck)
    shutil.copytree(pristine, ck)
    return ck


def _paths(obj, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _load_or_checkpoint_error(ck: Path) -> None:
    try:
        load_checkpoint(ck)
    except CheckpointError:
        pass


@FUZZ
@given(data=st.data(), value=json_values, rehash=st.booleans())
def test_manifest_value_mutations(pristine, tmp_path, data, value, rehash):
    ck = _fresh(pristine, tmp_path)
    manifest = json.loads((ck / MANIFEST).read_text())
    paths = [p for p in _paths(manifest) if p and p[0] != "content_hash"]
    path = data.draw(st.sampled_from(paths))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if rehash:
        manifest["content_hash"] = _content_hash(manifest, (ck / WEIGHTS).read_bytes())
    (ck / MANIFEST).write_text(json.dumps(manifest))
    _load_or_checkpoint_error(ck)


@FUZZ
@given(
    target=st.fixed_dictionaries({
        "kind": st.sampled_from(["mlp", "resnet", "x"]),
        "input_shape": st.lists(st.integers(-2, 10**7), max_size=4),
        "hidden": st.lists(st.integers(-2, 10**9), max_size=3),
        "num_classes": st.integers(-1, 10**9),
    }),
    chunk=st.integers(-5, 10**12),
)
def test_crafted_configs_never_allocate_huge_models(pristine, tmp_path, target, chunk):
    """Valid-hash manifests asking for enormous models fail fast with CheckpointError."""
    ck = _fresh(pristine, tmp_path)
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["target"].update(target)
    manifest["hypernet"]["chunk_size"] = chunk
    manifest["content_hash"] = _content_hash(manifest, (ck / WEIGHTS).read_bytes())
    (ck / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)


@FUZZ
@given(data=st.binary(max_size=2048), mode=st.sampled_from(["replace", "truncate", "flip", "prefix"]),
       pos=st.integers(0, 10**6), rehash=st.booleans())
def test_weights_file_mutations(pristine, tmp_path, data, mode, pos, rehash):
    ck = _fresh(pristine, tmp_path)
    raw = (ck / WEIGHTS).read_bytes()
    if mode == "replace":
        new = data
    elif mode == "truncate":
        new = raw[: pos % len(raw)]
    elif mode == "flip":
        i = pos % len(raw)
        new = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :]
    else:  # a forged header length in front of garbage
        new = (pos * 7919).to_bytes(8, "little") + data
    (ck / WEIGHTS).write_bytes(new)
    if rehash:
        manifest = json.loads((ck / MANIFEST).read_text())
        manifest["content_hash"] = _content_hash(manifest, new)
        (ck / MANIFEST).write_text(json.dumps(manifest))
    if new == raw:
        load_checkpoint(ck)
    elif rehash:
        # A re-hashed file whose tensor bytes changed can still be a valid checkpoint (a
        # flipped float); anything structurally wrong must be a CheckpointError.
        _load_or_checkpoint_error(ck)
    else:
        with pytest.raises(CheckpointError):
            load_checkpoint(ck)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_manifest_garbage(pristine, tmp_path, text):
    ck = _fresh(pristine, tmp_path)
    (ck / MANIFEST).write_bytes(text.encode("utf-8", "surrogatepass"))
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)


def test_deeply_nested_manifest(pristine, tmp_path):
    ck = _fresh(pristine, tmp_path)
    (ck / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)
