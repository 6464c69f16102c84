"""The CLI: every command is there with its help, and bad input is one line and a non-zero exit."""
from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from main import app

COMMANDS = ["download", "fit", "find-lr", "evaluate", "interpret", "gradcam", "predict", "export", "compare", "demo",
            "bench"]
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


BRACKETED_DEFAULT_COMMANDS = ["download", "fit", "find-lr", "evaluate", "interpret", "gradcam", "predict", "export",
                              "demo", "bench data", "bench train", "bench recipe"]


@pytest.mark.parametrize("cmd", BRACKETED_DEFAULT_COMMANDS)
def test_help_shows_every_bracketed_default(cmd):
    """typer renders help as rich markup, where "[default: the run's]" is a style tag that vanishes: each option's
    own "[default: ...]" must reach the screen, and an option has one."""
    out = plain(runner.invoke(app, cmd.split() + ["--help"], env={"COLUMNS": "200"}).output)
    screen = " ".join(out.replace("│", " ").split())
    command = typer.main.get_command(app)
    for name in cmd.split():
        command = command.commands[name]
    by_option = {p.name: re.findall(r"\[default: [^\]]*\]", p.help or "") for p in command.params}
    assert all(len(found) <= 1 for found in by_option.values()), by_option  # one default an option
    written = [" ".join(found[0].split()) for found in by_option.values() if found]
    assert written, cmd
    for default in written:
        assert screen.count(default) == written.count(default), default


PRECISION_COMMANDS = {"fit": [], "find-lr": [], "evaluate": ["RUN"], "interpret": ["RUN"], "gradcam": ["RUN"],
                      "predict": ["RUN", "IMG"], "demo": [], "bench train": []}


@pytest.mark.parametrize("cmd", PRECISION_COMMANDS)
def test_every_command_that_trains_or_predicts_takes_a_precision(cmd):
    out = plain(runner.invoke(app, cmd.split() + ["--help"], env={"COLUMNS": "200"}).output)
    assert "--precision" in out and "auto|bf16|fp16|fp32" in out, cmd
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


# Every numeric flag of every command, just outside its range: one line naming the flag and the range, exit 2,
# before any work (RUN and IMG need not exist: the ranges are checked first).
OUT_OF_RANGE = [
    ("fit", "--epochs", "0", ">= 1"), ("fit", "--bs", "0", ">= 1"), ("fit", "--size", "0", ">= 8"),
    ("fit", "--lr", "0", "positive"), ("fit", "--wd", "-1", ">= 0"), ("fit", "--mom", "1", "in [0, 1)"),
    ("fit", "--label-smoothing", "1.5", "in [0, 1)"), ("fit", "--patience", "-1", ">= 0"),
    ("fit", "--factor", "1", "> 1"), ("fit", "--num-workers", "-2", ">= 0"), ("fit", "--classes", "0", ">= 1"),
    ("fit", "--train-per-class", "0", ">= 1"), ("fit", "--seed", "-1", "in [0, 4294967295]"),
    ("fit", "--lr-num-it", "1", ">= 2"), ("fit", "--ema", "1", "in [0, 1)"), ("fit", "--mixup", "-0.4", ">= 0"),
    ("fit", "--cutmix", "-1", ">= 0"), ("fit", "--progressive", "-8", ">= 0"),
    ("find-lr", "--bs", "0", ">= 1"), ("find-lr", "--num-it", "1", ">= 2"), ("find-lr", "--start-lr", "0", "> 0"),
    ("find-lr", "--end-lr", "-1", "> 0"), ("find-lr", "--size", "4", ">= 8"), ("find-lr", "--classes", "0", ">= 1"),
    ("find-lr", "--train-per-class", "0", ">= 1"),
    ("interpret RUN", "--top-losses", "0", ">= 1"), ("interpret RUN", "--pairs", "0", ">= 1"),
    ("gradcam RUN", "--n", "0", ">= 1"), ("gradcam RUN", "--limit", "0", ">= 1"),
    ("predict RUN IMG", "--topk", "0", ">= 1"), ("compare RUN", "--at", "1.5", "in (0, 1]"),
    ("demo", "--epochs", "0", ">= 1"), ("demo", "--size", "8", ">= 16"), ("demo", "--classes", "1", "in [2, 256]"),
    ("bench data", "--bs", "0", ">= 1"), ("bench data", "--passes", "0", ">= 1"),
    ("bench data", "--num-workers", "-1", ">= 0"), ("bench data", "--baseline-workers", "-1", ">= 0"),
    ("bench train", "--steps", "0", ">= 1"), ("bench train", "--warmup", "-1", ">= 0"), ("bench train", "--lr", "0", "> 0"),
    ("bench recipe", "--epochs", "0", ">= 1"), ("bench recipe", "--classes", "-1", ">= 0"),
    ("bench recipe", "--seed", "-3", "in [0, 4294967295]"), ("bench recipe", "--lr", "-1", "positive"),
]


