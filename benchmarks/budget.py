"""`fit --budget` on real data, a JSONL row a run: whether the run landed within 5% of its budget (everything
counted from the command's start: imports, the cache build, the range test, training, validation, the end), what
it reached, its plan and its peak memory. The screens of issue #29 (which size, progressive resizing or not, for a
given budget on this CPU) are rows of this file; run one at a time, with `nice`, as the 2 cores are the measurement.

usage: python benchmarks/budget.py --data DATA --budget 30m --results docs/budget.jsonl [--out RUN] [-- FIT FLAGS]

A row is appended when the run ends, also when it failed (with its exit code), so a session cut off loses only the
run in flight; `--out RUN --resume` among the fit flags continues one.
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_budget(data: str, budget: str, out: Path, fit_flags: list[str]) -> dict:
    """`main.py fit --budget` as a child process, timed from outside; the row for it."""
    command = [sys.executable, str(REPO / "main.py"), "fit", "--data", data, "--budget", budget, "--out", str(out),
               "--quiet", *fit_flags]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child so far
    said = proc.stdout if proc.returncode == 0 else proc.stderr  # the result line, or the one-line error
    return budget_row(out, data, budget, fit_flags, proc.returncode, wall, peak_kib / 2**20,
                      said.strip().splitlines()[-1:])


def budget_row(out: Path, data: str, budget: str, fit_flags: list[str], exit_code: int, wall_s: float,
               peak_rss_gib: float, last_line: list[str]) -> dict:
    """What a budgeted run folder says of itself (plan, size, epochs, top-1), beside what was measured outside."""
    row = {"date": datetime.now().isoformat(timespec="seconds"), "data": data, "budget": budget,
           "fit_flags": fit_flags, "exit_code": exit_code, "wall_s": round(wall_s, 1),
           "peak_rss_gib": round(peak_rss_gib, 2), "last_line": last_line}
    config_file = out / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        budget_s = config.get("budget", {}).get("budget_s") or (config["args"].get("budget_plan") or {}).get("budget_s")
        row.update({"budget_s": budget_s, "share_of_budget": round(wall_s / budget_s, 4) if budget_s else None,
                    "within_5pct": bool(budget_s) and abs(wall_s / budget_s - 1) <= 0.05,
                    "plan": config["args"].get("budget_plan"), "size": config["args"].get("size"),
                    "fit_wall_s": config.get("budget", {}).get("wall_s")})
    if (out / "metrics.csv").exists():
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        accs = [float(r["accuracy"]) for r in rows]
        row.update({"epochs_done": len(rows), "best_top1": max(accs, default=None), "final_top1": accs[-1] if accs else None,
                    "final_top5": float(rows[-1]["top5"]) if rows else None,
                    "train_seconds": round(sum(float(r["train_seconds"]) for r in rows), 1)})
    return row


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--budget", required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / f"budget-{args.budget}-{datetime.now():%Y%m%d-%H%M%S}"
    row = run_budget(args.data, args.budget, out, fit_flags)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
