"""A run's best model for deployment, without fastai: TorchScript or ONNX, checked against PyTorch as it is written.

Both take what the model itself takes: a float32 batch N×3×H×W (any N), RGB scaled to 0-1 and normalised with
TinyImageNet's mean and std (`TINY_MEAN`, `TINY_STD`), at the run's `--size`; both give N×classes logits. The
fastai side (decoding, resizing, normalising, the class names) stays out of the file; `model.json`, written
beside it, says what goes in and what comes out, with the class wnids in output order.

Export needs no dataset: the model is rebuilt from config.json (classes, stem) and model.pth. Each file is
written to a temporary name and renamed once complete, and it is accepted only if, on the same random batch, its
logits are within `TOLERANCE` of PyTorch's (fp32, CPU).
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .choices import FORMATS
from .data import TINY_MEAN, TINY_STD
from .model import resnet18
from .layout import LEARNER, MODEL_JSON, atomic_write, atomic_write_text
from .errors import RunError
from .run_folder import read_config, read_model

SUFFIX = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}  # the run-folder name of each format
TOLERANCE = 1e-4  # max abs difference of the logits, fp32


def run_model(run_dir: Path | str) -> tuple[torch.nn.Module, dict]:
    """The run's best weights in a plain fp32 eval-mode ResNet18 on the CPU, and the run's config."""
    config = read_config(run_dir)
    weights = read_model(run_dir)
    model = resnet18(config["dataset"]["classes"], stem=config["args"]["stem"])
    model.load_state_dict(weights)
    return model.float().eval(), config


def _write(fmt: str, model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notices for TorchScript, the exporter's chatter
            if fmt == "torchscript":
                torch.jit.save(torch.jit.trace(model, example), str(tmp))
            else:
                torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                                  external_data=False)  # one self-contained file (45 MB, far below protobuf's 2 GB)
    atomic_write(path, write)


def _needs(*packages: str) -> None:
    import importlib.util
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise RunError(f"--format onnx needs {' and '.join(missing)}: pip install {' '.join(missing)} onnxruntime "
                       f"(or pip install -e .[onnx])")


def load_exported(path: Path | str):
    """The exported file as a function of a float32 NCHW numpy batch -> logits (numpy): TorchScript through
    torch.jit, ONNX through onnxruntime."""
    path = Path(path)
    if path.suffix == ".onnx":
        _needs("onnxruntime")
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu")

    def run(x):
        with torch.no_grad():
            return scripted(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return run


def _median_ms(fn, x, repeats: int) -> float:
    fn(x)  # warm-up: graph optimisation, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def export_run(run_dir: Path | str, fmt: str = "onnx", out: Path | str | None = None, batch: int = 64,
               repeats: int = 5, seed: int = 0) -> dict:
    """Write the run's model as `fmt` (RUN_DIR/model.onnx or model.torchscript.pt unless `out`), check it against
    PyTorch on a random batch of `batch`, and time both on it: what `export` prints and model.json keeps."""
    if fmt not in FORMATS:
        raise RunError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "onnx":
        _needs("onnx", "onnxscript", "onnxruntime")
    run_dir = Path(run_dir)
    model, config = run_model(run_dir)
    size = config["args"]["size"]
    path = Path(out) if out is not None else run_dir / SUFFIX[fmt]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    t0 = time.perf_counter()
    _write(fmt, model, x[:2], path)  # exported at batch 2, run at `batch`: the batch dimension is free
    export_seconds = time.perf_counter() - t0
    exported = load_exported(path)
    with torch.no_grad():
        reference = model(x).numpy()
    difference = float(np.abs(exported(x.numpy()) - reference).max())
    if not difference <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise RunError(f"the {fmt} model's logits differ from PyTorch's by {difference:.2g} (> {TOLERANCE}): "
                       f"not written")

    def pytorch(batch_x):
        with torch.no_grad():
            return model(torch.from_numpy(batch_x)).numpy()
    result = {"format": fmt, "file": str(path), "bytes": path.stat().st_size, "export_seconds": round(export_seconds, 3),
              "max_abs_difference": difference, "batch": batch, "size": size,
              "ms_per_batch": {"pytorch": round(_median_ms(pytorch, x.numpy(), repeats), 2),
                               fmt: round(_median_ms(exported, x.numpy(), repeats), 2)},
              "threads": torch.get_num_threads()}
    info = {"input": f"float32 N x 3 x {size} x {size}, RGB in [0, 1] normalised as (x - mean) / std",
            "mean": list(TINY_MEAN), "std": list(TINY_STD), "output": f"N x {config['dataset']['classes']} logits",
            "classes": _wnids(run_dir), "exported": {fmt: result}}
    meta = run_dir / MODEL_JSON if out is None else path.with_suffix(".json")
    if meta.exists():  # keep what an export in the other format recorded
        info["exported"] = {**json.loads(meta.read_text()).get("exported", {}), fmt: result}
    atomic_write_text(meta, json.dumps(info, indent=2) + "\n")
    return {**result, "info": str(meta)}


def _wnids(run_dir: Path) -> list[str] | None:
    """The class order of the logits, from the run's learner.pkl (no dataset needed), if it has one."""
    if not (run_dir / LEARNER).exists():
        return None
    from fastai.learner import load_learner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(load_learner(run_dir / LEARNER).dls.vocab)
