"""Tests for tinyfast.interpret: every number checked against a count made here, independently of the module.

One learner is trained once for the module on the 4-class synthetic set; an untrained one (random weights,
so plenty of confusions) checks the confusion bookkeeping against fastai's own `ClassificationInterpretation`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.interpret import ClassificationInterpretation
from fastai.torch_core import set_seed
from fastai.vision.core import PILImage
from PIL import Image

from tinyfast.data import load_rgb, tiny_imagenet_dls
from tinyfast.dataset import DatasetError
from tinyfast.interpret import (
    ValPredictions, confusion_matrix, evaluate, evaluation_summary, interpret, interpretation_from_predictions,
    most_confused, per_class_table, plot_confusion, plot_full_confusion, plot_top_losses, predict_valid,
)
from tinyfast.learner import tiny_learner

SIZE = 32


@pytest.fixture(scope="module")
def learn(tiny_root):
    set_seed(0)
    dls = tiny_imagenet_dls(tiny_root, bs=16, size=SIZE, aug=False, device="cpu")
    learn = tiny_learner(dls)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(6, 0.02)  # with PyTorch's default init, 4 epochs at 0.05 overshoot on 96 images
    return learn


@pytest.fixture(scope="module")
def untrained(tiny_root):
    set_seed(1)
    return tiny_learner(tiny_imagenet_dls(tiny_root, bs=16, size=SIZE, aug=False, device="cpu"))


@pytest.fixture(scope="module")
def preds(learn) -> ValPredictions:
    with learn.no_bar():
        return predict_valid(learn)


@pytest.fixture(scope="module")
def untrained_preds(untrained) -> ValPredictions:
    with untrained.no_bar():
        return predict_valid(untrained)


def quiet(learn):
    return learn.no_bar()


def val_labels(root: Path) -> dict[str, str]:
    """file name -> wnid, read straight from the annotation file."""
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
    return {f: w for f, w, *_ in (line.split("\t") for line in lines if line.strip())}


def words(root: Path) -> dict[str, str]:
    lines = (root / "words.txt").read_text().splitlines()
    return {w: name for w, name in (line.split("\t", 1) for line in lines if line.strip())}


def independent_probs(learn, root: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's probabilities per val file, through fastai's own test_dl, and each file's true wnid."""
    labels = val_labels(root)
    files = sorted(labels, key=lambda f: int(Path(f).stem.split("_")[1]))
    dl = learn.dls.test_dl([root / "val" / "images" / f for f in files])
    with quiet(learn):
        probs = learn.get_preds(dl=dl)[0]
    return dict(zip(files, probs)), labels


# ---------------------------------------------------------------------------------------------------------
def test_evaluate_matches_an_independent_count(learn, tiny_root, tmp_path):
    with quiet(learn):
        result = evaluate(learn, tmp_path)
    probs, labels = independent_probs(learn, tiny_root)
    vocab = list(learn.dls.vocab)
    hits = sum(vocab[int(p.argmax())] == labels[f] for f, p in probs.items())
    k = min(5, len(vocab))
    top = sum(labels[f] in {vocab[i] for i in p.topk(k).indices.tolist()} for f, p in probs.items())
    nll = np.mean([-math.log(float(p[vocab.index(labels[f])])) for f, p in probs.items()])

    assert result["n"] == len(labels) == 32
    assert result["accuracy"] == pytest.approx(hits / len(labels))
    assert result["top5"] == pytest.approx(top / len(labels))
    assert result["loss"] == pytest.approx(nll, rel=1e-3)
    assert result["tta"] is False
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert {k: saved[k] for k in ("accuracy", "top5", "loss", "n")} == pytest.approx(
        {k: result[k] for k in ("accuracy", "top5", "loss", "n")})


def test_a_trained_model_is_well_above_chance(preds):
    """4 classes of one coloured shape: a few epochs learn the colour at least (seeded run: 15/32 right)."""
    assert preds.accuracy >= 0.4 > 1.5 / preds.n_classes
    assert preds.loss < math.log(preds.n_classes)  # better than a uniform guess, though confident on 96 images


