"""Offline scoring: files in (``.npy``, ``.npz``, ``.csv``, ``.parquet``), predictions out, in
constant memory; locally (``score_file``) or on Ray Data (``hnet_serve.scoring.ray``).

``readers`` turns files into validated chunks, ``scorer`` runs them through the serving runtime,
``writers`` writes the results atomically; ``cli`` is ``hnet-serve score``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ScoreReport", "ScoredBatch", "Scorer", "ScoringConfig", "score_batch", "score_file"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import hnet_serve.scoring.cli` (building the CLI parser) stays light.
    if name in __all__:
        from hnet_serve.scoring import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module 'hnet_serve.scoring' has no attribute {name!r}")
