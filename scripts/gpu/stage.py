"""Stage the 3-call device path here: the wheels the device lacks and the packed dataset, split into one folder
per call (`.gpu/call1`, `.gpu/call2`, `.gpu/call3`), each small enough to travel with the tree.

    python scripts/gpu/stage.py data/tiny-imagenet-200            # downloads the wheels (PyPI), packs, splits
    python scripts/gpu/stage.py data/tiny-imagenet-200 --wheels DIR   # wheels already downloaded

Why: one call carries at most 64 MiB, tracked files included; the standard train+val folders pack to ~144 MiB
(`jpegpack.py`) and the wheels to ~10 MiB, so they need 3 calls, with the wheels in the first, where the
environment is checked. The wheels are for the device's Python (CPython 3.12, manylinux x86-64), at the versions
installed here, the ones the tests ran against; each is checked against those tags before it is staged.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from jpegpack import pack  # noqa: E402

# what the device's image lacks (KINDS.md's package list), distribution -> import name
DEVICE_LACKS = {"fastai": "fastai", "fastcore": "fastcore", "fasttransform": "fasttransform",
                "fastprogress": "fastprogress", "fastdownload": "fastdownload", "plum-dispatch": "plum",
                "beartype": "beartype", "albumentations": "albumentations", "albucore": "albucore",
                "stringzilla": "stringzilla", "simsimd": "simsimd", "pydantic": "pydantic",
                "pydantic-core": "pydantic_core", "annotated-types": "annotated_types",
                "typing-inspection": "typing_inspection", "grad-cam": "pytorch_grad_cam", "ttach": "ttach"}
SDIST_ONLY = {"grad-cam"}  # no wheel on PyPI: built here (pure Python)
PYTHON = (3, 12)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64",
                                                                                  "manylinux1_x86_64"]
CALL_MIB, MARGIN_MIB, CALLS, PART_MIB = 64, 2, 3, 4  # the margin: the tool may count a little more than file bytes


def device_tags() -> set:
    from packaging import tags
    py = f"cp{PYTHON[0]}{PYTHON[1]}"
    return set(tags.cpython_tags(PYTHON, platforms=PLATFORMS)) | set(tags.compatible_tags(PYTHON, py, PLATFORMS))


def check_wheels(wheels: list[Path]) -> None:
    """Each wheel installable on the device's Python, and one version of each distribution."""
    from packaging.utils import canonicalize_name, parse_wheel_filename
    allowed, seen = device_tags(), {}
    for w in wheels:
        name, version, _, file_tags = parse_wheel_filename(w.name)
        if not file_tags & allowed:
            raise SystemExit(f"stage: {w.name} does not install on CPython {PYTHON[0]}.{PYTHON[1]} manylinux x86-64")
        if name in seen:
            raise SystemExit(f"stage: two versions of {name}: {seen[name]} and {w.name} (pip would stop on them)")
        seen[name] = w.name
    missing = {canonicalize_name(d) for d in DEVICE_LACKS} - set(seen)
    if missing:
        raise SystemExit(f"stage: no wheel for {', '.join(sorted(missing))}")


def download_wheels(dest: Path) -> list[Path]:
    """Each package the device lacks, at the version installed here, built for the device's Python; a package
    with no such wheel on PyPI is built here, and kept only if it is pure Python. One pip for all the wheels (each
    pip costs a second or two of start-up), then one for each that the first did not bring."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]

    def download(specs: list[str]) -> bool:
        return subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--python-version", f"{PYTHON[0]}.{PYTHON[1]}", "--implementation", "cp", *platforms,
                               "-d", str(dest), *specs], capture_output=True, text=True).returncode == 0

    specs = {dist: f"{dist}=={importlib.metadata.version(dist)}" for dist in DEVICE_LACKS}
    download([spec for dist, spec in specs.items() if dist not in SDIST_ONLY])  # if it fails, each alone below
    for dist, spec in specs.items():
        if not has_wheel(dest, dist) and not download([spec]):  # no wheel on PyPI: build it, tags checked below
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec], check=True)
    return sorted(dest.glob("*.whl"))


def has_wheel(folder: Path, dist: str) -> bool:
    """A wheel of `dist` in `folder` (a wheel's name spells the project with underscores, lower-cased or not)."""
    prefix = dist.replace("-", "_").lower() + "-"
    return any(w.name.lower().startswith(prefix) for w in folder.glob("*.whl"))


def tree_files(repo: Path) -> list[str]:
    """What every call sends besides its carried folder: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return [n for n in names if n and (repo / n).is_file()]


def travelling_bytes(repo: Path) -> int:
    return sum((repo / n).stat().st_size for n in tree_files(repo))


def stage(root: Path | str, wheels_dir: Path | str | None = None, dest: Path | str = ".gpu",
          repo: Path | str = ".", calls: int = CALLS, call_mib: float = CALL_MIB) -> dict:
    """`dest/call1..N`: call 1 the wheels, pack.sha1 and the first parts, then the rest; the plan as a dict."""
    root, dest, repo = Path(root), Path(dest), Path(repo)
    wheels = sorted(Path(wheels_dir).glob("*.whl")) if wheels_dir else download_wheels(dest / "wheels")
    check_wheels(wheels)
    for old in dest.glob("call*"):
        shutil.rmtree(old)
    packed = dest / "pack"
    shutil.rmtree(packed, ignore_errors=True)
    parts = pack(root, packed, PART_MIB)
    tree = travelling_bytes(repo)
    budget = int((call_mib - MARGIN_MIB) * 2**20) - tree
    plan, queue = [], [packed / "pack.sha1"] + parts
    for call in range(1, calls + 1):
        folder = dest / f"call{call}"
        used, files = 0, []
        if call == 1:
            (folder / "wheels").mkdir(parents=True)
            for w in wheels:
                shutil.copyfile(w, folder / "wheels" / w.name)
                used += w.stat().st_size
            if used > budget:
                raise SystemExit(f"stage: the wheels alone ({used / 2**20:.1f} MiB) and the tree "
                                 f"({tree / 2**20:.1f} MiB) do not fit in one call of {call_mib} MiB")
        (folder / "parts").mkdir(parents=True, exist_ok=True)
        while queue and used + queue[0].stat().st_size <= budget:
            part = queue.pop(0)
            os.link(part, folder / "parts" / part.name)
            used += part.stat().st_size
            files.append(part.name)
        plan.append({"call": call, "carry": f"{dest.name}/call{call}", "parts": files,
                     "wheels": len(wheels) if call == 1 else 0, "mib": round((used + tree) / 2**20, 2)})
    if queue:
        raise SystemExit(f"stage: {len(queue)} parts left over after {calls} calls of {call_mib} MiB "
                         f"(the tree alone is {tree / 2**20:.1f} MiB)")
    result = {"tree_mib": round(tree / 2**20, 2), "calls": plan, "data": str(root)}
    (dest / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="a TinyImageNet folder (tiny-imagenet-200)")
    ap.add_argument("--wheels", help="a folder of wheels already downloaded (else: downloaded from PyPI)")
    ap.add_argument("--dest", default=".gpu")
    a = ap.parse_args(argv)
    plan = stage(a.root, a.wheels, a.dest)
    for c in plan["calls"]:
        print(f"call {c['call']}: carry ['{c['carry']}'], {len(c['parts'])} parts, {c['wheels']} wheels, "
              f"{c['mib']} MiB with the tree: python3 scripts/gpu/device.py {c['call']}")


if __name__ == "__main__":
    main()
