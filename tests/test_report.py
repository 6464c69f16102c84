"""report.md links every plot and table that exists, and says which command makes the missing ones."""
from __future__ import annotations

import json

from tinyfast.report import write_report


def test_report_links_what_exists_and_names_what_is_missing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "python main.py fit --epochs 2", "device": "cpu",
                                                 "args": {"epochs": 2, "bs": 32, "lr": 0.1},
                                                 "dataset": {"classes": 4, "root": "/data"}}))
    (run / "metrics.csv").write_text("epoch,train_loss,valid_loss,accuracy,top5,time,elapsed\n"
                                     "1,1.2,1.1,0.4,0.9,3.0,3.0\n2,1.0,0.9,0.625,1.0,3.0,6.0\n")
    (run / "evaluation.json").write_text(json.dumps({"accuracy": 0.625, "top5": 1.0, "loss": 0.9, "n": 32}))
    (run / "per_class.csv").write_text("wnid,name,accuracy,support\nn01,red circle,0.5,8\n")
    for png in ("curves.png", "top_losses.png"):
        (run / png).write_bytes(b"\x89PNG")
    text = write_report(run).read_text()
    assert "python main.py fit --epochs 2" in text
    assert "Best val top-1 0.6250" in text and "at epoch 2" in text
    assert "![loss and accuracy curves](curves.png)" in text and "![top losses](top_losses.png)" in text
    assert "| 0.625 | 1 | 0.9 | 32 |" in text and "red circle" in text
    assert "not yet — `python main.py gradcam RUN_DIR`" in text
    assert "not yet — `python main.py interpret RUN_DIR`" in text  # confusion.png is missing


def test_report_tables_the_localisation_scores_gradcam_writes(tmp_path):
    # gradcam.json as tinyfast.cam_report.gradcam writes it: {method: its scores}
    run = tmp_path / "run"
    run.mkdir()
    scores = {m: {"method": m, "layer": "layer4.1", "n": 96, "pointing_game": p, "energy_in_box": 0.5}
              for m, p in (("gradcam", 0.875), ("layercam", 0.8125))}
    (run / "gradcam.json").write_text(json.dumps(scores))
    (run / "gradcam.png").write_bytes(b"\x89PNG")
    text = write_report(run).read_text()
    assert "![Grad-CAM](gradcam.png)" in text
    assert "| gradcam | layer4.1 | 96 | 0.875 | 0.5 |" in text and "| layercam | layer4.1 | 96 | 0.8125 | 0.5 |" in text
