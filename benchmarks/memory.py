"""Where a full-data run's memory goes (issue #29): the resident set after each stage of a fit, and the peak
within each stage, read from /proc/self/status. One JSONL row per run.

The stages are those of `fit`, built from the same public functions: the file list, the decoded cache, the
DataBlock's DataLoaders, the Learner, `steps` training batches, a validation pass, and `predict_valid` (what
`evaluate` and `interpret` run). The peak of each stage is measured on its own: the kernel's high-water mark is
reset between stages (`/proc/self/clear_refs`). RSS is split into anonymous memory (the Python heap, tensors) and
file pages (the memory-mapped cache, which the kernel can drop under pressure, and shared libraries).

usage: python benchmarks/memory.py --data DATA --size 64 --bs 256 --steps 30 --results docs/memory.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30


def memory() -> dict:
    """This process's resident memory now and its peak since the last `reset_peak`, in GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024 / GIB
    return {"rss": round(fields["VmRSS"], 3), "anon": round(fields["RssAnon"], 3),
            "file": round(fields["RssFile"] + fields.get("RssShmem", 0), 3), "peak": round(fields["VmHWM"], 3)}


def reset_peak() -> None:
    """Reset the kernel's high-water mark of this process (VmHWM) to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


class Stages:
    """Run named stages, each measured on its own: RSS after it, its own peak, its seconds."""

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, name: str, fn):
        import gc
        gc.collect()
        reset_peak()
        start = time.perf_counter()
        result = fn()
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 1), **memory()})
        print(json.dumps(self.rows[-1]), flush=True)
        return result


def measure(data: str, size: int, bs: int, steps: int, precision: str = "auto") -> list[dict]:
    stages = Stages()
    stages("imports", lambda: __import__("tinyfast.train"))
    from fastai.callback.core import Callback, CancelFitException

    from tinyfast.data import DecodedImages, default_cache_dir, tiny_imagenet_dls, tiny_imagenet_files
    from tinyfast.dataset import resolve_dataset
    from tinyfast.interpret import predict_valid
    from tinyfast.learner import tiny_learner

    root = resolve_dataset(data)
    _, files, _ = stages("file list", lambda: tiny_imagenet_files(root))
    decoded = DecodedImages(files, size, default_cache_dir(root))
    stages("cache (build or open)", lambda: decoded.load(progress=False))
    dls = stages("DataLoaders (DataBlock over every file)", lambda: tiny_imagenet_dls(root, bs=bs, size=size, progress=False))
    learn = stages("Learner", lambda: tiny_learner(dls, precision=precision))

    class StopAfter(Callback):
        def after_batch(self):
            if self.training and self.iter + 1 >= steps:
                raise CancelFitException

    def train():
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 0.01, cbs=StopAfter())

    stages(f"training, {steps} batches", train)

    def validate():
        with learn.no_bar(), learn.no_logging():
            return learn.validate()

    def predict():
        with learn.no_bar():
            return predict_valid(learn)

    stages("validation (the val set)", validate)
    stages("predict_valid (evaluate, interpret)", predict)
    return stages.rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)
    stages = measure(args.data, args.size, args.bs, args.steps, args.precision)
    row = {"date": datetime.now().isoformat(timespec="seconds"), "data": args.data, "size": args.size, "bs": args.bs,
           "steps": args.steps, "precision": args.precision, "stages": stages,
           "peak_gib": max(s["peak"] for s in stages), "peak_stage": max(stages, key=lambda s: s["peak"])["stage"]}
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("size", "bs", "peak_gib", "peak_stage")}))
    return row


if __name__ == "__main__":
    main()