def test_per_class_csv_adds_up_and_is_sorted_worst_first(learn, preds, tiny_root, tmp_path):
    evaluate(learn, tmp_path, p=preds)
    table = pd.read_csv(tmp_path / "per_class.csv")
    pd.testing.assert_frame_equal(table.fillna({"most_confused_with": ""}), per_class_table(preds), check_dtype=False)
    assert list(table.columns[:4]) == ["wnid", "name", "accuracy", "support"]
    assert table["support"].sum() == len(preds) == 32
    assert table["accuracy"].is_monotonic_increasing
    names = words(tiny_root)
    labels = val_labels(tiny_root)
    vocab = list(learn.dls.vocab)
    for row in table.itertuples():
        assert row.name == names[row.wnid]
        mine = [i for i, f in enumerate(Path(x).name for x in preds.items) if labels[f] == row.wnid]
        assert row.support == len(mine)
        assert row.accuracy == pytest.approx(np.mean([vocab[int(preds.preds[i])] == row.wnid for i in mine]))


def test_confusion_matrix_equals_a_naive_count(untrained_preds):
    p = untrained_preds
    naive = torch.zeros(p.n_classes, p.n_classes, dtype=torch.long)
    for t, q in zip(p.targets.tolist(), p.probs.argmax(1).tolist()):
        naive[t, q] += 1
    cm = confusion_matrix(p)
    assert torch.equal(cm, naive)
    assert (cm.sum() - cm.trace()) > 0  # random weights: there is something to confuse


@pytest.mark.parametrize("which", ["learn", "untrained"])
def test_most_confused_matches_fastai(which, request):
    lrn = request.getfixturevalue(which)
    p = request.getfixturevalue("preds" if which == "learn" else "untrained_preds")
    with quiet(lrn):
        theirs = ClassificationInterpretation.from_learner(lrn).most_confused()
    ours = most_confused(p)
    assert [(a, b, int(c)) for a, b, c in theirs] == list(
        ours[["actual_wnid", "predicted_wnid", "count"]].itertuples(index=False, name=None))
    assert ours["actual_name"].tolist() == [p.names[p.vocab.index(w)] for w in ours["actual_wnid"]]
    if which == "untrained":
        assert len(ours) > 0
    assert most_confused(p, min_val=10**6).empty


def test_fastai_interpretation_from_one_pass_does_not_predict_again(untrained, untrained_preds):
    p = untrained_preds
    with quiet(untrained):
        expected = ClassificationInterpretation.from_learner(untrained).most_confused()
    interp = interpretation_from_predictions(untrained, p)
    assert isinstance(interp, ClassificationInterpretation)

    def no_more(*args, **kwargs):
        raise AssertionError("get_preds called again")

    untrained.get_preds = no_more
    try:
        assert interp.most_confused() == expected
        np.testing.assert_array_equal(interp.confusion_matrix(), confusion_matrix(p).numpy())
        losses, idx = interp.top_losses(5)
        assert torch.equal(idx, p.losses.topk(5).indices)
    finally:
        del untrained.get_preds


def test_losses_are_plain_cross_entropy(preds):
    ce = -preds.probs[torch.arange(len(preds)), preds.targets].log()
    torch.testing.assert_close(preds.losses, ce, rtol=1e-4, atol=1e-5)
    assert preds.loss == pytest.approx(ce.mean().item(), rel=1e-4)
    again = ValPredictions(preds.probs, preds.targets, preds.items, preds.vocab, preds.names)  # losses derived
    torch.testing.assert_close(again.losses, preds.losses, rtol=1e-4, atol=1e-5)


def test_tta_averages_the_image_and_its_mirror(learn, preds, tmp_path):
    with quiet(learn):
        tta = predict_valid(learn, tta=True)
        # the mirror images, built here from the files, through fastai's test_dl
        mirrored = [PILImage.create(np.ascontiguousarray(load_rgb(f, SIZE)[:, ::-1])) for f in preds.items]
        flipped = learn.get_preds(dl=learn.dls.test_dl(mirrored))[0]
        result = evaluate(learn, tmp_path, tta=True)
    assert tta.items == preds.items
    assert not torch.allclose(tta.probs, preds.probs)
    torch.testing.assert_close(tta.probs, (preds.probs + flipped.float()) / 2, atol=2e-2, rtol=0)
    torch.testing.assert_close(tta.probs.sum(1), torch.ones(len(tta)))
    assert abs(tta.accuracy - preds.accuracy) <= 0.2 and tta.accuracy > 1 / tta.n_classes
    assert result["tta"] is True and result["accuracy"] == pytest.approx(tta.accuracy)


