"""The Python API of training: what the CLI, ``hnet-serve quickstart`` and the benchmarks call.

* :func:`train_benchmark` / :func:`train_tasks`: train a sequence of tasks, save a checkpoint
  after every completed task (so Ctrl-C keeps the last one), record provenance in ``meta``.
* :func:`add_task`: train one more task onto a saved checkpoint, measure every old task's drift
  and accuracy change, refuse (``ForgettingError``) beyond the tolerances unless forced, and
  write a *new* checkpoint; the old one is never touched.
* :func:`evaluate_checkpoint`: re-evaluate a checkpoint on its recorded test data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hnet_serve.checkpoint import (
    check_checkpoint_out,
    checkpoint_hash,
    load_checkpoint,
    save_checkpoint,
)
from hnet_serve.devices import resolve_device
from hnet_serve.errors import ForgettingError, InputError, TaskExistsError
from hnet_serve.fsutil import check_output_dir, owned_files
from hnet_serve.model import HNetModel
from hnet_serve.registry import validate_task_name
from hnet_serve.targets import TargetSpec
from hnet_serve.training import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MAX_DRIFT
from hnet_serve.training.config import TrainConfig, build_config
from hnet_serve.training.data import TaskData, build_benchmark, load_task_file
from hnet_serve.training.data.provenance import recorded_tasks, relocate_sources
from hnet_serve.training.evaluate import (
    accuracy,
    evaluate_model,
    plot_accuracy_matrix,
    plot_embeddings,
    weight_drift,
)
from hnet_serve.training.loop import TrainResult, run_tasks
from hnet_serve.training.methods.baselines import make_baseline
from hnet_serve.training.methods.hnet import HNetMethod
from hnet_serve.training.methods.registry import make_method


def check_out_dir(out: str | os.PathLike, overwrite: bool, protect: str | os.PathLike | None = None
                  ) -> Path:
    """The absolute ``out`` path, if writing a checkpoint there loses nothing: new, empty, or
    (``overwrite``) a checkpoint directory, never a folder holding or inside ``protect`` (the
    source checkpoint). See :func:`hnet_serve.fsutil.check_output_dir`."""
    return check_checkpoint_out(
        out, overwrite=overwrite,
        protect={"source checkpoint": protect} if protect is not None else None)


REPORT_FILES = ("results.json", "eval.json", "accuracy_matrix.png", "embeddings.png")


def check_report_dir(directory: str | os.PathLike,
                     checkpoint: str | os.PathLike | None = None) -> Path:
    """The absolute report directory, if writing there loses nothing: new, empty, or holding
    only report files (which are replaced), and neither holding nor inside ``checkpoint``."""
    return check_output_dir(
        directory, owned=owned_files(REPORT_FILES.__contains__, "report"), flag="--report-dir",
        what="a report", protect={"checkpoint": checkpoint} if checkpoint is not None else None,
    )


def load_benchmark(config: TrainConfig) -> list[TaskData]:
    return build_benchmark(
        config.benchmark, config.dataset, config.tasks, config.seed, config.data_dir,
        pad=config.pad, first_identity=config.first_identity, data_files=config.data_files,
        data_names=config.data_names,
    )


def train_tasks(
    tasks: list[TaskData],
    config: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    report_dir: str | os.PathLike | None = None,
) -> tuple[Any, TrainResult]:
    """Train ``tasks`` in sequence with ``config.method``; returns ``(model, result)``.

    With ``out``, the checkpoint is saved after every completed task (atomically), so an
    interrupted run leaves the last completed task's checkpoint. Only the ``hnet`` method
    produces a checkpoint; other methods return their own model object.
    """
    out_path = check_out_dir(out, overwrite) if out is not None else None
    if report_dir is not None:
        check_report_dir(report_dir, out)
    config.check_tasks(tasks)
    method = make_method(config, tasks)
    model = getattr(method, "model", None)
    if isinstance(model, HNetModel):
        # The saved config names the architecture actually built (a derived chunk size too).
        config = config.model_copy(update={"hypernet": model.hypernet_config})
        model.meta.update(
            benchmark=config.benchmark, dataset=config.dataset, data_dir=config.data_dir,
            seed=config.seed, tasks=len(tasks), method=config.method,
            train_config=config.model_dump(mode="json"),
        )
        if out_path is not None:
            model.meta["task_sources"] = relocate_sources(
                {t.name: t.source for t in tasks}, None, out_path)
        else:
            model.meta["task_sources"] = {t.name: t.source for t in tasks}

    def on_task_end(i: int, task: TaskData, result: TrainResult) -> None:
        if not isinstance(model, HNetModel):
            return
        _record_results(model, result)
        if out_path is not None:
            save_checkpoint(model, out_path)

    result = run_tasks(method, tasks, config, on_task_end=on_task_end, progress=progress)
    if report_dir is not None:
        write_report(result, report_dir, model if isinstance(model, HNetModel) else None,
                     config=config)
    return model if model is not None else method, result


def _record_results(model: HNetModel, result: TrainResult) -> None:
    model.meta["results"] = result.to_dict()
    final = result.final_accuracy
    for i, name in enumerate(result.completed):
        info = model.registry.get(name)
        info.metrics["accuracy"] = final[name]
        info.metrics["accuracy_after_training"] = result.accuracy_matrix[i][i]


def train_benchmark(
    benchmark: str = "split-mnist",
    dataset: str = "mnist5k",
    tasks: int | None = None,
    iterations: int | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    report_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> tuple[HNetModel, TrainResult]:
    """Build ``benchmark`` on ``dataset`` and train it; see :func:`train_tasks`.

    ``overrides`` are :class:`~hnet_serve.training.config.TrainConfig` fields (``beta=``, ``lr=``,
    ``batch_size=``, ``target={"hidden": [...]}``, ``hypernet={...}``, ...).
    """
    config = build_config(
        config_file, benchmark=benchmark, dataset=dataset, tasks=tasks, iterations=iterations,
        seed=seed, data_dir=str(data_dir) if data_dir else None, **overrides,
    )
    return train_tasks(load_benchmark(config), config, out, overwrite=overwrite,
                       progress=progress, report_dir=report_dir)


def write_report(result: TrainResult, directory: str | os.PathLike,
                 model: HNetModel | None = None, *,
                 config: TrainConfig | None = None) -> dict[str, str]:
    """``results.json``, ``accuracy_matrix.png`` and (hnet) ``embeddings.png`` in ``directory``.

    With ``config``, ``results.json`` also records the settings that produced it (a baseline's
    report is its only artifact, so its strengths must be in it)."""
    d = check_report_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {"results": str(d / "results.json"), "accuracy_matrix": str(d / "accuracy_matrix.png")}
    data = result.to_dict()
    if config is not None:
        data["config"] = config.model_dump(mode="json")
    (d / "results.json").write_text(json.dumps(data, indent=2))
    if result.accuracy_matrix:
        plot_accuracy_matrix(result.accuracy_matrix, result.task_names, d / "accuracy_matrix.png")
    if model is not None and len(model.registry):
        plot_embeddings(model, d / "embeddings.png")
        files["embeddings"] = str(d / "embeddings.png")
    return files


# -- add a task later -----------------------------------------------------------------------
@dataclass
class AddTaskReport:
    """What adding a task did to the old ones (``before``/``after`` None without test data)."""

    new_task: dict[str, Any]
    old_tasks: dict[str, dict[str, float | None]]
    max_drift: float
    max_accuracy_drop: float
    violations: list[str] = field(default_factory=list)
    saved: bool = False
    out: str | None = None
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_task": self.new_task,
            "old_tasks": self.old_tasks,
            "tolerances": {"max_drift": self.max_drift,
                           "max_accuracy_drop": self.max_accuracy_drop},
            "violations": self.violations,
            "forced": self.forced,
            "saved": self.saved,
            "out": self.out,
        }


# A new task this many points below a fresh network of the same architecture means the
# checkpoint has used its capacity (seed-to-seed spread of one network is ~0.5 point).
CAPACITY_GAP = 0.02


def reference_accuracy(task: TaskData, config: TrainConfig, *, progress: bool = False) -> float:
    """Test accuracy of a fresh network (``config.target``, one per task, the same steps, batch
    size, learning rate and seed) trained on ``task`` alone: what the task is worth without
    sharing anything."""
    learner = make_baseline("independent", config.model_copy(update={"method": "independent"}),
                            [task])
    return run_tasks(learner, [task], config, progress=progress).accuracy_matrix[0][0]


def reference_report(accuracy_: float, reference: float) -> dict[str, Any]:
    """``new_task`` fields of an add-task run that trained a reference network."""
    gap = reference - accuracy_
    out: dict[str, Any] = {"reference_accuracy": reference, "reference_gap": gap}
    if gap > CAPACITY_GAP:
        out["capacity_warning"] = (
            f"the new task reaches {100 * accuracy_:.2f} % where a fresh network of the same "
            f"architecture reaches {100 * reference:.2f} % ({100 * gap:.2f} points more): this "
            "checkpoint has used its capacity; train a larger one (hnet-serve train "
            "--compression with a higher value, or more --tasks planned)")
    return out


def _old_task_accuracies(model: HNetModel, tasks: dict[str, TaskData], batch_size: int
                         ) -> dict[str, float]:
    return {n: accuracy(model, n, t.x_test, t.y_test, batch_size) for n, t in tasks.items()}


def saved_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training settings for ``add-task``; one saved before ``reg_pairs`` existed
    regularized every (task, chunk) pair and keeps doing so, not today's default."""
    base = dict(meta.get("train_config") or {})
    return {"reg_pairs": "all", **base} if base else base


