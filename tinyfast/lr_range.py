"""Learning-rate range tests that pick the peak LR for `fit_one_cycle`, leaving the Learner as they found it.

* ``mode="fastai"`` is fastai's `Learner.lr_find` itself: an exponential sweep (default 1e-7 to 10) read off
  the smoothed *training* loss by fastai's rules, `valley` first (fastai's default), then `minimum`, `slide`,
  `steep`. Guarded: a curve too short for fastai's rules (fastai #3658: `lr_find` slices ``[num_it//10 : -5]``
  and `slide` needs 16 points) falls back to one tenth of the LR at the lowest loss, with a warning.
* ``mode="smith"`` is Leslie Smith's test (2017, "Cyclical learning rates"; 2018, "A disciplined approach"),
  `callbacks.SmithLRFinder`: a *linear* sweep (default 1e-3 to 1.0), after every step the loss on the same held-out
  batches in eval mode (far steadier than the training loss of ever-changing batches, and the loss the
  schedule should improve), read by `smith_rule`. A fresh model diverges early in such a sweep (a 10-class
  subset: exploding by ~0.04, the 4th step of 100), so a sweep that diverges within its first quarter is run
  again from the same state up to where it did (at most `MAX_ZOOMS` times), and the reason says so.

Both run inside `kept_state` (the Learner exactly as it was afterwards) and end their curve at the first
non-finite loss with the guard `fit` uses (`StopOnNaN`); fastai's `stop_div` alone never fires on NaN.
The plot, the files and the `find-lr` command are in `lr_range_report`.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.learner import Learner

from .callbacks import SmithLRFinder, StopOnNaN
from .choices import MODES
from .config import RunConfig
from .learner import kept_state

DEFAULT_RANGE = {"fastai": (1e-7, 10.0), "smith": (1e-3, 1.0)}
MIN_RELIABLE_POINTS = 20   # below this many points on the curve, no rule is trustworthy: warn
SMITH_RISE = 0.10          # Smith rule: the curve "rises" once it is 10% of its descent above its minimum
SMITH_FLOOR = 0.05         # ... or 5% of the minimum loss, whichever is more: on a flat curve, noise is no rise
HELD_OUT_BATCHES = RunConfig.default("lr_val_batches")  # batches Smith's test measures after each step
MAX_ZOOMS = 4              # a Smith sweep that diverges within its first quarter is rerun up to where it did
FASTAI_RULES = {           # in order of preference: the first one that gives a usable LR is the suggestion
    "valley": (valley, "middle of the longest descending stretch of the training loss (fastai's default)"),
    "minimum": (minimum, "one tenth of the LR at the lowest training loss"),
    "slide": (slide, "where the training-loss slope stops changing, walking down from the divergence"),
    "steep": (steep, "the steepest descent of the training loss"),
}


@dataclass
class LRRangeResult:
    """One range test: the curve it measured (cut at the first non-finite loss), every rule's suggestion that
    lies in the swept range, the LR picked and why, and what makes it doubtful."""
    mode: str
    suggested_lr: float
    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float]
    reason: str
    warnings: list[str] = field(default_factory=list)
    start_lr: float = float("nan")
    end_lr: float = float("nan")
    num_it: int = 0


# ---------------------------------------------------------------------------------------------------------
# The sweeps
# ---------------------------------------------------------------------------------------------------------
def _fastai_sweep(learn: Learner, start_lr: float, end_lr: float, num_it: int):
    """fastai's `lr_find` with its rules: (lrs, losses, LR of the first non-finite loss or None, the rules' LRs,
    notes). Guarded against fastai #3658, a curve too short for the rules."""
    guard, found, notes = StopOnNaN(every=1, cancel=True), {}, []
    funcs = tuple(rule for rule, _ in FASTAI_RULES.values())
    with tempfile.TemporaryDirectory(prefix="tinyfast-lr-") as tmp, learn.added_cbs(guard):
        # LRFinder saves the model under learn.path: not the dataset root (maybe read-only) or a run folder;
        # kept_state puts path and model_dir back.
        learn.path, learn.model_dir = Path(tmp), "models"
        try:
            found = learn.lr_find(start_lr, end_lr, num_it, stop_div=True, show_plot=False,
                                  suggest_funcs=funcs)._asdict()
        except (IndexError, ValueError, RuntimeError) as e:   # raised by the rules, after the sweep
            notes.append(f"fastai's rules could not read a curve of {len(learn.recorder.lrs)} points "
                         f"(fastai #3658: {e.__class__.__name__})")
    lrs, losses = [float(x) for x in learn.recorder.lrs], [float(x) for x in learn.recorder.losses]
    return lrs, losses, guard.nonfinite_lr, {k: float(v) for k, v in found.items()}, notes