def test_calibration_is_merged_into_evaluation_json(learn, preds, tmp_path):
    pytest.importorskip("tinyfast.calibration")
    result = evaluate(learn, tmp_path, temperature=True, p=preds)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["nll"] == pytest.approx(saved["loss"], rel=1e-3)
    assert 0 <= saved["ece"] <= 1 and saved["temperature"] > 0
    assert saved == pytest.approx(result)
    assert (tmp_path / "reliability.png").is_file()


def test_interpret_writes_legible_figures(learn, preds, tmp_path):
    result = interpret(learn, tmp_path, top_losses=8, p=preds)
    for name, min_side in [("top_losses.png", 400), ("confusion.png", 300), ("confusion_full.png", 500)]:
        path = tmp_path / name
        assert Path(result["paths"][path.stem]) == path
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= min_side
    table = pd.read_csv(tmp_path / "most_confused.csv")
    assert list(table.columns) == ["actual_wnid", "actual_name", "predicted_wnid", "predicted_name", "count"]
    assert table["count"].sum() == (preds.preds != preds.targets).sum().item()


def test_top_losses_titles_name_the_classes(preds, tiny_root):
    names = words(tiny_root)
    fig = plot_top_losses(preds, k=6)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6
    worst = preds.losses.topk(6).indices.tolist()
    for ax, i in zip(shown, worst):
        title = ax.get_title()
        assert f"pred: {names[preds.vocab[int(preds.preds[i])]]}" in title
        assert f"actual: {names[preds.vocab[int(preds.targets[i])]]}" in title
        assert f"loss {preds.losses[i]:.2f}" in title
        assert ax.images[0].get_interpolation() == "nearest"
        assert ax.images[0].get_array().shape[:2] == (64, 64)  # the file at its own resolution
    assert len([ax for ax in plot_top_losses(preds, k=1000).axes if ax.images]) == len(preds)
    with pytest.raises(ValueError, match="k must be"):
        plot_top_losses(preds, k=0)


def test_confusion_figures(untrained_preds):
    p = untrained_preds
    fig = plot_confusion(p, n_pairs=2)
    ax = fig.axes[0]
    pairs = most_confused(p).head(2)
    involved = set(pairs["actual_name"]) | set(pairs["predicted_name"])
    assert {t.get_text() for t in ax.get_yticklabels()} == involved
    assert {t.get_text() for t in ax.get_xticklabels()} == involved
    assert str(pairs["count"].iloc[0]) in {t.get_text() for t in ax.texts}
    full = plot_full_confusion(p).axes[0]
    assert not full.get_xticks().size and not full.get_yticks().size
    rows = np.asarray(full.images[0].get_array())
    assert rows.shape == (p.n_classes, p.n_classes)
    np.testing.assert_allclose(rows.sum(1), 1.0)
    with pytest.raises(ValueError, match="n_pairs"):
        plot_confusion(p, n_pairs=0)


def test_bad_inputs_fail_with_one_line(learn, preds, tmp_path):
    with quiet(learn), pytest.raises(ValueError, match="no labels"):
        predict_valid(learn, dl=learn.dls.test_dl(preds.items[:1]))
    with pytest.raises(ValueError, match="same N images"):
        ValPredictions(preds.probs[:-1], preds.targets, preds.items, preds.vocab, preds.names)
    with pytest.raises(ValueError, match="classes"):
        ValPredictions(preds.probs, preds.targets, preds.items, preds.vocab[:-1], preds.names[:-1])
    with pytest.raises(DatasetError, match="cannot decode image .*moved"):
        plot_top_losses(preds, k=1, root=tmp_path / "moved")  # looked up under the new root
    plot_top_losses(preds, k=1, root=Path(preds.items[0]).parents[2])  # the data's own root: found
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        interpret(None, tmp_path / "file", p=preds)
    assert evaluation_summary(preds)["errors"] == int((preds.preds != preds.targets).sum())