def add_task(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    data: TaskData | str | os.PathLike | None = None,
    benchmark_task: int | None = None,
    max_drift: float = DEFAULT_MAX_DRIFT,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    config_file: str | os.PathLike | None = None,
    reference: bool = False,
    **overrides: Any,
) -> tuple[HNetModel, AddTaskReport]:
    """Train one more task onto ``checkpoint`` and save the result to ``out``.

    The task comes from ``data`` (a :class:`TaskData` or a .npz/.npy/.csv file) or from the
    checkpoint's recorded benchmark (``benchmark_task`` = its index, e.g. 5 for the 6th
    permutation). Training settings default to the checkpoint's saved config; ``overrides``
    change them (``iterations=``, ``beta=``, ...). Raises :class:`ForgettingError` (with
    ``.report``) and writes nothing if an old task's generated weights drift more than
    ``max_drift`` (relative L2) or its test accuracy drops more than ``max_accuracy_drop``
    (a fraction), unless ``force``.

    ``reference``: also train a fresh network of the checkpoint's target architecture on the same
    data with the same steps (:func:`reference_accuracy`) and report how far the new task falls
    short of it: a checkpoint whose shared weights are used up learns new tasks worse.
    """
    if max_drift < 0 or max_accuracy_drop < 0:
        raise InputError("--max-drift and --max-accuracy-drop must be >= 0")
    out_path = check_out_dir(out, overwrite, protect=checkpoint)
    parent_hash = checkpoint_hash(checkpoint)
    model = load_checkpoint(checkpoint)
    config = build_config(config_file, base=saved_settings(model.meta), **overrides)
    # The architecture is the checkpoint's, whatever the saved or given settings say.
    arch = model.target_config.model_dump()
    config = config.model_copy(update={
        "hypernet": model.hypernet_config,
        "target": TargetSpec(**{k: v for k, v in arch.items() if k in TargetSpec.model_fields}),
    })

    task = _new_task(model, config, name, data, benchmark_task)
    config.check_tasks([task])
    old_data, _ = recorded_tasks(model)
    names = model.task_names
    model.to(resolve_device(config.device))  # before/after weights on the training device
    with torch.no_grad():
        before = model.hypernet.generate().clone()  # (K, n)
    acc_before = _old_task_accuracies(model, old_data, config.eval_batch_size)

    method = HNetMethod(model, config)
    result = run_tasks(method, [task], config, progress=progress)

    with torch.no_grad():
        after = model.hypernet.generate(list(range(len(names))))
    drift = weight_drift(before, after)
    acc_after = _old_task_accuracies(model, old_data, config.eval_batch_size)
    report = AddTaskReport(
        new_task={"name": task.name, "accuracy": result.accuracy_matrix[0][0],
                  **(reference_report(result.accuracy_matrix[0][0],
                                      reference_accuracy(task, config, progress=progress))
                     if reference else {})},
        old_tasks={
            n: {"before": acc_before.get(n), "after": acc_after.get(n), "drift": drift[i]}
            for i, n in enumerate(names)
        },
        max_drift=max_drift, max_accuracy_drop=max_accuracy_drop, forced=force,
    )
    for n, figs in report.old_tasks.items():
        if figs["drift"] > max_drift:
            report.violations.append(
                f"task {n!r}: weight drift {figs['drift']:.4f} > max {max_drift:g}")
        if figs["before"] is not None and figs["before"] - figs["after"] > max_accuracy_drop:
            report.violations.append(
                f"task {n!r}: accuracy {figs['before']:.4f} -> {figs['after']:.4f} "
                f"(drop {figs['before'] - figs['after']:.4f} > max {max_accuracy_drop:g})")
    if report.violations and not force:
        err = ForgettingError(
            "adding task {!r} would change old tasks beyond the tolerances (nothing written; "
            "pass --force to write anyway): {}".format(task.name, "; ".join(report.violations))
        )
        err.report = report  # type: ignore[attr-defined]
        raise err

    info = model.registry.get(task.name)
    info.metrics["accuracy"] = report.new_task["accuracy"]
    info.metrics["accuracy_after_training"] = report.new_task["accuracy"]
    for n, figs in report.old_tasks.items():
        if figs["after"] is not None:
            model.registry.get(n).metrics["accuracy"] = figs["after"]
    for key, kind in (("task_sources", dict), ("history", list)):
        if not isinstance(model.meta.get(key), kind):  # absent, or hand-edited to another type
            model.meta[key] = kind()
    model.meta["task_sources"] = relocate_sources(
        {**model.meta["task_sources"], task.name: task.source}, model.checkpoint_dir, out_path)
    model.meta["history"].append({
        "added_task": task.name,
        "parent_checkpoint": parent_hash,
        "time": datetime.now(timezone.utc).isoformat(),
        "train_config": config.model_dump(mode="json"),
        "report": report.to_dict(),
    })
    save_checkpoint(model, out_path)
    report.saved, report.out = True, str(out_path)
    return model, report