@pytest.mark.parametrize("cmd, flag, value, allowed", OUT_OF_RANGE, ids=[f"{c} {f}" for c, f, _, _ in OUT_OF_RANGE])
def test_a_numeric_flag_out_of_range_is_one_line_naming_it(cmd, flag, value, allowed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not in the checkout
    res = runner.invoke(app, cmd.split() + [flag, value])
    lines = plain(res.output).strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and flag in lines[0] and allowed in lines[0] and value in lines[0], res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd, old, new", [("interpret RUN", "--top", "--top-losses"),
                                           ("fit", "--lr-iterations", "--lr-num-it")])
def test_a_renamed_flag_still_works_under_its_old_name(cmd, old, new, tmp_path, monkeypatch):
    # renamed on 2026-12-02 to the API's names (interpret(top_losses=), fit(lr_num_it=)); the old ones stay
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, cmd.split() + [old, "0"])
    assert res.exit_code == 2 and f"{new} must be" in plain(res.output), res.output


def test_every_numeric_flag_has_a_range():
    """A new numeric flag without an entry in RANGES would be unchecked: the table must grow with the CLI."""
    import typing
    from main import RANGES, bench_app

    def numeric(hint) -> bool:
        return hint in (int, float) or any(numeric(h) for h in typing.get_args(hint))

    commands = [c.callback for c in app.registered_commands + bench_app.registered_commands]
    found = {name for fn in commands for name, hint in typing.get_type_hints(fn).items() if numeric(hint)}
    assert {"bs", "epochs", "at", "topk", "passes"} <= found
    assert found <= set(RANGES), sorted(found - set(RANGES))


def test_the_cli_choices_are_the_packages():
    """One tuple per set of choices (tinyfast.choices): the modules check against it, the CLI's enums are made
    from it, and importing the CLI imports no torch (`--help` is instant)."""
    import subprocess
    import sys
    import inspect
    import typing
    from tinyfast import choices, export, learner, lr_range, model
    from tinyfast.cam import CAM_METHODS
    from tinyfast.cli import ExportFormat, Mode, Precision, Stem, fit_cmd
    from tinyfast.config import RunConfig
    option_choices = {f.name: f.metadata["choices"] for f in RunConfig.options()}
    assert option_choices["schedule"] is choices.SCHEDULES and option_choices["log"] is choices.TRACKERS
    assert option_choices["precision"] is choices.PRECISIONS and option_choices["stem"] is choices.STEMS
    assert option_choices["lr_mode"] is choices.MODES
    assert learner.PRECISIONS is choices.PRECISIONS and model.STEMS is choices.STEMS
    assert lr_range.MODES is choices.MODES and export.FORMATS is choices.FORMATS
    assert tuple(CAM_METHODS) == choices.CAM_METHOD_NAMES
    fit_params = inspect.signature(fit_cmd).parameters
    for name, values in option_choices.items():
        if values:  # an enum, or Optional[enum] where the default is None (--stem: the budget's choice)
            enum = next((a for a in typing.get_args(fit_params[name].annotation) if a is not type(None)),
                        fit_params[name].annotation)
            assert tuple(e.value for e in enum) == values, name
    for enum, values in [(Precision, choices.PRECISIONS), (Stem, choices.STEMS), (Mode, choices.MODES),
                         (ExportFormat, choices.FORMATS)]:
        assert tuple(e.value for e in enum) == values, enum
    probe = "import sys, tinyfast.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_missing_tracker_package_is_one_line_before_any_folder(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    res = runner.invoke(app, ["fit", "--log", "wandb", "--out", str(tmp_path / "run")])
    lines = plain(res.output).strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "pip install wandb" in lines[0], res.output
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_is_one_line(tiny_root, tmp_path):
    """fastai puts "Exception occured in `StopOnNaN` ..." on a line before the message of an error raised inside a
    callback: the CLI still says it in one line."""
    res = runner.invoke(app, ["fit", "--data", str(tiny_root), "--out", str(tmp_path / "run"), "--epochs", "1",
                              "--size", "16", "--bs", "8", "--lr", "1e12", "--num-workers", "0", "--quiet"])
    err = plain(res.output).strip().splitlines()
    assert res.exit_code == 1 and err[-1].startswith("error: loss became NaN or inf at epoch 1, batch "), err
    assert not any("Exception occured" in line for line in err)
