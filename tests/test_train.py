"""Training runs: it learns, run folders are complete and never overwritten, resume == uninterrupted,
NaN stops with a message, ReduceLROnPlateau really lowers the LR, checkpoints are atomic."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback

from tinyfast.layout import atomic_save
from tinyfast.train import (METRIC_COLUMNS, NonFiniteLoss, RunError, RunInterrupted, fit, load_run,
                            new_run_dir, read_metrics)

SMALL = dict(size=16, bs=16, quiet=True)  # runs that only check mechanics
LEARN = dict(size=32, bs=16, quiet=True)  # runs that must learn


@pytest.fixture(scope="module")
def run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "first"
    return fit(tiny_root, epochs=6, lr=0.02, out=out, **LEARN)


def test_fit_learns_and_writes_a_complete_run_folder(run, tiny_root):
    assert run.best_accuracy >= 0.5  # 4 classes: chance is 0.25
    names = {p.name for p in run.run_dir.iterdir()}
    assert {"config.json", "summary.txt", "metrics.csv", "curves.png", "schedule.png", "model.pth",
            "learner.pkl", "checkpoint.pth"} <= names
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    assert tuple(rows[0]) == METRIC_COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert max(float(r["accuracy"]) for r in rows) == pytest.approx(run.best_accuracy)
    assert all(0 < float(r["train_seconds"]) < float(r["time"]) for r in rows)  # training only: less than the epoch
    cfg = json.loads((run.run_dir / "config.json").read_text())
    assert cfg["args"]["epochs"] == 6 and cfg["args"]["lr"] == 0.02 and cfg["dataset"]["classes"] == 4
    assert "torch" in cfg["versions"] and cfg["command"]
    assert "ResNet" in (run.run_dir / "summary.txt").read_text()


def test_quiet_fit_prints_nothing(run, tiny_root, tmp_path, capsys):
    """`quiet=True` (bench recipe, the tests) leaves the terminal alone: no summary, no progress bars, not even
    the one fastai's `summary` would draw for its single batch. The cache was decoded by the `run` fixture."""
    capsys.readouterr()
    fit(tiny_root, epochs=1, lr=0.05, out=tmp_path / "quiet", **LEARN)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_best_weights_reload(run):
    learn = load_run(run.run_dir)
    with learn.no_bar(), learn.no_logging():
        _, acc, _ = learn.validate()
    assert acc == pytest.approx(run.best_accuracy)


