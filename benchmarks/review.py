"""The review of a finished run at full scale, a JSONL row a run: `evaluate --temperature` (top-1, calibration),
`interpret` (top losses, the confusion, the most confused pairs) and `gradcam --score` (the pointing game on the
val boxes), each a child process timed from outside, with its own peak RSS. Issue #29 asks for these on the
whole dataset: what each stage costs on this CPU, and what it found.

usage: python benchmarks/review.py RUN_DIR --results docs/review.jsonl [--limit N] [--data DATA]

A stage that fails is recorded with its exit code and last line, and the next one still runs; the row is
appended when every stage has ended.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {  # stage: the main.py command after RUN_DIR
    "evaluate": ["evaluate", "--temperature"],
    "interpret": ["interpret"],
    "gradcam": ["gradcam", "--score"],
}


def run_stage(command: list[str]) -> dict:
    """A child process, its wall time and its own peak RSS (`os.wait4`: that child's rusage, not the largest
    child so far, which is what `getrusage(RUSAGE_CHILDREN)` gives). Linux counts in a child's peak the memory it
    shared with its parent before `exec`, so the parent must stay small: this module imports the standard
    library only."""
    start = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return {"exit_code": proc.returncode, "wall_s": round(time.time() - start, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "last_lines": lines[-8:]}


def findings(run_dir: Path, top: int = 10) -> dict:
    """What the stages wrote that the issue asks for: top-1, calibration, the most confused pairs with their
    names, the pointing game."""
    found = {}
    evaluation = run_dir / "evaluation.json"
    if evaluation.exists():
        e = json.loads(evaluation.read_text())
        found["evaluation"] = {k: v for k, v in e.items() if not isinstance(v, (list, dict))}  # the headline numbers
    confused = run_dir / "most_confused.csv"
    if confused.exists():
        with open(confused) as f:
            found["most_confused"] = list(csv.DictReader(f))[:top]
    cam = run_dir / "gradcam.json"
    if cam.exists():
        found["gradcam"] = json.loads(cam.read_text())  # per CAM method
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--limit", type=int, default=None, help="gradcam --score on the first N val images only")
    args = parser.parse_args(argv)
    if not (args.run_dir / "model.pth").exists():
        parser.error(f"{args.run_dir} is not a finished run folder (no model.pth)")
    extra = ["--quiet"] + (["--data", args.data] if args.data else [])
    row = {"date": datetime.now().isoformat(timespec="seconds"), "run_dir": str(args.run_dir), "stages": {}}
    for stage, command in STAGES.items():
        limit = ["--limit", str(args.limit)] if stage == "gradcam" and args.limit else []
        row["stages"][stage] = run_stage([sys.executable, str(REPO / "main.py"), command[0], str(args.run_dir),
                                          *command[1:], *limit, *extra])
        print(stage, json.dumps(row["stages"][stage]), flush=True)
    row["findings"] = findings(args.run_dir)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
