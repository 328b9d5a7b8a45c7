"""Training speed: the Gram-form output regularizer against hypnettorch, and with 99 old tasks.

    python -m benchmarks.bench_training [--quick] [--threads N]

1. **PermutedMNIST-10, task 10** at the paper's configuration (target MLP 1024-1000-1000-10 on
   32x32-padded inputs, chunked hypernetwork with chunk 78,000, hidden 25-25, embeddings 24/8,
   batch 128, beta 0.01, Adam): one full training step (task loss, regularizer over the 9 old
   tasks, backward, Adam) of ``training.trainer.HNetMethod`` beside hypnettorch 0.0.4 (its
   ``ChunkedHMLP`` + ``MLP`` and ``calc_fix_target_reg`` with stored targets, the loop of its
   examples) on the same sizes, in the same process, rounds interleaved. Also the regularizer
   alone (forward + backward) in our explicit form, our Gram form and hypnettorch's.
2. **PermutedMNIST-100**: per-step time while training task 100 against task 2 (one old task):
   every (old task, chunk) pair regularized every step (``--reg-pairs all``, no subsampling),
   and the training default (``--reg-pairs auto``: past 10 tasks' worth of pairs, every old
   task on a random share of the chunks).

Timing needs no real data: inputs are uniform [0, 1] vectors with random labels.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._report import machine, table, write_section
from hnet_serve.devices import to_device
from hnet_serve.model import HNetModel
from hnet_serve.training.config import REG_PAIRS_TASKS, build_config
from hnet_serve.training.data import TaskData
from hnet_serve.training.loop import batches
from hnet_serve.training.methods.hnet import HNetMethod, build_model, task_norm
from hnet_serve.training.regularizer import make_snapshot, output_regularizer

INPUT = 1024  # 28x28 padded to 32x32, as in the paper
PAPER = {
    "benchmark": "permuted-mnist", "batch_size": 128, "beta": 0.01, "lr": 1e-3,
    "target": {"hidden": [1000, 1000]},
    "hypernet": {"kind": "chunked", "hidden": [25, 25], "chunk_size": 78_000,
                 "task_emb_dim": 24, "chunk_emb_dim": 8},
}


def synthetic_task(name: str, seed: int, n: int = 1024) -> TaskData:
    rng = np.random.default_rng(seed)
    x = rng.random((n, INPUT), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return TaskData(name, x, y, x[:128], y[:128], num_classes=10)


def ours(n_old: int, *, lookahead: bool = False, reg_method: str = "auto", device: str = "cpu",
         reg_pairs: int | str = "all") -> tuple[Callable[[], None], HNetMethod]:
    """A step function of HNetMethod while training task n_old + 1 (on ``device``); every
    (old task, chunk) pair regularized every step unless ``reg_pairs`` says otherwise."""
    config = build_config(**PAPER, lookahead=lookahead, reg_method=reg_method, device=device,
                          reg_pairs=reg_pairs)
    task = synthetic_task("new", 0)
    model: HNetModel = build_model(config, [task])
    for i in range(n_old):  # old tasks: only their embeddings matter for the step cost
        model.add_task(f"old-{i}", num_classes=10, input_norm=task_norm(model, task))
    method = HNetMethod(model, config)
    method.begin_task(n_old, task)
    data = batches(task.x_train, task.y_train, config.batch_size, 10**9, 0)

    def step() -> None:
        x, y = next(data)
        method.train_step(to_device(x, method.device), to_device(y, method.device))

    return step, method


def hypnettorch_step(n_old: int, *, lookahead: bool = False, device: str = "cpu"
                     ) -> Callable[[], None]:
    """The same step with hypnettorch 0.0.4 (the paper's reference implementation)."""
    from hypnettorch.hnets import ChunkedHMLP
    from hypnettorch.mnets import MLP
    from hypnettorch.utils import hnet_regularizer as hreg
    from hypnettorch.utils import optim_step as opstep

    mnet = MLP(n_in=INPUT, n_out=10, hidden_layers=(1000, 1000), no_weights=True, verbose=False)
    hnet = ChunkedHMLP(mnet.param_shapes, chunk_size=78_000, chunk_emb_size=8,
                       layers=(25, 25), cond_in_size=24, num_cond_embs=n_old + 1, verbose=False)
    dev = torch.device(device)
    hnet.to(dev)
    task_id = n_old
    targets = hreg.get_current_targets(task_id, hnet)
    params = [*hnet.unconditional_params, hnet.conditional_params[task_id]]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    task = synthetic_task("new", 0)
    data = batches(task.x_train, task.y_train, 128, 10**9, 0)

    def step() -> None:
        x, y = next(data)
        x, y = to_device(x, dev), to_device(y, dev)
        optimizer.zero_grad()
        weights = hnet.forward(cond_id=task_id)
        loss = F.cross_entropy(mnet.forward(x, weights=weights), y)
        loss.backward(retain_graph=True)
        dtheta = None
        if lookahead:  # the optimizer's step for Θ (its list ends with the task embedding)
            dtheta = opstep.calc_delta_theta(optimizer, False, lr=1e-3)[: len(params) - 1]
        reg = 0.01 * hreg.calc_fix_target_reg(hnet, task_id, targets=targets, dTheta=dtheta)
        reg.backward()
        optimizer.step()

    return step


def reg_only(n_old: int) -> dict[str, Callable[[], None]]:
    """The regularizer alone (forward + backward): our two forms and hypnettorch's."""
    from hypnettorch.hnets import ChunkedHMLP
    from hypnettorch.mnets import MLP
    from hypnettorch.utils import hnet_regularizer as hreg

    _, method = ours(n_old)
    hn, snap = method.model.hypernet, make_snapshot(method.model.hypernet, list(range(n_old)))
    with torch.no_grad():
        hn.head.weight.add_(1e-3)  # away from the snapshot, as after a few steps

    def form(name: str) -> Callable[[], None]:
        def run() -> None:
            hn.zero_grad(set_to_none=True)
            output_regularizer(hn, snap, method=name).backward()  # type: ignore[arg-type]

        return run

    mnet = MLP(n_in=INPUT, n_out=10, hidden_layers=(1000, 1000), no_weights=True, verbose=False)
    hnet = ChunkedHMLP(mnet.param_shapes, chunk_size=78_000, chunk_emb_size=8, layers=(25, 25),
                       cond_in_size=24, num_cond_embs=n_old + 1, verbose=False)
    targets = hreg.get_current_targets(n_old, hnet)

    def theirs() -> None:
        hnet.zero_grad(set_to_none=True)
        hreg.calc_fix_target_reg(hnet, n_old, targets=targets).backward()

    return {"explicit": form("explicit"), "gram": form("gram"), "hypnettorch": theirs}


def interleaved(fns: dict[str, Callable[[], None]], repeat: int, rounds: int, warmup: int = 2
                ) -> dict[str, float]:
    """Median seconds per call, rounds interleaved so load spikes hit every candidate alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and 20 instead of 100 tasks")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the 2 shared cores are busy)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeat, rounds = (3, 2) if args.quick else (6, 5)
    long_tasks = 20 if args.quick else 100

    # 1. task 10 of PermutedMNIST-10 against hypnettorch, plain and with the lookahead
    speed_rows = []
    for lookahead in (False, True):
        step_ours, method = ours(9, lookahead=lookahead)
        times = interleaved({"ours": step_ours,
                             "hypnettorch": hypnettorch_step(9, lookahead=lookahead)},
                            repeat, rounds)
        speed_rows.append([
            "on" if lookahead else "off", f"{times['ours'] * 1e3:.1f}",
            f"{times['hypnettorch'] * 1e3:.1f}", f"{times['hypnettorch'] / times['ours']:.2f}x",
        ])
        n_params, n_chunks = method.model.target.n_params, method.model.hypernet.num_chunks
        del method, step_ours
    reg_times = interleaved(reg_only(9), repeat, rounds)
    reg_rows = [[name, f"{t * 1e3:.1f}", f"{reg_times['hypnettorch'] / t:.2f}x"]
                for name, t in reg_times.items()]

    # 2. task 100 vs task 2 of PermutedMNIST-100: every pair, and the training default
    long_rows = []
    for pairs_flag, label in (("all", "every (task, chunk) pair (`--reg-pairs all`)"),
                              ("auto", "the default (`--reg-pairs auto`)")):
        step2, _ = ours(1, reg_pairs=pairs_flag)
        step_n, m_n = ours(long_tasks - 1, reg_pairs=pairs_flag)
        times = interleaved({"2": step2, "n": step_n}, repeat, rounds)
        long_rows.append([label, f"{times['2'] * 1e3:.1f}", f"{times['n'] * 1e3:.1f}",
                          f"{times['n'] / times['2']:.3f}x"])
        del step2, step_n
    pairs = (long_tasks - 1) * m_n.model.hypernet.num_chunks

    text = (
        "## Training speed (`benchmarks/bench_training.py`)\n\n"
        f"Paper configuration of PermutedMNIST-10: target MLP {INPUT}-1000-1000-10 "
        f"({n_params:,} weights, inputs padded to 32x32), chunked hypernetwork (chunk 78,000 -> "
        f"{n_chunks} chunks, hidden 25-25, embeddings 24/8), batch 128, beta 0.01, Adam; "
        "synthetic inputs (timing only). One full step = task loss, regularizer over every old "
        "task, backward, Adam. hypnettorch 0.0.4 runs the loop of its examples "
        "(`ChunkedHMLP` + `MLP`, `calc_fix_target_reg` with stored targets, "
        "`calc_delta_theta` for the lookahead) on the same sizes in the same process; rounds "
        f"interleaved, median of {repeat * rounds} steps."
        f"{' (quick run)' if args.quick else ''} Machine: {machine()}. Shared, noisy CPUs: "
        "compare ratios.\n\n"
        "**Training task 10 (9 old tasks regularized)**, ms per step. Goal: >= 3x.\n\n"
        + table(["lookahead", "ours (ms)", "hypnettorch (ms)", "speed-up"], speed_rows)
        + "\n**The regularizer alone** (9 old tasks, forward + backward), ms. `auto` picks "
        f"the Gram form here ({9 * n_chunks} (task, chunk) pairs >= 2(d + 1) = 52; see "
        "`training.regularizer.choose_method`).\n\n"
        + table(["form", "ms", "vs hypnettorch"], reg_rows)
        + f"\n**Long sequences**: PermutedMNIST-{long_tasks}, same configuration, every old "
        f"task regularized every step ({pairs:,} (task, chunk) pairs at task {long_tasks}; the "
        f"default regularizes {REG_PAIRS_TASKS} tasks' worth of them, a random share of the "
        "chunks of every old task). Goal: <= 1.25x.\n\n"
        + table(["old pairs per step", "task 2 (ms)", f"task {long_tasks} (ms)", "ratio"],
                long_rows)
    )
    print(text)
    write_section("training-speed", text)


if __name__ == "__main__":
    main()
