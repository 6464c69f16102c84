"""LR range tests (tinyfast.lr_range): curves, suggestions, traps, and a Learner left exactly as it was.

A width-16 ResNet18 on `tiny_root` (4 classes, 6 training batches of 16 at 32 px, 2 validation batches) keeps
every sweep to seconds; the sweeps that several tests read are run once per module.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import slide, valley
from fastai.torch_core import set_seed

from tinyfast.data import tiny_imagenet_dls
from tinyfast.learner import kept_state, tiny_learner
from tinyfast.lr_range import DEFAULT_RANGE, LRRangeResult, held_out_batches, lr_range_test, smith_rule
from tinyfast.lr_range_report import find_lr, plot_lr_range, write_lr_range
from tinyfast.model import resnet18

JSON_KEYS = {"suggested_lr", "mode", "lrs", "losses", "suggestions", "reason"}


@pytest.fixture(scope="module")
def dls(tiny_root):
    return tiny_imagenet_dls(tiny_root, bs=16, size=32)


def small_learner(dls, seed: int = 0, path=None):
    set_seed(seed)
    # He-normal + zero-init residual (tinyfast's defaults until 2026-12) give these 96 images a long converging
    # range for the sweeps to find; PyTorch's default init diverges within 5 of 24 steps here. The tests check
    # the range tests' mechanics, not the recipe (that is `python main.py bench recipe`).
    learn = tiny_learner(dls, model=resnet18(dls.c, width=16, init="kaiming", zero_init_residual=True))
    if path is not None:   # fastai's own lr_find writes under learn.path (the dataset root by default)
        learn.path = path
    return learn


def quiet_test(learn, **kwargs) -> LRRangeResult:
    with learn.no_bar():
        return lr_range_test(learn, **kwargs)


FASTAI_IT, SMITH_IT = 30, 24


def fresh_run(dls, path, **kwargs):
    """A test on a fresh learner, with the state before it, for the tests that compare."""
    learn = small_learner(dls, path=path)
    before = snapshot(learn)
    return learn, before, quiet_test(learn, **kwargs)


@pytest.fixture(scope="module")
def fastai_run(dls, tmp_path_factory):
    return fresh_run(dls, tmp_path_factory.mktemp("fastai_learner"), mode="fastai", num_it=FASTAI_IT)


@pytest.fixture(scope="module")
def smith_run(dls, tmp_path_factory):
    return fresh_run(dls, tmp_path_factory.mktemp("smith_learner"), mode="smith", num_it=SMITH_IT, val_batches=2)


@pytest.fixture(scope="module")
def fastai_result(fastai_run):
    return fastai_run[2]


@pytest.fixture(scope="module")
def smith_result(smith_run):
    return smith_run[2]


@pytest.fixture(scope="module")
def fitted(dls, tmp_path_factory):
    """A learner after a real `fit_one_cycle`: optimizer state, moved BN statistics, a Recorder history,
    scheduled hypers, and the model in eval mode (fit ends with validation)."""
    learn = small_learner(dls, seed=1, path=tmp_path_factory.mktemp("fitted_learner"))
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 0.05)
    return learn


def snapshot(learn) -> dict:
    return {"model": copy.deepcopy(learn.model.state_dict()),
            "opt": None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
            "modes": [m.training for m in learn.model.modules()],
            "values": copy.deepcopy(getattr(learn.recorder, "values", None)),
            "lrs": copy.copy(getattr(learn.recorder, "lrs", None)),
            "hps": copy.deepcopy(getattr(learn.recorder, "hps", None))}


def assert_same(before: dict, learn) -> None:
    after = snapshot(learn)
    assert before["model"].keys() == after["model"].keys()
    for k, v in before["model"].items():   # weights and BN running_mean/var/num_batches_tracked
        assert torch.equal(v, after["model"][k]), k
    assert before["modes"] == after["modes"]
    if before["opt"] is None:
        assert learn.opt is None
    else:
        assert after["opt"]["hypers"] == before["opt"]["hypers"]
        for s0, s1 in zip(before["opt"]["state"], after["opt"]["state"], strict=True):
            assert s0.keys() == s1.keys()
            for k in s0:
                assert torch.equal(s0[k], s1[k]) if torch.is_tensor(s0[k]) else s0[k] == s1[k], k
    assert after["values"] == before["values"] and after["lrs"] == before["lrs"]
    assert after["hps"] == before["hps"]


def assert_sane(result: LRRangeResult) -> None:
    """What every result promises, degenerate or not."""
    lr = result.suggested_lr
    assert math.isfinite(lr) and lr > 0 and lr != result.start_lr
    assert len(result.lrs) == len(result.losses)
    assert all(math.isfinite(x) for x in result.losses)
    for name, v in result.suggestions.items():
        assert math.isfinite(v) and result.start_lr <= v <= result.end_lr, name


# ---------------------------------------------------------------------------------------------------------
def test_fastai_mode_exponential_curve_over_several_epochs(fastai_result, dls):
    r = fastai_result
    assert (r.mode, r.start_lr, r.end_lr) == ("fastai",) + DEFAULT_RANGE["fastai"]
    assert len(dls.train) < len(r.lrs) <= FASTAI_IT   # 6 batches an epoch: the sweep ran over several epochs
    steps = np.diff(np.log(r.lrs))
    assert np.allclose(steps, math.log(r.end_lr / r.start_lr) / FASTAI_IT, rtol=1e-3)   # exponential
    assert r.lrs[0] == pytest.approx(r.start_lr)
    assert {"valley", "steep"} <= set(r.suggestions) <= {"valley", "minimum", "steep", "slide"}
    assert_sane(r)
    # valley lands on the trimmed curve (from lrs[num_it//10]), so it is usable and it is the pick
    assert r.start_lr < r.suggested_lr == r.suggestions["valley"] <= r.end_lr and r.reason.startswith("valley")


def test_smith_mode_linear_curve_on_held_out_loss(smith_result):
    r = smith_result
    assert (r.mode, r.start_lr) == ("smith", DEFAULT_RANGE["smith"][0])
    # a sweep that diverged early was swept again up to where it did (test_smith_zooms_in_...)
    assert (r.end_lr < DEFAULT_RANGE["smith"][1]) == ("swept again" in r.reason)
    assert 6 < len(r.lrs) <= SMITH_IT
    assert np.allclose(r.lrs, np.linspace(r.start_lr, r.end_lr, SMITH_IT)[:len(r.lrs)])   # linear, start to end
    assert len(set(r.losses)) > len(r.losses) // 2   # the fixed batches' loss moved as the weights did
    assert set(r.suggestions) == {"smith", "min_loss", "max_converging"}
    assert_sane(r)
    assert r.suggestions["min_loss"] <= r.suggestions["max_converging"] == r.suggestions["smith"]
    assert r.start_lr < r.suggested_lr <= r.end_lr and "held-out" in r.reason


def test_smith_zooms_in_when_the_sweep_diverges_early(dls, tmp_path):
    """A sweep to an absurd end_lr diverges within a few steps: the curve would have no point below the cliff.
    The test sweeps again, from the same state, up to the LR where it diverged, and says so."""
    learn = small_learner(dls, path=tmp_path)
    before = snapshot(learn)
    r = quiet_test(learn, mode="smith", num_it=SMITH_IT, end_lr=100.0, val_batches=2)
    assert "swept again" in r.reason and "diverged at" in r.reason
    assert r.end_lr < 100 and len(r.lrs) >= 6
    assert np.allclose(r.lrs, np.linspace(r.start_lr, r.end_lr, SMITH_IT)[:len(r.lrs)])   # the new sweep, linear
    assert r.start_lr < r.suggested_lr <= r.end_lr
    assert_same(before, learn)   # every sweep started from the same state, and it is back


@pytest.mark.parametrize("mode", ["fastai", "smith"])
def test_fresh_learner_left_exactly_as_it_was(fastai_run, smith_run, mode):
    learn, before, r = fastai_run if mode == "fastai" else smith_run
    assert len(set(r.losses)) > 1   # the sweep trained: there was something to undo
    assert_same(before, learn)   # no optimizer was there and none is left
    assert not any(learn.path.iterdir())   # nothing written where the learner keeps its files


@pytest.mark.parametrize("mode", ["fastai", "smith"])
def test_after_a_previous_fit(fitted, mode):
    """fastai #3658 and friends: after a fit, the test works and leaves weights, BN stats, optimizer state,
    the scheduled hypers, eval mode and the Recorder's history of that fit untouched."""
    before = snapshot(fitted)
    assert not fitted.model.training and before["opt"]["hypers"][0]["lr"] != fitted.lr
    r = quiet_test(fitted, mode=mode, num_it=12)
    assert_sane(r)
    assert_same(before, fitted)
    assert not any(fitted.path.iterdir())


