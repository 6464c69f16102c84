"""The demo: the real pipeline, end to end, on a generated dataset in the exact TinyImageNet layout.

It runs the same functions as a real run (`fit` with `lr="auto"`, `evaluate`, `interpret`, `gradcam`,
`write_report`) on a learnable dataset made on the spot, so a newcomer without a GPU or the 240 MB download
sees every output of tinyfast on two CPU cores in minutes (see docs/BENCHMARKS.md for the measured time).
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from .dataset import DatasetError, read_wnids, validate_layout
from .synthetic import make_tiny_imagenet

DEMO_DATA = dict(n_train=100, n_val=20, n_test=5, size=64, seed=0)


def demo_dataset(dest: Path | str = "data/demo", classes: int = 10) -> Path:
    """Generate the demo dataset once; reuse it when it is already there and valid."""
    root = Path(dest) / "tiny-imagenet-200"
    if root.exists():
        try:
            validate_layout(root)
            if len(read_wnids(root)) == classes:
                return root
        except DatasetError:
            pass
        raise DatasetError(f"{root} exists but is not a {classes}-class demo dataset: remove it or pass another --data")
    return make_tiny_imagenet(dest, n_classes=classes, **DEMO_DATA)


def run_demo(out: Path | str | None = None, data: Path | str = "data/demo", epochs: int = 6, size: int = 32,
             classes: int = 10, bs: int = 32, precision: str = "auto", lr_num_it: int = 40,
             command: str | None = None, quiet: bool = False) -> dict:
    """Range test, fit_one_cycle, evaluate, interpret, Grad-CAM with its localisation score, report."""
    from .cam_report import gradcam
    from .interpret import evaluate, interpret
    from .report import write_report
    from .train import fit

    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    root = demo_dataset(data, classes)
    say(f"[1/5] dataset: {root} ({classes} generated classes)")
    out = Path(out) if out is not None else Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    say("[2/5] LR range test, then fit_one_cycle")
    result = fit(root, epochs=epochs, bs=bs, lr="auto", size=size, out=out, precision=precision, command=command,
                 lr_num_it=lr_num_it, quiet=quiet)
    learn = result.learn
    say("[3/5] evaluate")
    ev = evaluate(learn, out, temperature=False)
    say("[4/5] interpret")
    interpret(learn, out, top_losses=16)
    say("[5/5] Grad-CAM and its localisation score")
    cam = gradcam(learn, out, n=16, score=True)
    report = write_report(out)
    return {"run_dir": out, "report": report, "accuracy": ev["accuracy"], "evaluation": ev,
            "localisation": cam.get("scores"), "seconds": time.perf_counter() - t0}
