"""A local stand-in for the lent device machine: the whole 3-call path, on the CPU, under the device's limits.

    python scripts/gpu/rehearse.py                       # a generated dataset, 2 epochs at 64 px
    python scripts/gpu/rehearse.py --data DIR --wheels W -- --epochs 1 --bs 32   # (flags after -- go to fit)
    python scripts/gpu/rehearse.py join FILES_DIR RUN_DIR   # what call 3 returned -> a run folder here

Why: a loan is 15 minutes, drawn by chance, with no second try, so the path must have run before it is needed.
Each call here is what the device tool does: the tree (tracked files and untracked ones git does not ignore) and
the call's carried folder copied into a device folder, refused above 64 MiB; `$OUT` empty at the start; `python3`
a Python whose image lacks what the device lacks (`stage.DEVICE_LACKS`: only the carried wheels can provide it);
no network (`unshare -n`, where the kernel lets us); then what came back is checked against the device's return
limits (8 files, 16 MiB each, 64 MiB in all, 2 folders deep, plain names). The wheels are also installed and
their compiled modules imported by a real CPython 3.12, the device's version, when one is on this machine
(the stand-in Python is this one, since a 3.12 with torch is not). At the end the returned files become a run
folder here and `evaluate` scores it.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from stage import CALL_MIB, DEVICE_LACKS, PYTHON, stage, travelling_bytes, tree_files  # noqa: E402

RETURN_FILES, RETURN_MIB, RETURN_TOTAL_MIB = 8, 16, 64
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
COMPILED_FOR_ANOTHER_PYTHON = re.compile(r"\.cpython-(\d+)-")

BLOCKER = '''
# The stand-in's image: the packages the device lacks come from the carried wheels (TINYFAST_STAGE/site) or not at
# all; a compiled one whose carried build is for another Python (the device's 3.12) falls back to this Python's copy.
import importlib.abc, importlib.machinery, os, re, sys
LACKS = set({lacks!r})
SITE = os.path.join(os.environ.get("TINYFAST_STAGE", "/root/tinyfast"), "site")
OTHER = re.compile(r"\\.cpython-(\\d+)-")
class DeviceImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in LACKS or path is not None:
            return None
        mine = "%d%d" % sys.version_info[:2]
        site = os.listdir(SITE) if os.path.isdir(SITE) else []
        files = [f for f in site if f.startswith(name + ".")]  # an extension module alone: name.cpython-312-...so
        spec = importlib.machinery.PathFinder.find_spec(name, [SITE])
        if spec is not None and spec.submodule_search_locations:
            files += os.listdir(spec.submodule_search_locations[0])
        if spec is None and not files:
            raise ModuleNotFoundError(f"No module named {{name!r}} on the device: carry its wheel", name=name)
        if any((m := OTHER.search(f)) and m.group(1) != mine for f in files):
            # built for the device's Python: this Python's own copy stands in
            return importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p != SITE])
        return spec
sys.meta_path.insert(0, DeviceImage())
'''


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def send(repo: Path, carried: Path, device_repo: Path, carry_as: str) -> None:
    """The device tool's copy: the tree, then the carried folder in place of that path; over 64 MiB is refused."""
    size = travelling_bytes(repo) + folder_bytes(carried)
    if size > CALL_MIB * 2**20:
        raise SystemExit(f"rehearse: the working tree is larger than {CALL_MIB} MiB ({size / 2**20:.1f} MiB with "
                         f"{carry_as}): the device tool refuses this call")
    for name in tree_files(repo):
        (device_repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, device_repo / name)
    shutil.rmtree(device_repo / carry_as, ignore_errors=True)
    shutil.copytree(carried, device_repo / carry_as)


def check_returned(out: Path) -> list[Path]:
    """The device's return limits; what passes, as it would come back."""
    files, problems = [p for p in out.rglob("*") if p.is_file()], []
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3:
            problems.append(f"{rel}: more than 2 folders down")
        if not all(NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with other characters than letters, digits, '.', '_', '-'")
        if p.stat().st_size > RETURN_MIB * 2**20:
            problems.append(f"{rel}: {p.stat().st_size / 2**20:.1f} MiB, over {RETURN_MIB} MiB")
    if len(files) > RETURN_FILES:
        problems.append(f"{len(files)} files, over {RETURN_FILES}")
    if sum(p.stat().st_size for p in files) > RETURN_TOTAL_MIB * 2**20:
        problems.append(f"over {RETURN_TOTAL_MIB} MiB in all")
    if problems:
        raise SystemExit("rehearse: what came back breaks the device's limits: " + "; ".join(problems))
    return files


def no_network_prefix() -> list[str]:
    """`unshare -n` when this kernel lets us make a network namespace (root, or user namespaces), else nothing."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    return []


def device_call(call: str, work: Path, repo: Path, carried: Path | None, fit_flags: list[str]) -> dict:
    device_repo, out = work / "device" / "repo", work / f"out-{call}"
    if carried is not None:
        send(repo, carried, device_repo, f".gpu/call{call}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {"PATH": f"{work / 'bin'}{os.pathsep}/usr/bin:/bin", "HOME": str(work / "device" / "home"), "OUT": str(out),
           "PYTHONPATH": str(work / "image"), "TINYFAST_STAGE": str(work / "device" / "root" / "tinyfast"),
           "MPLBACKEND": "Agg", "LANG": "C.UTF-8", "TINYFAST_BENCH_BS": "16",
           "TINYFAST_BENCH_WORKERS": "0,2"}
    cut = no_network_prefix()
    command = cut + ["python3", "scripts/gpu/device.py", call] + fit_flags
    res = subprocess.run(command, cwd=device_repo, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"rehearse: call {call} failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return {"files": sorted(str(p.relative_to(out)) for p in check_returned(out)), "out": str(out),
            "tail": res.stdout.strip().splitlines()[-1:], "network_cut": bool(cut)}


def stand_in_python(work: Path) -> None:
    """`python3` on the stand-in's PATH: this interpreter, with the device image's gaps (sitecustomize)."""
    (work / "bin").mkdir(parents=True, exist_ok=True)
    (work / "image").mkdir(parents=True, exist_ok=True)
    (work / "image" / "sitecustomize.py").write_text(BLOCKER.format(lacks=sorted(set(DEVICE_LACKS.values()))))
    launcher = work / "bin" / "python3"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    launcher.chmod(0o755)


def python312() -> str | None:
    """A CPython of the device's version that runs (a pyenv shim without that version set exits 127)."""
    version = f"{PYTHON[0]}.{PYTHON[1]}"
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))
    candidates += [p for p in [shutil.which(f"python{version}")] if p]
    return next((c for c in candidates if subprocess.run([c, "-c", ""], capture_output=True).returncode == 0), None)


