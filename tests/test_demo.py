"""The demo runs the real pipeline end to end and leaves a complete run folder with its report."""
from __future__ import annotations

import json

from tinyfast.demo import run_demo


def test_demo_with_tiny_settings_writes_every_output(tmp_path):
    res = run_demo(out=tmp_path / "run", data=tmp_path / "data", classes=3, epochs=1, size=16, bs=32,
                   lr_num_it=12, quiet=True)
    run = res["run_dir"]
    for name in ("config.json", "metrics.csv", "model.pth", "learner.pkl", "lr_find.png", "lr_find.json",
                 "curves.png", "schedule.png", "evaluation.json", "per_class.csv", "reliability.png",
                 "top_losses.png", "confusion.png", "most_confused.csv", "gradcam.png", "gradcam.json", "report.md"):
        assert (run / name).exists(), name
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["n"] == 3 * 20 and 0 <= res["accuracy"] <= 1 and res["accuracy"] == ev["accuracy"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["args"]["lr"] == "auto" and cfg["args"]["lr_picked"] > 0
    assert "gradcam" in json.loads((run / "gradcam.json").read_text())
    report = (run / "report.md").read_text()
    assert "![Grad-CAM](gradcam.png)" in report and "not yet" not in report
