"""One owner of a run's configuration (tinyfast.config.RunConfig): the `fit` command is made from it, `fit` takes
it whole or by overrides, config.json is it serialised, older folders still load, and bad values are one line."""
from __future__ import annotations

import dataclasses
import json

import pytest
import typer.main
from rich.markup import escape

from tinyfast.cli import app
from tinyfast.config import RunConfig, resume_changes
from tinyfast.errors import RunError
from tinyfast.train import fit, load_run

RUNTIME_FLAGS = {"out", "resume", "quiet"}  # how `fit` runs, not what the run is: not in config.json


def fit_command():
    return typer.main.get_command(app).commands["fit"]


def test_every_option_is_a_fit_flag_with_its_default_and_help_and_nothing_else_is():
    params = {p.name: p for p in fit_command().params}
    options = {f.name: f for f in RunConfig.options()}
    assert set(params) == set(options) | RUNTIME_FLAGS
    for name, f in options.items():
        p, meta = params[name], f.metadata
        assert p.help == escape(meta["help"]), name  # as rich markup, where "[" would start a tag
        assert set(p.opts) == set(meta["flags"] or ["--" + name.replace("_", "-")]), name
        default = p.default.value if hasattr(p.default, "value") else p.default
        assert default == (str(f.default) if name == "lr" else f.default), name  # choices: test_cli


def test_every_option_has_a_group_and_a_help_and_the_shared_defaults_are_its():
    from tinyfast.config import OPTION_GROUPS
    from tinyfast.lr_range import HELD_OUT_BATCHES
    assert all(f.metadata["group"] in OPTION_GROUPS and f.metadata["help"] for f in RunConfig.options())
    assert HELD_OUT_BATCHES == RunConfig().lr_val_batches


def test_a_bad_value_is_one_line_naming_the_flag():
    cases = {"epochs": (0, "--epochs must be >= 1, not 0"), "schedule": ("cosine", "--schedule must be one of "
             "one-cycle, plateau, not 'cosine'"), "mom": (1.0, "--mom must be in [0, 1), not 1.0"),
             "lr": (-1.0, "--lr must be > 0, not -1.0"), "lr_num_it": (1, "--lr-num-it must be >= 2, not 1")}
    for name, (value, message) in cases.items():
        with pytest.raises(RunError) as e:
            RunConfig(**{name: value})
        assert str(e.value) == message
    with pytest.raises(RunError, match="alternatives"):
        RunConfig(mixup=0.4, cutmix=1.0)
    with pytest.raises(RunError, match="plans a one-cycle schedule"):
        RunConfig(budget="30m", schedule="plateau")
    with pytest.raises(RunError, match="progressive"):
        RunConfig(size=32, progressive=48)
    assert RunConfig(lr="auto").lr == "auto"


def test_it_is_frozen_and_round_trips_through_json():
    config = RunConfig(epochs=5, lr="auto", size=32, budget="1h", classes=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 6
    assert RunConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
    assert config.replace(epochs=6).epochs == 6 and config.epochs == 5
    from pathlib import Path
    assert RunConfig(data=Path("data") / "x").data == str(Path("data") / "x")  # JSON-ready


def test_an_older_folders_args_load_with_the_defaults_of_what_it_lacks():
    older = {"data": "data/x", "epochs": 12, "size": 32, "lr_picked": 0.05, "budget_plan": None, "gone": 1}
    config = RunConfig.from_dict(older)
    assert (config.data, config.epochs, config.size) == ("data/x", 12, 32)
    assert config.lr_val_batches == RunConfig().lr_val_batches and config.budget is None


def test_the_resume_policy_is_the_options_own():
    may = {f.name for f in RunConfig.options() if f.metadata["resume"]}
    assert may == {"data", "num_workers", "tta"}
    saved = RunConfig(epochs=4).as_dict()
    assert resume_changes(saved, {"tta": True, "data": "elsewhere"}, 2) == {"tta": True, "data": "elsewhere"}
    with pytest.raises(RunError, match=r"--bs 32 \(saved: 256\)"):
        resume_changes(saved, {"bs": 32}, 2)


def test_fit_takes_a_config_or_overrides_and_config_json_is_it(tiny_root, tmp_path):
    config = RunConfig(data=str(tiny_root), epochs=1, size=16, bs=16, lr=0.05, seed=3)
    whole = fit(config, out=tmp_path / "whole", quiet=True)
    by_name = fit(tiny_root, out=tmp_path / "by_name", quiet=True, epochs=1, size=16, bs=16, lr=0.05, seed=3)
    for result in (whole, by_name):
        saved = json.loads((result.run_dir / "config.json").read_text())["args"]
        assert RunConfig.from_dict(saved) == config.replace(stem="cifar")  # what a default resolved to is kept
        assert set(saved) == {f.name for f in RunConfig.options()} | {"lr_picked", "budget_plan"}
    assert whole.best_accuracy == by_name.best_accuracy  # the same run, said two ways
    with pytest.raises(TypeError, match="unexpected option bogus"):
        fit(tiny_root, out=tmp_path / "bogus", bogus=1)
    assert not (tmp_path / "bogus").exists()


def test_a_folder_written_before_the_config_had_an_option_still_loads(tiny_root, tmp_path):
    run_dir = fit(tiny_root, out=tmp_path / "run", quiet=True, epochs=1, size=16, bs=16, lr=0.05).run_dir
    config = json.loads((run_dir / "config.json").read_text())
    for newer in ("budget", "lr_val_batches", "compile", "log"):
        del config["args"][newer]
    (run_dir / "config.json").write_text(json.dumps(config))
    learn = load_run(run_dir)
    assert learn.dls.c == 4
