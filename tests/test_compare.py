"""Run comparison on fake run folders (config.json + metrics.csv as `main.py fit` writes them): no training."""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from tinyfast.compare import compare_runs, read_run, to_markdown, write_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_ARGS = {"data": "data/tiny-imagenet-200", "size": 64, "bs": 256, "stem": "cifar", "epochs": 6, "lr": 0.1,
             "schedule": "one-cycle", "wd": 5e-4, "seed": 0, "out": None}


def make_run(parent: Path, name: str, accuracy: list[float], epoch_seconds: float = 60.0, sha: str = "a" * 40,
             **args) -> Path:
    """A run folder with made-up but plausible curves: loss falls as accuracy rises, top5 above top1,
    epoch times jittering around `epoch_seconds`; `args` override the fit arguments in config.json."""
    d = parent / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    config = {"command": "fit", "args": {**BASE_ARGS, "out": f"runs/{name}", **args},
              "versions": {"torch": "2.x", "fastai": "2.8.12"},
              "dataset": {"root": "data/tiny-imagenet-200", "wnids_sha1": sha}}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    elapsed = 0.0
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "valid_loss", "accuracy", "top5", "time", "elapsed"])
        for epoch, acc in enumerate(accuracy):
            t = epoch_seconds * rng.uniform(0.9, 1.1)
            elapsed += t
            w.writerow([epoch, 5.3 - 3 * acc + 0.1, 5.3 - 3.5 * acc, acc, min(1.0, acc + 0.25), round(t, 3),
                        round(elapsed, 3)])
    return d


