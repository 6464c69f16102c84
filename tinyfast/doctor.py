"""What a user asks before a long run, in the spirit of `torch.utils.collect_env` and `accelerate env`: which device
trains, whether the installed torch has kernels for it, the precision `auto` picks there and why, the loader's
workers and where the decoded cache lives, and the versions that matter. `python main.py doctor` prints it.

The kernel check is also `fit`'s first step: a GPU the installed torch cannot run (a V100, sm_70, under a CUDA 13
build, whose kernels start at sm_75) is one line before any folder is made, instead of "no kernel image is
available" at the first batch.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from fastai.torch_core import default_device

from .data import default_cache_dir, default_num_workers
from .dataset import DatasetError, resolve_dataset
from .errors import RunError
from .learner import precision_choice

OLD_GPU_TORCH = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126"


def versions() -> dict:
    import albumentations
    import fastai
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__, "fastai": fastai.__version__,
            "albumentations": albumentations.__version__, "grad-cam": version("grad-cam"),
            "platform": platform.platform()}


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build compiled for `arch_list` (`torch.cuda.get_arch_list()`) runs on a GPU of `capability`:
    machine code for sm_XY runs on the same major version from minor Y up (sm_XYa only on X.Y itself), PTX
    (compute_XY) on anything from X.Y up, by JIT compilation. torch's own `_check_capability` applies this
    rule, as a warning."""
    device = 10 * capability[0] + capability[1]
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        code = int(number.rstrip("af"))
        if kind == "compute" and code <= device:
            return True
        if kind == "sm" and (code == device if number.endswith("a") else code // 10 == device // 10 and code <= device):
            return True
    return False


def kernel_problem(device: torch.device) -> str | None:
    """None where torch can run on `device`; else the one line that says why not and what to install."""
    if device.type != "cuda":
        return None
    arch_list = torch.cuda.get_arch_list()
    capability = torch.cuda.get_device_capability(device)
    if not arch_list or has_kernels(capability, arch_list):
        return None
    name, built = torch.cuda.get_device_name(device), [a for a in arch_list if a.startswith("sm_")]
    oldest = min((int(a[3:].rstrip("af")) for a in built), default=0)
    fix = (f"install a torch built with CUDA 12.6, whose kernels still cover it: {OLD_GPU_TORCH}"
           if 10 * capability[0] + capability[1] < oldest else "install a newer torch")
    return (f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) has no kernels for the {name} (compute "
            f"capability {capability[0]}.{capability[1]}; it was built for {', '.join(arch_list)}): {fix}")


def check_device(device: torch.device | None = None) -> None:
    """A RunError where the installed torch cannot run on `device` (default: the one fastai trains on)."""
    problem = kernel_problem(device if device is not None else default_device())
    if problem:
        raise RunError(problem)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)} ({device}), compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB; {torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}")
    return f"{device.type}: {cpu_model()}, {os.cpu_count()} cores"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def doctor(data: Path | str | None = None, device: torch.device | None = None) -> dict[str, str]:
    """The facts, as `label: text`, in the order `doctor` prints them."""
    device = device if device is not None else default_device()
    facts = {"device": describe_device(device)}
    if device.type == "cuda":
        facts["kernels"] = kernel_problem(device) or f"yes: this torch has {', '.join(torch.cuda.get_arch_list())}"
    dtype, why = precision_choice("auto", device)
    facts["precision auto"] = why
    workers = default_num_workers(device)
    facts["loader workers"] = f"{workers} by default here (--num-workers changes it)"
    try:
        root = resolve_dataset(data)
        facts["dataset"] = str(root)
        cache = default_cache_dir(root)
        caches = sorted(cache.glob("images-*.npy")) if cache.is_dir() else []
        facts["decoded cache"] = f"{cache} ({len(caches)} cache file(s), " \
                                 f"{sum(c.stat().st_size for c in caches) / 2**20:.0f} MiB)"
    except DatasetError as e:
        facts["dataset"] = str(e)
    distributed = [f"{k}={os.environ[k]}" for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ]
    if distributed:
        facts["launch"] = " ".join(distributed)
    found = versions()
    facts["versions"] = ", ".join(f"{k} {v}" for k, v in found.items() if k != "platform")
    facts["platform"] = found["platform"]
    return facts


def format_doctor(facts: dict[str, str]) -> str:
    width = max(map(len, facts))
    return "\n".join(f"{label + ':':<{width + 1}} {text}" for label, text in facts.items())
