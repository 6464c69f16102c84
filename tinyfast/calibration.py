"""How far the model's probabilities can be trusted: calibration error, NLL, reliability plots, temperature.

Accuracy says how often the top class is right; calibration says whether a "90 % sure" prediction is right
90 % of the time. A network trained with SGD to low loss is typically over-confident, and one scalar
temperature dividing the logits (Guo et al., 2017, "On Calibration of Modern Neural Networks") fixes most of
it without changing a single prediction. fastai has no calibration metric, so this module adds the few pieces
needed on top of `Learner.get_preds` output: probabilities (N, C) and integer targets (N,).

Temperature is always fitted on one random half of the validation images and judged on the other half:
fitted and measured on the same images it would look better than it is.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

from .layout import RELIABILITY, RELIABILITY_TEMPERATURE, save_figure

N_BINS = 15
# Temperatures searched by `fit_temperature`: wide enough for any sane network, bounded so that perfectly
# separable data (NLL falls forever as T -> 0) still gives a finite answer.
T_RANGE = (0.01, 100.0)
_EPS = 1e-12  # probabilities are clipped here before a log, so one confident zero does not make NLL infinite


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x  # bf16 has no numpy dtype
        return x.as_subclass(torch.Tensor).numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything unconvertible is a bad argument
        raise ValueError(f"{name} must be a tensor or an array, got {type(x).__name__}") from e


def _check_targets(targets, n: int, n_classes: int) -> np.ndarray:
    t = _to_numpy(targets, "targets")
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"targets must have shape ({n},) to match the predictions, got {tuple(t.shape)}")
    if not (np.issubdtype(t.dtype, np.integer) or (np.issubdtype(t.dtype, np.floating) and np.all(t == np.round(t)))):
        raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
    t = t.astype(np.int64)
    if n and (t.min() < 0 or t.max() >= n_classes):
        raise ValueError(f"targets must lie in [0, {n_classes}), got values from {t.min()} to {t.max()}")
    return t


def _check_scores(scores, name: str) -> np.ndarray:
    s = _to_numpy(scores, name).astype(np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, C) with N >= 1 and C >= 2, got {tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _is_probs(s: np.ndarray) -> bool:
    # bf16 inference leaves softmax rows a little off 1, hence the loose tolerance.
    return bool(s.min() >= 0 and s.max() <= 1 and np.allclose(s.sum(1), 1, atol=2e-2))


def _check(probs, targets) -> tuple[np.ndarray, np.ndarray]:
    p = _check_scores(probs, "probs")
    if not _is_probs(p):
        raise ValueError("probs must be probabilities (each row >= 0 and summing to 1): pass softmax(logits)")
    return p, _check_targets(targets, len(p), p.shape[1])


def _check_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def reliability_bins(probs, targets, n_bins: int = N_BINS) -> pd.DataFrame:
    """Accuracy against confidence in `n_bins` equal-width bins over the top-class probability.

    A bin holds the predictions with lo < confidence <= hi (the first bin also takes 0). All bins are
    returned, empty ones with count 0 and NaN confidence/accuracy, so plots have a fixed layout."""
    p, t = _check(probs, targets)
    n_bins = _check_bins(n_bins)
    conf, correct = p.max(1), (p.argmax(1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, minlength=n_bins) / count
        acc = np.bincount(idx, correct, minlength=n_bins) / count
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": count, "confidence": mean_conf, "accuracy": acc})


def _ece_from_bins(bins: pd.DataFrame) -> float:
    full = bins[bins["count"] > 0]
    return float((full["count"] * (full["accuracy"] - full["confidence"]).abs()).sum() / full["count"].sum())


def expected_calibration_error(probs, targets, n_bins: int = N_BINS) -> float:
    """ECE: the gap |accuracy - confidence| per confidence bin, weighted by the share of images in the bin.
    0 is perfectly calibrated; 0.1 means the model's stated confidence is off by 10 points on average."""
    return _ece_from_bins(reliability_bins(probs, targets, n_bins))


def negative_log_likelihood(probs, targets) -> float:
    """Mean -log p(true class): the cross-entropy the model would score on these images (no label smoothing).
    Unlike ECE it needs no binning and punishes confident mistakes hardest."""
    p, t = _check(probs, targets)
    return float(-np.log(np.clip(p[np.arange(len(t)), t], _EPS, None)).mean())