def rows_of(run_dir: Path) -> list[dict]:
    """metrics.csv as floats, read with the csv module (an independent path from pandas)."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        make_run(tmp_path, "base", [0.10, 0.25, 0.41, 0.52, 0.60, 0.58]),
        make_run(tmp_path, "high_lr", [0.05, 0.30, 0.55, 0.62, 0.66, 0.69], epoch_seconds=45, lr=0.4),
        make_run(tmp_path, "step", [0.12, 0.22, 0.31, 0.38, 0.44, 0.47], schedule="step", lr=0.4),
    ]


def test_table_numbers_equal_independent_computations(runs):
    table, fig = compare_runs(runs, at=0.5)
    assert isinstance(fig, Figure)
    assert table["run"].tolist() == ["base", "high_lr", "step"]
    for d in runs:
        rows = rows_of(d)
        args = json.loads((d / "config.json").read_text())["args"]
        r = table.set_index("run").loc[d.name]
        best = max(range(len(rows)), key=lambda i: (rows[i]["accuracy"], -i))  # first epoch at the maximum
        assert r["best_top1"] == pytest.approx(rows[best]["accuracy"])
        assert r["final_top1"] == pytest.approx(rows[-1]["accuracy"])
        assert r["best_top5"] == pytest.approx(max(x["top5"] for x in rows))
        assert r["final_top5"] == pytest.approx(rows[-1]["top5"])
        assert r["best_epoch"] == rows[best]["epoch"]
        assert r["time_to_best"] == pytest.approx(rows[best]["elapsed"])
        assert r["time_to_best"] == pytest.approx(sum(x["time"] for x in rows[: best + 1]), abs=0.01)
        assert (r["schedule"], r["lr"], r["epochs"], r["bs"]) == (args["schedule"], args["lr"], args["epochs"],
                                                                   args["bs"])
        assert r["epochs_done"] == len(rows) and bool(r["finished"])
    # base falls back from its best (epoch 4) at the end; reaching 0.5 happens at epoch 3
    base = table.iloc[0]
    assert base["best_epoch"] == 4 and base["final_top1"] < base["best_top1"]


def test_time_to_at_is_first_crossing_and_blank_when_never_reached(runs, tmp_path):
    table, _ = compare_runs(runs, at=0.5)
    col = table.set_index("run")["time_to_0.5"]
    for d in runs:
        rows = rows_of(d)
        first = next((x["elapsed"] for x in rows if x["accuracy"] >= 0.5), None)
        if first is None:
            assert math.isnan(col[d.name])
        else:
            assert col[d.name] == pytest.approx(first)
    assert math.isnan(col["step"])  # tops out at 0.47
    assert col["high_lr"] == pytest.approx(rows_of(runs[1])[2]["elapsed"])
    table3, _ = compare_runs(runs, at=0.3)
    assert "time_to_0.3" in table3.columns and table3["time_to_0.3"].notna().all()
    out = write_comparison(runs, tmp_path / "cmp", at=0.5)
    with open(out["csv"]) as f:
        csv_rows = {r["run"]: r for r in csv.DictReader(f)}
    assert csv_rows["step"]["time_to_0.5"] == ""  # empty in the CSV, not "nan"
    assert float(csv_rows["base"]["time_to_0.5"]) == pytest.approx(col["base"])


def test_only_differing_settings_appear(runs):
    table, fig = compare_runs(runs)
    fixed = ["run", "schedule", "lr", "epochs", "epochs_done", "finished", "bs", "best_top1", "final_top1",
             "best_top5", "final_top5", "best_epoch", "time_to_best", "time_to_0.5"]
    assert list(table.columns) == fixed  # lr/schedule differ but have their own columns; `out` names the run
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "base (lr=0.1, schedule=one-cycle)"
    assert legend[2] == "step (lr=0.4, schedule=step)"


def test_extra_differing_keys_become_columns(tmp_path):
    a = make_run(tmp_path, "a", [0.2, 0.4], epochs=2, wd=5e-4, mixup=0.2)
    b = make_run(tmp_path, "b", [0.3, 0.5], epochs=2, wd=1e-4, size=32)  # no mixup key at all
    table, fig = compare_runs([a, b])
    assert list(table.columns)[-3:] == ["size", "wd", "mixup"]
    assert table["wd"].tolist() == [5e-4, 1e-4]
    assert table["size"].tolist() == [64, 32]
    assert table["mixup"].iloc[0] == 0.2 and pd.isna(table["mixup"].iloc[1])
    assert "stem" not in table.columns and "seed" not in table.columns and "out" not in table.columns
    assert [t.get_text() for t in fig.legends[0].get_texts()][1] == "b (size=32, wd=0.0001, mixup unset)"


def test_single_run_is_fine_and_has_no_differing_columns(runs):
    table, fig = compare_runs([runs[0]])
    assert len(table) == 1 and "wd" not in table.columns
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["base"]
    table2, _ = compare_runs(runs[0])  # one path, not a list
    assert table2.equals(table)


def test_truncated_run_compares_on_the_epochs_it_has(tmp_path):
    full = make_run(tmp_path, "full", [0.1, 0.3, 0.5, 0.6], epochs=4)
    cut = make_run(tmp_path, "cut", [0.2, 0.35], epochs=4)
    table, fig = compare_runs([full, cut])
    r = table.set_index("run").loc["cut"]
    assert (r["epochs"], r["epochs_done"], bool(r["finished"])) == (4, 2, False)
    assert r["final_top1"] == pytest.approx(0.35) and r["best_epoch"] == 1
    assert bool(table.set_index("run").loc["full", "finished"])
    assert [t.get_text() for t in fig.legends[0].get_texts()][1] == "cut [2/4 epochs]"
    md = to_markdown(table)
    assert "Not finished (compared on the epochs done): cut." in md


def test_run_with_only_a_header_is_in_progress(tmp_path):
    started = make_run(tmp_path, "started", [])
    table, _ = compare_runs([make_run(tmp_path, "other", [0.3]), started])
    r = table.set_index("run").loc["started"]
    assert r["epochs_done"] == 0 and pd.isna(r["best_top1"]) and pd.isna(r["best_epoch"])


def test_not_a_run_folder_raises_naming_it(tmp_path, runs):
    empty = tmp_path / "just_a_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="just_a_folder: not a run folder") as e:
        compare_runs([runs[0], empty])
    assert "\n" not in str(e.value)
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"only_config: not a run folder \(no metrics.csv\)"):
        read_run(tmp_path / "only_config")
    with pytest.raises(ValueError, match="no such directory"):
        compare_runs([tmp_path / "nope"])
    bad = make_run(tmp_path, "badcols", [0.2])
    (bad / "metrics.csv").write_text("epoch,train_loss\n0,1.0\n")
    with pytest.raises(ValueError, match="badcols: metrics.csv lacks column"):
        compare_runs([bad])
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="badcols: config.json is not valid JSON"):
        read_run(bad)


def test_bad_arguments(runs):
    with pytest.raises(ValueError, match="no run folders"):
        compare_runs([])
    with pytest.raises(ValueError, match="between 0 and 1"):
        compare_runs(runs, at=50)
    with pytest.raises(ValueError, match="more than once"):
        compare_runs([runs[0], runs[0]])


def test_same_folder_name_in_two_places_gets_parent_labels(tmp_path):
    a = make_run(tmp_path / "x", "base", [0.2])
    b = make_run(tmp_path / "y", "base", [0.3])
    table, _ = compare_runs([a, b])
    assert table["run"].tolist() == ["x/base", "y/base"]


def test_different_datasets_warn_once_and_still_compare(tmp_path):
    a = make_run(tmp_path, "a", [0.2, 0.4], sha="1" * 40)
    b = make_run(tmp_path, "b", [0.3, 0.5], sha="2" * 40)
    with pytest.warns(UserWarning, match="different datasets") as record:
        table, _ = compare_runs([a, b])
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert len(table) == 2
    same = make_run(tmp_path, "c", [0.3], sha="1" * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_runs([a, same])


def test_write_comparison_writes_png_md_csv(runs, tmp_path):
    out = write_comparison(runs, out=tmp_path / "compare", at=0.5)
    assert out["png"].read_bytes()[:8] == PNG_MAGIC
    csv_table = pd.read_csv(out["csv"])
    assert csv_table["run"].tolist() == ["base", "high_lr", "step"]
    assert csv_table["best_top1"].tolist() == pytest.approx(out["table"]["best_top1"].tolist())
    md = out["md"].read_text().splitlines()
    assert md[0].startswith("| run | schedule | lr |") and md[1].startswith("|---|")
    body = [line for line in md[2:] if line.startswith("| ")]
    assert len(body) == 3 and body[0].startswith("| base | one-cycle | 0.1 | 6 | 6 | True | 256 | 0.6000 |")
    assert body[2].count("|") == md[0].count("|")
