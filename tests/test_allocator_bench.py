"""benchmarks/allocator.py: a row each way on tiny data, and the allocator setting put back after it."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
import tinyfast.learner as learner  # noqa: E402
from benchmarks import allocator  # noqa: E402


def test_a_row_each_way_and_the_setting_put_back(tiny_root):
    kept = learner.keep_freed_memory
    with allocator.allocator(keep=False):
        assert learner.keep_freed_memory() is False  # what FastDevice calls, made a no-op
    assert learner.keep_freed_memory is kept
    rows = [allocator.one_process(str(tiny_root), keep, size=16, bs=8, stem="cifar", batches=2) for keep in (False, True)]
    assert [r["allocator"] for r in rows] == ["glibc default", "kept"]
    assert all(r["img_s"] > 0 and r["minflt_per_batch"] >= 0 and r["peak_rss_gib"] > 0 for r in rows), rows
    assert learner.keep_freed_memory is kept
