"""Faults at the file system (issue #30): a full disk on every file tinyfast writes, a damaged decoded cache, a
read-only folder, an I/O error, a log that can no longer be written. The rule for each: one line that names the
path (and the space needed and left), a non-zero exit, nothing half-written, and a file that was good stays good.

Real small file systems where the test may mount them (a tmpfs, as root), with a skip and its reason elsewhere;
otherwise the failing write is simulated.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tinyfast.data as data_module
from tinyfast.cli import app
from tinyfast.data import CACHE_ENV, tiny_imagenet_dls
from tinyfast.dataset import DatasetError
from tinyfast.errors import RunError
from tinyfast.layout import atomic_save, atomic_write, atomic_write_text, save_figure
from tinyfast.runlog import run_log

runner = CliRunner()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs of that many bytes, unmounted afterwards."""
    mounted = []

    def mount(size: int, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {res.stderr.strip()[:120]}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


# ---------------------------------------------------------------------------------------------------------
# Out of space, on each kind of write
# ---------------------------------------------------------------------------------------------------------
def test_a_full_disk_keeps_the_good_file_and_says_the_space(tmpfs):
    disk = tmpfs(1024 * 1024)
    good = disk / "checkpoint.pth"
    atomic_save({"w": torch.zeros(1000)}, good)
    before = good.read_bytes()
    with pytest.raises(RunError) as full:
        atomic_save({"w": torch.zeros(1_000_000)}, good)  # 4 MB onto a 1 MiB disk
    message = str(full.value)
    assert "\n" not in message and f"no space left to write {good}" in message
    assert "3.8 MiB needed" in message and "left there" in message
    assert good.read_bytes() == before and _leftovers(disk) == []  # the good one stays, no half file


@pytest.mark.parametrize("writer", ["text", "figure", "csv"])
def test_every_kind_of_write_fails_in_one_line_without_a_half_file(tmpfs, writer):
    disk = tmpfs(256 * 1024)
    (disk / "filler").write_bytes(b"x" * (256 * 1024 - 8192))
    target = disk / {"text": "config.json", "figure": "curves.png", "csv": "per_class.csv"}[writer]
    with pytest.raises(RunError, match=f"no space left to write {target}"):
        if writer == "text":
            atomic_write_text(target, "x" * 100_000)
        elif writer == "figure":
            import matplotlib.pyplot as plt
            fig = plt.figure(figsize=(20, 20))
            plt.imshow(np.random.default_rng(0).random((500, 500)))
            save_figure(fig, target, dpi=200)
        else:
            import pandas as pd
            frame = pd.DataFrame({"a": np.arange(100_000)})
            atomic_write(target, lambda tmp: frame.to_csv(tmp, index=False))
    assert not target.exists() and _leftovers(disk) == []


def test_fit_on_a_full_disk_is_one_line_and_leaves_no_half_file(tiny_root, tmpfs):
    out = tmpfs(3 * 1024 * 1024) / "run"  # room for the small files, not for the model (45 MB)
    res = runner.invoke(app, ["fit", "--data", str(tiny_root), "--out", str(out), "--epochs", "1", "--size", "16",
                              "--bs", "8", "--num-workers", "0", "--quiet"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and lines[-1].startswith(f"error: no space left to write {out}"), res.output
    assert "43 MiB needed" in lines[-1] and "Traceback" not in res.output and " 0.0 MiB left" not in lines[-1]
    assert _leftovers(out) == [] and (out / "config.json").exists()
    assert not (out / "model.pth").exists() or torch.load(out / "model.pth", map_location="cpu")


def test_a_read_only_out_is_one_line(tiny_root, tmpfs):
    out = tmpfs(1024 * 1024, read_only=True) / "run"
    res = runner.invoke(app, ["fit", "--data", str(tiny_root), "--out", str(out), "--epochs", "1", "--size", "16",
                              "--num-workers", "0", "--quiet"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and lines[-1].startswith(f"error: cannot write {out}") and "read-only" in lines[-1], res.output


def test_an_io_error_names_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"good")

    def dying_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(RunError, match=r"cannot write .*model\.pth: input/output error"):
        atomic_write(target, dying_disk)
    assert target.read_bytes() == b"good" and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# The decoded cache: damaged is rebuilt; what cannot be rebuilt says where it lives
# ---------------------------------------------------------------------------------------------------------
def _cache_of(root: Path, size: int, tmp_path: Path) -> Path:
    tiny_imagenet_dls(root, bs=8, size=size, num_workers=0, cache_dir=tmp_path / "cache", progress=False)
    return next((tmp_path / "cache").glob("images-*.npy"))


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "unreadable"])
def test_a_damaged_cache_is_decoded_again_with_one_line(tiny_root, tmp_path, capsys, monkeypatch, damage):
    cache = _cache_of(tiny_root, 16, tmp_path)
    good = np.load(cache)
    if damage == "truncated":
        with open(cache, "r+b") as f:
            f.truncate(cache.stat().st_size // 2)
    elif damage == "wrong shape":
        np.save(cache, good[:, :8])
    else:
        real = np.load

        def unreadable(path, *args, **kwargs):
            if Path(path) == cache and not hasattr(unreadable, "done"):
                unreadable.done = True
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(data_module.np, "load", unreadable)
    capsys.readouterr()
    dls = tiny_imagenet_dls(tiny_root, bs=8, size=16, num_workers=0, cache_dir=tmp_path / "cache", progress=False)
    said = [line for line in capsys.readouterr().out.splitlines() if "decoded cache" in line]
    assert len(said) == 1 and f"the decoded cache {cache} is damaged" in said[0] and "decoding the images again" in said[0]
    assert np.array_equal(np.load(cache), good) and len(list(dls.train)) > 0


def test_a_cache_that_cannot_be_rebuilt_says_where_it_lives_and_how_to_move_it(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "free_bytes", lambda path: 1000)
    with pytest.raises(DatasetError) as full:
        tiny_imagenet_dls(tiny_root, bs=8, size=24, num_workers=0, cache_dir=tmp_path / "cache", progress=False)
    message = str(full.value)
    assert "\n" not in message and f"no space left to write {tmp_path / 'cache'}" in message
    assert f"{CACHE_ENV}=DIR" in message and "MiB needed" in message
    assert list((tmp_path / "cache").glob("*.npy")) == []


def test_the_cache_goes_where_tinyfast_cache_says(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert data_module.default_cache_dir(tiny_root).parent == tmp_path / "elsewhere"


# ---------------------------------------------------------------------------------------------------------
# The log: a copy of what is printed, never the reason a run stops
# ---------------------------------------------------------------------------------------------------------
class _FullDisk:
    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass

    def close(self):
        pass


def test_a_log_that_cannot_be_written_is_a_warning_and_the_command_goes_on(tmp_path, capsys):
    import sys
    with run_log(tmp_path, header="fit") as path:
        print("epoch 1")
        log = sys.stdout.log  # the run's log.txt behind the tee
        log.file.close()
        log.file = _FullDisk()  # the disk fills up
        print("epoch 2")
        print("epoch 3")
    out, err = capsys.readouterr()
    assert "epoch 2" in out and "epoch 3" in out
    assert err.count("is not written from here on: No space left on device") == 1
    assert path.read_text().splitlines()[-1] == "epoch 1"


def test_data_on_a_network_file_system_gets_its_cache_on_the_local_disk(tiny_root, tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda1 / ext4 rw 0 0\nserver:/export {tiny_root.parent} nfs4 rw 0 0\n")
    real = data_module.file_system_type
    monkeypatch.setattr(data_module, "file_system_type", lambda path: real(path, mounts))
    assert data_module.file_system_type(tiny_root) == "nfs4"
    cache = data_module.default_cache_dir(tiny_root)
    assert cache.is_relative_to(Path.home() / ".cache" / "tinyfast") and not cache.is_relative_to(tiny_root)
    mounts.write_text(f"/dev/vda1 / ext4 rw 0 0\n")
    assert data_module.default_cache_dir(tiny_root) == tiny_root / ".tinyfast-cache"


def test_compare_into_a_read_only_folder_is_one_line(tmp_path, tmpfs):
    out = tmpfs(1024 * 1024, read_only=True) / "compare"
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text('{"args": {"lr": 0.1}, "command": "fit"}')
        (run / "metrics.csv").write_text("epoch,valid_loss,accuracy,elapsed\n1,1.0,0.5,10\n")
        runs.append(str(run))
    res = runner.invoke(app, ["compare", *runs, "--out", str(out)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"error: cannot write {out}") and "read-only" in res.output
