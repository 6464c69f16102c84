"""Calibration metrics against synthetic predictions whose calibration is known by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from tinyfast.calibration import (
    apply_temperature,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    plot_reliability,
    reliability_bins,
    split_halves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def predictions_with_confidence(conf: np.ndarray, correct: np.ndarray, n_classes: int = 10, seed: int = 0):
    """Probabilities whose top class has probability `conf` (rest spread evenly) and is right where `correct`."""
    rng = np.random.default_rng(seed)
    n = len(conf)
    pred = rng.integers(0, n_classes, n)
    probs = np.repeat(((1 - conf) / (n_classes - 1))[:, None], n_classes, axis=1)
    probs[np.arange(n), pred] = conf
    wrong = (pred + rng.integers(1, n_classes, n)) % n_classes  # any class but pred
    return probs, np.where(correct, pred, wrong)


def calibrated_logits(n: int = 20000, n_classes: int = 10, seed: int = 0):
    """Logits with targets drawn from softmax(logits): calibrated at T=1 by construction."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, n_classes, generator=g) * 2.0
    t = torch.multinomial(F.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, t


def naive_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Textbook loop: bins (i/n, (i+1)/n], the first one closed at 0."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        in_bin = [k for k in range(len(conf)) if (lo < conf[k] <= hi) or (i == 0 and conf[k] == 0)]
        if in_bin:
            acc = sum(pred[k] == targets[k] for k in in_bin) / len(in_bin)
            avg_conf = sum(conf[k] for k in in_bin) / len(in_bin)
            total += len(in_bin) / len(conf) * abs(acc - avg_conf)
    return total


def test_perfectly_calibrated_set_has_ece_near_zero():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.15, 1.0, 60000)
    probs, targets = predictions_with_confidence(conf, rng.random(len(conf)) < conf)
    assert expected_calibration_error(probs, targets) < 0.02


def test_over_confident_set_has_ece_of_the_gap():
    n = 1000
    correct = np.arange(n) < 600  # exactly 60 % right, always 99 % sure
    probs, targets = predictions_with_confidence(np.full(n, 0.99), correct)
    assert expected_calibration_error(probs, targets) == pytest.approx(0.39, abs=1e-9)
    bins = reliability_bins(probs, targets)
    assert len(bins) == 15 and bins["count"].sum() == n
    assert bins["count"].iloc[-1] == n  # every image in the top bin (14/15, 1]
    assert bins["accuracy"].iloc[-1] == pytest.approx(0.6)


@pytest.mark.parametrize("n_bins", [15, 10, 4])
def test_ece_matches_naive_loop(n_bins):
    rng = np.random.default_rng(n_bins)
    probs = rng.dirichlet(np.full(5, 0.3), size=400)
    targets = rng.integers(0, 5, 400)
    assert expected_calibration_error(probs, targets, n_bins) == pytest.approx(naive_ece(probs, targets, n_bins),
                                                                              abs=1e-12)


def test_confidences_on_bin_edges_fall_in_the_lower_bin():
    # confidence exactly 0.2 = 3/15 belongs to bin (2/15, 3/15], like the naive loop says
    conf = np.array([0.2, 0.2, 1.0, 1 / 3])
    probs, targets = predictions_with_confidence(conf, np.array([True, False, True, True]), n_classes=5)
    bins = reliability_bins(probs, targets)
    assert bins["count"].tolist()[2] == 2 and bins["count"].tolist()[14] == 1 and bins["count"].tolist()[4] == 1
    assert expected_calibration_error(probs, targets) == pytest.approx(naive_ece(probs, targets, 15), abs=1e-12)


def test_nll_equals_torch_cross_entropy_on_log_probs():
    z, t = calibrated_logits(500, 7)
    probs = F.softmax(z, 1)
    expected = F.cross_entropy(torch.log(probs), t).item()
    assert negative_log_likelihood(probs, t) == pytest.approx(expected, rel=1e-5)
    assert negative_log_likelihood(probs.numpy(), t.numpy()) == pytest.approx(expected, rel=1e-5)


def test_torch_and_numpy_inputs_agree():
    z, t = calibrated_logits(300, 6)
    probs = F.softmax(z, 1)
    assert expected_calibration_error(probs, t) == pytest.approx(expected_calibration_error(probs.numpy(), t.numpy()))
    bf16 = probs.to(torch.bfloat16)  # what get_preds can return under bf16 autocast
    assert expected_calibration_error(bf16, t) == pytest.approx(expected_calibration_error(probs, t), abs=0.02)


