"""The training levers' mechanics (their accuracy is a benchmark, docs/BENCHMARKS.md): the EMA weights differ
from the raw ones, are what is validated, saved and what `load_run` gives, and survive a resume; mixup and
cutmix mix the inputs and the targets; progressive resizing trains at the planned size each epoch; TTA is
scored and written."""
from __future__ import annotations

import json

import pytest
import torch
from fastai.callback.core import Callback

from tinyfast.callbacks import EMA, ema_decay, progressive_sizes
from tinyfast.train import RunError, fit, load_run

SMALL = dict(size=16, bs=16, quiet=True)


class Spy(Callback):
    """Records, per training batch, the input size, and for the first batch the (xb, yb) the model gets."""
    order = 95  # after every lever's before_batch

    def __init__(self):
        self.sizes, self.first = {}, None

    def before_batch(self):
        if self.training:
            self.sizes.setdefault(self.epoch, set()).add(tuple(self.xb[0].shape[-2:]))
            if self.first is None:
                self.first = [t.clone() for t in self.xb], [t.clone() for t in self.yb], getattr(self.learn, "mix_up", None) or getattr(self.learn, "cut_mix", None)


def test_ema_average_follows_the_rule():
    """First update: a copy; then avg += (1 - d) * (current - avg) with timm's warm-up d = min(decay, (1+n)/(10+n));
    integer buffers are copied. Checked against that rule written out, tensor by tensor."""
    from types import SimpleNamespace
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(0.9)
    ema.learn = SimpleNamespace(model=model)
    ema.before_fit()
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # moves the BatchNorm buffers, num_batches_tracked included
        ema.after_step()
        current = {k: v.clone() for k, v in model.state_dict().items()}
        if expected is None:
            expected = current
        else:
            d = ema_decay(0.9, n)
            expected = {k: (e + (current[k] - e) * (1 - d)) if e.is_floating_point() else current[k]
                        for k, e in expected.items()}
    got = ema.averaged_state()
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-6) for k in expected)
    assert int(got["1.num_batches_tracked"]) == 6 and int(ema.averaged.n_averaged) == 6
    assert ema_decay(0.9, 0) == pytest.approx(0.1) and ema_decay(0.9, 1000) == 0.9


def test_ema_run_validates_and_saves_the_ema_weights(tiny_root, tmp_path):
    run = fit(tiny_root, epochs=2, lr=0.05, out=tmp_path / "ema", ema=0.9, **SMALL)
    saved = torch.load(run.run_dir / "model.pth")
    raw = torch.load(run.run_dir / "checkpoint.pth", weights_only=False)
    assert raw["ema"] is not None
    differ = [k for k in saved if saved[k].is_floating_point() and not torch.allclose(saved[k], raw["model"][k])]
    assert len(differ) > len(saved) // 2  # the EMA weights are not the raw weights
    ema_weights = {k[len("module."):]: v for k, v in raw["ema"].items() if k.startswith("module.")}
    if run.best_epoch == 2:  # model.pth is the EMA of the best epoch, and the last one is in the checkpoint
        assert all(torch.equal(saved[k], ema_weights[k]) for k in saved)
    learn = load_run(run.run_dir)
    assert all(torch.equal(v, saved[k]) for k, v in learn.model.state_dict().items())
    # what was validated is the EMA model: its accuracy on the validation set is the recorded one
    metrics = [r for r in (run.run_dir / "metrics.csv").read_text().splitlines()[1:]]
    best_logged = max(float(r.split(",")[3]) for r in metrics)
    _, acc, _ = learn.validate()
    assert acc == pytest.approx(best_logged, abs=1e-6)


