"""export: ONNX and TorchScript files that give PyTorch's logits on any batch size, read without fastai."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinyfast.export import SUFFIX, export_run
from tinyfast.train import RunError, fit, load_run


@pytest.fixture(scope="module")
def run_dir(tiny_root, tmp_path_factory):
    return fit(tiny_root, epochs=1, lr=0.02, size=16, bs=16, out=tmp_path_factory.mktemp("export") / "run",
               quiet=True).run_dir


def _reference(run_dir, x: torch.Tensor) -> np.ndarray:
    model = load_run(run_dir).model.float().eval().cpu()  # the fastai path: the Learner's own model
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_exported_model_gives_pytorchs_logits(run_dir, fmt, tmp_path):
    r = export_run(run_dir, fmt, batch=8, repeats=1)
    path = run_dir / SUFFIX[fmt]
    assert r["file"] == str(path) and path.exists() and r["max_abs_difference"] < 1e-4
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # another batch size than exported
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".claimed"]  # no tmp
    if fmt == "onnx":
        import shutil
        import onnxruntime
        alone = shutil.copy(path, tmp_path / "alone.onnx")  # one self-contained file: no external weights
        session = onnxruntime.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    else:
        out = torch.jit.load(str(path)).eval()(x).detach().numpy()
    assert out.shape == (5, 4) and np.abs(out - _reference(run_dir, x)).max() < 1e-4
    info = json.loads((run_dir / "model.json").read_text())
    assert info["classes"] == list(load_run(run_dir).dls.vocab) and fmt in info["exported"]
    assert "normalised" in info["input"] and len(info["mean"]) == 3


def test_export_without_onnxruntime_is_one_line(run_dir, monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(RunError, match="pip install onnxruntime"):
        export_run(run_dir, "onnx", out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_from_the_cli(run_dir, tmp_path):
    from typer.testing import CliRunner
    from main import app
    res = CliRunner().invoke(app, ["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                                   "--batch", "4"])
    assert res.exit_code == 0, res.output
    assert "of PyTorch's" in res.output and (tmp_path / "m.pt").exists() and (tmp_path / "m.json").exists()
    assert CliRunner().invoke(app, ["export", str(tmp_path), "--format", "onnx"]).exit_code == 1  # not a run