def _as_logits(logits_or_probs, kind: str) -> np.ndarray:
    """Logits from either input: log-probabilities are the logits up to a per-row constant, which softmax and
    temperature scaling both ignore."""
    if kind not in ("auto", "logits", "probs"):
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    s = _check_scores(logits_or_probs, "logits_or_probs")
    if kind == "probs" or (kind == "auto" and _is_probs(s)):
        if not _is_probs(s):
            raise ValueError("kind='probs' but the rows are not probabilities (>= 0, summing to 1)")
        return np.log(np.clip(s, _EPS, None))
    return s


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def apply_temperature(logits_or_probs, temperature: float, kind: str = "auto") -> np.ndarray:
    """Probabilities after dividing the logits by `temperature` (T > 1 softens, T < 1 sharpens).
    The argmax, hence accuracy, is unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return _softmax(_as_logits(logits_or_probs, kind) / temperature)


def _nll_at(z: np.ndarray, t: np.ndarray, temperature: float) -> float:
    zt = z / temperature
    zt = zt - zt.max(1, keepdims=True)
    return float((np.log(np.exp(zt).sum(1)) - zt[np.arange(len(t)), t]).mean())


def fit_temperature(logits_or_probs, targets, kind: str = "auto") -> float:
    """The single temperature T that minimises the NLL of softmax(logits / T) on these images.

    NLL is convex in 1/T, so a bounded 1-D search over log T finds the one minimum without the step-size
    care LBFGS needs. `kind="auto"` treats rows that are non-negative and sum to 1 as probabilities."""
    z = _as_logits(logits_or_probs, kind)
    t = _check_targets(targets, len(z), z.shape[1])
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    res = minimize_scalar(lambda u: _nll_at(z, t, float(np.exp(u))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-5})
    return float(np.exp(res.x))


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into a fit half and a report half (disjoint, together all of n);
    random rather than first/second half because the validation set may be ordered by class."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"temperature scaling needs at least 2 images to split in two halves, got {n!r}")
    perm = np.random.default_rng(seed).permutation(int(n))
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def plot_reliability(probs, targets, n_bins: int = N_BINS, title: str | None = None) -> Figure:
    """Reliability diagram: per confidence bin, the accuracy (bars) against the diagonal a calibrated model
    would follow, the gap between accuracy and mean confidence shaded (red: over-confident, orange: under);
    below, how many images each bin holds (log scale when counts span decades), since a big gap in a
    near-empty bin matters little."""
    bins = reliability_bins(probs, targets, n_bins)
    ece, n = _ece_from_bins(bins), int(bins["count"].sum())
    width = 1.0 / len(bins)
    centres = (bins["lo"] + bins["hi"]) / 2
    full = bins["count"] > 0

    fig, (ax, axn) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]},
                                  layout="constrained")
    ax.bar(centres[full], bins["accuracy"][full], width=width, color="tab:blue", edgecolor="white",
           label="accuracy")
    over = full & (bins["confidence"] > bins["accuracy"])
    under = full & (bins["confidence"] < bins["accuracy"])
    if over.any():
        ax.bar(centres[over], (bins["confidence"] - bins["accuracy"])[over], bottom=bins["accuracy"][over],
               width=width, color="#f4b6b6", edgecolor="tab:red", hatch="//",
               label="over-confident (confidence above)")
    if under.any():
        ax.bar(centres[under], (bins["accuracy"] - bins["confidence"])[under], bottom=bins["confidence"][under],
               width=width, color="#fdd9a0", edgecolor="tab:orange", hatch="\\\\",
               label="under-confident (accuracy above)")
    ax.plot(bins["confidence"][full], bins["accuracy"][full], "o", color="black", ms=4,
            label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(f"{title or 'Reliability'}\nECE {ece:.3f} ({100 * ece:.1f} points), n={n}, {len(bins)} bins",
                 fontsize=11)

    axn.bar(centres, bins["count"], width=width, color="tab:gray", edgecolor="white")
    axn.set(xlabel="confidence (top-class probability)", ylabel="images")
    if bins["count"].max() > 0 and bins["count"][full].max() / max(bins["count"][full].min(), 1) > 50:
        axn.set_yscale("log")
    axn.grid(alpha=0.3, axis="y")
    return fig


def calibration_summary(probs, targets, out: str | Path | None = None, temperature: bool = False,
                        seed: int = 0, n_bins: int = N_BINS) -> dict:
    """ECE and NLL of these predictions; with `temperature=True`, also the effect of temperature scaling,
    fitted on one random half of the images and measured on the other half only.

    Returns {"ece", "nll", "n_bins", "n"} (all images, nothing fitted) plus, with temperature, {"temperature",
    "ece_before", "nll_before", "ece_after", "nll_after", "n_fit", "n_report"} (before/after both on the report
    half). With `out`, writes reliability.png (and reliability_temperature.png: report half, after scaling)."""
    p, t = _check(probs, targets)
    n_bins = _check_bins(n_bins)
    summary: dict = {"ece": expected_calibration_error(p, t, n_bins), "nll": negative_log_likelihood(p, t),
                 "n_bins": n_bins, "n": len(t)}
    out_dir = None if out is None else Path(out)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_figure(plot_reliability(p, t, n_bins, title="Reliability (all validation images)"),
                    out_dir / RELIABILITY, dpi=120)
    if not temperature:
        return summary

    fit, rep = split_halves(len(t), seed)
    temp = fit_temperature(p[fit], t[fit], kind="probs")
    after = apply_temperature(p[rep], temp, kind="probs")
    summary.update(temperature=temp,
               ece_before=expected_calibration_error(p[rep], t[rep], n_bins),
               nll_before=negative_log_likelihood(p[rep], t[rep]),
               ece_after=expected_calibration_error(after, t[rep], n_bins),
               nll_after=negative_log_likelihood(after, t[rep]),
               n_fit=len(fit), n_report=len(rep))
    if out_dir is not None:
        title = (f"After temperature scaling, T={temp:.2f}\nfitted on {len(fit)} images, shown on the other "
                 f"{len(rep)} (ECE before: {summary['ece_before']:.3f})")
        save_figure(plot_reliability(after, t[rep], n_bins, title=title), out_dir / RELIABILITY_TEMPERATURE, dpi=120)
    return summary
