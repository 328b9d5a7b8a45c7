"""Shared fixtures: tiny models built inside the tests (no downloads, a few ms each)."""

from __future__ import annotations

import pytest
import torch

from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.targets import MLPConfig, ResNetConfig


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where torch sees a GPU; elsewhere they skip cleanly."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_mlp_model(
    n_tasks: int = 3,
    *,
    input_size: int = 12,
    hidden: tuple[int, ...] = (16, 8),
    num_classes: int = 3,
    kind: str = "chunked",
    chunk_size: int = 50,
    seed: int = 0,
    layout: str = "flat",
    task_chunk_emb_dim: int = 0,
    adapter_rank: int = 0,
    adapter_layers: int = 1,
) -> HNetModel:
    """A small MLP target with a chunked (truncated last chunk) or full hypernetwork."""
    model = HNetModel(
        MLPConfig(input_shape=(input_size,), hidden=list(hidden), num_classes=num_classes),
        HypernetConfig(kind=kind, hidden=[10, 10], task_emb_dim=6, chunk_emb_dim=4,
                       chunk_size=chunk_size, layout=layout,
                       task_chunk_emb_dim=task_chunk_emb_dim, adapter_rank=adapter_rank,
                       adapter_layers=adapter_layers),
        seed=seed,
    )
    for i in range(n_tasks):
        model.add_task(f"task-{i}")
    return model


def tiny_adapter_model(n_tasks: int = 3, *, seed: int = 0, kind: str = "chunked",
                       layers: int = 1) -> HNetModel:
    """The tiny MLP whose tasks each keep a rank-2 private correction of the first ``layers``
    layers, set to non-zero values as after training (a fresh task's ``U`` is zero)."""
    model = tiny_mlp_model(n_tasks, adapter_rank=2, seed=seed, kind=kind,
                           adapter_layers=layers)
    hn = model.hypernet
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for row in hn.task_embs:
            row[hn.code_dim:] = torch.randn(hn.adapter_dim, generator=g) * 0.3
    return model


def tiny_trunk_model(n_tasks: int = 3, *, basis: str = "shared", mode: str = "replace",
                     rank: int = 2, seed: int = 0) -> HNetModel:
    """The tiny MLP (12 -> 16 -> 8 -> 3) whose first layer is each task's own rank-``rank``
    ``U V`` (``mode`` replace: not generated), over a ``basis`` shared or private ``U``."""
    cfg = HypernetConfig(kind="chunked", hidden=[10, 10], task_emb_dim=6, chunk_emb_dim=4,
                         chunk_size=30, adapter_rank=rank, adapter_mode=mode,
                         adapter_basis=basis, freeze="after-first-task")
    model = HNetModel(MLPConfig(input_shape=(12,), hidden=[16, 8], num_classes=3), cfg,
                      seed=seed)
    for i in range(n_tasks):
        model.add_task(f"t{i}")
    return model


def tiny_columns_model(n_tasks: int = 3, *, seed: int = 0) -> HNetModel:
    """The tiny MLP with a column-chunked hypernetwork and per-task chunk codes."""
    return tiny_mlp_model(n_tasks, layout="columns", task_chunk_emb_dim=2, seed=seed)


def tiny_resnet_model(n_tasks: int = 2, *, seed: int = 0, layout: str = "flat") -> HNetModel:
    """ResNet-8 on 3x8x8 images: the same code path as ResNet-32, small enough for tests."""
    model = HNetModel(
        ResNetConfig(input_shape=(3, 8, 8), num_classes=4, blocks_per_stage=1, width=4,
                     input_mean=[0.5, 0.5, 0.5], input_std=[0.25, 0.25, 0.25]),
        HypernetConfig(kind="chunked", hidden=[8], task_emb_dim=5, chunk_emb_dim=3,
                       chunk_size=300, layout=layout,
                       task_chunk_emb_dim=2 if layout == "columns" else 0),
        seed=seed,
    )
    for i in range(n_tasks):
        model.add_task(f"img-{i}")
    # Distinct, non-trivial batch-norm statistics per task, as after training.
    g = torch.Generator().manual_seed(seed + 1)
    for bufs in model.task_buffers.values():
        for name, b in bufs.items():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            else:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def one_thread():
    """Tiny networks: intra-op threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mlp_model() -> HNetModel:
    return tiny_mlp_model()


@pytest.fixture
def resnet_model() -> HNetModel:
    return tiny_resnet_model()


def save_service_checkpoint(path):
    """The service tests' checkpoint: three 10-class tasks and a labelled binary one."""
    from hnet_serve.checkpoint import save_checkpoint

    model = tiny_mlp_model(3)
    model.add_task("binary", num_classes=2, label_names=["no", "yes"])
    save_checkpoint(model, path)
    return path


def normed_mlp_model(mode: str = "per-feature", n_tasks: int = 3, *,
                     input_shape: tuple[int, ...] = (6,), seed: int = 0) -> HNetModel:
    """A tiny MLP that normalizes each task's inputs with its own (fitted) statistics; task
    ``i``'s features live on scales 10**(j - 2) (1e-2 .. 1e3), shifted per task."""

    from hnet_serve.normalization import fit_norm

    model = HNetModel(
        MLPConfig(input_shape=input_shape, hidden=[9], num_classes=4, input_norm=mode),
        HypernetConfig(kind="chunked", hidden=[10], task_emb_dim=4, chunk_emb_dim=3,
                       chunk_size=40),
        seed=seed,
    )
    for i in range(n_tasks):
        model.add_task(f"norm-{i}", input_norm=fit_norm(
            scaled_inputs(64, input_shape, seed=seed + i, shift=i), mode, input_shape))
    return model


def scaled_inputs(n: int, input_shape: tuple[int, ...], *, seed: int = 0, shift: float = 0.0):
    """``(n, *input_shape)`` float32 rows whose features sit on scales 1e-2 .. 1e3."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = int(np.prod(input_shape))
    scales = 10.0 ** np.linspace(-2, 3, size)
    x = (rng.normal(size=(n, size)) + 3 + shift) * scales
    return x.reshape(n, *input_shape).astype(np.float32)
