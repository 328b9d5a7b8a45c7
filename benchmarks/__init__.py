"""Benchmark scripts (``python -m benchmarks.<name>``); see ``benchmarks/run_all.py``.

``hnet_serve`` is imported first, as the CLI does: it sets the environment knobs PyTorch and
OpenMP read once when torch loads (``OMP_WAIT_POLICY``, ``THP_MEM_ALLOC_ENABLE``), so every
benchmark measures what a user of ``hnet-serve`` gets.
"""

import hnet_serve  # noqa: F401
