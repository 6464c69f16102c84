"""glibc's allocator and the training step (issue #29): the real Learner's training batches (`budget.measure`, the
median after its warm-up) with `learner.keep_freed_memory` in force, or made a no-op, each in a fresh process (the
setting is process-wide), the two interleaved round by round; a JSONL row a process, with its page faults and peak.

usage: python benchmarks/allocator.py --data DATA --results allocator.jsonl [--size 64] [--bs 256]
       [--stem imagenet] [--batches 24] [--rounds 3]

Run on purpose, one at a time, with `nice`, on an otherwise idle machine: the 2 cores are the measurement.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


@contextmanager
def allocator(keep: bool) -> Iterator[None]:
    """`keep_freed_memory` as tinyfast has it (keep), or a no-op where FastDevice and the probes call it."""
    import tinyfast.budget as budget
    import tinyfast.learner as learner
    saved = learner.keep_freed_memory, budget.keep_freed_memory
    if not keep:
        learner.keep_freed_memory = budget.keep_freed_memory = lambda: False
    try:
        yield
    finally:
        learner.keep_freed_memory, budget.keep_freed_memory = saved


def one_process(data: str, keep: bool, size: int, bs: int, stem: str, batches: int) -> dict:
    """This process's row: the Learner's training batch time with the allocator kept or not."""
    from tinyfast.budget import measure
    from tinyfast.data import tiny_imagenet_dls
    from tinyfast.learner import tiny_learner
    with allocator(keep):
        dls = tiny_imagenet_dls(data, bs=bs, size=size, num_workers=0, progress=False)
        learn = tiny_learner(dls, stem=stem)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        timing = measure(learn, 0.1, n_train=batches, n_valid=2, warmup=WARMUP)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
    return {"allocator": "kept" if keep else "glibc default", "size": size, "bs": bs, "stem": stem,
            "train_batch_s": round(timing.train_batch_s, 4), "img_s": round(bs / timing.train_batch_s, 1),
            "minflt_per_batch": round(faults / (batches + WARMUP + 2 + WARMUP)),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--results", type=Path)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", choices=["kept", "default"], help=argparse.SUPPRESS)  # a child process's own row
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one_process(a.data, a.one == "kept", a.size, a.bs, a.stem, a.batches)))
        return
    if a.results is None:
        p.error("--results is required")
    for round_ in range(1, a.rounds + 1):
        for variant in ("default", "kept"):
            child = subprocess.run([sys.executable, __file__, "--one", variant, "--data", a.data, "--size", str(a.size),
                                    "--bs", str(a.bs), "--stem", a.stem, "--batches", str(a.batches)],
                                   capture_output=True, text=True, cwd=REPO)
            if child.returncode != 0:
                sys.exit(f"error: the {variant} process failed: {child.stderr.strip().splitlines()[-1:]}")
            row = {"date": datetime.now().isoformat(timespec="seconds"), "round": round_,
                   **json.loads(child.stdout.strip().splitlines()[-1])}
            with open(a.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
