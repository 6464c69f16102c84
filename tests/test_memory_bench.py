"""benchmarks/memory.py: what it reads from /proc, that each stage's peak is its own, and its row on tiny data."""
from __future__ import annotations

import json
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks import memory  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")


def test_the_figures_are_consistent():
    m = memory.memory()
    assert 0 < m["anon"] <= m["rss"] <= m["peak"] and m["file"] >= 0
    assert m["rss"] == pytest.approx(m["anon"] + m["file"], abs=0.01)


def test_a_stage_peak_is_its_own(tmp_path):
    """A 256 MiB buffer touched and freed in one stage raises that stage's peak, not the next one's."""
    stages = memory.Stages()

    def big():
        # its own mapping, touched (resident) and unmapped at the end: what malloc would do with a block this size
        # under glibc's defaults, which FastDevice changes for the whole process (learner.keep_freed_memory)
        with mmap.mmap(-1, 2**28) as buffer:
            a = np.frombuffer(buffer, np.uint8)
            a[::4096] = 1
            total = int(a[::4096].sum())
            del a
        return total

    stages("big", big)
    stages("small", lambda: None)
    big_row, small_row = stages.rows
    assert big_row["peak"] - small_row["peak"] >= 0.2  # GiB: the buffer, in the first stage's peak only
    assert small_row["peak"] <= small_row["rss"] + 0.05


def test_the_row_on_tiny_data(tiny_root, tmp_path):
    results = tmp_path / "memory.jsonl"
    row = memory.main(["--data", str(tiny_root), "--size", "16", "--bs", "8", "--steps", "2", "--results", str(results)])
    assert [s["stage"] for s in row["stages"]] == [
        "imports", "file list", "cache (build or open)", "DataLoaders (DataBlock over every file)", "Learner",
        "training, 2 batches", "validation (the val set)", "predict_valid (evaluate, interpret)"]
    assert row["peak_gib"] == max(s["peak"] for s in row["stages"]) > 0
    assert json.loads(results.read_text().splitlines()[-1]) == row
