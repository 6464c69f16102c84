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
