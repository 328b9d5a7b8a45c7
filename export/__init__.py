"""Export checkpoints to ONNX: per-task models with baked weights, or one dynamic graph.

``from hnet_serve import export``, then ``export.to_onnx(checkpoint, task, path)``,
``export.export_all(checkpoint, out_dir)`` and ``export.to_dynamic_onnx(checkpoint, path)``; see
:mod:`hnet_serve.export.onnx_export` and docs/export.md. Attributes are imported on first use,
so importing the package (and building the CLI) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportResult", "export_all", "to_dynamic_onnx", "to_onnx"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hnet_serve.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
