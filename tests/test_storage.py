"""The stored-parameter count: every tensor a checkpoint writes, by kind, against one target."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from hnet_serve.checkpoint import MANIFEST, WEIGHTS, save_checkpoint
from hnet_serve.cli import main as cli_main
from hnet_serve.storage import stored_params
from tests.conftest import tiny_adapter_model, tiny_mlp_model, tiny_resnet_model


def _file_numel(path) -> int:
    """Every value in the weights file plus the normalization values of the manifest."""
    tensors = sum(t.numel() for t in load_file(path / WEIGHTS).values())
    target = json.loads((path / MANIFEST).read_text())["target"]
    return tensors + len(target["input_mean"]) + len(target["input_std"])


@pytest.mark.parametrize("build", [
    lambda: tiny_mlp_model(3),
    lambda: tiny_mlp_model(4, kind="full"),
    lambda: tiny_resnet_model(2),
    lambda: tiny_adapter_model(3),
], ids=["mlp-chunked", "mlp-full", "resnet-with-buffers", "mlp-adapters"])
def test_stored_params_count_everything_the_checkpoint_writes(tmp_path, build):
    model = build()
    save_checkpoint(model, tmp_path / "ck")
    s = stored_params(model)
    assert s.total == _file_numel(tmp_path / "ck")
    assert s.shared == model.hypernet.n_shared  # chunk embeddings included
    hn = model.hypernet
    assert s.task_embeddings == len(model.registry) * (hn.config.task_emb_dim + hn.adapter_dim)
    buffers = sum(b.numel() for bufs in model.task_buffers.values() for b in bufs.values())
    assert s.task_buffers == buffers
    if "resnet" in type(model.target).__name__.lower():
        assert s.task_buffers > 0 and s.normalization == 6
    assert s.target == model.target.n_params and s.tasks == len(model.registry)
    assert s.ratio == pytest.approx(s.total / model.target.n_params)


def test_summary_names_the_ratio_and_the_separate_networks_alternative():
    s = stored_params(tiny_mlp_model(3))
    assert s.summary() == (f"stores {s.ratio:.2f}x one target network for 3 tasks; "
                           "3 separate networks would store 3x")
    one = stored_params(tiny_mlp_model(1))
    assert "for 1 task;" in one.summary() and "1 separate network would" in one.summary()


def test_info_reports_stored_params_plain_and_json(tmp_path, capsys):
    model = tiny_mlp_model(3)
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)
    s = stored_params(model)
    assert cli_main(["info", str(ck), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target_params"] == model.target.n_params
    assert out["stored_params"] == s.total == _file_numel(ck)
    assert out["stored_ratio"] == pytest.approx(s.total / model.target.n_params)
    assert out["compression_ratio"] == pytest.approx(model.hypernet.compression_ratio())
    assert out["stored"]["summary"] == s.summary()
    assert cli_main(["info", str(ck)]) == 0
    text = capsys.readouterr().out
    assert s.summary() in text and f"{s.total:,} parameters" in text


def test_info_names_the_private_corrections(tmp_path, capsys):
    model = tiny_adapter_model(3)
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)
    assert cli_main(["info", str(ck), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hn = model.hypernet
    assert out["adapter_params"] == 3 * hn.adapter_dim == 3 * 2 * (16 + 12)
    assert out["stored_params"] == _file_numel(ck)  # the corrections are in the file, counted
    assert cli_main(["info", str(ck)]) == 0
    text = capsys.readouterr().out
    assert f"{out['adapter_params']:,} in rank-2 private first-layer corrections" in text
