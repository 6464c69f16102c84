"""The classic recipe given a wall-clock budget, for issue #29's head to head: `fit --budget 60m` (run by
benchmarks/budget.py) against benchmarks/classic.py given the same 60 minutes, on the whole dataset.

The classic recipe asks for epochs, so its user would set them from a trial run. This script does that trial
for them: a short probe of the same recipe at the same size and batch (`PROBE_PER_CLASS` images a class, one
epoch, the whole val set) gives this machine's time per step, per validation and per decoded image; the most
whole epochs that fit the budget, after the decode, are then trained. The probe is not counted in the budget,
as a user's trial would not be. The row records the probe, the epochs chosen, the wall time of the run (decode,
training and validation), its accuracy per epoch, and its peak RSS.

usage: python benchmarks/head_to_head.py --data DATA --budget 60m --size 24 --results docs/budget.jsonl
       [--lr 0.05] [--bs 64] [--seed 0] [--epochs N (skips the probe)]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from datetime import datetime

from .classic import classic_fit, read_split

PROBE_PER_CLASS = 32  # 6,400 images: 100 steps of 64 at any size, and the whole val set once
MARGIN = 0.02  # of the budget, left for the model's construction and the interpreter's start


def parse_budget(text: str) -> float:
    """`90m`, `1.5h`, `600s`, as `fit --budget` reads them (written again here: the classic side imports nothing
    of tinyfast)."""
    units = {"s": 1, "m": 60, "h": 3600}
    if not text or text[-1] not in units:
        raise ValueError(f"a budget is a number and a unit (s, m or h), got {text!r}")
    return float(text[:-1]) * units[text[-1]]


def probe(data: str, size: int, bs: int, lr: float, seed: int) -> dict:
    """This machine's seconds per training step, per validation of the whole val set, and per decoded image."""
    start = time.perf_counter()
    row = classic_fit(data, epochs=1, lr=lr, bs=bs, size=size, seed=seed, train_per_class=PROBE_PER_CLASS)[-1]
    wnids, train, val = read_split(data, None, PROBE_PER_CLASS)
    steps = len(train) // bs
    return {"step_s": row["seconds"] / steps, "valid_s": row["valid_seconds"],
            "decode_s_per_image": row["decode_seconds"] / (len(train) + len(val)),
            "probe_wall_s": round(time.perf_counter() - start, 1)}


def epochs_for(budget_s: float, timing: dict, n_train: int, n_val: int, bs: int) -> int:
    """The most whole epochs, each validated, that fit the budget after the decode."""
    decode = timing["decode_s_per_image"] * (n_train + n_val)
    epoch = timing["step_s"] * (n_train // bs) + timing["valid_s"]
    return max(1, math.floor((budget_s * (1 - MARGIN) - decode) / epoch))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--budget", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--lr", type=float, default=0.05)  # its best on the 20-class grid (BENCHMARKS)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    budget_s = parse_budget(args.budget)
    _, train, val = read_split(args.data)
    timing = None if args.epochs else probe(args.data, args.size, args.bs, args.lr, args.seed)
    epochs = args.epochs or epochs_for(budget_s, timing, len(train), len(val), args.bs)
    print(f"classic recipe, budget {args.budget}: {epochs} epochs at {args.size} px (probe: {timing})", flush=True)
    start = time.time()
    rows = classic_fit(args.data, epochs=epochs, lr=args.lr, bs=args.bs, size=args.size, seed=args.seed,
                       on_epoch=lambda row: print(json.dumps(row), flush=True))
    wall = time.time() - start
    accs = [r["accuracy"] for r in rows]
    row = {"date": datetime.now().isoformat(timespec="seconds"), "trainer": "classic", "data": args.data,
           "budget": args.budget, "budget_s": budget_s, "size": args.size, "bs": args.bs, "lr": args.lr,
           "seed": args.seed, "probe": timing, "epochs": epochs, "wall_s": round(wall, 1),
           "share_of_budget": round(wall / budget_s, 4),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "accuracies": accs, "final_top1": accs[-1], "best_top1": max(accs), "epoch_rows": rows}
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "epoch_rows"}))
    return row


if __name__ == "__main__":
    main()
