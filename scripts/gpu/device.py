"""The lent device machine's side of the 3-call path (scripts/gpu/README.md, "On the lent device machine").

Each call carries one folder made by `stage.py`, `.gpu/callN/` (parts of the packed dataset; the wheels in call 1),
and runs, from the repository root there:

    python3 scripts/gpu/device.py 1          # wheels installed, the environment checked -> $OUT/env.json
    python3 scripts/gpu/device.py 2          # parts stored
    python3 scripts/gpu/device.py 3 [fit flags]   # dataset rebuilt, `fit` started detached, waited for, collected
    python3 scripts/gpu/device.py collect    # only if call 3 ran out of time: wait again, collect

Why this shape: a call carries at most 64 MiB and the machine keeps nothing it was not told to keep, so every
call first moves what it carried to STAGE, outside the repository (the next call's copy of the tree replaces the
carried paths). `fit` runs under `setsid`, so that it outlives a call that ends first. What comes back is at most
8 files of at most 16 MiB: metrics.csv, log.txt, curves.png, config.json, verify.json and the best weights in
parts of 15 MiB, which `rehearse.py join` turns back into a run folder here (`evaluate`, `interpret`, `gradcam`).
Only the standard library is imported at the top: the first call runs before the wheels are installed.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGE = Path(os.environ.get("TINYFAST_STAGE", "/root/tinyfast"))  # outside the repo: survives the next call's copy
SITE, PARTS, DATA, RUN = STAGE / "site", STAGE / "parts", STAGE / "data", STAGE / "run"
CARRIED = Path(".gpu")
PART_BYTES = 15 * 2**20  # each returned file is at most 16 MiB
WAIT_S = int(os.environ.get("TINYFAST_WAIT_S", "520"))  # call 3's wait for fit, inside the 600 s a call may run
BENCH_BS = os.environ.get("TINYFAST_BENCH_BS", "256")  # fit's batch size; the rehearsal's few images need less
# the loader's worker counts timed after the fit; the rehearsal times two, as each costs a process start here
BENCH_WORKERS = tuple(int(n) for n in os.environ.get("TINYFAST_BENCH_WORKERS", "0,2,4,8").split(","))
FIT_DEFAULTS = ["--epochs", "30"]
START = time.monotonic()
IMPORTS = ("fastai", "albumentations", "pytorch_grad_cam", "typer", "torch", "torchvision")


def out_dir() -> Path:
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def python_env() -> dict:
    """The environment every child Python gets: the carried wheels before the image's own packages."""
    path = [str(SITE), str(Path.cwd())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


def store(call: int) -> list[str]:
    """Move what call `call` carried into STAGE and install its wheels there; the names of the parts stored."""
    carried = CARRIED / f"call{call}"
    if not carried.is_dir():
        raise SystemExit(f"device.py: {carried} is missing: run this call with carry ['.gpu/call{call}']")
    PARTS.mkdir(parents=True, exist_ok=True)
    stored = []
    for part in sorted((carried / "parts").glob("*")):
        shutil.copyfile(part, PARTS / (part.name + ".tmp"))
        os.replace(PARTS / (part.name + ".tmp"), PARTS / part.name)  # a killed copy leaves no half part under its name
        stored.append(part.name)
    wheels = sorted((carried / "wheels").glob("*.whl"))
    if wheels:
        from stage import PLATFORMS, PYTHON  # the device's tags, named: the rehearsal's Python is not 3.12
        tags = ["--python-version", "%d.%d" % PYTHON, "--implementation", "cp", "--only-binary=:all:"]
        tags += [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", *tags, "--target", str(SITE), *map(str, wheels)], check=True)
    return stored


def missing_parts() -> list[str]:
    """The parts pack.sha1 lists that are not stored (their bytes are checked once, by jpegpack's unpack)."""
    listing = PARTS / "pack.sha1"
    if not listing.exists():
        return ["pack.sha1"]
    return [line.split()[1] for line in listing.read_text().splitlines()
            if line.strip() and not (PARTS / line.split()[1]).exists()]


def check_environment() -> dict:
    """What call 1 learns before any time is spent on data: the GPU, torch, /dev/shm, the imports, the CLI."""
    env = python_env()
    probe = ("import importlib, json, sys, torch\n"
             "v = {}\n"
             f"for name in {IMPORTS!r}:\n"
             "    try:\n"
             "        m = importlib.import_module(name); v[name] = getattr(m, '__version__', 'imported')\n"
             "    except Exception as e:\n"
             "        v[name] = 'FAILED: ' + repr(e)[:200]\n"
             "cuda = torch.cuda.is_available()\n"
             "print(json.dumps({'python': sys.version.split()[0], 'imports': v, 'cuda': cuda,\n"
             "  'gpu': torch.cuda.get_device_name(0) if cuda else None,\n"
             "  'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,\n"
             "  'capability': list(torch.cuda.get_device_capability(0)) if cuda else None,\n"
             "  'arch_list': torch.cuda.get_arch_list() if cuda else None}))\n")
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    info = json.loads(res.stdout) if res.returncode == 0 else {"probe_failed": res.stderr[-2000:]}
    cli = subprocess.run([sys.executable, "main.py", "fit", "--help"], env=env, capture_output=True, text=True)
    doctor = subprocess.run([sys.executable, "main.py", "doctor"], env=env, capture_output=True, text=True)
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    smi = shutil.which("nvidia-smi")
    return {**info, "cli_fit_help": cli.returncode == 0 or cli.stderr[-500:],
            "doctor": doctor.stdout.strip().splitlines() if doctor.returncode == 0 else doctor.stderr[-1000:],
            "dev_shm_gib": round(shm.total / 2**30, 1) if shm else None, "cpus": os.cpu_count(),
            "nvidia_smi": subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip() if smi else None,
            "missing_parts": missing_parts(), "stage": str(STAGE)}


def start_fit(flags: list[str]) -> None:
    """The dataset rebuilt from its parts, then `main.py fit` detached (its own session): it outlives this call."""
    missing = missing_parts()
    if missing:
        raise SystemExit(f"device.py: parts missing {missing}: the machine went back between calls, or a call was "
                         "skipped; start again from call 1")
    root = DATA / "tiny-imagenet-200"
    if not root.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "scripts/gpu/jpegpack.py", "unpack", str(PARTS), str(DATA)], check=True)
    if RUN.exists():
        raise SystemExit(f"device.py: {RUN} exists: fit was started already; run `device.py collect`")
    command = [sys.executable, "main.py", "fit", "--data", str(root), "--out", str(RUN), *(flags or FIT_DEFAULTS)]
    with open(STAGE / "fit.out", "w") as log:
        proc = subprocess.Popen(command, env=python_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (STAGE / "fit.pid").write_text(str(proc.pid))
    print("started:", " ".join(command), flush=True)


def fit_running() -> bool:
    pid_file = STAGE / "fit.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it, or it stays a zombie that looks alive
        return done == 0
    except ChildProcessError:  # started by an earlier call: ask the kernel
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def wait_for_fit(seconds: float) -> bool:
    """True if fit ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while fit_running():
        if time.monotonic() > deadline:
            return False
        time.sleep(2)
    return True


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(path))] if path.exists() else []


def run_vocabulary(run: Path, root: Path) -> list[str]:
    """The model's output order: the wnids in wnids.txt order (tinyfast's `CategoryBlock(vocab=wnids, sort=False)`),
    not sorted (the real wnids.txt is not), checked against the digest fit wrote in config.json."""
    import hashlib
    from tinyfast.data import tiny_imagenet_files
    config = json.loads((run / "config.json").read_text())
    a = config["args"]
    wnids = tiny_imagenet_files(root, a.get("classes"), a.get("train_per_class"))[0]
    saved = config.get("dataset", {}).get("wnids_sha1")
    if saved and hashlib.sha1("\n".join(wnids).encode()).hexdigest() != saved:
        raise SystemExit(f"device.py: the wnids of {root} are not the run's vocabulary (config.json's wnids_sha1)")
    return wnids


def independent_top1(run: Path, root: Path) -> dict:
    """model.pth scored on the val JPEGs decoded anew (PIL), counted against val_annotations.txt: no fastai
    loader, no decoded cache. The classes are in the run's vocabulary order (`run_vocabulary`)."""
    import numpy as np
    import torch
    from PIL import Image
    from tinyfast.data import TINY_MEAN, TINY_STD
    from tinyfast.model import resnet18
    a = json.loads((run / "config.json").read_text())["args"]
    wnids = run_vocabulary(run, root)
    index = {w: i for i, w in enumerate(wnids)}
    truth = [line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines() if line]
    truth = [(name, index[w]) for name, w in truth if w in index]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = resnet18(len(wnids), stem=a["stem"])
    model.load_state_dict(torch.load(run / "model.pth", map_location="cpu"))
    model.eval().to(device)
    mean, std = torch.tensor(TINY_MEAN).view(1, 3, 1, 1), torch.tensor(TINY_STD).view(1, 3, 1, 1)
    correct = 0
    for i in range(0, len(truth), 500):
        batch = truth[i:i + 500]
        pixels = []
        for name, _ in batch:
            image = Image.open(root / "val" / "images" / name).convert("RGB")
            if image.size != (a["size"], a["size"]):  # area averaging, as the decoded cache resizes (INTER_AREA)
                image = image.resize((a["size"], a["size"]), Image.BOX)
            pixels.append(np.asarray(image))
        x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            predicted = model(x.to(device)).argmax(1).cpu()
        correct += int((predicted == torch.tensor([label for _, label in batch])).sum())
    return {"independent_top1": correct / len(truth), "independent_images": len(truth)}


