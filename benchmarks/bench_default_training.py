"""Training step time of the compressive default (issue 15) against the default it replaced.

    python -m benchmarks.bench_default_training [--quick] [--threads N]

Permuted-MNIST preset, synthetic inputs (timing only), one full step (task loss, regularizer
over every old task unless the generator is frozen, backward, Adam):

1. **Task 10** (9 old tasks), at the preset's target (MLP 300-300) and at the MLP 100-100 it
   had before: the previous default hypernetwork of this preset (hidden 50-50, chunk 30,000,
   embeddings 32/32: 17x one 100-100 target) against today's (``--compression 1.0`` for 10
   tasks: each task's own first layer over a shared basis, the generator frozen after task 1).
   Goal: <= 1.5x.
2. **Long sequences**: today's default sized for 100 planned tasks (no private first layer fits
   there, so it is the regularized generator), task 2 against task 100, with the default
   regularizer (``--reg-pairs auto``: every old task each step, on a random share of the chunks
   past 10 old tasks), with every (task, chunk) pair (``--reg-pairs all``) and with the random
   subset of tasks (``--reg-tasks 8``). Goal (flat cost in the number of tasks): <= 1.25x.

Rounds are interleaved (``bench_training.interleaved``); the table reports the median.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks._report import machine, table, write_section
from benchmarks.bench_training import interleaved
from hnet_serve.storage import stored_params
from hnet_serve.training.config import REG_PAIRS_TASKS, build_config
from hnet_serve.training.data import TaskData
from hnet_serve.training.loop import batches
from hnet_serve.training.methods.hnet import HNetMethod, build_model, task_norm

SUBSET = 8  # the opt-in random subset of old tasks per step (--reg-tasks 8)
SMALL = 2  # a pair budget of this many tasks' worth: what every-task-every-step costs at least
PREVIOUS = {"hidden": [50, 50], "chunk_size": 30_000, "task_emb_dim": 32, "chunk_emb_dim": 32}


def task(name: str, seed: int, n: int = 1024) -> TaskData:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return TaskData(name, x, y, x[:128], y[:128], num_classes=10)


def stepper(n_old: int, **overrides: Any) -> tuple[Callable[[], None], HNetMethod]:
    """A step function while training task ``n_old + 1`` of the permuted-mnist preset."""
    config = build_config(benchmark="permuted-mnist", **overrides)
    new = task("new", 0)
    model = build_model(config, [new])
    for i in range(n_old):  # old tasks: only their embeddings matter for the step cost
        model.add_task(f"old-{i}", num_classes=10, input_norm=task_norm(model, new))
    method = HNetMethod(model, config)
    method.begin_task(n_old, new)
    data = batches(new.x_train, new.y_train, config.batch_size, 10**9, 0)
    return (lambda: method.train_step(*next(data))), method


def describe(method: HNetMethod, tasks: int) -> str:
    hn = method.model.hypernet_config
    s = stored_params(method.model)
    ratio = (s.total - s.task_embeddings + tasks * method.model.hypernet.emb_dim) / s.target
    first = (f", own rank-{hn.adapter_rank} first layers, generator frozen after task 1"
             if hn.adapter_mode == "replace" and hn.adapter_rank else "")
    return (f"hidden {'-'.join(map(str, hn.hidden))}, chunk {hn.chunk_size:,}, embeddings "
            f"{hn.task_emb_dim}/{hn.chunk_emb_dim}{first} ({ratio:.2f}x for {tasks} tasks)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, 20 instead of 100 tasks")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeat, rounds = (3, 2) if args.quick else (6, 5)
    long_tasks = 20 if args.quick else 100

    rows = []
    for hidden in ([300, 300], [100, 100]):
        target = {"target": {"hidden": hidden}}
        old_step, old = stepper(9, hypernet=PREVIOUS, compression=None, **target)
        new_step, new = stepper(9, planned_tasks=10, **target)
        t = interleaved({"previous": old_step, "today": new_step}, repeat, rounds)
        name = "-".join(map(str, hidden))
        rows += [[name, "previous default", describe(old, 10), f"{t['previous'] * 1e3:.1f}",
                  "1.00x"],
                 [name, "today's default", describe(new, 10), f"{t['today'] * 1e3:.1f}",
                  f"{t['today'] / t['previous']:.2f}x"]]
        del old_step, new_step, old, new

    steps = {}
    settings = {  # name -> (row label, TrainConfig overrides)
        "auto": ((f"default (`--reg-pairs auto`): every old task, {REG_PAIRS_TASKS} tasks' "
                  "worth of (task, chunk) pairs"), {}),
        "all": ("`--reg-pairs all`: every (task, chunk) pair", {"reg_pairs": "all"}),
        "tasks": (f"`--reg-tasks {SUBSET}`: a random {SUBSET} old tasks per step, all their chunks",
                  {"reg_tasks": SUBSET, "reg_pairs": "all"}),
    }
    chunks = stepper(1, planned_tasks=long_tasks)[1].snapshot.num_chunks
    settings["small"] = ((f"`--reg-pairs {SMALL * chunks}`: every old task, {SMALL} tasks' "
                          "worth of pairs (the Gram form's fixed cost)"),
                         {"reg_pairs": SMALL * chunks})
    for name, (_, over) in settings.items():
        steps[f"first-{name}"] = stepper(1, planned_tasks=long_tasks, **over)[0]
        steps[f"last-{name}"], m = stepper(long_tasks - 1, planned_tasks=long_tasks, **over)
    lt = interleaved(steps, repeat, rounds)
    long_rows = [[label, f"{lt[f'first-{name}'] * 1e3:.1f}", f"{lt[f'last-{name}'] * 1e3:.1f}",
                  f"{lt[f'last-{name}'] / lt[f'first-{name}']:.2f}x"]
                 for name, (label, _) in settings.items()]
    text = (
        "## Training speed of the default (`benchmarks/bench_default_training.py`)\n\n"
        "Permuted-MNIST preset, batch 128, synthetic inputs; one "
        f"full step; rounds interleaved, median of {repeat * rounds} steps"
        f"{' (quick run)' if args.quick else ''}. Machine: {machine()}, 1-min load average {os.getloadavg()[0]:.1f} at the end (2 cores).\n\n"
        "**Task 10 (9 old tasks)**, ms per step. Goal: today's default <= 1.5x the previous.\n\n"
        + table(["target", "hypernetwork", "sizes", "ms / step", "vs previous"], rows)
        + f"\n**Long sequences** (MLP 300-300, the preset's target): today's default sized for "
        f"{long_tasks} planned tasks "
        f"({describe(m, long_tasks)}). Goal: <= 1.25x from task 2 to task {long_tasks}.\n\n"
        + table(["old tasks regularized per step", "task 2 (ms)", f"task {long_tasks} (ms)",
                 "ratio"], long_rows)
    )
    print(text)
    write_section("training-speed-default", text)


if __name__ == "__main__":
    main()