def test_temperature_recovers_over_confidence_factor():
    z, t = calibrated_logits()
    T = fit_temperature(z * 3, t)
    assert T == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(F.softmax(z * 3, 1), t) == pytest.approx(T, rel=1e-3)  # from probabilities
    assert fit_temperature(z, t) == pytest.approx(1.0, rel=0.05)
    sharpened = fit_temperature(z / 2, t)  # under-confident -> T < 1
    assert sharpened == pytest.approx(0.5, rel=0.05)


def test_temperature_keeps_predictions_and_sharpness_direction():
    z, _ = calibrated_logits(200)
    soft = apply_temperature(z, 2.0)
    assert (soft.argmax(1) == z.numpy().argmax(1)).all()
    assert (soft.max(1) <= F.softmax(z, 1).numpy().max(1) + 1e-9).all()
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(z, 0.0)


def test_split_halves_are_disjoint_cover_all_and_are_seeded():
    fit, rep = split_halves(1001, seed=3)
    assert len(set(fit) & set(rep)) == 0
    assert sorted(set(fit) | set(rep)) == list(range(1001))
    assert abs(len(fit) - len(rep)) <= 1
    fit2, _ = split_halves(1001, seed=3)
    assert (fit == fit2).all()
    assert not (split_halves(1001, seed=4)[0] == fit).all()
    assert not (fit == np.arange(len(fit))).all()  # random, not the first half of a class-ordered set
    with pytest.raises(ValueError, match="2 images"):
        split_halves(1)


def test_summary_fits_on_one_half_and_reports_on_the_other(tmp_path):
    z, t = calibrated_logits()
    probs = F.softmax(z * 3, 1)
    s = calibration_summary(probs, t, out=tmp_path, temperature=True, seed=5)
    assert s["n_bins"] == 15 and s["n"] == len(t)
    assert s["ece"] == pytest.approx(expected_calibration_error(probs, t))
    assert s["nll"] == pytest.approx(negative_log_likelihood(probs, t))
    fit, rep = split_halves(len(t), seed=5)
    assert (s["n_fit"], s["n_report"]) == (len(fit), len(rep))
    assert s["temperature"] == pytest.approx(fit_temperature(probs[fit], t[fit]), rel=1e-6)
    assert s["temperature"] == pytest.approx(3.0, rel=0.05)
    assert s["ece_before"] == pytest.approx(expected_calibration_error(probs[rep], t[rep]))
    assert s["nll_before"] == pytest.approx(negative_log_likelihood(probs[rep], t[rep]))
    assert s["ece_after"] < s["ece_before"] / 3 and s["ece_after"] < 0.03
    assert s["nll_after"] < s["nll_before"]
    for name in ("reliability.png", "reliability_temperature.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_summary_without_temperature_writes_one_plot(tmp_path):
    probs, targets = predictions_with_confidence(np.full(100, 0.99), np.arange(100) < 60)
    s = calibration_summary(probs, targets, out=tmp_path / "new")
    assert set(s) == {"ece", "nll", "n_bins", "n"}
    assert s["ece"] == pytest.approx(0.39)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["reliability.png"]


def test_plot_reliability_returns_figure_with_ece_in_title():
    z, t = calibrated_logits(500)
    probs = F.softmax(z * 3, 1)
    fig = plot_reliability(probs, t, title="valid")
    assert isinstance(fig, Figure)
    title = fig.axes[0].get_title()
    assert "valid" in title and f"ECE {expected_calibration_error(probs, t):.3f}" in title


@pytest.mark.parametrize("probs, targets, match", [
    (np.full((4, 3), 0.5), np.zeros(4, int), "sum"),         # not probabilities
    (np.full((4, 3), 1 / 3), np.zeros(3, int), "shape"),      # wrong number of targets
    (np.full((4, 3), 1 / 3), np.array([0, 1, 2, 3]), r"\[0, 3\)"),  # class out of range
    (np.full(4, 0.5), np.zeros(4, int), "shape"),             # 1-D scores
    (np.full((4, 3), np.nan), np.zeros(4, int), "NaN"),
])
def test_bad_inputs_raise_one_line_errors(probs, targets, match):
    with pytest.raises(ValueError, match=match) as e:
        expected_calibration_error(probs, targets)
    assert "\n" not in str(e.value)


def test_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(np.full((2, 2), 0.5), np.zeros(2, int), n_bins=0)