def test_plain_lr_find_is_what_needs_the_wrapper(fitted):
    """Why `kept_state` exists: fastai's `lr_find` after a fit resets the LR hyper to `learn.lr` (it saves the
    optimizer after `fit` has set it), replaces the Recorder's history, and leaves the model in train mode.
    (Run inside `kept_state`, which puts `fitted` back for the other tests.)"""
    before = snapshot(fitted)
    with kept_state(fitted):
        with fitted.no_bar():
            fitted.lr_find(num_it=6, show_plot=False, suggest_funcs=None)
        assert fitted.opt.hypers[0]["lr"] == fitted.lr != before["opt"]["hypers"][0]["lr"]
        assert fitted.recorder.values != before["values"]
        assert fitted.model.training and not before["modes"][0]
        assert (fitted.path / fitted.model_dir).is_dir()   # and it made a models/ folder under learn.path
    assert_same(before, fitted)
    (fitted.path / fitted.model_dir).rmdir()


def test_short_curve_does_not_raise_like_lr_find(fastai_result, dls):
    """The #3658 mechanism: `lr_find` keeps `[num_it//10:-5]` of the curve, and a sweep stopped early by
    `stop_div` leaves too little for fastai's rules, which raise; the guarded call answers sanely and says why."""
    lrs, losses = torch.tensor(fastai_result.lrs[:12]), torch.tensor(fastai_result.losses[:12])
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        valley(lrs[100 // 10:-5], losses[100 // 10:-5], 100)
    with pytest.raises(IndexError):
        slide(lrs, losses, 100)
    learn = small_learner(dls)
    with learn.added_cbs(PoisonBatch(at=12)):   # a curve of 12 points out of 100: 0 left after [10:-5]
        r = quiet_test(learn, mode="fastai", num_it=100)
    assert len(r.lrs) == 12
    assert_sane(r)
    assert any("#3658" in w for w in r.warnings) and r.reason.startswith("fallback")


class PoisonBatch(Callback):
    """Makes the training loss NaN from training step `at` on (a NaN input), as an absurd LR would."""
    def __init__(self, at: int):
        self.at = at

    def before_batch(self):
        if self.training and self.train_iter >= self.at:
            self.learn.xb = (self.xb[0] * float("nan"),)


@pytest.mark.parametrize("mode", ["fastai", "smith"])
def test_curve_cut_at_first_non_finite_loss(dls, mode):
    learn = small_learner(dls)
    before = snapshot(learn)
    with learn.added_cbs(PoisonBatch(at=7)):   # smith to 0.1 only: no divergence stop before step 7
        r = quiet_test(learn, mode=mode, num_it=12, end_lr=None if mode == "fastai" else 0.1)
    assert len(r.lrs) == 7   # steps 0..6 finite; in smith mode step 7's update poisons the held-out loss
    assert_sane(r)
    assert any("NaN/inf" in w for w in r.warnings)
    assert_same(before, learn)   # and no NaN left behind in the weights


def test_absurd_end_lr(dls):
    """Smith's linear sweep to 1e6 is at 5e4 by its second step: the loss goes non-finite at once. The test
    sweeps again up to where it did, up to MAX_ZOOMS times, says so, and answers sanely, with warnings. fastai's
    exponential sweep to 1e6 is stopped by its divergence test first; it must still give a sane answer."""
    r = quiet_test(small_learner(dls), mode="smith", num_it=20, end_lr=1e6)
    assert_sane(r)
    assert r.end_lr < 1e6 and any("went NaN/inf at" in w and "swept again" in w for w in r.warnings)
    assert "swept again" in r.reason
    r = quiet_test(small_learner(dls), mode="fastai", num_it=12, end_lr=1e6)
    assert_sane(r)
    assert r.lrs[-1] < 1e6


@pytest.mark.parametrize("mode,num_it", [("fastai", 8), ("smith", 5)])
def test_few_iterations_warn_and_stay_sane(dls, mode, num_it):
    r = quiet_test(small_learner(dls), mode=mode, num_it=num_it)
    assert_sane(r)
    assert any("unreliable" in w for w in r.warnings)


def test_smith_rule_on_known_curves():
    lrs = np.linspace(0.001, 1.0, 101)
    # a U: falling to a flat bottom over [0.3, 0.5], rising after; the rule takes the bottom's right end
    y = np.where(lrs < 0.3, 2.0 - 3 * lrs, np.where(lrs <= 0.5, 1.1, 1.1 + 4 * (lrs - 0.5)))
    noisy = y + np.random.default_rng(0).normal(0, 0.01, len(y))
    lr, points, why = smith_rule(lrs.tolist(), noisy.tolist())
    assert 0.45 <= points["max_converging"] <= 0.55 and points["min_loss"] <= points["max_converging"]
    assert lr == points["max_converging"] and "converging" in why
    # still falling at the end: the largest converging LR is the last one, however noisy the curve
    _, points, _ = smith_rule(lrs.tolist(), (2.0 - lrs + np.random.default_rng(1).normal(0, 0.01, len(lrs))).tolist())
    assert points["max_converging"] >= 0.95


def test_smith_rule_takes_the_first_climb_not_the_climb_after_a_later_minimum():
    """A fresh model on real data: flat near ln(10), a cliff at ~0.02, then, carried on at higher LRs, a recovery
    below where it started (a model that survived divergence). The largest converging LR is before the cliff."""
    lrs = np.linspace(0.001, 0.07, 100)
    y = np.full_like(lrs, 2.30)
    y[(lrs > 0.018) & (lrs < 0.045)] = 4.5                    # the cliff
    y[lrs >= 0.045] = np.linspace(2.4, 2.0, int((lrs >= 0.045).sum()))  # the recovery, below the start
    noisy = y + np.random.default_rng(0).normal(0, 0.01, len(y))
    lr, points, _ = smith_rule(lrs.tolist(), noisy.tolist())
    assert 0.013 <= lr <= 0.018 and points["min_loss"] <= lr


def test_bad_arguments(dls):
    learn = small_learner(dls)
    for kwargs in [dict(mode="other"), dict(start_lr=1.0, end_lr=0.1), dict(start_lr=-1.0), dict(num_it=1),
                   dict(end_lr=float("nan")), dict(mode="smith", val_batches=0)]:
        with pytest.raises(ValueError):
            lr_range_test(learn, **kwargs)


@pytest.mark.parametrize("which", ["fastai", "smith"])
def test_plot_and_files(fastai_result, smith_result, tmp_path, which):
    r = fastai_result if which == "fastai" else smith_result
    fig = plot_lr_range(r)
    ax = fig.axes[0]
    assert ax.get_xscale() == ("log" if which == "fastai" else "linear")
    labels = ax.get_legend_handles_labels()[1]
    for name, lr in r.suggestions.items():
        assert f"{name}: {lr:.2e}" in labels
    paths = write_lr_range(r, tmp_path / "run")
    assert paths["png"].stat().st_size > 10_000
    data = json.loads(paths["json"].read_text())
    assert JSON_KEYS <= set(data)
    assert data["mode"] == which and data["suggested_lr"] == r.suggested_lr
    assert data["lrs"] == r.lrs and data["losses"] == r.losses and data["suggestions"] == r.suggestions
    assert isinstance(data["reason"], str) and "\n" not in data["reason"]


def test_suggested_lr_trains(dls, smith_result):
    """The smith suggestion, as fit_one_cycle's peak for 3 epochs (18 steps), beats chance (25%, 8 of the 32
    validation images) clearly: at least 15 right has a chance of 0.4% by guessing.
    (fastai's valley from a 30-step sweep, about 5e-3 here, does not: too cautious for 18 steps.)"""
    learn = small_learner(dls, seed=2)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, smith_result.suggested_lr)
    assert max(float(v[2]) for v in learn.recorder.values) >= 15 / 32


def test_find_lr_command_writes_the_files(tiny_root, tmp_path):
    """`python main.py find-lr` calls `find_lr`: a fresh full-size model, the test, lr_find.png/.json in --out."""
    r = find_lr(data=tiny_root, bs=16, size=32, mode="smith", num_it=3, out=tmp_path / "lr")
    assert_sane(r)
    data = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert data["mode"] == "smith" and data["suggested_lr"] == r.suggested_lr and len(data["lrs"]) == len(r.lrs)
    assert (tmp_path / "lr" / "lr_find.png").exists()


def test_held_out_batches_are_the_same_images_every_time(dls, tmp_path):
    learn = small_learner(dls, path=tmp_path)
    a, b = held_out_batches(learn, 4), held_out_batches(learn, 4)
    assert len(a) == len(dls.valid) == 2   # asked for 4, the validation set has 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(held_out_batches(learn, 1)) == 1


def test_find_lr_and_fit_lr_auto_share_their_defaults():
    """`find-lr` shows the pick `fit --lr auto` would make: the same test, the same held-out batch count."""
    import inspect
    from tinyfast.config import RunConfig
    f, g = inspect.signature(find_lr).parameters, RunConfig()
    assert f["mode"].default == g.lr_mode == "smith"
    assert f["val_batches"].default == g.lr_val_batches
    assert f["num_it"].default == g.lr_num_it