def summarise(run: Path, finished: bool) -> dict:
    """verify.json: the headline figures from metrics.csv, in training seconds only, and the independent top-1."""
    rows = read_rows(run)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    result = {"finished": finished, "epochs_done": len(rows), "fit_command": config.get("command"),
              "versions": config.get("versions"), "device": config.get("device")}
    if rows:
        n_train = config.get("dataset", {}).get("n_train")
        seconds = [r["train_seconds"] for r in rows]
        cumulative = list(itertools.accumulate(seconds))
        at_50 = next((c for r, c in zip(rows, cumulative) if r["accuracy"] >= 0.5), None)
        best = max(rows, key=lambda r: r["accuracy"])  # the epoch model.pth holds: the first best val accuracy
        result.update({"best_top1": max(r["accuracy"] for r in rows), "last_top1": rows[-1]["accuracy"],
                       "model_epoch": int(best["epoch"]), "model_epoch_top1": best["accuracy"],
                       "train_seconds_to_50pct": at_50, "train_seconds_total": cumulative[-1],
                       "median_train_img_s": statistics.median(n_train / s for s in seconds) if n_train else None,
                       "wall_seconds_total": rows[-1]["elapsed"]})
    if (run / "model.pth").exists():
        result.update(independent_top1(run, DATA / "tiny-imagenet-200"))
    return result


