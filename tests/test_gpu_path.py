"""scripts/gpu: the 3-call device path (stage.py, device.py), run whole by its local stand-in (rehearse.py)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).parents[1] / "scripts" / "gpu"
sys.path.insert(0, str(GPU))
import rehearse  # noqa: E402
import stage  # noqa: E402


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """The device's wheels, downloaded from PyPI as `stage.py` does for a loan (TINYFAST_GPU_WHEELS: a folder of
    them already downloaded)."""
    if os.environ.get("TINYFAST_GPU_WHEELS"):
        return Path(os.environ["TINYFAST_GPU_WHEELS"])
    folder = tmp_path_factory.mktemp("wheels")
    stage.download_wheels(folder)
    return folder


@pytest.fixture
def shuffled_root(tiny_root, tmp_path) -> Path:
    """tiny_root with wnids.txt out of sorted order, as the real one is: the vocabulary is wnids.txt's order, so a
    verify that sorted the wnids would count against the wrong classes."""
    root = tmp_path / "shuffled" / tiny_root.name
    shutil.copytree(tiny_root, root)
    wnids = (root / "wnids.txt").read_text().split()
    (root / "wnids.txt").write_text("\n".join(wnids[2:] + wnids[:2]) + "\n")
    assert (root / "wnids.txt").read_text().split() != sorted(wnids)
    return root


def test_the_rehearsal_runs_the_three_calls_under_the_device_limits_and_its_weights_evaluate_here(
        wheels, shuffled_root, tmp_path):
    report = rehearse.rehearse(shuffled_root, wheels, tmp_path / "work")
    calls = report["calls"]
    assert calls["1"]["files"] == ["env.json"] and calls["2"]["files"] == []
    assert calls["3"]["files"] == ["config.json", "curves.png", "log.txt", "metrics.csv", "model.pth.00",
                                   "model.pth.01", "model.pth.02", "verify.json"]
    assert all(c["mib"] <= 64 for c in report["plan"]["calls"]) and calls["1"]["network_cut"] == bool(rehearse.no_network_prefix())
    env = report["env"]
    assert all(not str(v).startswith("FAILED") for v in env["imports"].values()) and env["cli_fit_help"] is True
    v = report["verify"]
    assert v["finished"] and v["epochs_done"] == 2 and v["independent_images"] == 32
    assert abs(v["independent_top1"] - v["model_epoch_top1"]) <= 1 / 32  # same model, decoded anew, counted apart
    assert v["median_train_img_s"] > 0 and v["train_seconds_total"] > 0
    rates = v["bench_data"]["img_s"]
    assert sorted(rates) == ["0", "2"] and all(isinstance(r, float) and r > 0 for r in rates.values()), rates
    assert rates[v["bench_data"]["fastest_workers"]] == max(rates.values())
    run = Path(report["run"])
    assert hashlib.sha1((run / "model.pth").read_bytes()).hexdigest() == v["model_sha1"]
    assert (run / "evaluation.json").exists()  # evaluate ran on the joined folder, here
    if rehearse.python312():
        assert "pydantic" in report["wheels_on_python312"]["imported"]


def test_a_wheel_for_another_python_or_a_missing_one_is_refused(wheels, tmp_path):
    stage.check_wheels(sorted(wheels.glob("*.whl")))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for w in wheels.glob("*.whl"):
        name = w.name.replace("cp312-cp312", "cp311-cp311")
        (wrong / name).write_bytes(w.read_bytes())
    with pytest.raises(SystemExit, match="does not install on CPython 3.12"):
        stage.check_wheels(sorted(wrong.glob("*.whl")))
    with pytest.raises(SystemExit, match="no wheel for fastai"):
        stage.check_wheels([w for w in wheels.glob("*.whl") if not w.name.startswith("fastai-")])


def test_the_stand_in_image_lacks_what_the_device_lacks(tmp_path):
    rehearse.stand_in_python(tmp_path)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "image"),
           "TINYFAST_STAGE": str(tmp_path / "stage")}
    res = subprocess.run(["python3", "-c", "import torch, typer; import fastai"], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "No module named 'fastai' on the device: carry its wheel" in res.stderr


def test_a_call_over_64_mib_is_refused_and_returns_over_the_limits_are_caught(tmp_path):
    carried = tmp_path / "big"
    carried.mkdir()
    (carried / "part").write_bytes(os.urandom(1024) * 64 * 1024)  # 64 MiB, with the tree over the limit
    with pytest.raises(SystemExit, match="larger than 64 MiB"):
        rehearse.send(rehearse.REPO, carried, tmp_path / "device", ".gpu/call1")
    out = tmp_path / "out"
    out.mkdir()
    for i in range(9):
        (out / f"f{i}.txt").write_text("x")
    with pytest.raises(SystemExit, match="9 files, over 8"):
        rehearse.check_returned(out)
    for p in out.iterdir():
        p.unlink()
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    with pytest.raises(SystemExit) as refused:
        rehearse.check_returned(out)
    assert "a/b/c/deep.txt: more than 2 folders down" in str(refused.value)
    assert "bad name.txt: a name with other characters" in str(refused.value)


def test_the_parts_are_split_over_three_calls_each_within_64_mib(wheels, tiny_root, tmp_path):
    plan = stage.stage(tiny_root, wheels, tmp_path / "stage", rehearse.REPO, call_mib=64)
    assert [c["call"] for c in plan["calls"]] == [1, 2, 3] and plan["calls"][0]["parts"][0] == "pack.sha1"
    listed = [line.split()[1] for line in (tmp_path / "stage" / "pack" / "pack.sha1").read_text().splitlines()]
    assert [p for c in plan["calls"] for p in c["parts"]] == ["pack.sha1"] + listed
    assert json.loads((tmp_path / "stage" / "plan.json").read_text()) == plan
    wheels_mib = sum(w.stat().st_size for w in wheels.glob("*.whl")) / 2**20
    with pytest.raises(SystemExit, match="the wheels alone"):
        stage.stage(tiny_root, wheels, tmp_path / "stage2", rehearse.REPO, call_mib=plan["tree_mib"] + stage.MARGIN_MIB)
    with pytest.raises(SystemExit, match="1 parts left over after 1 calls"):  # room for the wheels, not the part
        stage.stage(tiny_root, wheels, tmp_path / "stage3", rehearse.REPO, calls=1,
                    call_mib=plan["tree_mib"] + stage.MARGIN_MIB + wheels_mib + 0.05)