def _new_task(
    model: HNetModel, config: TrainConfig, name: str | None,
    data: TaskData | str | os.PathLike | None, benchmark_task: int | None,
) -> TaskData:
    if (data is None) == (benchmark_task is None):
        raise InputError("give exactly one of --data FILE or --benchmark-task INDEX")
    if isinstance(data, TaskData):
        task = data
        if name:
            task.name = validate_task_name(name)
    elif data is not None:
        if not name:
            raise InputError("--name is required with --data")
        task = load_task_file(data, name, seed=config.seed)
    else:
        if benchmark_task < 0:  # type: ignore[operator]
            raise InputError(f"--benchmark-task must be >= 0, got {benchmark_task}")
        built = build_benchmark(
            config.benchmark, config.dataset, benchmark_task + 1, config.seed,  # type: ignore[operator]
            config.data_dir, pad=config.pad, first_identity=config.first_identity,
            data_files=config.data_files,
        )
        task = built[benchmark_task]  # type: ignore[index]
        if name:
            task.name = validate_task_name(name)
    if task.name in model.registry:
        raise TaskExistsError(f"task {task.name!r} already exists in the checkpoint")
    return task


# -- evaluation -----------------------------------------------------------------------------
def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    tasks: list[TaskData] | None = None,
    batch_size: int = 1000,
    report_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Accuracy of every task of a checkpoint on its recorded test data (or on ``tasks``);
    ``data_dir``: where recorded data files are looked for when they moved.

    Returns ``{"mean_accuracy", "accuracy": {task: acc}, "missing": {task: reason}, ...}``;
    with the training-time accuracy matrix in the checkpoint also ``bwt`` (now vs. just after
    each task was trained). ``device``: where the weights are generated and run
    (:func:`~hnet_serve.devices.resolve_device`).
    """
    if report_dir is not None:
        check_report_dir(report_dir, checkpoint)
    model = load_checkpoint(checkpoint, map_location=resolve_device(device))
    if tasks is None:
        found, missing = recorded_tasks(model, data_dir=data_dir)
    else:
        found = {t.name: t for t in tasks if t.name in model.registry}
        missing = {n: "not in the given data" for n in model.task_names if n not in found}
    for name, task in found.items():
        if task.input_shape != tuple(model.target_config.input_shape):
            raise InputError(
                f"task {name!r}: data inputs {list(task.input_shape)} do not match the "
                f"checkpoint's {list(model.target_config.input_shape)}"
            )
    report = evaluate_model(model, found, batch_size)
    report["missing"] = missing
    trained = {
        t.name: t.metrics["accuracy_after_training"] for t in model.registry
        if isinstance(t.metrics.get("accuracy_after_training"), (int, float))
    }
    # Backward transfer now: every task but the last, against its accuracy right after training.
    changes = [report["accuracy"][n] - trained[n] for n in model.task_names[:-1]
               if n in trained and n in report["accuracy"]]
    report["bwt"] = sum(changes) / len(changes) if changes else None
    report["accuracy_after_training"] = {n: trained[n] for n in report["accuracy"] if n in trained}
    report["checkpoint"] = str(checkpoint)
    report["content_hash"] = checkpoint_hash(checkpoint)
    if report_dir is not None:
        d = Path(report_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "eval.json").write_text(json.dumps(report, indent=2))
        results = model.meta.get("results")
        if isinstance(results, dict) and results.get("accuracy_matrix"):
            plot_accuracy_matrix(results["accuracy_matrix"], results["task_names"],
                                 d / "accuracy_matrix.png")
        plot_embeddings(model, d / "embeddings.png")
    return report
