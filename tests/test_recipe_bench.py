"""The classic-recipe baseline and the recipe sweep: independent of tinyfast, same data, resumable.
Accuracy itself is measured on purpose (`python main.py bench recipe`), never asserted here."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import classic, recipe
from benchmarks.classic import ClassicResNet18, classic_fit, read_split
from tinyfast.data import is_val, tiny_imagenet_files
from tinyfast.model import resnet18


def test_classic_recipe_imports_nothing_of_tinyfast():
    tree = ast.parse(Path(classic.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.startswith(("tinyfast", "fastai", "."))]


def test_classic_split_is_tinyfasts_subset(tiny_root):
    wnids, train, val = read_split(tiny_root, classes=3, train_per_class=5)
    t_wnids, files, val_wnids = tiny_imagenet_files(tiny_root, 3, 5)
    assert wnids == t_wnids
    assert [p for p, _ in train] == [f for f in files if not is_val(f)]
    assert sorted(p for p, _ in val) == sorted(f for f in files if is_val(f))
    assert all(wnids[label] == val_wnids[p.name] for p, label in val)
    assert len(train) == 15 and len(val) == 3 * 8


def test_classic_model_keeps_pytorch_default_init():
    torch.manual_seed(0)
    model = ClassicResNet18(10)
    assert all(float(m.weight.min()) == 1.0 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = model.layer2[0].conv2
    assert float(conv.weight.abs().max()) <= 1 / (conv.weight[0].numel() ** 0.5)  # kaiming_uniform(a=sqrt(5))'s bound
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 10)


def test_tinyfast_init_choices():
    torch.manual_seed(0)
    default, previous = resnet18(10), resnet18(10, init="kaiming", zero_init_residual=True)
    conv, bound = default.layer2[0].conv2.weight, 1 / (128 * 9) ** 0.5
    assert float(conv.abs().max()) <= bound
    assert float(previous.layer2[0].conv2.weight.std()) == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert float(default.layer1[0].bn2.weight.min()) == 1.0
    assert float(previous.layer1[0].bn2.weight.abs().max()) == 0.0
    with pytest.raises(ValueError, match="init"):
        resnet18(10, init="xavier")


def test_classic_fit_trains_and_counts(tiny_root):
    seen = []
    rows = classic_fit(tiny_root, epochs=2, lr=0.05, bs=16, size=16, seed=0, precision="fp32", device="cpu",
                       on_epoch=seen.append)
    assert [r["epoch"] for r in rows] == [1, 2] and seen == rows
    assert all(0 <= r["accuracy"] <= 1 and r["train_loss"] > 0 for r in rows)
    assert 0 < rows[0]["seconds"] < rows[1]["seconds"]
    assert 0 < rows[0]["valid_seconds"] < rows[1]["valid_seconds"] and rows[0]["decode_seconds"] > 0
    with pytest.raises(ValueError, match="precision"):
        classic_fit(tiny_root, epochs=1, precision="fp16")


def test_sweep_appends_and_resumes(tiny_root, tmp_path, monkeypatch):
    results = tmp_path / "r.jsonl"
    kw = dict(lrs=(0.05,), seeds=(0,), epochs=1, bs=16, size=16, results=results, log=lambda m: None)
    rows = recipe.sweep([tiny_root], **kw)
    assert [(r["trainer"], r["variant"]) for r in rows] == [("classic", "bf16"), ("tinyfast", "defaults")]
    tiny = rows[1]
    assert tiny["independent_best"] == pytest.approx(tiny["best"], abs=1e-6)  # fastai's metric = a count from val_annotations
    assert len(results.read_text().splitlines()) == 2

    calls = []
    monkeypatch.setattr(recipe, "run_one", lambda *a, **k: calls.append(a) or dict(rows[0], lr=0.1))
    recipe.sweep([tiny_root], **kw)  # nothing new to run
    assert calls == []
    recipe.sweep([tiny_root], **{**kw, "lrs": (0.05, 0.1), "trainers": ("classic",)})
    assert len(calls) == 1 and calls[0][2] == 0.1
    assert [json.loads(line)["lr"] for line in results.read_text().splitlines()] == [0.05, 0.05, 0.1]
    table = recipe.format_results(recipe.read_results(results))
    assert "| classic | bf16 |" in table and "lr 0.1" in table


def test_sweep_refuses_bad_requests(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="auto"):
        recipe.sweep([tiny_root], trainers=("classic",), lrs=("auto",), results=tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="variant"):
        recipe.sweep([tiny_root], variant="bigger", results=tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="trainer"):
        recipe.sweep([tiny_root], trainers=("keras",), results=tmp_path / "r.jsonl")


@pytest.mark.parametrize("variant", ["ema-0.99", "progressive-half", "one-cycle-pct-0.5"])
def test_lever_variants_run_through_fits_callbacks(tiny_root, tmp_path, variant):
    """A variant trains through `fit`, with its options or a `RecipeChange`; the EMA's top-1 is the average's, as
    fastai counted it; every tinyfast row also has its TTA top-1."""
    rows = recipe.sweep([tiny_root], trainers=("tinyfast",), lrs=(0.05,), seeds=(0,), epochs=2, bs=16, size=16,
                        variant=variant, results=tmp_path / "r.jsonl", log=lambda m: None)
    (row,) = rows
    assert row["variant"] == variant and 0.0 <= row["tta_best"] <= 1.0
    assert row["independent_best"] == pytest.approx(row["best"], abs=1e-6)


def test_recipe_change_undoes_what_it_names_before_anything_trains(tiny_root):
    """`RecipeChange` on the Learner fit builds: by the time the other callbacks begin, the model is the other
    init, the optimizer is made again with the other arguments (decay off BatchNorm and biases), the training
    augmentation has no cutout, and the one-cycle schedule peaks where asked."""
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.schedule import ParamScheduler
    from tinyfast.data import AlbumentationsTransform, Cutout, tiny_imagenet_dls
    from tinyfast.learner import tiny_learner

    seen = {}

    class Look(Callback):
        order = -10

        def before_fit(self):
            learn, block = self.learn, self.learn.model.layer1[0]
            schedule = next(cb for cb in learn.cbs if isinstance(cb, ParamScheduler))
            augs = [t.aug for t in learn.dls.train.after_item.fs if isinstance(t, AlbumentationsTransform)]
            seen.update(opt=learn.opt, keywords=learn.opt_func.keywords, wd=learn.opt.hypers[-1]["wd"],
                        bn_decayed=learn.opt.state[block.bn2.weight].get("do_wd", True),
                        conv_decayed=learn.opt.state[block.conv1.weight].get("do_wd", True),
                        bn2=float(block.bn2.weight.abs().max()), lr=[np.asarray(schedule.scheds["lr"](p)).item() for p in (0.25, 0.5)],
                        cutouts=[t for a in augs for t in a.transforms if isinstance(t, Cutout)], augs=len(augs))
            raise CancelFitException

    dls = tiny_imagenet_dls(tiny_root, bs=8, size=16)
    learn = tiny_learner(dls, wd=5e-3)
    learn.create_opt()
    before = learn.opt
    assert any(isinstance(t, Cutout) for a in dls.train.after_item.fs if isinstance(a, AlbumentationsTransform)
               for t in a.aug.transforms)
    change = recipe.RecipeChange(16, **recipe.VARIANTS["previous"][1], cutout=False, one_cycle={"pct_start": 0.5})
    learn.fit_one_cycle(1, 0.1, cbs=[change, Look()])
    assert seen["opt"] is not before and seen["wd"] == 5e-3
    assert seen["keywords"]["decouple_wd"] is True and seen["keywords"]["nesterov"] is False
    assert seen["bn_decayed"] is False and seen["conv_decayed"] is True
    assert seen["bn2"] == 0.0  # zero-init residual: the last BatchNorm of each block starts at 0
    assert seen["lr"][1] == pytest.approx(0.1) and seen["lr"][0] < 0.1  # the peak at half the run, not a quarter
    assert seen["augs"] == 1 and seen["cutouts"] == []


def test_tinyfast_auto_is_fits_range_test_and_quiet(tiny_root, capsys, monkeypatch):
    """`--lr auto` in the benchmark is the range test `fit --lr auto` runs, with fit's defaults, and its pick is
    the LR trained at; the range test's bars stay out of the benchmark's log. (The sweep is cut to 8 steps: the
    mechanics, not the pick, are under test.)"""
    import tinyfast.lr_range
    from tinyfast.config import RunConfig

    calls, real = [], tinyfast.lr_range.lr_range_test

    def short(learn, **kw):
        calls.append(kw)
        result = real(learn, **{**kw, "num_it": 8})
        calls.append(result.suggested_lr)
        return result

    monkeypatch.setattr(tinyfast.lr_range, "lr_range_test", short)
    rows, used, _, _ = recipe.tinyfast_fit(tiny_root, epochs=1, lr="auto", bs=16, size=16, seed=3)
    assert "Epoch" not in capsys.readouterr().out
    d = RunConfig()
    assert calls[0] == {"mode": d.lr_mode, "num_it": d.lr_num_it, "val_batches": d.lr_val_batches}
    assert used == calls[1] and len(rows) == 1


def test_the_classic_side_of_the_head_to_head_is_independent_and_fits_its_epochs_to_the_budget(tiny_root, tmp_path):
    """benchmarks/head_to_head.py: the classic recipe given a wall-clock budget, its epochs set from a probe."""
    from benchmarks import head_to_head
    tree = ast.parse(Path(head_to_head.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith(("tinyfast", "fastai"))] and "classic" in imported
    assert head_to_head.parse_budget("60m") == 3600 and head_to_head.parse_budget("1.5h") == 5400
    with pytest.raises(ValueError, match="budget"):
        head_to_head.parse_budget("60")
    # 100,000 + 10,000 images, 0.4 s a step of 64, 20 s of validation, 270 us an image to decode: 30 s of decode,
    # 645 s an epoch; 3528 s of the hour (less its 2% margin) buys 5 epochs, 3000 s buys 4
    timing = {"step_s": 0.4, "valid_s": 20.0, "decode_s_per_image": 0.00027}
    assert head_to_head.epochs_for(3600, timing, 100_000, 10_000, 64) == 5
    assert head_to_head.epochs_for(3000, timing, 100_000, 10_000, 64) == 4
    assert head_to_head.epochs_for(10, timing, 100_000, 10_000, 64) == 1  # at least one
    results = tmp_path / "h2h.jsonl"
    row = head_to_head.main(["--data", str(tiny_root), "--budget", "2s", "--size", "16", "--bs", "16",
                             "--results", str(results)])
    assert json.loads(results.read_text()) == json.loads(json.dumps(row))
    assert row["epochs"] >= 1 and len(row["accuracies"]) == row["epochs"] and row["probe"]["step_s"] > 0
