"""ONNX export (#21 item 5): a dynamic batch axis, checked in onnxruntime against PyTorch;
runs where the ``prunesearch[onnx]`` extra (onnx, onnxscript, onnxruntime) is installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from search.cli import main
from search.config import load_config
from search.export import load_pruned
from search.export_formats import TOLERANCE, check_onnx
from search.runner import run_study
from search.setup import load_task_and_space
from tests.fakes import FakePool, tiny_config

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")


def test_onnx_runs_a_batch_of_64_in_onnxruntime_within_1e4_of_pytorch(tmp_path, capsys):
    import onnxruntime

    path = tiny_config(tmp_path, n_trials=4)
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert main(["export", str(path), "--formats", "pt2,onnx"]) == 0
    task, _ = load_task_and_space(config)
    dirs = sorted((tmp_path / "exports" / "tiny").glob("trial-*"))
    assert dirs
    for d in dirs:
        info = json.loads((d / "metrics.json").read_text())
        assert "model.onnx" in info["files"] and info["files"] == sorted(p.name for p in d.iterdir())
        assert info["onnx_check"]["batch"] == 64 and info["onnx_check"]["max_abs_diff"] <= TOLERANCE
        model = load_pruned(d, task.build_model)
        session = onnxruntime.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 64):  # real validation images, any batch size
            x = task.validation[0][:batch]
            (got,) = session.run(None, {"input": x.numpy()})
            with torch.no_grad():
                assert abs(got - model(x).numpy()).max() <= 1e-4


def test_a_disagreeing_onnx_file_is_an_error(tmp_path):
    """The check can fail: an ONNX file of another model is caught."""
    task_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    example = torch.randn(1, 3, 2, 2)
    torch.onnx.export(other.eval(), (example.expand(2, 3, 2, 2).clone(),), str(tmp_path / "m.onnx"), dynamo=True,
                      input_names=["input"], output_names=["output"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with pytest.raises(RuntimeError, match="onnxruntime differs from PyTorch"):
        check_onnx(task_model, example, tmp_path / "m.onnx")