def held_out_batches(learn: Learner, n_batches: int) -> list[tuple]:
    """The first `n_batches` batches of `learn.dls.valid` (which does not shuffle), kept as tensors so every
    step of the sweep is measured on the same images."""
    batches = [tuple(t.detach() for t in b) for b in islice(learn.dls.valid, n_batches)]
    if not batches:
        raise ValueError("smith mode measures the loss on validation batches, but learn.dls.valid is empty")
    return batches


def _smith_sweep(learn: Learner, held_out: list[tuple], start_lr: float, end_lr: float, num_it: int):
    """(lrs, losses, LR of the first non-finite loss, training or held-out, or None)."""
    finder, guard = SmithLRFinder(held_out, start_lr, end_lr, num_it), StopOnNaN(every=1, cancel=True)
    with learn.no_logging():
        learn.fit(num_it // len(learn.dls.train) + 1, cbs=[finder, guard])
    return finder.lrs, finder.losses, guard.nonfinite_lr or finder.nonfinite_lr


# ---------------------------------------------------------------------------------------------------------
# Suggestion rules
# ---------------------------------------------------------------------------------------------------------
def smooth(losses: list[float] | np.ndarray, window: int | None = None) -> np.ndarray:
    """Centred moving average (window ~ a tenth of the curve, odd, at least 3; shrinking at the ends). Centred,
    unlike fastai's exponential average, so a feature of the curve stays at the LR where it happened."""
    y = np.asarray(losses, dtype=float)
    w = window or max(3, len(y) // 10)
    h = w // 2
    return np.array([y[max(0, i - h):i + h + 1].mean() for i in range(len(y))])


def smith_rule(lrs: list[float], losses: list[float]) -> tuple[float, dict[str, float], str]:
    """The largest LR that converges, read off the held-out loss: where the curve first climbs out of its bottom.

    Smith reads the range test for "the largest LR that converges" (2017, section 3.3), and the 1cycle takes it
    as its peak (2018; fastai's one-cycle): its warm-up and anneal hold it there only briefly. The reading made
    exact and noise-proof: smooth the curve (`smooth`), walk it from the start keeping its running minimum; the
    bottom is everything within `SMITH_RISE` of the descent so far above that minimum, or within `SMITH_FLOOR`
    of the minimum itself where the curve has barely descended (a fresh model stays near ln(classes) until it
    diverges: there a 10% band would be noise-thin). The suggestion is the last LR before the curve first
    leaves the bottom, or the last one swept if it never does (the caller warns: sweep further).

    The *first* climb, not the climb after the global minimum: a fresh model's held-out loss jumps at its first
    cliff (~0.02 on 10-class subsets at batch 64), then, carried on, falls below where it was; that later
    minimum is a model that survived divergence. Read after the global minimum, the rule picked ~0.031 there,
    2.8-3.8 points below the sweep's best; the first climb picks 0.015-0.019 (docs/BENCHMARKS.md).
    The climb itself, not a fraction of it: 0.8x the climb, run on the same 11 subset-seed cases, did no better
    (within 2 points of the sweep's best in 9 of 11 against 8, mean gap 0.82 points against 0.72).
    Returns (suggested LR, named points for the plot, a one-line reason)."""
    y = smooth(losses)
    lrs = np.asarray(lrs, dtype=float)
    low = np.minimum.accumulate(y)
    band = low + np.maximum(SMITH_RISE * np.maximum(y[0] - low, 0.0), SMITH_FLOOR * np.abs(low))
    above = np.nonzero(y > band)[0]
    i_edge = max(int(above[0]) - 1, 0) if len(above) else len(y) - 1
    i_min = int(np.argmin(y[:i_edge + 1]))
    lr = float(lrs[i_edge])
    points = {"min_loss": float(lrs[i_min]), "max_converging": lr, "smith": lr}
    why = (f"the largest converging LR {lr:.3g}, the last before the smoothed held-out loss first climbs out of "
           f"the bottom of the curve (lowest so far at lr {lrs[i_min]:.3g})")
    return lr, points, why


def _fallback(lrs: list[float], losses: list[float], start_lr: float) -> tuple[float, str]:
    """One tenth of the LR at the lowest loss seen (fastai's `minimum`): the rule of thumb that needs only one
    finite point, and that stays below any LR where the loss went up. Below start_lr when the loss only rose."""
    if not lrs:
        return start_lr / 10, f"no finite loss at all: start_lr/10 = {start_lr / 10:.3g}"
    lr = lrs[int(np.argmin(smooth(losses) if len(losses) >= 3 else losses))] / 10
    return lr, f"fallback: one tenth of the LR at the lowest loss = {lr:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------
def _check_args(learn: Learner, num_it: int, start_lr: float, end_lr: float, val_batches: int) -> None:
    if not isinstance(num_it, int) or num_it < 2:
        raise ValueError(f"num_it must be an integer >= 2, got {num_it!r}")
    if not (math.isfinite(start_lr) and math.isfinite(end_lr) and 0 < start_lr < end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr, both finite; got start_lr={start_lr}, end_lr={end_lr}")
    if not isinstance(val_batches, int) or val_batches < 1:
        raise ValueError(f"val_batches must be an integer >= 1, got {val_batches!r}")
    if len(learn.dls.train) == 0:
        raise ValueError("learn.dls.train has no batches (fewer training images than one batch?)")


def lr_range_test(learn: Learner, mode: str = "fastai", num_it: int = 100, start_lr: float | None = None,
                  end_lr: float | None = None, val_batches: int = HELD_OUT_BATCHES) -> LRRangeResult:
    """Run the range test `mode` on `learn` and suggest the peak LR for `fit_one_cycle`; `learn` (model,
    optimizer, Recorder history) is left as it was. Defaults: 1e-7 to 10 for fastai, 1e-3 to 1.0 for smith.
    The suggestion is the first rule's LR that is finite and in (start_lr, end_lr] (fastai: valley, minimum,
    slide, steep; smith: its rule), else `_fallback`'s, with a warning: never NaN, <= 0 or start_lr."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lo, hi = DEFAULT_RANGE[mode]
    start_lr, end_lr = float(lo if start_lr is None else start_lr), float(hi if end_lr is None else end_lr)
    _check_args(learn, num_it, start_lr, end_lr, val_batches)
    warnings: list[str] = []
    with kept_state(learn) as restore:
        if mode == "fastai":
            num_it = max(num_it, 6)   # fastai's LRFinder runs at least 6 steps whatever it is asked
            lrs, losses, bad_lr, found, notes = _fastai_sweep(learn, start_lr, end_lr, num_it)
            why = {k: w for k, (_, w) in FASTAI_RULES.items()}
        else:
            held_out = held_out_batches(learn, val_batches)
            lrs, losses, bad_lr = _smith_sweep(learn, held_out, start_lr, end_lr, num_it)
            for _ in range(MAX_ZOOMS):  # diverged early: the curve has no resolution below the cliff
                stop_lr = bad_lr if bad_lr is not None else (lrs[-1] if lrs else None)
                if len(lrs) >= max(MIN_RELIABLE_POINTS, num_it // 4) or stop_lr is None or stop_lr <= 2 * start_lr:
                    break
                warnings.append(f"the sweep to {end_lr:.3g} {'went NaN/inf' if bad_lr is not None else 'diverged'} "
                                f"at {stop_lr:.3g} after {len(lrs)} steps, so it was swept again to {stop_lr:.3g}")
                end_lr = stop_lr
                restore()
                lrs, losses, bad_lr = _smith_sweep(learn, held_out, start_lr, end_lr, num_it)
            found, notes, why = {}, [], {}
            if len(lrs) >= 3:
                _, found, why["smith"] = smith_rule(lrs, losses)
                if found["max_converging"] == lrs[-1] and len(lrs) == num_it:
                    notes.append(f"the held-out loss had not risen off its bottom by end_lr={end_lr:.3g}: the "
                                 f"suggestion is capped by the sweep; rerun with a larger end_lr")
            else:
                notes.append(f"the smith rule needs 3 points, the curve has {len(lrs)}")
    zooms = list(warnings)
    if bad_lr is not None:
        warnings.append(f"the loss became NaN/inf at lr {bad_lr:.3g}: curve cut there, suggestions from the "
                        f"{len(lrs)} finite points")
    if len(lrs) < MIN_RELIABLE_POINTS:
        warnings.append(f"only {len(lrs)} points on the curve (num_it={num_it}): the suggestion is unreliable; "
                        f"use num_it >= {MIN_RELIABLE_POINTS}, 100 is usual")
    warnings += notes
    suggestions = {k: v for k, v in found.items() if math.isfinite(v) and start_lr <= v <= end_lr}
    warnings += [f"{k} = {v:.3g} is outside the swept range [{start_lr:.3g}, {end_lr:.3g}]: dropped"
                 for k, v in found.items() if k not in suggestions]
    order = tuple(FASTAI_RULES) if mode == "fastai" else ("smith",)
    picked = next((k for k in order if k in suggestions and start_lr < suggestions[k] <= end_lr), None)
    if picked is None:
        suggested, reason = _fallback(lrs, losses, start_lr)
        warnings.append(f"no rule gave a usable LR; {reason}")
    else:
        suggested, reason = suggestions[picked], f"{picked}: {why[picked]}"
        if picked != order[0]:
            warnings.append(f"{order[0]} gave no usable LR (NaN, outside the range or start_lr); used {picked}")
            reason += f" ({order[0]} unusable)"
    if mode == "smith":
        reason += f"; held-out loss on {len(held_out)} validation batches" + "".join(f"; {z}" for z in zooms)
    return LRRangeResult(mode=mode, suggested_lr=float(suggested), lrs=lrs, losses=losses, suggestions=suggestions,
                         reason=reason, warnings=warnings, start_lr=start_lr, end_lr=end_lr, num_it=num_it)
