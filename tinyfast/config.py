"""A run's configuration, written once: each option's name, default, allowed values, help text, group, and
whether `--resume` may change it. `fit`, the `fit` command (its flags are made from these fields), config.json
(the object serialised under "args") and the benchmarks all read it from here.

In the manner of nanoGPT's config and timm's grouped arguments: one frozen dataclass, read top to bottom. A bad
value is one RunError line naming the flag, raised when the object is made, before any folder exists.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .choices import MODES, PRECISIONS, SCHEDULES, STEMS, TRACKERS
from .errors import RunError

__all__ = ["RunConfig", "option", "OPTION_GROUPS", "DEFAULT_SIZE", "DEFAULT_STEM", "BUDGET_SIZES", "parse_budget", "in_range", "describe_range",
           "resume_changes"]

DEFAULT_SIZE = 64                   # the size of a run given neither --size nor --budget
DEFAULT_STEM = "cifar"              # the stem of a run given neither --stem nor a --budget that chooses it
BUDGET_SIZES = (16, 24, 32, 48, 64)  # the training sizes a budget chooses from (tinyfast.budget)
DATA_WHAT = "a tiny-imagenet-200 folder or its zip"
DATA_DEFAULT = "[default: $TINYFAST_DATA or data/tiny-imagenet-200]"
DATA_HELP = f"{DATA_WHAT} {DATA_DEFAULT}"
OPTION_GROUPS = ("data", "model", "optimizer", "lr test", "levers", "runtime")


def option(default: Any, help: str, group: str, range: str | None = None, choices: tuple[str, ...] | None = None,
           flags: tuple[str, ...] = (), resume: bool = False):
    """A field of RunConfig with what the CLI and the checks need. range: "[1, inf)" is >= 1, "(0, 1]" is above 0
    and at most 1. flags: the CLI's names when not only `--name` (aliases). resume: `--resume` may change it."""
    return field(default=default, metadata={"help": help, "group": group, "range": range, "choices": choices,
                                            "flags": flags, "resume": resume})


