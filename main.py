"""tinyfast's command line: parses flags with typer and calls the package, nothing more.

Every command maps its flags to the package function of the same name and arguments, so anything done here
can be done from a REPL. Errors a user can act on are one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and understand a ResNet18 on TinyImageNet with fastai.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure the data loader or the training step (run on purpose, not in tests).")
app.add_typer(bench_app, name="bench")

DATA_HELP = "a tiny-imagenet-200 folder or its zip [default: $TINYFAST_DATA or data/tiny-imagenet-200]"


class Schedule(str, Enum):
    one_cycle = "one-cycle"
    plateau = "plateau"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Stem(str, Enum):
    cifar = "cifar"
    imagenet = "imagenet"


class Mode(str, Enum):
    fastai = "fastai"
    smith = "smith"


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_safely(fn, *args, **kwargs):
    """Call the package; turn the errors a user can act on into one line and a non-zero exit."""
    from tinyfast.dataset import DatasetError
    from tinyfast.train import RunError, RunInterrupted
    try:
        return fn(*args, **kwargs)
    except RunInterrupted as e:
        fail(str(e), 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (DatasetError, RunError, ValueError, FileNotFoundError) as e:
        fail(str(e))


def command_line() -> str:
    import shlex
    return shlex.join(["python", "main.py"] + sys.argv[1:])


# ---------------------------------------------------------------------------------------------------------
@app.command()
def download(dest: Path = typer.Option(Path("data"), help="folder to download and extract into"),
             url: str = typer.Option("http://cs231n.stanford.edu/tiny-imagenet-200.zip", help="zip to download"),
             md5: Optional[str] = typer.Option(None, help="expected md5 [default: the official one for the official URL]")):
    """Download TinyImageNet (resumable, checksummed), extract it atomically and validate its layout."""
    from tinyfast.dataset import download_tiny_imagenet
    root = run_safely(download_tiny_imagenet, dest, url=url, md5=md5)
    typer.echo(f"TinyImageNet ready at {root}")


@app.command("fit")
def fit_cmd(data: Optional[Path] = typer.Option(None, help=DATA_HELP),
            epochs: int = typer.Option(30, help="epochs to train"),
            bs: int = typer.Option(256, help="batch size"),
            lr: str = typer.Option("0.1", help="peak (one-cycle) or starting (plateau) learning rate, or 'auto' to run the LR range test first"),
            schedule: Schedule = typer.Option(Schedule.one_cycle, help="fit_one_cycle, or SGD with ReduceLROnPlateau"),
            wd: float = typer.Option(5e-4, help="weight decay (not applied to BatchNorm and biases)"),
            mom: float = typer.Option(0.9, help="SGD momentum (one-cycle cycles it 0.95-0.85-0.95 as fastai does)"),
            label_smoothing: float = typer.Option(0.1, help="label smoothing of the cross-entropy (0 for none)"),
            size: int = typer.Option(64, help="input size in pixels"),
            stem: Stem = typer.Option(Stem.cifar, help="cifar: 3x3 stride-1 stem, 64x64 feature maps; imagenet: 7x7 stride-2 + max-pool (16x cheaper)"),
            out: Optional[Path] = typer.Option(None, help="run folder [default: runs/<timestamp>]"),
            resume: bool = typer.Option(False, help="continue the run in --out (or the newest under runs/) from its checkpoint"),
            seed: int = typer.Option(42, help="random seed"),
            precision: Precision = typer.Option(Precision.auto, help="auto: bf16 autocast where the device computes bf16 natively"),
            num_workers: Optional[int] = typer.Option(None, help="DataLoader workers [default: 0 on CPU, 8 on GPU]"),
            monitor: str = typer.Option("valid_loss", help="plateau: the value watched"),
            patience: int = typer.Option(2, help="plateau: epochs without improvement before the LR drops"),
            factor: float = typer.Option(5.0, help="plateau: the LR is divided by this"),
            classes: Optional[int] = typer.Option(None, help="train on the first N classes only (a real subset)"),
            train_per_class: Optional[int] = typer.Option(None, help="use the first M training images of each class"),
            aug: bool = typer.Option(True, help="the default Albumentations policy on the training split")):
    """Train the ResNet18 and write a run folder (metrics, curves, model, learner.pkl, the exact command)."""
    from tinyfast.train import fit
    lr_value = lr if lr == "auto" else _float(lr, "--lr")
    result = run_safely(fit, data=data, epochs=epochs, bs=bs, lr=lr_value, schedule=schedule.value, wd=wd, mom=mom,
                        label_smoothing=label_smoothing, size=size, stem=stem.value, out=out, resume=resume, seed=seed,
                        precision=precision.value, num_workers=num_workers, monitor=monitor, patience=patience,
                        factor=factor, classes=classes, train_per_class=train_per_class, aug=aug,
                        command=command_line())
    typer.echo(f"best val accuracy {result.best_accuracy:.4f} at epoch {result.best_epoch}, "
               f"{result.seconds:.0f} s of training; run folder: {result.run_dir}")


def _float(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        fail(f"{flag} must be a number or 'auto', not {text!r}", 2)
    if not value > 0:
        fail(f"{flag} must be positive, not {text}", 2)
    return value


if __name__ == "__main__":
    app()
