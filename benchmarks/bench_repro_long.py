"""Long task sequences in the compressive regime: Permuted Fashion-MNIST-100.

One chunked hypernetwork with fewer trainable weights than its target network (compression
ratio < 1) learns N permutations of Fashion-MNIST in sequence with the output regularizer on every
previous task every step (past 10 old tasks on a random share of the chunks: the training
default, ``--reg-pairs auto``). Measured: the mean test accuracy over all N tasks after the
last one, every task's accuracy right after it was learned, and the accuracy of task 1 after
every task (the paper's memory-lifetime plot).

Cost control: the trainer evaluates every task seen after each task (N^2 / 2 evaluations), so
inside the loop each task is evaluated on the first ``--loop-rows`` test examples only; task 1
after every task, each task right after it is learned, and every task at the end are evaluated
on the full 10,000 test examples.

    python -m benchmarks.bench_repro_long [--tasks 100] [--iterations 500] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._report import ROOT, machine, table, write_section
from benchmarks.bench_reproduction import COMPRESSIVE_HNET
from hnet_serve.storage import stored_params
from hnet_serve.training.config import REG_PAIRS_TASKS, TrainConfig, build_config
from hnet_serve.training.data import TaskData, build_benchmark
from hnet_serve.training.evaluate import accuracy, plot_accuracy_matrix
from hnet_serve.training.loop import TrainResult, run_tasks
from hnet_serve.training.methods.hnet import PLAIN_ADAPTERS
from hnet_serve.training.methods.registry import make_method

IMG = ROOT / "docs" / "img"
# The long run's networks: an MLP 300-300 target (328,810 weights) and a chunked hypernetwork
# with hidden 60-60, chunks of 4,000 and a 128-dim task embedding (the authors' PermutedMNIST-100
# choice): 256,544 shared weights, compression ratio 0.780 (0.819 counting the 100 task
# embeddings). On the 100-100 target every compressive hypernetwork tried lost 1.7-5.4 points of
# task 1 over 100 tasks; in absolute terms it was too small (docs/reproduction.md).
TARGET_HIDDEN = [300, 300]
HYPERNET = {**COMPRESSIVE_HNET, "hidden": [60, 60], "chunk_size": 4000, "task_emb_dim": 128}


def _count(text: str | None) -> int | str | None:
    """A ``N|all|auto`` flag as TrainConfig takes it (None: the training default)."""
    return text if text is None or text in ("all", "auto") else int(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=300, help="steps per task")
    ap.add_argument("--loop-rows", type=int, default=500,
                    help="test examples per task for the in-loop accuracy matrix")
    ap.add_argument("--beta", type=float, default=2.0,
                    help="regularizer strength (the penalty averages over the K old tasks, so "
                    "each gets beta / K: a long run needs a larger beta than a short one)")
    ap.add_argument("--target-hidden", type=int, nargs="+", default=TARGET_HIDDEN,
                    help="hidden widths of the target MLP (default 300 300)")
    ap.add_argument("--hnet-hidden", type=int, nargs="+", default=HYPERNET["hidden"],
                    help="hypernetwork hidden layer widths")
    ap.add_argument("--chunk-size", type=int, default=HYPERNET["chunk_size"])
    ap.add_argument("--task-emb-dim", type=int, default=HYPERNET["task_emb_dim"])
    ap.add_argument("--chunk-emb-dim", type=int, default=HYPERNET["chunk_emb_dim"])
    ap.add_argument("--compression", type=float, default=None, metavar="R",
                    help="size the hypernetwork from the stored ratio R for --tasks tasks, as "
                    "`hnet-serve train --compression R` does (the chunk size "
                    "and embedding flags are then ignored)")
    ap.add_argument("--reg-tasks", default=None, metavar="N|all",
                    help="old tasks regularized per step (default: the training default)")
    ap.add_argument("--reg-pairs", default=None, metavar="N|auto|all",
                    help="(old task, chunk) pairs regularized per step (default: the training "
                    "default)")
    ap.add_argument("--independent-every", type=int, default=10, metavar="K",
                    help="train one fresh target network on every K-th task as the reference "
                    "(0: none)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lookahead", action="store_true", help="regularize f_h(e, theta + dtheta)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-denormals", action="store_true",
                    help="do not flush denormal floats to zero (see bench_reproduction)")
    ap.add_argument("--quick", action="store_true", help="5 tasks, 30 steps (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--regularized", action="store_true",
                    help="with --compression: the regularized generator (adapter_mode add), "
                    "not the preset's own first layers and generator frozen after task 1")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.iterations = 5, 30
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)

    hnet_spec = {**HYPERNET, "hidden": args.hnet_hidden, "chunk_size": args.chunk_size,
                 "task_emb_dim": args.task_emb_dim, "chunk_emb_dim": args.chunk_emb_dim}
    full = build_benchmark("permuted-mnist", "fashion-mnist", tasks=args.tasks, seed=args.seed)
    tasks = [t.with_test_rows(args.loop_rows) for t in full]
    settings = {"benchmark": "permuted-mnist", "dataset": "fashion-mnist", "tasks": args.tasks,
                "iterations": args.iterations, "seed": args.seed, "beta": args.beta,
                "lr": args.lr, "lookahead": args.lookahead, "reg_tasks": _count(args.reg_tasks),
                "reg_pairs": _count(args.reg_pairs),
                "target": {"hidden": args.target_hidden}}
    if args.compression is not None:  # sized exactly as `hnet-serve train` sizes it
        cfg = build_config(**settings, compression=args.compression,
                           hypernet={"hidden": args.hnet_hidden,
                                     **(PLAIN_ADAPTERS if args.regularized else {})})
    else:
        cfg = build_config(**settings, hypernet=hnet_spec)
    references = independent_references(full, cfg, args.independent_every)
    method = make_method(cfg, tasks)
    model = method.model
    first = full[0]
    task1_curve: list[float] = []  # full test accuracy of task 1 after each task
    just_trained: list[float] = []  # full test accuracy of task i right after learning it
    eval_seconds = [0.0]

    def on_task_end(i: int, task: TaskData, result: TrainResult) -> None:
        t0 = time.perf_counter()
        task1_curve.append(accuracy(model, first.name, first.x_test, first.y_test))
        cur = full[i]
        just_trained.append(task1_curve[-1] if i == 0 else
                            accuracy(model, cur.name, cur.x_test, cur.y_test))
        eval_seconds[0] += time.perf_counter() - t0
        if (i + 1) % 10 == 0 or i == len(tasks) - 1:
            print(f"task {i + 1}/{len(tasks)}: task-1 {task1_curve[-1]:.4f}, new "
                  f"{just_trained[-1]:.4f}, {sum(result.seconds):.0f} s training", flush=True)

    t_start = time.perf_counter()
    result = run_tasks(method, tasks, cfg, on_task_end=on_task_end, progress=args.progress)
    final = {t.name: accuracy(model, t.name, t.x_test, t.y_test) for t in full}
    total = time.perf_counter() - t_start

    hn, hc = model.hypernet, model.hypernet_config
    final_acc = np.array(list(final.values()))
    after = np.array(just_trained)
    drift_task1 = 100 * (task1_curve[-1] - task1_curve[0])
    steps = np.array(result.seconds) / np.array(result.steps)  # s/step per task
    n = len(full)
    rows = [
        ["tasks learned", n],
        ["mean accuracy over all tasks after the last (%)", 100 * final_acc.mean()],
        ["mean accuracy right after learning each task (%)", 100 * after.mean()],
        ["mean change since learning (points, BWT)", 100 * (final_acc - after).mean()],
        ["worst task change (points)", 100 * (final_acc - after).min()],
        *([[(f"independent networks on tasks 1, {1 + args.independent_every}, ... "
            f"({len(references)} tasks, %)"), 100 * np.mean(list(references.values()))],
           ["hypernetwork on the same tasks after the last (%)",
            100 * np.mean([final_acc[i] for i in references])],
           ["difference (points)", 100 * (np.mean([final_acc[i] for i in references])
                                          - np.mean(list(references.values())))]]
          if references else []),
        ["task 1 right after learning (%)", 100 * task1_curve[0]],
        [f"task 1 after task {n} (%)", 100 * task1_curve[-1]],
        ["task 1 change (points)", drift_task1],
        ["target weights", f"{model.target.n_params:,}"],
        ["hypernetwork weights (shared)", f"{hn.n_shared:,}"],
        ["task embeddings", f"{n} x {hc.task_emb_dim}"
         + (f" (+ {hn.adapter_dim:,} numbers of each task's own first layer)"
            if hn.adapter_dim else "")],
        ["compression ratio (shared / target)", hn.compression_ratio()],
        ["compression ratio counting the task embeddings too",
         (hn.n_shared + n * hc.task_emb_dim) / model.target.n_params],
        ["stored / one target network (everything the checkpoint keeps)",
         stored_params(model).ratio],
        [f"step time, task 2 / task {n} (ms)",
         f"{1e3 * steps[min(1, n - 1)]:.1f} / {1e3 * steps[-1]:.1f}"],
        ["training time (min)", sum(result.seconds) / 60],
        ["whole run (min)", total / 60],
    ]
    pairs = (f"{REG_PAIRS_TASKS} tasks' worth of" if cfg.reg_pairs == "auto" else
             f"{cfg.reg_pairs}")
    body = (
        "## Reproduction: long sequences, Permuted Fashion-MNIST-"
        f"{n} (`benchmarks/bench_repro_long.py`)\n\n"
        f"Data: {n} pixel permutations of Fashion-MNIST (task 1 the identity), 60,000 training "
        "/ 10,000 test images each. Target MLP "
        f"{cfg.target.hidden} ({model.target.n_params:,} weights, one shared 10-way output); "
        f"chunked hypernetwork hidden {hc.hidden}, chunk {hc.chunk_size}, "
        f"embeddings {hc.task_emb_dim}/{hc.chunk_emb_dim} "
        f"({hn.n_shared:,} weights: compression ratio {hn.compression_ratio():.3f}). "
        f"{cfg.iterations} iterations per task, batch {cfg.batch_size}, Adam lr {cfg.lr}, "
        + (f"each task's own rank-{hc.adapter_rank} first layer over a shared basis and the "
           "generator frozen after task 1 (the preset's default): no regularizer"
           if hc.freeze == "after-first-task" else
           f"beta {cfg.beta}{', lookahead' if cfg.lookahead else ''}, the regularizer on "
           + ("all previous tasks every step" if cfg.reg_tasks in (None, "all") else
              f"a random {cfg.reg_tasks} previous tasks every step")
           + ("" if cfg.reg_pairs == "all" else
              f", {pairs} (task, chunk) pairs of them per step (random chunks)"))
        + f". Seed {args.seed}. "
        f"Machine: {machine()}, denormals "
        f"{'kept' if args.keep_denormals else 'flushed to zero'}."
        + (" `--quick` smoke run: numbers are not meaningful." if args.quick else "")
        + "\n\n" + table(["measure", "value"], rows)
        + f"\nDone when (#15): stored <= 1.0x one target network (measured "
        f"{stored_params(model).ratio:.3f}x), the mean accuracy over all {n} tasks within 3 "
        "points of independent networks (measured "
        + (f"{100 * (final_acc.mean() - np.mean(list(references.values()))):+.2f}"
           if references else "-")
        + f"), task 1 after task {n} within 2 points of right after learning it "
        f"(measured {drift_task1:+.2f}).\n"
    )
    if not args.no_write and not args.quick:
        IMG.mkdir(parents=True, exist_ok=True)
        stem = f"repro_pfmnist{n}" + (f"_seed{args.seed}" if args.seed else "")
        curve = IMG / f"{stem}_task1.png"
        plot_long(task1_curve, after, final_acc, curve, n)
        matrix = IMG / f"{stem}_matrix.png"
        plot_accuracy_matrix(result.accuracy_matrix, [t.name for t in tasks], matrix,
                             f"PFMNIST-{n}, R[i][j] on {args.loop_rows} test images per task")
        raw = IMG / f"{stem}.json"
        raw.write_text(json.dumps({
            "task1_curve": task1_curve, "just_trained": just_trained, "final": final,
            "loop_matrix": result.accuracy_matrix, "seconds": result.seconds,
            "steps": result.steps, "config": cfg.model_dump(mode="json"),
        }))
        body += (f"\nPlots: [task 1 over time, every task after learning vs at the end]"
                 f"({curve.relative_to(ROOT / 'docs').as_posix()}), "
                 f"[accuracy matrix]({matrix.relative_to(ROOT / 'docs').as_posix()}). "
                 f"Raw numbers: `{raw.relative_to(ROOT).as_posix()}`.\n")
        write_section("repro-long" if args.seed == 0 else f"repro-long-seed{args.seed}", body)
    print(body)


def independent_references(full: list[TaskData], cfg: TrainConfig, every: int
                           ) -> dict[int, float]:
    """Full test accuracy of one fresh target network per every ``every``-th task (same
    target, steps, batch and Adam as the hypernetwork): the reference the issue compares with."""
    if every <= 0:
        return {}
    ind = cfg.model_copy(update={"method": "independent"})
    out = {}
    for i in range(0, len(full), every):
        torch.manual_seed(cfg.seed + i)
        result = run_tasks(make_method(ind, [full[i]]), [full[i]], ind, progress=False)
        out[i] = result.accuracy_matrix[-1][0]
        print(f"independent network on task {i + 1}: {100 * out[i]:.2f} %", flush=True)
    return out


def plot_long(task1: list[float], after: np.ndarray, final: np.ndarray, path: Path, n: int
              ) -> None:
    from hnet_serve.training.evaluate import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(1, n + 1)
    a.plot(x, 100 * np.asarray(task1), color="C0")
    a.axhline(100 * task1[0] - 2, color="C3", ls="--", lw=1, label="2 points below start")
    a.set_xlabel("tasks learned")
    a.set_ylabel("task 1 test accuracy (%)")
    a.set_title("task 1 over time")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot(x, 100 * after, color="C2", lw=1, label="right after learning the task")
    b.plot(x, 100 * final, color="C0", lw=1, label=f"after task {n}")
    b.set_xlabel("task")
    b.set_ylabel("test accuracy (%)")
    b.set_title("every task")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
