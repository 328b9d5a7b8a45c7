"""Evaluation: accuracies, the continual-learning metrics, weight drift, and the report plots.

The accuracy matrix ``R[i][j]`` is the accuracy on task j after training task i (``None`` for
j > i). From it: final mean accuracy (last row), backward transfer
``BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j])`` and forgetting
``1/(T-1) Σ_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])`` (Lopez-Paz & Ranzato 2017;
Chaudhry et al. 2018).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hnet_serve.devices import to_device
from hnet_serve.drift import weight_drift  # noqa: F401 - re-exported: add-task and tests use it here
from hnet_serve.model import HNetModel
from hnet_serve.training.data import (
    DataError,
    TaskData,
)

Predict = Callable[[torch.Tensor], torch.Tensor]


# -- accuracies -----------------------------------------------------------------------------
@torch.no_grad()
def accuracy_of(predict: Predict, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Fraction of rows of ``x`` whose arg-max logit from ``predict`` equals ``y``."""
    if len(y) == 0:
        raise DataError("cannot compute an accuracy on zero examples")
    correct = 0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
        pred = predict(xb).argmax(dim=1).cpu().numpy()  # (B,)
        correct += int((pred == y[start : start + batch_size]).sum())
    return correct / len(y)


def predictor(model: HNetModel, task_name: str) -> Predict:
    """Logits function for one task with its weights generated once (eval mode)."""
    with torch.no_grad():
        weights = model.generate([task_name])[0]  # (n_params,)
    return lambda xb: model.logits(task_name, to_device(xb, weights.device), weights=weights)


def accuracy(
    model: HNetModel, task_name: str, x: np.ndarray, y: np.ndarray, batch_size: int = 1000
) -> float:
    """Test accuracy of the checkpoint's task ``task_name`` on inputs ``x`` and labels ``y``."""
    return accuracy_of(predictor(model, task_name), x, y, batch_size)


def evaluate_tasks(
    model: HNetModel, tasks: list[TaskData], batch_size: int = 1000
) -> dict[str, float]:
    return {t.name: accuracy(model, t.name, t.x_test, t.y_test, batch_size) for t in tasks}


# -- continual-learning metrics -------------------------------------------------------------
def continual_metrics(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """Final mean accuracy, BWT and forgetting from an accuracy matrix (fractions)."""
    t = len(matrix)
    if t == 0:
        return {"mean_accuracy": None, "bwt": None, "forgetting": None}
    last = [v for v in matrix[-1][:t] if v is not None]
    out: dict[str, float | None] = {"mean_accuracy": float(np.mean(last)) if last else None}
    if t < 2:
        out.update(bwt=0.0, forgetting=0.0)
        return out
    bwt = [matrix[-1][j] - matrix[j][j] for j in range(t - 1)]
    forget = [max(matrix[i][j] for i in range(j, t - 1)) - matrix[-1][j] for j in range(t - 1)]
    out.update(bwt=float(np.mean(bwt)), forgetting=float(np.mean(forget)))
    return out


def evaluate_model(model: HNetModel, tasks: dict[str, TaskData], batch_size: int = 1000
                   ) -> dict[str, Any]:
    """Accuracy per task (checkpoint task order) and their mean."""
    accs = {
        name: accuracy(model, name, tasks[name].x_test, tasks[name].y_test, batch_size)
        for name in model.task_names if name in tasks
    }
    mean = float(np.mean(list(accs.values()))) if accs else None
    return {"mean_accuracy": mean, "accuracy": accs}


# -- plots ----------------------------------------------------------------------------------
def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_matrix(
    matrix: list[list[float | None]], names: list[str], path: str | os.PathLike, title: str = ""
) -> None:
    """PNG heatmap of R[i][j] (rows: after training task i; columns: evaluated on task j)."""
    plt = pyplot()
    t = len(matrix)
    data = np.full((t, len(names)), np.nan)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                data[i, j] = 100 * v
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    lo = float(np.nanmin(data)) if t else 0.0
    hi = max(float(np.nanmax(data)) if t else 100.0, lo + 1.0)  # contrast for close values
    im = ax.imshow(data, cmap="viridis", vmin=lo, vmax=hi)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(t), names[:t], fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    if len(names) <= 20:
        for i in range(t):
            for j in range(len(names)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if data[i, j] < (lo + hi) / 2 else "black")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title or "accuracy matrix R[i][j]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def embedding_pca(model: HNetModel) -> np.ndarray:
    """Task embeddings projected onto their first two principal components: (T, 2)."""
    emb = model.hypernet.embeddings().detach().numpy().astype(np.float64)  # (T, E)
    centered = emb - emb.mean(axis=0, keepdims=True)
    if len(emb) < 2:
        return np.zeros((len(emb), 2))
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    comps = vt[:2]
    proj = centered @ comps.T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
    return proj


def plot_embeddings(model: HNetModel, path: str | os.PathLike, title: str = "") -> None:
    """PNG of the task-embedding space (PCA to 2-D), one labelled point per task."""
    plt = pyplot()
    proj = embedding_pca(model)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(proj[:, 0], proj[:, 1], c=np.arange(len(proj)), cmap="viridis", s=40)
    if len(proj) <= 30:
        for name, (px, py) in zip(model.task_names, proj):
            ax.annotate(name, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "task embeddings (PCA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
