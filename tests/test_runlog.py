"""RUN_DIR/log.txt keeps what fit, evaluate, interpret and gradcam print, without the progress bars' redraws."""
from __future__ import annotations

import sys

from typer.testing import CliRunner

from main import app
from tinyfast.runlog import run_log

runner = CliRunner()


def test_run_log_keeps_lines_and_drops_progress_bar_redraws(tmp_path, capsys):
    with run_log(tmp_path, header="python main.py fit"):
        print("layer summary")
        for i in range(5):  # fastprogress on a console: the same line redrawn after carriage returns
            sys.stdout.write(f"\rEpoch 1/2 : |{'█' * i}{'-' * (4 - i)}| {i * 25:.2f}% [{i}/4 00:01<00:03]")
        sys.stdout.write("\r" + " " * 40 + "\repoch     train_loss  valid_loss\n")
        print("0         1.234567    1.111111")
        print("warning: something", file=sys.stderr)
    shown = capsys.readouterr()
    assert "layer summary" in shown.out and "█" in shown.out  # the screen still gets everything
    log = (tmp_path / "log.txt").read_text()
    lines = log.splitlines()
    assert lines[0].endswith("] python main.py fit")
    assert lines[1:] == ["layer summary", "epoch     train_loss  valid_loss", "0         1.234567    1.111111",
                         "warning: something"]
    assert "\r" not in log and "█" not in log


def test_fit_evaluate_interpret_gradcam_and_their_quiet_flag_write_log_txt(tiny_root, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["fit", "--data", str(tiny_root), "--out", str(run), "--epochs", "2", "--size", "16",
                              "--bs", "16", "--lr", "0.02", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().startswith("best val accuracy") and len(res.output.strip().splitlines()) == 1
    log = (run / "log.txt").read_text()
    assert log.startswith("[") and "best val accuracy" in log  # a timestamped header (the command), then the lines
    res = runner.invoke(app, ["interpret", str(run), "--top-losses", "4", "--pairs", "3"])
    assert res.exit_code == 0, res.output
    assert "val top-1" in res.output and "most confused" in res.output and "most_confused.csv" in res.output
    log = (run / "log.txt").read_text()
    assert "interpret" in log and "most confused (actual -> predicted, count):" in log and "█" not in log
    # a refused resume is one line, and leaves the folder as it was, log.txt included
    before = (run / "log.txt").read_text()
    res = runner.invoke(app, ["fit", "--out", str(run), "--resume", "--lr", "0.9"])
    assert res.exit_code == 1 and "--lr 0.9 (saved: 0.02)" in res.output
    assert (run / "log.txt").read_text() == before
    # a flag typed at its default value is still a request: the CLI passes the flags on its command line
    res = runner.invoke(app, ["fit", "--out", str(run), "--resume", "--lr", "0.1"])
    assert res.exit_code == 1 and "--lr 0.1 (saved: 0.02)" in res.output
    # evaluate and gradcam append their own entries, each headed by a timestamp and the command (here pytest's argv)
    for command, printed in [(["evaluate", str(run), "--quiet"], "ECE"),
                             (["gradcam", str(run), "--n", "4", "--score", "--limit", "8", "--quiet"], "pointing game")]:
        res = runner.invoke(app, command)
        assert res.exit_code == 0, res.output
        assert printed in res.output and "█" not in res.output
        log = (run / "log.txt").read_text()
        entry = log[len(before):]
        assert entry.startswith("[20") and printed in entry and "█" not in entry
        before = log