def test_exported_learner_loads_in_a_fresh_process_outside_the_repo(run, tiny_root, tmp_path):
    """learner.pkl needs tinyfast importable: the installed package (pyproject.toml; requirements.txt installs it
    editable), not the checkout on sys.path."""
    img = next((tiny_root / "val" / "images").iterdir())
    code = ("import sys, tinyfast; from fastai.learner import load_learner; "
            f"l = load_learner(r'{run.run_dir / 'learner.pkl'}'); print(tinyfast.__file__); print(l.predict(r'{img}')[0])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("n")
    assert "FutureWarning" not in out.stderr, out.stderr  # torch's notice on fastai's torch.jit.script: hushed


def test_the_console_script_is_the_cli(tmp_path):
    script = Path(sys.executable).parent / "tinyfast"
    assert script.exists(), "pip install -e . (requirements.txt does) installs the `tinyfast` command"
    out = subprocess.run([str(script), "fit", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "--epochs" in out.stdout and "Usage: tinyfast fit" in out.stdout, out.stderr


def test_a_relative_out_and_the_default_runs_folder_complete(tiny_root, tmp_path, monkeypatch):
    """fastai's `export` joins its name to `learn.path`: a relative run folder must not be joined twice (it was,
    once, and every run without an absolute --out failed at its last step)."""
    monkeypatch.chdir(tmp_path)
    given = fit(tiny_root, epochs=1, lr=0.05, out="relative/run", **SMALL)
    default = fit(tiny_root, epochs=1, lr=0.05, **SMALL)
    assert given.run_dir == Path("relative/run") and default.run_dir.parent == Path("runs")
    for run_dir in (given.run_dir, default.run_dir):
        assert (tmp_path / run_dir / "learner.pkl").stat().st_size > 0
        assert not list((tmp_path / run_dir).glob("*.tmp"))


def test_existing_run_folder_is_never_overwritten(run, tiny_root):
    before = (run.run_dir / "metrics.csv").read_text()
    with pytest.raises(RunError, match="already exists"):
        fit(tiny_root, epochs=1, out=run.run_dir, **SMALL)
    assert (run.run_dir / "metrics.csv").read_text() == before


class InterruptAt(Callback):
    def __init__(self, epoch, it):
        self.at = (epoch, it)

    def before_batch(self):
        if self.training and (self.epoch, self.iter) == self.at:
            raise KeyboardInterrupt


def test_resume_ends_where_an_uninterrupted_run_ends(run, tiny_root, tmp_path):
    out = tmp_path / "cut"
    with pytest.raises(RunInterrupted, match="--resume"):
        fit(tiny_root, epochs=6, lr=0.02, out=out, cbs=[InterruptAt(2, 1)], **LEARN)
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2
    resumed = fit(tiny_root, out=out, resume=True, quiet=True)
    full = torch.load(run.run_dir / "checkpoint.pth", weights_only=False)
    cut = torch.load(out / "checkpoint.pth", weights_only=False)
    assert cut["epoch"] == full["epoch"] == 6
    for k, v in full["model"].items():
        assert torch.allclose(v.float(), cut["model"][k].float(), atol=1e-5), k
    assert cut["lrs"] == pytest.approx(full["lrs"])  # same schedule position
    assert [r["accuracy"] for r in cut["rows"]] == [r["accuracy"] for r in full["rows"]]
    assert resumed.best_accuracy == pytest.approx(run.best_accuracy)


class PoisonBatch(Callback):
    order = 5

    def before_batch(self):
        if self.training and self.epoch == 0 and self.iter == 2:
            self.learn.xb = (self.xb[0] * math.nan,)


def test_nan_loss_stops_with_epoch_and_batch(tiny_root, tmp_path):
    with pytest.raises(NonFiniteLoss, match="epoch 1, batch 3"):
        fit(tiny_root, epochs=2, lr=0.05, out=tmp_path / "nan", cbs=[PoisonBatch()], **SMALL)


def test_plateau_schedule_really_lowers_the_lr(tiny_root, tmp_path):
    # with 4 classes top-5 is 1.0 from the first epoch on: a plateau by construction, so after epoch 2
    # (patience 1) the LR must be divided by 10 in the optimizer itself (fastai #4046: not with OptimWrapper)
    r = fit(tiny_root, epochs=3, lr=0.05, schedule="plateau", monitor="top5", patience=1, factor=10,
            out=tmp_path / "plateau", **SMALL)
    ck = torch.load(r.run_dir / "checkpoint.pth", weights_only=False)
    per_epoch = len(ck["lrs"]) // 3
    assert set(ck["lrs"][:2 * per_epoch]) == {0.05}
    assert ck["lrs"][2 * per_epoch:] == pytest.approx([0.005] * per_epoch)
    assert ck["lr"] == pytest.approx(0.0005)  # and again after epoch 3, for the next epoch


def test_bad_schedule_is_refused(tiny_root, tmp_path):
    with pytest.raises(RunError, match="schedule"):
        fit(tiny_root, epochs=1, schedule="cosine", out=tmp_path / "x", **SMALL)


def test_atomic_save_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    atomic_save({"a": torch.ones(3)}, target)

    def dying_save(obj, f, *a, **k):  # atomic_save serialises into a buffer, then writes the file
        f.write(b"partial")
        raise OSError("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


# ---------------------------------------------------------------------------------------------------------
# Faults a user meets: a broken checkpoint, a conflicting resume, a race for one folder, SIGTERM
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cut_run(tiny_root, tmp_path_factory):
    """A one-cycle run of 3 epochs interrupted in its second: checkpoint after epoch 1."""
    out = tmp_path_factory.mktemp("cut") / "run"
    with pytest.raises(RunInterrupted):
        fit(tiny_root, epochs=3, lr=0.02, out=out, cbs=[InterruptAt(1, 1)], **SMALL)
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_truncated_checkpoint_on_resume_is_one_line_and_changes_nothing(cut_run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(cut_run, run_dir)
    ck = run_dir / "checkpoint.pth"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    before = _snapshot(run_dir)
    with pytest.raises(RunError) as e:
        fit(out=run_dir, resume=True, quiet=True)
    message = str(e.value)
    assert "\n" not in message and "checkpoint.pth" in message and "nothing in" in message
    assert "model.pth" in message and "metrics.csv (1 epochs)" in message and "new --out" in message
    assert _snapshot(run_dir) == before


def test_resume_refuses_a_flag_that_differs_from_the_saved_run(cut_run):
    before = _snapshot(cut_run)
    with pytest.raises(RunError, match=r"--lr 0\.9 \(saved: 0\.02\)") as e:
        fit(out=cut_run, resume=True, lr=0.9, quiet=True)
    assert "\n" not in str(e.value)
    with pytest.raises(RunError, match=r"--epochs 5 \(saved: 3\).*one-cycle schedule cannot be stretched"):
        fit(out=cut_run, resume=True, epochs=5, quiet=True)
    # a flag given at its default value is still a request (the CLI passes what was on its command line)
    with pytest.raises(RunError, match=r"--lr 0\.1 \(saved: 0\.02\)"):
        fit(out=cut_run, resume=True, lr=0.1, changed={"lr"}, quiet=True)
    assert _snapshot(cut_run) == before


def test_resume_extends_a_plateau_run_and_records_it(tiny_root, tmp_path):
    out = tmp_path / "plateau"
    with pytest.raises(RunInterrupted):
        fit(tiny_root, epochs=2, lr=0.02, schedule="plateau", out=out, cbs=[InterruptAt(1, 1)], **SMALL)
    r = fit(out=out, resume=True, epochs=3, num_workers=0, quiet=True)
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2, 3] and r.best_epoch in (1, 2, 3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["epochs"] == 3
    assert cfg["resumed"][0]["after_epoch"] == 1 and cfg["resumed"][0]["changed"] == {"epochs": 3, "num_workers": 0}


def test_of_runs_racing_for_one_folder_exactly_one_claims_it(tmp_path):
    import threading
    target, barrier, won, refused = tmp_path / "race", threading.Barrier(8), [], []

    def start():
        barrier.wait()
        try:
            won.append(new_run_dir(target))
        except RunError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all("already exists" in m or "claimed by another run" in m for m in refused)


class TermAt(Callback):
    def before_batch(self):
        if self.training and (self.epoch, self.iter) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_as_ctrl_c_does(tiny_root, tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "term"
    with pytest.raises(RunInterrupted, match=r"interrupted during epoch 2; checkpoint after epoch 1 .*--resume"):
        fit(tiny_root, epochs=3, lr=0.02, out=out, cbs=[TermAt()], **SMALL)
    assert {"interrupted.pth", "curves.png", "schedule.png", "checkpoint.pth"} <= {p.name for p in out.iterdir()}
    assert signal.getsignal(signal.SIGTERM) is previous


def test_fit_logs_to_tensorboard(tiny_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    r = fit(tiny_root, epochs=2, lr=0.02, out=tmp_path / "tb", log="tensorboard", **SMALL)
    events = EventAccumulator(str(r.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "valid_loss", "accuracy", "top5", "lr_0"} <= tags, tags
    accuracy = [e.value for e in events.Scalars("accuracy")]
    assert accuracy == pytest.approx([row["accuracy"] for row in read_metrics(r.run_dir)], abs=1e-6)
    assert len(events.Scalars("train_loss")) >= 2 * len(r.learn.dls.train)  # one per training step


def wandb_records(path: Path):
    """The records of a wandb offline run file: a LevelDB-style log (`:W&B`, magic, version, then 32 KiB blocks of
    records with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST), each a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, parts = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zeroed space
            continue
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def test_fit_logs_to_wandb_offline_into_the_run_folder(tiny_root, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    r = fit(tiny_root, epochs=2, lr=0.02, out=tmp_path / "wb", log="wandb", **SMALL)
    assert capsys.readouterr().out == ""  # quiet: wandb's banner and summary too
    (run_file,) = (r.run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # offline, inside the run folder
    history, config = [], {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
    epochs = [h for h in history if "accuracy" in h]
    assert [h["accuracy"] for h in epochs] == pytest.approx([row["accuracy"] for row in read_metrics(r.run_dir)], abs=1e-6)
    assert len([h for h in history if "raw_loss" in h]) >= 2 * len(r.learn.dls.train)  # one per training step
    assert config["lr"] == 0.02 and config["epochs"] == 2  # the run's own arguments


def test_the_nan_guard_does_not_read_the_loss_into_python_every_batch(monkeypatch):
    """On a GPU, a Python bool of a device tensor makes the host wait for the step: the guard keeps its verdict on
    the device and reads it every `every` batches and at the end of the training phase."""
    from types import SimpleNamespace
    from tinyfast.train import StopOnNaN
    guard = StopOnNaN(every=100)
    guard.learn = SimpleNamespace(training=True, epoch=0, opt=SimpleNamespace(hypers=[{"lr": 0.1}]))
    guard.before_train()

    def no_sync(*args):
        raise AssertionError("read into Python")
    for name in ("__bool__", "__int__", "__float__", "item"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for i, loss in enumerate([1.0, 2.0, math.nan, 3.0, math.inf]):
        guard.learn.iter, guard.learn.loss = i, torch.tensor(loss)
        guard.after_loss()
    monkeypatch.undo()
    with pytest.raises(NonFiniteLoss, match="epoch 1, batch 3"):  # the first bad one, not the last
        guard.after_train()
