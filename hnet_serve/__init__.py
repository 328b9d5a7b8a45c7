"""hnet-serve: train, export and serve task-conditioned hypernetworks for continual learning."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Generated weight vectors are large (a 10-task batch of the paper's PermutedMNIST target is
# 72 MB). Fresh allocations of that size are mmapped and page-faulted 4 KiB at a time, which
# costs as much as the matmul that fills them (benchmarks/bench_generation.py: 45.8 -> 23.8 CPU ms
# per 10-task call; a single task pays about 0.5 ms more). This PyTorch knob backs CPU
# allocations >= 2 MiB with transparent huge pages. PyTorch reads it once,
# at its first allocation, so it only takes effect when hnet_serve is imported before any tensor
# is created (true for the CLI, the service and the benchmarks). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# PyTorch's OpenMP worker threads spin while they wait for work by default. When other
# processes hold a core (a shared machine, a busy container), a spinning thread keeps the one
# doing the work off the CPU: the torch backend at batch 64 with 2 threads measured 102 ms per
# call instead of 9 ms (10x; the docs' "torch, 2 threads" scoring row), with passive waiting
# 9.2 ms. OpenMP reads this once, when torch loads: effective when hnet_serve is imported
# first (the CLI, the service). Set OMP_WAIT_POLICY=ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["__version__"]
