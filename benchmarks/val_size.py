"""A run's model validated at other input sizes than it trained at, a JSONL row a run: the train/test resolution
effect (Touvron et al., "Fixing the train-test resolution discrepancy", 2019). Issue #29 asks whether a model
trained small on this CPU should be validated at 64 px. The ResNet ends in global average pooling, so any size
goes through; the val images are resized to each size as for training, without augmentation.

usage: python benchmarks/val_size.py RUN_DIR --sizes 24 32 48 64 --results docs/val-size.jsonl [--data DATA]
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path


def validate_at_sizes(run_dir: Path | str, sizes: list[int], data: str | None = None, bs: int = 256) -> list[dict]:
    """Top-1, top-5 and loss of the run's model (model.pth) at each size, on its whole val set."""
    from tinyfast.config import RunConfig
    from tinyfast.data import tiny_imagenet_dls
    from tinyfast.run_folder import read_config
    from tinyfast.train import load_run

    saved = read_config(run_dir)
    run = RunConfig.from_dict(saved["args"])
    root = data or run.data or saved["dataset"]["root"]
    learn = load_run(run_dir, data=root, bs=bs)
    trained = list(learn.dls.valid_ds.items)
    rows = []
    for size in sizes:
        start = time.time()
        learn.dls = tiny_imagenet_dls(root, bs=bs, size=size, aug=False, classes=run.classes,
                                      train_per_class=run.train_per_class, progress=False)
        assert list(learn.dls.valid_ds.items) == trained, "the val set must be the one the run validated"
        with learn.no_bar(), learn.no_logging():
            loss, top1, top5 = (float(v) for v in learn.validate())
        rows.append({"size": size, "top1": round(top1, 4), "top5": round(top5, 4), "loss": round(loss, 4),
                     "seconds": round(time.time() - start, 1)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    config = json.loads((args.run_dir / "config.json").read_text())
    row = {"date": datetime.now().isoformat(timespec="seconds"), "run_dir": str(args.run_dir),
           "trained_size": config["args"]["size"], "sizes": validate_at_sizes(args.run_dir, args.sizes, args.data)}
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