def test_ema_resumes_where_it_stopped(tiny_root, tmp_path):
    whole = fit(tiny_root, epochs=2, lr=0.05, out=tmp_path / "whole", ema=0.9, **SMALL)

    class StopAfterFirstEpoch(Callback):
        order = 99
        def after_epoch(self):
            if self.epoch == 0:
                raise KeyboardInterrupt

    with pytest.raises(RunError):
        fit(tiny_root, epochs=2, lr=0.05, out=tmp_path / "cut", ema=0.9, cbs=[StopAfterFirstEpoch()], **SMALL)
    resumed = fit(out=tmp_path / "cut", resume=True, quiet=True)
    a = torch.load(whole.run_dir / "checkpoint.pth", weights_only=False)["ema"]
    b = torch.load(resumed.run_dir / "checkpoint.pth", weights_only=False)["ema"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.parametrize("lever", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_inputs_and_targets(tiny_root, tmp_path, lever):
    before, after = Spy(), Spy()
    before.order = -1  # before fastai's MixUp/CutMix (order 0) change the batch
    fit(tiny_root, epochs=1, lr=0.05, out=tmp_path / lever, cbs=[before, after], **{lever: 1.0}, **SMALL)
    (raw,), (yb,), _ = before.first
    (mixed,), (yb_after,), mixer = after.first
    assert mixer is not None and torch.equal(yb_after, yb)
    assert not torch.equal(mixer.yb1[0], yb)  # a second target for each image, blended in the loss by lam
    lam = mixer.lam
    assert bool(((lam > 0) & (lam < 1)).all()) if lever == "mixup" else 0 < float(lam) < 1
    same = torch.isclose(mixed, raw).all(1)  # per pixel
    if lever == "mixup":
        assert not same.any(dim=(1, 2)).all() or not torch.allclose(mixed, raw)  # every image is a blend
        assert not torch.allclose(mixed, raw)
    else:  # a box pasted from another image, the rest left as it was
        assert same.any() and not same.all()


def test_mixup_and_cutmix_together_are_refused(tiny_root, tmp_path):
    with pytest.raises(RunError, match="--mixup and --cutmix"):
        fit(tiny_root, epochs=1, out=tmp_path / "both", mixup=0.4, cutmix=1.0, **SMALL)
    assert not (tmp_path / "both").exists()


def test_progressive_sizes_plan():
    assert progressive_sizes(64, 8, 32) == [32, 40, 48, 56, 64, 64, 64, 64]
    assert progressive_sizes(64, 30, 32)[:2] == [32, 32] and progressive_sizes(64, 30, 32)[15:] == [64] * 15
    assert progressive_sizes(32, 1, 16) == [16]
    with pytest.raises(ValueError):
        progressive_sizes(32, 4, 48)


def test_progressive_resizing_trains_at_the_planned_sizes(tiny_root, tmp_path):
    spy = Spy()
    run = fit(tiny_root, epochs=4, lr=0.05, out=tmp_path / "prog", progressive=8, cbs=[spy], **SMALL)
    planned = progressive_sizes(16, 4, 8)
    assert planned[0] == 8 and planned[-1] == 16  # [8, 16, 16, 16]: 12 px rounds to the 8-px step
    assert spy.sizes == {e: {(s, s)} for e, s in enumerate(planned)}
    assert json.loads((run.run_dir / "config.json").read_text())["args"]["progressive"] == 8


def test_tta_is_scored_and_written(tiny_root, tmp_path):
    run = fit(tiny_root, epochs=1, lr=0.05, out=tmp_path / "tta", tta=True, **SMALL)
    scores = json.loads((run.run_dir / "tta.json").read_text())
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["without_tta"] == pytest.approx(run.best_accuracy)
    assert run.tta_accuracy == pytest.approx(scores["accuracy"])


@pytest.mark.parametrize("flags, message", [(dict(ema=1.0), "--ema"), (dict(progressive=64), "--progressive")])
def test_bad_lever_values_are_refused(tiny_root, tmp_path, flags, message):
    with pytest.raises(RunError, match=message):
        fit(tiny_root, epochs=1, out=tmp_path / "bad", **flags, **SMALL)