@dataclass(frozen=True)
class RunConfig:
    # data
    data: str | None = option(None, DATA_HELP, "data", resume=True)
    classes: int | None = option(None, "train on the first N classes only (a real subset)", "data", "[1, inf)")
    train_per_class: int | None = option(None, "use the first M training images of each class", "data", "[1, inf)")
    size: int | None = option(None, "input size in pixels [default: 64, or the --budget's choice]", "data", "[8, inf)")
    bs: int = option(256, "batch size", "data", "[1, inf)")
    aug: bool = option(True, "the default Albumentations policy on the training split", "data")
    num_workers: int | None = option(None, "DataLoader workers [default: 0 on CPU; on a GPU min(8, CPU cores)]",
                                     "data", "[0, inf)", resume=True)
    # model
    stem: str | None = option(None, "cifar: 3x3 stride-1 stem, 64x64 feature maps; imagenet: 7x7 stride-2 + "
                              "max-pool (15x cheaper) [default: cifar, or the --budget's choice where neither --size "
                              "nor --progressive is given]", "model", choices=STEMS)
    # optimizer and schedule
    epochs: int = option(30, "epochs to train", "optimizer", "[1, inf)")
    budget: str | None = option(None, "plan the run for this much wall time, everything included (90m, 1.5h, "
                                "300s): the epochs, and the size where --size is not given", "optimizer")
    lr: float | str = option(0.1, "peak (one-cycle) or starting (plateau) learning rate, or 'auto' to run the LR "
                             "range test first", "optimizer", "(0, inf)")
    schedule: str = option("one-cycle", "fit_one_cycle, or SGD with ReduceLROnPlateau", "optimizer", choices=SCHEDULES)
    wd: float = option(5e-4, "L2 weight decay on every parameter, as in the classic recipe (SGD with Nesterov "
                       "momentum)", "optimizer", "[0, inf)")
    mom: float = option(0.9, "SGD momentum (one-cycle cycles it 0.95-0.85-0.95 as fastai does)", "optimizer", "[0, 1)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (0 for none)", "optimizer", "[0, 1)")
    monitor: str = option("valid_loss", "plateau: the value watched", "optimizer")
    patience: int = option(2, "plateau: epochs without improvement before the LR drops", "optimizer", "[0, inf)")
    factor: float = option(5.0, "plateau: the LR is divided by this", "optimizer", "(1, inf)")
    # the LR range test of --lr auto
    lr_mode: str = option("smith", "--lr auto: which LR range test picks the LR (find-lr --mode; fastai's valley "
                          "suits Adam, not SGD)", "lr test", choices=MODES)
    lr_num_it: int = option(100, "--lr auto: iterations of the LR range test (find-lr --num-it)", "lr test",
                            "[2, inf)", flags=("--lr-num-it", "--lr-iterations"))
    lr_val_batches: int = option(2, "--lr auto (smith): validation batches measured after each step (find-lr "
                                 "--val-batches)", "lr test", "[1, inf)")
    # levers toward the full-data target, each off by default (docs/BENCHMARKS.md has what each measured)
    ema: float = option(0.0, "EMA of the weights with this decay (0.999 is usual; 0: off): validated and saved as "
                        "model.pth", "levers", "[0, 1)")
    mixup: float = option(0.0, "fastai's MixUp with this Beta alpha (0.4 is usual; 0: off)", "levers", "[0, inf)")
    cutmix: float = option(0.0, "fastai's CutMix with this Beta alpha (1.0 is usual; 0: off)", "levers", "[0, inf)")
    progressive: int = option(0, "progressive resizing: the first half of the epochs grows from this size to --size "
                              "(0: off)", "levers", "[0, inf)")
    tta: bool = option(False, "also score the best model with fastai's test-time augmentation (tta.json)", "levers",
                       resume=True)
    # how it runs
    seed: int = option(42, "random seed", "runtime", "[0, 4294967295]")
    precision: str = option("auto", "auto: bf16 where native, fp16 (loss-scaled) on a GPU older than sm_80, else "
                            "fp32; see doctor", "runtime", choices=PRECISIONS)
    log: str = option("csv", "csv: metrics.csv only; tensorboard: also RUN_DIR/tensorboard/ (fastai's "
                      "TensorBoardCallback); wandb: also fastai's WandbCallback, offline unless WANDB_MODE is set",
                      "runtime", choices=TRACKERS)
    compile: bool = option(False, "torch.compile the model (pays on long GPU runs; the first steps wait for the "
                           "compiler)", "runtime", flags=("--compile",))

    def __post_init__(self):
        if self.data is not None and not isinstance(self.data, str):  # a Path: kept as the text config.json holds
            object.__setattr__(self, "data", str(self.data))
        for f in dataclasses.fields(self):
            _check_option(f, getattr(self, f.name))
        if self.mixup > 0 and self.cutmix > 0:
            raise RunError("--mixup and --cutmix are alternatives: give one of them, not both")
        size = self.size or DEFAULT_SIZE
        if self.budget is not None:
            parse_budget(self.budget)  # a bad budget is one line too
            size = self.size or min(BUDGET_SIZES)
            if self.schedule != "one-cycle":
                raise RunError("--budget plans a one-cycle schedule: drop --schedule plateau, or give --epochs instead")
        if self.progressive and not 0 < self.progressive <= size:
            raise RunError(f"--progressive is the first epochs' size, in (0, --size={size}] (0 for none), "
                           f"not {self.progressive}")

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """What config.json keeps under "args"."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunConfig:
        """A saved configuration (config.json's "args"): keys of an older version missing get their defaults,
        and keys that are not options (the run's state, such as the LR picked) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    @classmethod
    def make(cls, base: RunConfig | None = None, **overrides) -> RunConfig:
        """`base` (or the defaults) with `overrides`, each an option's name; a name that is not one is a TypeError,
        as for any function."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unexpected option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the options "
                            f"are RunConfig's fields: {', '.join(sorted(names))}")
        return (base or cls()).replace(**overrides)

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def default(cls, name: str) -> Any:
        """One option's default: for the functions that share it (`find_lr`, `find-lr`)."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def parse_budget(budget: str | float | int) -> float:
    """Seconds, from `90m`, `1.5h`, `300s` or a plain number of seconds."""
    if isinstance(budget, (int, float)):
        seconds = float(budget)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(budget).lower())
        if not m:
            raise RunError(f"--budget takes a time such as 90m, 1.5h or 300s, not {budget!r}")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not seconds > 0:
        raise RunError(f"--budget must be above zero, not {budget!r}")
    return seconds


def in_range(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    return ((low <= value) if interval[0] == "[" else (low < value)) and \
           ((value <= high) if interval[-1] == "]" else (value < high))


def describe_range(interval: str) -> str:
    low, high = interval[1:-1].split(", ")
    if high == "inf":
        return f"{'>=' if interval[0] == '[' else '>'} {low}"
    return f"in {interval}"


def _check_option(f: dataclasses.Field, value: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    choices, interval = f.metadata["choices"], f.metadata["range"]
    if value is None or (f.name == "lr" and value == "auto"):
        return
    if choices and value not in choices:
        raise RunError(f"{flag} must be one of {', '.join(choices)}, not {value!r}")
    if interval and not (isinstance(value, (int, float)) and not isinstance(value, bool) and in_range(value, interval)):
        raise RunError(f"{flag} must be {describe_range(interval)}, not {value!r}")


def resume_changes(saved: dict, requested: dict, done_epochs: int) -> dict:
    """The requested options a resume applies (those marked `resume`, and `epochs` of a plateau run beyond those
    done: it has no schedule to stretch, where a one-cycle run has); a RunError naming every other one that
    differs from the saved run, with both values. Anything else would make the run something other than what its
    folder says it is."""
    may_change = {f.name for f in RunConfig.options() if f.metadata["resume"]}
    apply, refused = {}, []
    for k, v in requested.items():
        if k not in saved or v == saved[k]:
            continue
        if k in may_change or (k == "epochs" and saved["schedule"] == "plateau" and v > done_epochs):
            apply[k] = v
        else:
            refused.append(f"--{k.replace('_', '-')} {v} (saved: {saved[k]})")
    if refused:
        why = ("a one-cycle schedule cannot be stretched; " if "epochs" in " ".join(refused) and
               saved["schedule"] == "one-cycle" else "")
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(may_change))
        raise RunError(f"--resume continues the run as it was saved, but {', '.join(refused)} differ: {why}drop "
                       f"{'them' if len(refused) > 1 else 'it'}, or start a new run with another --out (a resume may "
                       f"change only {allowed}, and --epochs of a plateau run)")
    return apply