def bench_workers(counts: tuple[int, ...] = BENCH_WORKERS, deadline_s: float = 580) -> dict:
    """`bench data --no-baseline` at each worker count, on fit's data and decoded cache: the loader's img/s, which
    decides the GPU default of --num-workers. A count that would end past `deadline_s` into the call is skipped."""
    import re
    args = json.loads((RUN / "config.json").read_text())["args"]
    subset = [flag for k in ("classes", "train_per_class") if args.get(k)
              for flag in (f"--{k.replace('_', '-')}", str(args[k]))]
    results = {}
    for n in counts:
        left = deadline_s - (time.monotonic() - START)
        if left < 15:
            results[str(n)] = "skipped: the call's time ran out"
            continue
        try:
            res = subprocess.run([sys.executable, "main.py", "bench", "data", "--data", str(DATA / "tiny-imagenet-200"),
                                  "--num-workers", str(n), "--no-naive", "--no-baseline", "--bs", BENCH_BS, *subset],
                                 env=python_env(), capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            results[str(n)] = "timed out"
            continue
        rate = re.search(r"workers\):\s+([\d,]+) img/s", res.stdout)
        results[str(n)] = (float(rate.group(1).replace(",", "")) if rate and res.returncode == 0
                           else "FAILED: " + (res.stderr or res.stdout)[-300:])
    rates = {n: r for n, r in results.items() if isinstance(r, float)}
    return {"img_s": results, "fastest_workers": max(rates, key=rates.get) if rates else None}


def collect(finished: bool, bench: bool) -> None:
    """At most 8 files into $OUT: the run's small files, verify.json, model.pth in 15 MiB parts."""
    out = out_dir()
    for name in ("metrics.csv", "log.txt", "curves.png", "config.json"):
        if (RUN / name).exists():
            shutil.copyfile(RUN / name, out / name)
    if not (out / "log.txt").exists() and (STAGE / "fit.out").exists():  # fit failed before its run folder
        shutil.copyfile(STAGE / "fit.out", out / "log.txt")
    verify = summarise(RUN, finished)
    weights = RUN / "model.pth"
    if weights.exists():
        data = weights.read_bytes()
        verify["model_sha1"], verify["model_parts"] = hashlib.sha1(data).hexdigest(), []
        for i in range(0, len(data), PART_BYTES):
            name = f"model.pth.{i // PART_BYTES:02d}"
            (out / name).write_bytes(data[i:i + PART_BYTES])
            verify["model_parts"].append(name)
    (out / "verify.json").write_text(json.dumps(verify, indent=2) + "\n")  # before the bench: a killed call keeps it
    print(json.dumps({k: v for k, v in verify.items() if k not in ("versions", "model_parts")}), flush=True)
    if bench:
        verify["bench_data"] = bench_workers()
        (out / "verify.json").write_text(json.dumps(verify, indent=2) + "\n")
        print(json.dumps(verify["bench_data"]))


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("1", "2", "3", "collect"):
        raise SystemExit("usage: python3 scripts/gpu/device.py 1|2|3|collect [fit flags]")
    step, flags = argv[0], argv[1:]
    if step in ("1", "2", "3"):
        stored = store(int(step))
        print(f"call {step}: stored {len(stored)} parts; missing: {missing_parts()}", flush=True)
    if step == "1":
        env = check_environment()
        (out_dir() / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env))
    elif step == "3":
        start_fit(flags)
        finished = wait_for_fit(WAIT_S - (time.monotonic() - START))
        collect(finished, bench=finished and time.monotonic() - START < WAIT_S - 60)
    elif step == "collect":
        finished = wait_for_fit(WAIT_S)
        collect(finished, bench=False)


if __name__ == "__main__":
    main(sys.argv[1:])
