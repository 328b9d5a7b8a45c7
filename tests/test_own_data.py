"""Issue 16, done when: your own tabular tasks end to end, as the README shows them.

The README's own-data commands (between its ``own-data`` markers) run exactly as written on
generated CSV files whose 8 columns live on scales from 1e-2 to 1e3: each task trained with the
defaults comes within 3 points of a standardized linear model (StandardScaler +
LogisticRegression) on the same rows; a later 6-class task with string labels is added with
``add-task`` (old tasks unchanged) and scored by name with ``--keep-columns id``.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from hnet_serve.cli import main
from hnet_serve.training.data import load_task_file
from tests.own_data import FAULTS, scored_truth, write_own_data

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- own-data:begin -->\s*```bash\n(.*?)```\s*<!-- own-data:end -->",
                      text, re.DOTALL)
    assert block, "README.md lost its own-data block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def linear_reference(path: Path) -> float:
    """Test accuracy of StandardScaler + LogisticRegression on the rows training uses."""
    pipeline = pytest.importorskip("sklearn.pipeline")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    task = load_task_file(path)  # the same 80/20 split (seed 0) as train/add-task
    model = pipeline.make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(model.fit(task.x_train, task.y_train).score(task.x_test, task.y_test))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on shared cores
    yield
    torch.set_num_threads(n)


def test_readme_own_data_commands_run_as_written(tmp_path, monkeypatch, capsys, one_thread):
    files = write_own_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["hnet-serve", "train"], ["hnet-serve", "add-task"],
                                         ["hnet-serve", "score"], ["hnet-serve", "eval"],
                                         ["hnet-serve", "export"]]
    outputs = []
    for argv in commands:
        code = main([*argv[1:], "--no-progress"] if argv[1] in ("train", "add-task") else argv[1:])
        out = capsys.readouterr().out
        assert code == 0, (argv, out)
        outputs.append(out)

    # 1. defaults within 3 points of a standardized linear model, per task
    report = json.loads(outputs[1])
    first = {name: figs["before"] for name, figs in report["old_tasks"].items()}
    for name in ("pumps", "valves"):
        ref = linear_reference(files[name])
        assert first[name] >= ref - 0.03, (name, first[name], ref)
    # 2. the 6-class task with string labels was added; old tasks unchanged
    assert report["new_task"]["name"] == "faults" and report["new_task"]["accuracy"] > 0.75
    for figs in report["old_tasks"].values():
        assert abs(figs["after"] - figs["before"]) <= 0.01
    ev = json.loads(outputs[3])
    assert set(ev["accuracy"]) == {"pumps", "valves", "faults"} and not ev["missing"]
    for name, acc in ev["accuracy"].items():
        want = report["new_task"]["accuracy"] if name == "faults" else \
            report["old_tasks"][name]["after"]
        assert acc == pytest.approx(want)
    # 3. scored by name, the id column kept in order
    with open(tmp_path / "scored.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and list(rows[0])[:1] == ["id"]
    assert [r["id"] for r in rows] == [f"row-{i:04d}" for i in range(40)]
    assert {r["task"] for r in rows} == {"faults"}
    assert {r["label"] for r in rows} <= set(FAULTS)
    right = sum(r["label"] == t for r, t in zip(rows, scored_truth()))
    assert right >= 0.75 * len(rows), right
    labels = sorted(FAULTS)  # label names are sorted strings: class i is labels[i]
    assert all(labels[int(r["prediction"])] == r["label"] for r in rows)
    # 4. the exported task takes the same raw rows (normalization inside the graph)
    import numpy as np
    import onnxruntime as ort

    from tests.own_data import tabular_task

    x = tabular_task(13, n=2500 + len(rows), classes=6)[0][-len(rows):]
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "faults.onnx"),
                                providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (len(rows), 6)
    assert np.argmax(logits, 1).tolist() == [int(r["prediction"]) for r in rows]


def test_more_classes_than_reserved_is_one_line_naming_max_classes(tmp_path, capsys, one_thread):
    from tests.own_data import tabular_task, write_csv

    x, y = tabular_task(1, n=200)
    write_csv(tmp_path / "small.csv", x, y)
    x, y = tabular_task(2, n=400, classes=12)
    write_csv(tmp_path / "wide.csv", x, y)
    ck = tmp_path / "ck"
    assert main(["train", "--benchmark", "custom", "--data", f"small={tmp_path / 'small.csv'}",
                 "--iterations", "5", "--out", str(ck), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["add-task", str(ck), "--name", "wide", "--data", str(tmp_path / "wide.csv"),
                 "--out", str(tmp_path / "ck2"), "--iterations", "5", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and "--max-classes 12" in err and len(err.strip().splitlines()) == 1
    assert "wide.csv" in err  # the file, the option
    assert "--max-classes" in json.loads(out)["error"]
    assert not (tmp_path / "ck2").exists()
    # --max-classes reserves the width up front; the wide task then fits
    assert main(["train", "--benchmark", "custom", "--data", f"small={tmp_path / 'small.csv'}",
                 "--iterations", "5", "--max-classes", "12", "--out", str(tmp_path / "ck3"),
                 "--no-progress"]) == 0
    assert main(["add-task", str(tmp_path / "ck3"), "--name", "wide", "--data",
                 str(tmp_path / "wide.csv"), "--out", str(tmp_path / "ck4"), "--iterations", "5",
                 "--force", "--no-progress"]) == 0
    from hnet_serve.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "ck4")
    assert model.target_config.num_classes == 12
    assert [t.num_classes for t in model.registry] == [3, 12]
    small = torch.from_numpy(x[:4])
    assert model.logits("small", small).shape == (4, 3)  # a task scores only its own classes
    code = main(["train", "--benchmark", "custom", "--data", f"wide={tmp_path / 'wide.csv'}",
                 "--iterations", "5", "--max-classes", "4", "--out", str(tmp_path / "ck5")])
    assert code == 1 and "--max-classes 4" in capsys.readouterr().err
    assert not (tmp_path / "ck5").exists()
