"""The CLI: every command is there with its help, and bad input is one line and a non-zero exit."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from main import app

COMMANDS = ["download", "fit", "find-lr", "evaluate", "interpret", "gradcam", "predict", "compare", "demo", "bench"]
runner = CliRunner()


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert re.search(rf"│ {re.escape(cmd)}\s", plain(res.output)), cmd


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "bench"] + ["bench data", "bench train"])
def test_every_command_has_help_with_defaults(cmd):
    res = runner.invoke(app, cmd.split() + ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = plain(res.output)
    assert "Usage:" in out and len(out.splitlines()) > 5
    if cmd == "fit":
        for flag, default in [("--epochs", "30"), ("--bs", "256"), ("--lr", "0.1"), ("--schedule", "one-cycle"),
                              ("--precision", "auto"), ("--seed", "42")]:
            assert re.search(rf"{flag}.*default: {re.escape(default)}", out), flag


PRECISION_COMMANDS = {"fit": [], "find-lr": [], "evaluate": ["RUN"], "interpret": ["RUN"], "gradcam": ["RUN"],
                      "predict": ["RUN", "IMG"], "demo": [], "bench train": []}


@pytest.mark.parametrize("cmd", PRECISION_COMMANDS)
def test_every_command_that_trains_or_predicts_takes_a_precision(cmd):
    out = plain(runner.invoke(app, cmd.split() + ["--help"], env={"COLUMNS": "200"}).output)
    assert "--precision" in out and "auto|bf16|fp32" in out, cmd
    res = runner.invoke(app, cmd.split() + PRECISION_COMMANDS[cmd] + ["--precision", "fp8"])
    assert res.exit_code == 2, res.output  # refused before any work


def test_missing_dataset_is_one_line_and_says_download(tmp_path):
    res = runner.invoke(app, ["fit", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    err = plain(res.output).strip()
    assert len(err.splitlines()) == 1 and "download" in err and "Traceback" not in err


def test_missing_default_dataset_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYFAST_DATA", str(tmp_path / "elsewhere"))
    res = runner.invoke(app, ["fit", "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "elsewhere" in res.output


@pytest.mark.parametrize("args", [["fit", "--schedule", "cosine"], ["fit", "--lr", "fast"], ["fit", "--lr", "-1"],
                                  ["fit", "--precision", "fp8"], ["find-lr", "--mode", "other"]])
def test_bad_flags_exit_2(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


def test_not_a_run_folder(tmp_path):
    res = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert res.exit_code == 1 and "not a run folder" in res.output
