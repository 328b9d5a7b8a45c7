"""Capacity ablation (#15): compressive hypernetworks against one network per task.

Every variant is trained with the same trainer, data, steps, batch size and Adam settings as
independent networks with the same target (``independent``). "Stored" counts everything a
checkpoint keeps to answer every task (:func:`hnet_serve.storage.stored_params`: shared hypernetwork
weights, chunk embeddings, every task's embedding row incl. per-chunk task codes, per-task
buffers); for independent networks, every task's network.

Runs are cached in ``docs/img/capacity.json`` (key: benchmark, variant, tasks, steps, seed), so
variants can be trained one process at a time and the table rebuilt from all of them:

    python -m benchmarks.bench_capacity --benchmark pfmnist10 --variants columns-tc6 --seeds 0 1 2
    python -m benchmarks.bench_capacity --benchmark pfmnist10 --tasks 5 --steps 500  # screening
    python -m benchmarks.bench_capacity --table-only

Writes the ``capacity`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from benchmarks._report import ROOT, machine, table, write_section
from benchmarks.bench_reproduction import COMPRESSIVE_HNET
from hnet_serve.sizing import derive_hypernet
from hnet_serve.storage import stored_params
from hnet_serve.training.config import build_config
from hnet_serve.training.data import build_benchmark
from hnet_serve.training.loop import run_tasks
from hnet_serve.training.methods.hnet import PLAIN_ADAPTERS, build_model
from hnet_serve.training.methods.registry import make_method

RAW = ROOT / "docs" / "img" / "capacity.json"

BENCHMARKS: dict[str, dict[str, Any]] = {
    "pfmnist10": {
        "title": "Permuted Fashion-MNIST-10",
        "data": {"benchmark": "permuted-mnist", "dataset": "fashion-mnist", "tasks": 10},
        "config": {"benchmark": "permuted-mnist", "dataset": "fashion-mnist", "iterations": 1000,
                   "beta": 0.05, "lr": 1e-3, "batch_size": 128},
    },
    "splitmnist": {
        "title": "SplitMNIST (mnist5k)",
        "data": {"benchmark": "split-mnist", "dataset": "mnist5k", "tasks": 5},
        "config": {"benchmark": "split-mnist", "dataset": "mnist5k", "iterations": 300,
                   "beta": 0.01, "lr": 1e-3, "batch_size": 128},
    },
}

# The column layout as screened: tanh (a ReLU hypernetwork makes every column nearly the same
# vector and the target starts at chance), 32-dim shared chunk embeddings, a 1-dim task embedding.
_COLS = {"kind": "chunked", "layout": "columns", "hidden": [50, 50], "activation": "tanh",
         "task_emb_dim": 1, "chunk_emb_dim": 32}
_T300 = {"target": {"hidden": [300, 300]}}
_T1000 = {"target": {"hidden": [1000, 1000]}}
TRUNK = {"adapter_rank": "auto", "adapter_mode": "replace", "adapter_basis": "shared",
         "freeze": "after-first-task"}
# name -> (what it tests, TrainConfig overrides). "independent*" are the references.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "independent": ("one fresh MLP 100-100 per task", {"method": "independent"}),
    "flat-1500": ("today's compressive setting: flat chunks of 1,500, hidden 50-50, emb 24/8",
                  {"hypernet": COMPRESSIVE_HNET}),
    "derived-1.0": (("flat, sizes from `derive_hypernet(n, tasks, 1.0)` (hidden 50-50, emb "
                     "24/8, the largest chunk that fits 1.0x)"), {"derive": {"ratio": 1.0}}),
    "derived-1.0-h100": ("as derived-1.0 with one hidden layer of 100",
                         {"derive": {"ratio": 1.0, "hidden": [100]}}),
    "derived-1.0-h25": ("as derived-1.0 with hidden 25-25",
                        {"derive": {"ratio": 1.0, "hidden": [25, 25]}}),
    "derived-1.0-beta0.05": ("derived-1.0 with beta 0.05",
                             {"beta": 0.05, "derive": {"ratio": 1.0}}),
    "flat-1500-beta0.01": ("flat-1500 with beta 0.01 (more plasticity)",
                           {"beta": 0.01, "hypernet": COMPRESSIVE_HNET}),
    "flat-1500-lookahead": ("flat-1500 with the lookahead regularizer",
                            {"lookahead": True, "hypernet": COMPRESSIVE_HNET}),
    "flat-1500-old-emb": ("flat-1500, old task embeddings trained under the regularizer",
                          {"train_old_embeddings": True, "hypernet": COMPRESSIVE_HNET}),
    "flat-1000-tc32": (("flat chunks of 1,000 + a 32-dim task code per chunk "
                        "(task-conditioned chunk embeddings)"),
                       {"hypernet": {**COMPRESSIVE_HNET, "chunk_size": 1000,
                                     "task_chunk_emb_dim": 32}}),
    "columns-tc4": (("one chunk per target column, one output layer per tensor, a 4-dim task "
                     "code per column"), {"hypernet": {**_COLS, "task_chunk_emb_dim": 4}}),
    "independent-300": ("one fresh MLP 300-300 per task", {"method": "independent", **_T300}),
    "flat-300-4000": ("MLP 300-300 target, flat chunks of 4,000, hidden 60-60, emb 32/8", {
        **_T300, "hypernet": {**COMPRESSIVE_HNET, "hidden": [60, 60], "chunk_size": 4000,
                              "task_emb_dim": 32}}),
    "flat-300-5000": ("MLP 300-300 target, flat chunks of 5,000, hidden 60-60, emb 32/8", {
        **_T300, "hypernet": {**COMPRESSIVE_HNET, "hidden": [60, 60], "chunk_size": 5000,
                              "task_emb_dim": 32}}),
    "derived-1.0-reg4": ("derived-1.0 regularizing a random 4 of the old tasks per step",
                         {"reg_tasks": 4, "derive": {"ratio": 1.0}}),
    "derived-1.0-lr2e-3": ("derived-1.0 with Adam lr 2e-3", {"lr": 2e-3, "derive": {"ratio": 1.0}}),
    "derived-1.0-lr5e-4": ("derived-1.0 with Adam lr 5e-4", {"lr": 5e-4, "derive": {"ratio": 1.0}}),
    "independent-1000": ("one fresh MLP 1000-1000 per task (the paper's PermutedMNIST target)",
                         {"method": "independent", **_T1000}),
    "independent-1000-lr5e-4": ("one fresh MLP 1000-1000 per task, Adam lr 5e-4",
                                {"method": "independent", "lr": 5e-4, **_T1000}),
    "derived-1.0-t1000": ("MLP 1000-1000 target, sizes from `derive_hypernet(n, tasks, 1.0)`",
                          {**_T1000, "derive": {"ratio": 1.0}}),
    "default-a0": (("today's default sizes (derived from --compression 1.0), no private "
                   "corrections"), {"hypernet": {"adapter_rank": 0}}),
    "default-auto": (("today's default sizes with `adapter_rank` auto (half the budget to the "
                     "private corrections)"), {"hypernet": {"adapter_rank": "auto"}}),
    "default-a4": (("today's default (sizes derived from --compression 1.0) + a rank-4 private "
                   "correction of the first layer per task (`adapter_rank`)"),
                   {"hypernet": {"adapter_rank": 4}}),
    "default-a5": ("as default-a4 with rank 5", {"hypernet": {"adapter_rank": 5}}),
    "default-a8": ("as default-a4 with rank 8", {"hypernet": {"adapter_rank": 8}}),
    "default-a16": ("as default-a4 with rank 16", {"hypernet": {"adapter_rank": 16}}),
    "default-300": ("MLP 300-300 target, today's default (sizes derived from --compression 1.0)",
                    {**_T300}),
    "default-300-a8": ("MLP 300-300 target, default-a8", {**_T300, "hypernet": {"adapter_rank": 8}}),
    "default-300-a16": ("MLP 300-300 target, default-a16",
                        {**_T300, "hypernet": {"adapter_rank": 16}}),
    "default-300-a16-v25": ("default-300-a16 with V's initial std 1/sqrt(16) (faster updates)",
                            {**_T300, "hypernet": {"adapter_rank": 16, "adapter_v_std": 0.25}}),
    "default-300-a16-beta0.01": ("default-300-a16 with beta 0.01",
                                 {**_T300, "beta": 0.01, "hypernet": {"adapter_rank": 16}}),
    "default-1000-a48": ("MLP 1000-1000 target, default sizes with a rank-48 correction",
                         {**_T1000, "hypernet": {"adapter_rank": 48}}),
    "default-1000-a80": ("MLP 1000-1000 target, default sizes with a rank-80 correction",
                         {**_T1000, "hypernet": {"adapter_rank": 80}}),
    "default-1000-auto": (("MLP 1000-1000 target, today's default sizes with `adapter_rank` "
                           "auto"), {**_T1000, "hypernet": {"adapter_rank": "auto"}}),
    "default-1000-auto-p10-lr2e-3": ("default-1000-auto sized for 10 tasks, Adam lr 2e-3",
                                     {**_T1000, "planned_tasks": 10, "lr": 2e-3,
                                      "hypernet": {"adapter_rank": "auto"}}),
    "default-300-auto-p10": ("MLP 300-300 target, default sizes (auto) for 10 tasks",
                             {**_T300, "planned_tasks": 10, "hypernet": {"adapter_rank": "auto"}}),
    "default-300-auto-p10-lr5e-4": ("default-300-auto-p10 with Adam lr 5e-4",
                                    {**_T300, "planned_tasks": 10, "lr": 5e-4,
                                     "hypernet": {"adapter_rank": "auto"}}),
    "default-p10-lr5e-4": ("today's default sizes for 10 tasks, Adam lr 5e-4",
                           {"planned_tasks": 10, "lr": 5e-4}),
    "default-p10": ("today's default sizes for 10 tasks", {"planned_tasks": 10}),
    "default-1000-auto-e256": ("default-1000-auto with 256-dim task embeddings",
                               {**_T1000, "hypernet": {"adapter_rank": "auto",
                                                       "task_emb_dim": 256}}),
    "default-1000-auto-beta0.01": ("default-1000-auto with beta 0.01",
                                   {**_T1000, "beta": 0.01, "hypernet": {"adapter_rank": "auto"}}),
    "default-1000-a80-lr5e-4": ("MLP 1000-1000 target, rank-80 corrections, Adam lr 5e-4",
                                {**_T1000, "lr": 5e-4, "hypernet": {"adapter_rank": 80}}),
    "default-300-auto-l2": ("MLP 300-300 target, auto corrections on the first two layers (rank 9)",
                            {**_T300, "hypernet": {"adapter_rank": "auto", "adapter_layers": 2}}),
    "default-1000-auto-l2": (("default-1000-auto with corrections on the first two layers "
                              "(rank 23)"), {**_T1000, "hypernet": {"adapter_rank": "auto",
                                                                      "adapter_layers": 2}}),
    "default-1000-auto-lr5e-4": ("default-1000-auto with Adam lr 5e-4",
                                 {**_T1000, "lr": 5e-4, "hypernet": {"adapter_rank": "auto"}}),
    "default-1000-auto-p10-lr5e-4": ("default-1000-auto sized for 10 tasks, Adam lr 5e-4",
                                     {**_T1000, "planned_tasks": 10, "lr": 5e-4,
                                      "hypernet": {"adapter_rank": "auto"}}),
    "default-1000-auto-p10": ("default-1000-auto sized for 10 tasks (screening on fewer)",
                              {**_T1000, "planned_tasks": 10,
                               "hypernet": {"adapter_rank": "auto"}}),
    "default-h100": (("today's default sizes with hypernetwork hidden 100-100 (a wider last "
                      "hidden layer: more directions per chunk, a smaller chunk)"),
                     {"hypernet": {"hidden": [100, 100]}}),
    "default-1000-auto-lookahead": ("default-1000-auto with the lookahead regularizer",
                                    {**_T1000, "lookahead": True,
                                     "hypernet": {"adapter_rank": "auto"}}),
    "default-300-auto-p10-e0.1": ("default-300-auto-p10 with task embeddings drawn with std 0.1",
                                  {**_T300, "planned_tasks": 10,
                                   "hypernet": {"adapter_rank": "auto", "emb_init_std": 0.1}}),
    "default-300-auto-p10-e3": ("default-300-auto-p10 with task embeddings drawn with std 3",
                                {**_T300, "planned_tasks": 10,
                                 "hypernet": {"adapter_rank": "auto", "emb_init_std": 3.0}}),
    "default-h50-200": ("today's default sizes with hypernetwork hidden 50-200",
                        {"hypernet": {"hidden": [50, 200]}}),
    "default-300-auto-p10-prev": ("default-300-auto-p10 with `emb_init: previous`",
                                  {**_T300, "planned_tasks": 10, "emb_init": "previous",
                                   "hypernet": {"adapter_rank": "auto"}}),
    "default-trunk": (("a private rank-r first layer per task over a shared basis (`adapter_mode:"
                       " replace`, `adapter_basis: shared`, r auto), the rest generated, the "
                       "generator trained with task 1 only (`freeze: after-first-task`)"),
                      {"hypernet": TRUNK}),
    "default-300-trunk": ("MLP 300-300 target, default-trunk", {**_T300, "hypernet": TRUNK}),
    "default-1000-trunk": ("MLP 1000-1000 target, default-trunk", {**_T1000, "hypernet": TRUNK}),
    "columns-300-tc16": ("MLP 300-300 target, columns, a 16-dim task code per column", {
        **_T300, "hypernet": {**_COLS, "chunk_emb_dim": 8, "task_chunk_emb_dim": 16}}),
}


def run_one(bench: str, variant: str, tasks_n: int, steps: int, seed: int,
            progress: bool) -> dict[str, Any]:
    spec = BENCHMARKS[bench]
    over = VARIANTS[variant][1]
    data = {**spec["data"], "tasks": tasks_n}
    tasks = build_benchmark(data["benchmark"], data["dataset"], tasks=data["tasks"], seed=seed)
    over = dict(over)
    # the regularized generator unless the variant says otherwise: the permuted-mnist preset
    # switched to own first layers in session 8, after most variants were measured
    over["hypernet"] = {**PLAIN_ADAPTERS, **over.get("hypernet", {})}
    derive = over.pop("derive", None)
    cfg = build_config(**{**spec["config"], "tasks": tasks_n, "iterations": steps, "seed": seed,
                          "target": {"hidden": [100, 100]}, **over})
    if derive is not None:
        n = build_model(cfg, tasks).target.n_params
        hnet = derive_hypernet(n, tasks_n, derive["ratio"],
                               **{k: v for k, v in derive.items() if k != "ratio"})
        cfg = cfg.model_copy(update={"hypernet": hnet})
    torch.manual_seed(seed)
    method = make_method(cfg, tasks)
    t0 = time.perf_counter()
    result = run_tasks(method, tasks, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    if cfg.method == "independent":
        stored = method.n_stored_params
        target = stored // len(tasks)
    else:
        stored = stored_params(method.model).total
        target = method.model.target.n_params
    return {"benchmark": bench, "variant": variant, "tasks": tasks_n, "steps": steps,
            "seed": seed, "stored": stored, "target": target, "seconds": seconds,
            "train_seconds": sum(result.seconds), **result.metrics,
            "matrix": result.accuracy_matrix, "config": cfg.model_dump(mode="json")}


def rank_probe(ranks: list[int], steps: int, seed: int) -> list[list[object]]:
    """How many private numbers one permuted task needs: an MLP 100-100 on (unpermuted)
    Fashion-MNIST whose first layer is ``A B`` with ``A (100, r)`` fixed random and only
    ``B (r, 784)`` learned, as a per-task code over a shared basis would be. Same steps, batch
    and Adam as the ablation; the full-rank row is the plain network."""
    import torch.nn.functional as F
    from torch import nn

    from hnet_serve.training.loop import batches

    task = build_benchmark("permuted-mnist", "fashion-mnist", tasks=1, seed=seed)[0]
    mean, std = float(task.x_train.mean()), float(task.x_train.std())
    rows = []
    for r in ranks:
        torch.manual_seed(seed)
        a = torch.randn(100, r) / r**0.5  # fixed basis
        b = nn.Parameter(torch.randn(r, 784) / 28)  # the task's private factor
        b1 = nn.Parameter(torch.zeros(100))
        l2, l3 = nn.Linear(100, 100), nn.Linear(100, 10)
        opt = torch.optim.Adam([b, b1, *l2.parameters(), *l3.parameters()], lr=1e-3)

        def net(x: torch.Tensor, a=a, b=b, b1=b1, l2=l2, l3=l3) -> torch.Tensor:
            h = F.relu(((x - mean) / std).flatten(1) @ (a @ b).T + b1)  # (B, 100)
            return l3(F.relu(l2(h)))

        for x, y in batches(task.x_train, task.y_train, 128, steps, seed):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((net(torch.from_numpy(task.x_test)).argmax(1).numpy()
                         == task.y_test).mean())
        rows.append([r, f"{784 * r:,}", f"{100 * acc:.2f}"])
        print(f"rank {r}: {100 * acc:.2f}", flush=True)
    return rows


def load_raw() -> dict[str, dict[str, Any]]:
    return json.loads(RAW.read_text()) if RAW.exists() else {}


def key_of(r: dict[str, Any]) -> str:
    return f"{r['benchmark']}/{r['variant']}/{r['tasks']}x{r['steps']}/seed{r['seed']}"


def summarize(raw: dict[str, dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for k, r in raw.items():
        if k == "rank-probe":
            continue
        groups.setdefault((r["benchmark"], r["tasks"], r["steps"], r["variant"]), []).append(r)
    order = list(VARIANTS)
    out = []
    for bench in BENCHMARKS:
        settings = sorted({(t, s) for (b, t, s, _) in groups if b == bench}, reverse=True)
        for tasks_n, steps in settings:
            rows = []
            refs = {}  # target widths -> mean accuracy of independent networks
            for (b, t, s_, v), rs in groups.items():
                if ((b, t, s_) == (bench, tasks_n, steps) and v.startswith("independent")
                        and "-lr" not in v):  # the reference: Adam lr 1e-3
                    refs[str(rs[0]["config"]["target"]["hidden"])] = np.mean(
                        [100 * r["mean_accuracy"] for r in rs])
            names = sorted((v for (b, t, s, v) in groups if (b, t, s) == (bench, tasks_n, steps)),
                           key=lambda v: order.index(v) if v in order else len(order))
            for v in names:
                rs = groups[(bench, tasks_n, steps, v)]
                ref_acc = refs.get(str(rs[0]["config"]["target"]["hidden"]))
                acc = np.array([100 * r["mean_accuracy"] for r in rs])
                bwt = np.array([100 * (r["bwt"] or 0.0) for r in rs])
                gap = f"{acc.mean() - ref_acc:+.2f}" if ref_acc is not None else "-"
                rows.append([
                    v, "-".join(map(str, rs[0]["config"]["target"]["hidden"])),
                    f"{rs[0]['stored']:,}", f"{rs[0]['stored'] / rs[0]['target']:.2f}x",
                    f"{acc.mean():.2f} ± {acc.std():.2f}", gap,
                    f"{bwt.mean():+.2f}", len(rs),
                    f"{np.mean([r['train_seconds'] for r in rs]) / 60:.1f}",
                ])
            out.append(f"### {BENCHMARKS[bench]['title']}: {tasks_n} tasks x {steps} steps\n\n"
                       + table(["variant", "target", "stored params", "stored / one target",
                                "CL1 mean acc (%)", "vs independent (points)", "BWT (points)",
                                "seeds", "train min / run (wall)"], rows))
    legend = "\n".join(f"- `{k}`: {d}" for k, (d, _) in VARIANTS.items())
    if "rank-probe" in raw:
        probe = raw["rank-probe"]
        out.append(
            "### Private numbers per task (`--rank-probe`)\n\nOne Fashion-MNIST task, MLP "
            f"100-100 with a rank-r first layer `A B` (A fixed random, only B learned), "
            f"{probe['steps']} steps, seed 0; rank 100 is the plain network.\n\n"
            + table(["rank r", "private first-layer numbers (784 r)", "test acc (%)"],
                    probe["rows"]))
    return (
        "## Capacity: compressive hypernetworks vs one network per task "
        "(`benchmarks/bench_capacity.py`)\n\n"
        "Target MLP 100-100 (Permuted Fashion-MNIST: 89,610 weights) unless the variant says "
        "300-300 (328,810) or 1000-1000 (1,796,010); \"vs independent\" compares with "
        "independent networks of the same target. Variants named `default*` build the model "
        "the way `hnet-serve train` does (sizes derived from --compression 1.0 for the planned "
        "tasks; the regularized generator with private first-layer corrections of the rank "
        "named, or `auto`, as the presets did until session 8; `*-trunk`: each task's own "
        "first layer and the generator frozen after task 1, the permuted-mnist preset since). "
        "Batch 128, Adam lr 1e-3, the same steps per task for every method; hypernetwork beta "
        "0.05 (PFMNIST) / 0.01 (SplitMNIST) unless the variant says otherwise. "
        "Stored = everything the checkpoint keeps (shared weights, chunk embeddings, every "
        "task's embedding row with its per-chunk codes and private corrections, per-task "
        "buffers). Rows with fewer tasks than the benchmark's are screening runs (a "
        "`-p10` variant is sized for 10 planned tasks). Mean ± std over "
        f"seeds (population std). Machine: {machine()}; wall times come from a machine shared "
        "with other jobs (2-5x swings), so compare them only roughly.\n\n"
        + legend + "\n\n" + "\n".join(out)
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", choices=list(BENCHMARKS), default="pfmnist10")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--tasks", type=int, default=None, help="default: the benchmark's")
    ap.add_argument("--steps", type=int, default=None, help="default: the benchmark's")
    ap.add_argument("--quick", action="store_true", help="3 tasks x 50 steps (smoke run)")
    ap.add_argument("--rerun", action="store_true", help="retrain runs already cached")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank-probe", action="store_true",
                    help="also measure a task's accuracy against the rank of its first layer")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = BENCHMARKS[args.benchmark]
    tasks_n = args.tasks or spec["data"]["tasks"]
    steps = args.steps or spec["config"]["iterations"]
    if args.quick:
        tasks_n, steps = 3, 50
    raw = load_raw()
    if not args.table_only:
        for variant in args.variants:
            for seed in args.seeds:
                probe = {"benchmark": args.benchmark, "variant": variant, "tasks": tasks_n,
                         "steps": steps, "seed": seed}
                if key_of(probe) in raw and not args.rerun:
                    continue
                r = run_one(args.benchmark, variant, tasks_n, steps, seed, args.progress)
                print(f"{key_of(r)}: acc {100 * r['mean_accuracy']:.2f} bwt "
                      f"{100 * (r['bwt'] or 0):+.2f} stored {r['stored']:,} "
                      f"({r['stored'] / r['target']:.2f}x) {r['train_seconds']:.0f} s", flush=True)
                if not args.quick:
                    raw = load_raw()  # another process may have added runs meanwhile
                    raw[key_of(r)] = r
                    RAW.parent.mkdir(parents=True, exist_ok=True)
                    RAW.write_text(json.dumps(raw, indent=None))
    if args.rank_probe:
        raw["rank-probe"] = {"rows": rank_probe([4, 8, 16, 32, 100], steps, 0), "steps": steps}
        RAW.write_text(json.dumps(raw, indent=None))
    body = summarize(raw)
    if not args.no_write and not args.quick:
        write_section("capacity", body)
    print(body)


if __name__ == "__main__":
    main()
