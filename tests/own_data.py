"""Generated "own data": tabular tasks whose features live on scales 1e-2 .. 1e3, as CSV files.

Each task's label is a linear rule on the *standardized* features, so a standardized linear
model (sklearn's StandardScaler + LogisticRegression) is the reference a good default must
reach; the raw columns differ in scale by 1e5, which is what broke a single scalar
normalization (issue 16).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

FEATURES = 8
SCALES = 10.0 ** np.linspace(-2, 3, FEATURES)  # 1e-2 .. 1e3


def tabular_task(seed: int, n: int = 2500, classes: int = 3, noise: float = 0.3
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``(n, FEATURES)`` float32 on scales 1e-2..1e3 (plus offsets), ``y`` ``(n,)`` int."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, FEATURES))
    w = rng.normal(size=(FEATURES, classes))
    y = (z @ w + noise * rng.normal(size=(n, classes))).argmax(1)
    offsets = rng.uniform(-3, 3, size=FEATURES) * SCALES
    x = (z * SCALES + offsets).astype(np.float32)
    return x, y


def write_csv(path: Path, x: np.ndarray, labels: list | np.ndarray, *, ids: bool = False,
              label: bool = True) -> Path:
    """A CSV with a header ``[id,]f0..f7[,label]``."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow((["id"] if ids else []) + [f"f{j}" for j in range(x.shape[1])]
                     + (["label"] if label else []))
        for i, row in enumerate(x):
            out.writerow(([f"row-{i:04d}"] if ids else []) + [repr(float(v)) for v in row]
                         + ([labels[i]] if label else []))
    return path


FAULTS = ["ok", "bearing", "seal", "misalign", "cavitation", "overheat"]
SCORED = 40


def write_own_data(directory: Path) -> dict[str, Path]:
    """The README's own-data files: two 3-class tasks, a later 6-class task with string labels,
    and rows to score (an ``id`` column, no label)."""
    directory = Path(directory)
    files = {}
    for name, seed in (("pumps", 11), ("valves", 12)):
        x, y = tabular_task(seed)
        files[name] = write_csv(directory / f"{name}.csv", x, y)
    x, y = tabular_task(13, n=2500 + SCORED, classes=6)  # the last rows come later, unlabeled
    files["faults"] = write_csv(directory / "faults.csv", x[:-SCORED],
                                [FAULTS[c] for c in y[:-SCORED]])
    files["new-faults"] = write_csv(directory / "new-faults.csv", x[-SCORED:], [], ids=True,
                                    label=False)
    return files


def scored_truth() -> list[str]:
    """The true fault names of ``new-faults.csv``'s rows, in order."""
    _, y = tabular_task(13, n=2500 + SCORED, classes=6)
    return [FAULTS[c] for c in y[-SCORED:]]
