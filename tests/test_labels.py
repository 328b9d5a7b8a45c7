"""Label names everywhere (issue 16): string or arbitrary-integer labels in task files become
the task's classes and names; predictions carry the names (Python, /predict, score)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from hnet_serve.scoring.scorer import score_file
from hnet_serve.serving.runtime import Runtime
from hnet_serve.training.data import load_task_file
from hnet_serve.training.data.task import encode_labels
from tests.conftest import tiny_mlp_model

ANIMALS = ["cat", "dog", "owl"]


def _rows(n=60, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).round(3)
    y = x[:, :3].argmax(1)
    return x, y


@pytest.mark.parametrize("labels,names,codes", [
    (np.array(["owl", "cat", "dog", "cat"]), ["cat", "dog", "owl"], [2, 0, 1, 0]),
    (np.array([7, 5, 9, 5]), ["5", "7", "9"], [1, 0, 2, 0]),
    (np.array([-1, 1, 1, -1]), ["-1", "1"], [0, 1, 1, 0]),
    (np.array(["3", "1", "2", "1"]), ["1", "2", "3"], [2, 0, 1, 0]),  # numbers as text
    (np.array([0, 2, 1, 2]), None, [0, 2, 1, 2]),  # already 0..C-1: unchanged
])
def test_encode_labels(labels, names, codes):
    ytr, yte, got = encode_labels(labels[:3], labels[3:], "t")
    assert got == names
    assert [*ytr.tolist(), *yte.tolist()] == codes


def test_csv_with_string_labels_and_a_header(tmp_path):
    x, y = _rows()
    path = tmp_path / "animals.csv"
    lines = ["f0,f1,f2,f3,label"] + [
        ",".join(map(str, r)) + f",{ANIMALS[c]}" for r, c in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    task = load_task_file(path, "animals")
    assert task.label_names == ANIMALS and task.num_classes == 3
    back = [task.label_names[i] for i in np.concatenate([task.y_train, task.y_test])]
    assert sorted(back) == sorted(ANIMALS[c] for c in y)


def test_csv_non_numeric_feature_names_the_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    with pytest.raises(Exception, match=r"line 3, column 'b' holds a non-numeric feature"):
        load_task_file(path, "bad")


def test_predictions_and_scores_carry_label_names(tmp_path):
    model = tiny_mlp_model(1, input_size=4, num_classes=3)
    model.add_task("animals", label_names=ANIMALS)
    rt = Runtime(model)
    x = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    pred = rt.predict("animals", x)
    assert pred.labels == [ANIMALS[i] for i in pred.predictions]
    body = pred.to_json()
    assert body["labels"] == pred.labels and len(body["labels"]) == 20
    unnamed = rt.predict("task-0", x)
    assert unnamed.labels == [str(i) for i in unnamed.predictions]
    inferred = rt.predict(None, x)
    assert inferred.labels == rt.labels_of(inferred.tasks, inferred.predictions)

    np.save(tmp_path / "x.npy", x)
    score_file(rt, tmp_path / "x.npy", tmp_path / "out.parquet", task="animals", progress=False)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("label").to_pylist() == pred.labels