def check_on_python312(wheels: Path, work: Path) -> dict:
    """pip on a real CPython 3.12 installs every wheel (it refuses a wrong tag) and its compiled modules import."""
    python = python312()
    if python is None:
        return {"python312": None}
    target = work / "site312"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    *map(str, sorted(wheels.glob("*.whl")))], check=True, capture_output=True)
    import typing_extensions  # on the device's image; pydantic needs it
    shutil.copy(typing_extensions.__file__, target)
    # the extension modules at the top (stringzilla, simsimd, plum's mypyc core), and pydantic for pydantic_core;
    # importing plum itself would need rich, which is on the device's image but not on this bare 3.12
    modules = sorted({p.name.split(".")[0] for p in target.glob("*.so") if COMPILED_FOR_ANOTHER_PYTHON.search(p.name)})
    modules += ["pydantic"]
    res = subprocess.run([python, "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]",
                          *modules], env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rehearse: the wheels' compiled modules do not import on {python}: {res.stderr[-1000:]}")
    return {"python312": python, "imported": modules}


def join(files: Path | str, run: Path | str) -> Path:
    """What call 3 returned -> a run folder here: model.pth rebuilt from its parts and checked against its sha1."""
    files, run = Path(files), Path(run)
    verify = json.loads((files / "verify.json").read_text())
    data = b"".join((files / name).read_bytes() for name in verify["model_parts"])
    if hashlib.sha1(data).hexdigest() != verify["model_sha1"]:
        raise SystemExit(f"rehearse join: the parts of model.pth in {files} do not rebuild it (sha1): fetch them again")
    run.mkdir(parents=True)
    (run / "model.pth").write_bytes(data)
    for name in ("config.json", "metrics.csv", "log.txt", "curves.png", "verify.json"):
        if (files / name).exists():
            shutil.copyfile(files / name, run / name)
    return run


def rehearse(data: Path | str | None = None, wheels: Path | str | None = None, work: Path | str | None = None,
             fit_flags: list[str] | None = None) -> dict:
    work = Path(work or tempfile.mkdtemp(prefix="rehearse-"))
    if data is None:
        from tinyfast.synthetic import make_tiny_imagenet
        data = make_tiny_imagenet(work / "data", n_classes=4, n_train=24, n_val=8, n_test=0, size=64, seed=0)
    fit_flags = fit_flags or ["--epochs", "2", "--bs", "16", "--lr", "0.02", "--quiet"]
    plan = stage(data, wheels, work / "stage", REPO)
    stand_in_python(work)
    report = {"plan": plan, "calls": {}}
    for call in ("1", "2", "3"):
        report["calls"][call] = device_call(call, work, REPO, work / "stage" / f"call{call}", fit_flags if call == "3" else [])
    env = json.loads((work / "out-1" / "env.json").read_text())
    failed = {k: v for k, v in env["imports"].items() if str(v).startswith("FAILED")}
    if failed or env["cli_fit_help"] is not True:
        raise SystemExit(f"rehearse: call 1's environment check failed: {failed or env['cli_fit_help']}")
    verify = json.loads((work / "out-3" / "verify.json").read_text())
    if not verify.get("finished"):
        raise SystemExit(f"rehearse: fit did not finish within call 3: {verify}")
    run = join(work / "out-3", work / "run")
    res = subprocess.run([sys.executable, str(REPO / "main.py"), "evaluate", str(run), "--data", str(data), "--quiet"],
                         capture_output=True, text=True, cwd=work)
    if res.returncode != 0:
        raise SystemExit(f"rehearse: evaluate on the joined run failed: {res.stdout[-1000:]}{res.stderr[-1000:]}")
    report.update({"env": env, "verify": verify, "run": str(run), "evaluate": res.stdout.strip().splitlines()[-1:],
                   "wheels_on_python312": check_on_python312(work / "stage" / "call1" / "wheels", work)})
    return report


def main(argv: list[str]) -> None:
    if argv[:1] == ["join"]:
        print(join(*argv[1:3]))
        return
    fit_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a TinyImageNet folder [default: a generated one]")
    ap.add_argument("--wheels", help="a folder of the device's wheels [default: downloaded from PyPI]")
    ap.add_argument("--work", help="a folder for the stand-in [default: a new temporary one]")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    report = rehearse(a.data, a.wheels, a.work, fit_flags)
    print(json.dumps({k: report[k] for k in ("calls", "verify", "evaluate", "wheels_on_python312")}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
