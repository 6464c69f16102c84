"""tinyfast's command line (`python main.py ...` in a checkout, `tinyfast ...` once installed): parses flags with
typer and calls the package, nothing more.

Every command maps its flags to the package function of the same name and arguments, so anything done here
can be done from a REPL. Errors a user can act on are one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from tinyfast.choices import CAM_METHOD_NAMES, FORMATS, MODES, PRECISIONS, STEMS
from tinyfast.config import DATA_DEFAULT, DATA_HELP, DATA_WHAT, DEFAULT_SIZE, DEFAULT_STEM, RunConfig, describe_range, in_range

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and understand a ResNet18 on TinyImageNet with fastai.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure the data loader or the training step (run on purpose, not in tests).")
app.add_typer(bench_app, name="bench")



def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice made from one of the package's tuples (tinyfast.choices, which imports nothing)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Precision = _choices("Precision", PRECISIONS)
Stem = _choices("Stem", STEMS)
Mode = _choices("Mode", MODES)
ExportFormat = _choices("ExportFormat", FORMATS)


# The allowed range of every numeric flag, checked before any work (`check_ranges`): a run's options have theirs in
# tinyfast.config.RunConfig; the other commands' flags are here. "[1, inf)" is >= 1, "(0, 1]" is above 0 and at
# most 1. A command with its own range for a name passes it to `check_ranges`.
RANGES = {f.name: f.metadata["range"] for f in RunConfig.options() if f.metadata["range"]} | {
    "baseline_workers": "[0, inf)", "num_it": "[2, inf)", "start_lr": "(0, inf)", "end_lr": "(0, inf)",
    "top_losses": "[1, inf)", "pairs": "[1, inf)", "n": "[1, inf)", "limit": "[1, inf)", "topk": "[1, inf)",
    "at": "(0, 1]", "passes": "[1, inf)", "steps": "[1, inf)", "warmup": "[0, inf)", "batch": "[1, inf)",
    "val_batches": "[1, inf)", "port": "[1, 65535]",
}


def check_ranges(values: dict, **own: str) -> None:
    """Every numeric flag in `values` (a command's locals) inside its range (`RANGES`, or the command's `own`),
    else one line naming the flag and the range, exit 2. A list flag is checked item by item; text (`--lr auto`,
    an enum) is checked where it is parsed."""
    for name, value in values.items():
        interval = own.get(name, RANGES.get(name))
        if interval is None or value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not in_range(v, interval):
                fail(f"--{name.replace('_', '-')} must be {describe_range(interval)}, not {v}", 2)


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_safely(fn, *args, **kwargs):
    """Call the package; turn the errors a user can act on into one line and a non-zero exit."""
    from tinyfast.dataset import DatasetError
    from tinyfast.errors import RunError, RunInterrupted, one_line
    try:
        return fn(*args, **kwargs)
    except RunInterrupted as e:
        fail(one_line(e), 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (DatasetError, RunError, ValueError, FileNotFoundError) as e:
        fail(one_line(e), getattr(e, "exit_code", 1))
    except OSError as e:  # a folder that cannot be made or written (read-only, full, gone): one line too
        from tinyfast.layout import write_failure
        fail(str(write_failure(e.filename, e)) if e.filename else one_line(e))


def command_line() -> str:
    """The command as typed: `python main.py ...` from a checkout, `tinyfast ...` from the console script."""
    import shlex
    program = ["python", "main.py"] if Path(sys.argv[0]).name == "main.py" else [Path(sys.argv[0]).name]
    return shlex.join(program + sys.argv[1:])


def _benchmarks(module: str):
    """The `bench` commands drive `benchmarks/` of the checkout (bench.py, recipe.py), which is not part of the
    installed package: a user who imports tinyfast gets only what training and understanding a model need."""
    import importlib
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "benchmarks" / f"{module}.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(f"benchmarks.{module}")
    except ImportError as e:
        if getattr(e, "name", None) not in ("benchmarks", f"benchmarks.{module}"):
            raise
        fail(f"bench runs benchmarks/{module}.py of a tinyfast checkout: run it from a git clone "
             f"(pip install -e .), not from an installed copy")


# ---------------------------------------------------------------------------------------------------------
@app.command()
def download(dest: Path = typer.Option(Path("data"), help="folder to download and extract into"),
             url: str = typer.Option("http://cs231n.stanford.edu/tiny-imagenet-200.zip", help="zip to download"),
             md5: Optional[str] = typer.Option(None, help="expected md5 [default: the official one for the official URL]")):
    """Download TinyImageNet (resumable, checksummed), extract it atomically and validate its layout."""
    from tinyfast.dataset import download_tiny_imagenet
    root = run_safely(download_tiny_imagenet, dest, url=url, md5=md5)
    typer.echo(f"TinyImageNet ready at {root}")


@app.command()
def doctor(data: Optional[Path] = typer.Option(None, help=DATA_HELP)):
    """Before a long run: the device and its compute capability, whether this torch has kernels for it, the
    precision `auto` picks there and why, the loader's workers, the dataset and its cache, the versions."""
    from tinyfast.doctor import doctor as facts, format_doctor, kernel_problem
    from fastai.torch_core import default_device
    found = run_safely(facts, data)
    typer.echo(format_doctor(found))
    if kernel_problem(default_device()):
        raise typer.Exit(1)


def _config_parameter(f) -> inspect.Parameter:
    """The typer parameter of one RunConfig option: its flags, default and help as the field says."""
    meta, default = f.metadata, f.default
    if meta["choices"]:
        kind = _choices(f.name.title().replace("_", ""), meta["choices"])
        hint, default = (Optional[kind], None) if default is None else (kind, kind(default))
    elif f.name == "data":
        hint = Optional[Path]
    elif f.name == "lr":
        hint, default = str, str(default)  # a number or "auto"
    else:
        hint = {"bool": bool, "int": int, "float": float, "str": str}[f.type.split(" | ")[0]]
        hint = Optional[hint] if "None" in f.type else hint
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hint,
                             default=typer.Option(default, *meta["flags"], help=meta["help"]))


def fit_cmd(ctx: typer.Context, out: Optional[Path], resume: bool, quiet: bool, **options):
    """Train the ResNet18 and write a run folder (metrics, curves, model, learner.pkl, the exact command)."""
    check_ranges(options)
    from tinyfast.config import parse_budget
    from tinyfast.errors import RunError
    from tinyfast.train import fit
    options = {k: (v.value if isinstance(v, Enum) else v) for k, v in options.items()}
    options["lr"] = options["lr"] if options["lr"] == "auto" else _float(options["lr"], "--lr")
    try:
        parse_budget(options["budget"]) if options["budget"] is not None else None
    except RunError as e:
        fail(str(e), 2)
    result = run_safely(fit, out=out, resume=resume, quiet=quiet, command=command_line(), changed=given_flags(ctx),
                        **options)
    from tinyfast.distributed import is_main_process
    if is_main_process():
        from tinyfast.runlog import run_log
        with run_log(result.run_dir):
            typer.echo(f"best val accuracy {result.best_accuracy:.4f} at epoch {result.best_epoch}, "
                       f"{result.seconds:.0f} s of training; run folder: {result.run_dir}")


# the command's parameters: every option of a run (tinyfast.config.RunConfig), then how to run it
fit_cmd.__signature__ = inspect.Signature(
    [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    + [_config_parameter(f) for f in RunConfig.options()]
    + [inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                         default=typer.Option(None, help="run folder [default: runs/<timestamp>]")),
       inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
           False, help="continue the run in --out (or the newest under runs/) from its checkpoint")),
       inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
           False, help="no layer summary, no progress bars: only the result line (RUN_DIR/log.txt keeps what is "
                       "printed)"))])
app.command("fit")(fit_cmd)


def given_flags(ctx: typer.Context) -> set[str]:
    """The parameters set on the command line (not left at their defaults): on --resume, what the user asks to
    change."""
    # by name: typer 0.29 ships its own copy of click, whose ParameterSource is not click's
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


def _float(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        fail(f"{flag} must be a number or 'auto', not {text!r}", 2)
    if not value > 0:
        fail(f"{flag} must be positive, not {text}", 2)
    return value


# ---------------------------------------------------------------------------------------------------------
@app.command("find-lr")
def find_lr_cmd(data: Optional[Path] = typer.Option(None, help=DATA_HELP),
                bs: int = typer.Option(RunConfig.default("bs"), help="batch size"),
                mode: Mode = typer.Option(Mode(RunConfig.default("lr_mode")), help="smith (fit --lr auto's): linear sweep on a fixed held-out loss; fastai: exponential sweep on training loss"),
                num_it: int = typer.Option(RunConfig.default("lr_num_it"), help="iterations of the sweep"),
                start_lr: Optional[float] = typer.Option(None, help="first LR [default: 1e-7 fastai, 1e-3 smith]"),
                end_lr: Optional[float] = typer.Option(None, help="last LR [default: 10 fastai, 1.0 smith]"),
                out: Path = typer.Option(Path("lr_find"), help="folder for lr_find.png and lr_find.json (a run folder works)"),
                size: int = typer.Option(DEFAULT_SIZE, help="input size in pixels"),
                stem: Stem = typer.Option(Stem(DEFAULT_STEM), help="model stem, as for fit"),
                precision: Precision = typer.Option(Precision(RunConfig.default("precision")), help="as for fit"),
                classes: Optional[int] = typer.Option(None, help="the first N classes only"),
                train_per_class: Optional[int] = typer.Option(None, help="the first M training images of each class"),
                val_batches: int = typer.Option(RunConfig.default("lr_val_batches"), help="smith: validation batches measured after each step (as fit --lr auto)")):
    """Run an LR range test on a fresh model; print and save the suggested learning rate."""
    check_ranges(locals())
    from tinyfast.lr_range_report import find_lr
    result = run_safely(find_lr, data=data, bs=bs, mode=mode.value, num_it=num_it, start_lr=start_lr, end_lr=end_lr,
                        out=out, size=size, stem=stem.value, precision=precision.value, classes=classes,
                        train_per_class=train_per_class, val_batches=val_batches)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"suggested lr {result.suggested_lr:.3g} ({result.reason}); plot: {out / 'lr_find.png'}")


def _load(run_dir: Path, data: Optional[Path], precision: Optional[Precision] = None):
    from tinyfast.train import load_run
    return run_safely(load_run, run_dir, data=data, precision=precision.value if precision else None)


def _out(run_dir: Path, out: Optional[Path]) -> Path:
    return out if out is not None else run_dir


@contextmanager
def _logged(folder: Path, learn, quiet: bool):
    """What evaluate, interpret and gradcam print goes to FOLDER/log.txt too; `quiet` hides the progress bars."""
    from tinyfast.runlog import run_log
    folder.mkdir(parents=True, exist_ok=True)
    with run_log(folder, header=command_line()), (learn.no_bar() if quiet else nullcontext()):
        yield


def _report(folder: Path):
    from tinyfast.report import write_report
    from tinyfast.layout import CONFIG
    if (folder / CONFIG).exists():
        typer.echo(f"report: {write_report(folder)}")


@app.command()
def evaluate(run_dir: Path = typer.Argument(..., help="a run folder written by fit"),
             data: Optional[Path] = typer.Option(None, help=DATA_WHAT + " [default: the run's]"),
             tta: bool = typer.Option(False, help="average the predictions of each image and its horizontal flip"),
             temperature: bool = typer.Option(False, help="fit a temperature on half the val set, report calibration on the other half"),
             out: Optional[Path] = typer.Option(None, help="output folder [default: RUN_DIR]"),
             precision: Optional[Precision] = typer.Option(None, help="[default: the run's]"),
             quiet: bool = typer.Option(False, help="no progress bars (log.txt keeps what is printed)")):
    """Val loss, top-1/top-5, per-class accuracy and calibration (ECE, NLL, reliability.png)."""
    from tinyfast.interpret import evaluate as evaluate_run
    learn = _load(run_dir, data, precision)
    with _logged(_out(run_dir, out), learn, quiet):
        res = run_safely(evaluate_run, learn, _out(run_dir, out), tta=tta, temperature=temperature)
        typer.echo(f"val top-1 {res['accuracy']:.4f}  top-5 {res['top5']:.4f}  loss {res['loss']:.4f}  "
                   f"ECE {res.get('ece', float('nan')):.4f}  NLL {res.get('nll', float('nan')):.4f}  n={res['n']}"
                   + ("  (flip TTA)" if tta else ""))
        if temperature and "temperature" in res:
            typer.echo(f"temperature {res['temperature']:.3f} fitted on {res['n_fit']} images; on the other "
                       f"{res['n_report']}: ECE {res['ece_before']:.4f} -> {res['ece_after']:.4f}, "
                       f"NLL {res['nll_before']:.4f} -> {res['nll_after']:.4f}")
        _report(_out(run_dir, out))


@app.command()
def interpret(run_dir: Path = typer.Argument(..., help="a run folder written by fit"),
              data: Optional[Path] = typer.Option(None, help=DATA_WHAT + " [default: the run's]"),
              top_losses: int = typer.Option(16, "--top-losses", "--top", help="how many top-loss images to show"),
              pairs: int = typer.Option(10, help="most-confused pairs whose classes make up confusion.png"),
              out: Optional[Path] = typer.Option(None, help="output folder [default: RUN_DIR]"),
              precision: Optional[Precision] = typer.Option(None, help="[default: the run's]"),
              quiet: bool = typer.Option(False, help="no progress bars (log.txt keeps what is printed)")):
    """Top losses, the confusion among the most confused classes, and most_confused.csv, from one prediction pass."""
    check_ranges(locals())
    from tinyfast.interpret import interpret as interpret_run
    learn = _load(run_dir, data, precision)
    with _logged(_out(run_dir, out), learn, quiet):
        res = run_safely(interpret_run, learn, _out(run_dir, out), top_losses=top_losses, pairs=pairs)
        typer.echo(f"val top-1 {res['accuracy']:.4f}  top-5 {res['top5']:.4f}  errors {res['errors']} of {res['n']}")
        typer.echo("most confused (actual -> predicted, count):")
        for row in res["most_confused"][:5]:
            typer.echo(f"  {row['actual_wnid']} {row['actual_name']} -> {row['predicted_wnid']} "
                       f"{row['predicted_name']}: {row['count']}")
        typer.echo("written: " + ", ".join(res["paths"].values()))
        _report(_out(run_dir, out))


@app.command()
def gradcam(run_dir: Path = typer.Argument(..., help="a run folder written by fit"),
            data: Optional[Path] = typer.Option(None, help=DATA_WHAT + " [default: the run's]"),
            n: int = typer.Option(16, help="images in the grid (half correct, half wrong where possible)"),
            methods: List[str] = typer.Option(["gradcam"], "--methods", "--method", help=f"{', '.join(CAM_METHOD_NAMES)}; repeat for several"),
            layer: Optional[str] = typer.Option(None, help="target module, e.g. layer3 or layer4.1 [default: the last residual stage]"),
            images: Optional[List[Path]] = typer.Option(None, help="images to explain instead of val images; repeat for several"),
            score: bool = typer.Option(False, help="localisation score against the val boxes: pointing game and energy in the box"),
            limit: Optional[int] = typer.Option(None, help="score on the first N val images only"),
            out: Optional[Path] = typer.Option(None, help="output folder [default: RUN_DIR]"),
            precision: Optional[Precision] = typer.Option(None, help="[default: the run's]"),
            quiet: bool = typer.Option(False, help="no progress bars (log.txt keeps what is printed)")):
    """Grad-CAM heat-maps of correct and wrong predictions, and how well they point at the object."""
    check_ranges(locals())
    from tinyfast.cam_report import gradcam as gradcam_run
    learn = _load(run_dir, data, precision)
    with _logged(_out(run_dir, out), learn, quiet):
        res = run_safely(gradcam_run, learn, _out(run_dir, out), n=n, methods=methods, layer=layer, images=images,
                         score=score, limit=limit)
        for m, s in (res.get("scores") or {}).items():
            typer.echo(f"{m}: pointing game {s['pointing_game']:.3f}, energy in box {s['energy_in_box']:.3f} "
                       f"(baseline {s['box_area_fraction']:.3f}) over {s['n']} images")
        _report(_out(run_dir, out))


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="a run folder written by fit"),
            images: List[Path] = typer.Argument(..., help="image files, any size or mode"),
            topk: int = typer.Option(5, help="classes to show per image"),
            cam: bool = typer.Option(False, help="also save the Grad-CAM overlay of the top class next to each image"),
            data: Optional[Path] = typer.Option(None, help=DATA_WHAT + " [default: the run's]"),
            precision: Optional[Precision] = typer.Option(None, help="[default: the run's]")):
    """Top-k classes (wnid, name, probability) for any images."""
    check_ranges(locals())
    from tinyfast.predict import predict_images, save_cam_overlays
    learn = _load(run_dir, data, precision)
    for r in run_safely(predict_images, learn, images, topk=topk):
        typer.echo(f"{r['path']}: " + ", ".join(f"{w} {name} {p:.3f}" for w, name, p in r["top"]))
    if cam:
        for path in run_safely(save_cam_overlays, learn, images):
            typer.echo(f"cam: {path}")


@app.command("app")
def app_cmd(run_dir: Path = typer.Argument(..., help="a run folder written by fit"),
            host: str = typer.Option("127.0.0.1", help="the address to listen on (0.0.0.0: every interface)"),
            port: int = typer.Option(7860, help="the port to listen on"),
            share: bool = typer.Option(False, help="also a public link through gradio's share servers"),
            data: Optional[Path] = typer.Option(None, help=DATA_WHAT + " [default: the run's]"),
            precision: Optional[Precision] = typer.Option(None, help="[default: the run's]")):
    """A web page over a run: upload or pick an image for its top-5 classes and Grad-CAM; browse the top losses
    and the most confused pairs. Needs the extra: pip install 'tinyfast[app]'."""
    check_ranges(locals())
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail("the app needs gradio, which is not installed: pip install 'tinyfast[app]' (or pip install gradio)")
    from tinyfast.app import serve
    run_safely(serve, run_dir, host=host, port=port, share=share, data=data,
               precision=precision.value if precision else None)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a run folder written by fit"),
           format: ExportFormat = typer.Option(ExportFormat.onnx, help="onnx (read with onnxruntime) or torchscript (torch.jit.load)"),
           out: Optional[Path] = typer.Option(None, help="the file to write [default: RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt]"),
           batch: int = typer.Option(64, help="images in the batch that checks and times the export against PyTorch")):
    """The best model as ONNX or TorchScript: a normalised N x 3 x H x W float batch in, logits out (model.json says so)."""
    check_ranges(locals())
    from tinyfast.export import export_run
    r = run_safely(export_run, run_dir, format.value, out=out, batch=batch)
    ms = r["ms_per_batch"]
    typer.echo(f"{r['file']}: {r['bytes'] / 2**20:.1f} MiB, written in {r['export_seconds']:.1f} s; logits within "
               f"{r['max_abs_difference']:.1g} of PyTorch's; a {r['batch']}-image batch at {r['size']} px on the CPU: "
               f"PyTorch {ms['pytorch']:.1f} ms, {r['format']} {ms[r['format']]:.1f} ms; inputs and classes: {r['info']}")


@app.command()
def compare(run_dirs: List[Path] = typer.Argument(..., help="run folders written by fit"),
            out: Path = typer.Option(Path("compare"), help="folder for compare.png, compare.md, compare.csv"),
            at: float = typer.Option(0.5, help="accuracy threshold for the time-to column")):
    """Runs side by side: curves against epoch and wall time, and a table of what differs and how it ended."""
    check_ranges(locals())
    from tinyfast.compare import write_comparison
    res = run_safely(write_comparison, run_dirs, out=out, at=at)
    typer.echo(res["md"].read_text())
    typer.echo(f"written: {res['png']}, {res['md']}, {res['csv']}")


@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="run folder [default: runs/demo-<timestamp>]"),
         data: Path = typer.Option(Path("data/demo"), help="where the generated dataset goes (reused when present)"),
         epochs: int = typer.Option(6, help="epochs of fit_one_cycle"),
         size: int = typer.Option(32, help="input size in pixels"),
         classes: int = typer.Option(10, help="classes in the generated dataset"),
         precision: Precision = typer.Option(Precision.auto, help="as for fit")):
    """The whole pipeline on a generated dataset (no download, sized for 2 CPU cores): LR range test,
    fit_one_cycle, evaluate, interpret, Grad-CAM with its localisation score, and the report."""
    check_ranges(locals(), classes="[2, 256]", size="[16, inf)")
    from tinyfast.demo import run_demo
    res = run_safely(run_demo, out=out, data=data, epochs=epochs, size=size, classes=classes,
                     precision=precision.value, command=command_line())
    typer.echo(f"demo done in {res['seconds']:.0f} s: val accuracy {res['accuracy']:.3f} "
               f"(chance {1 / classes:.3f}); report: {res['report']}")


@bench_app.command("data")
def bench_data_cmd(data: Optional[Path] = typer.Option(None, help=DATA_HELP),
                   bs: int = typer.Option(256, help="batch size"),
                   size: int = typer.Option(64, help="input size in pixels"),
                   num_workers: Optional[int] = typer.Option(None, help="tinyfast loader workers [default: as fit]"),
                   baseline_workers: int = typer.Option(2, help="workers of the hand-written baseline loader"),
                   classes: Optional[int] = typer.Option(None, help="the first N classes only"),
                   train_per_class: Optional[int] = typer.Option(None, help="the first M training images of each class"),
                   passes: int = typer.Option(2, help="passes over the data; the last one is timed"),
                   naive: bool = typer.Option(True, help="also time fastai's ordinary per-item loader (no cache), for context"),
                   baseline: bool = typer.Option(True, help="also time the hand-written loader (--no-baseline: tinyfast's alone, e.g. to compare worker counts)")):
    """tinyfast's train loader against a hand-written torch Dataset + DataLoader, same files, same run."""
    check_ranges(locals())
    bench = _benchmarks("bench")
    res = run_safely(bench.bench_data, data=data, bs=bs, size=size, num_workers=num_workers,
                     baseline_workers=baseline_workers, classes=classes, train_per_class=train_per_class, passes=passes,
                     naive=naive, baseline=baseline)
    typer.echo(bench.format_bench_data(res))


@bench_app.command("train")
def bench_train_cmd(data: Optional[Path] = typer.Option(None, help=DATA_WHAT + " [default: a generated dataset]"),
                    size: int = typer.Option(64, help="input size in pixels"),
                    bs: int = typer.Option(64, help="batch size"),
                    steps: int = typer.Option(5, help="timed training steps"),
                    warmup: int = typer.Option(2, help="untimed steps first"),
                    precision: Precision = typer.Option(Precision.auto, help="tinyfast's precision"),
                    channels_last: bool = typer.Option(True, help="tinyfast's memory format"),
                    stem: Stem = typer.Option(Stem.cifar, help="model stem"),
                    num_workers: Optional[int] = typer.Option(None, help="tinyfast loader workers [default: as fit]"),
                    classes: Optional[int] = typer.Option(None, help="with --data: the first N classes only"),
                    train_per_class: Optional[int] = typer.Option(None, help="with --data: the first M training images of each class"),
                    lr: float = typer.Option(0.01, help="learning rate of both loops")):
    """Training images/s of tinyfast's Learner next to a plain PyTorch fp32 loop (and, on a GPU, the FLOP bound)."""
    check_ranges(locals())
    bench = _benchmarks("bench")
    res = run_safely(bench.bench_train, data=data, size=size, bs=bs, steps=steps, warmup=warmup, precision=precision.value,
                     channels_last=channels_last, stem=stem.value, num_workers=num_workers, classes=classes,
                     train_per_class=train_per_class, lr=lr)
    typer.echo(bench.format_bench_train(res))



@bench_app.command("recipe")
def bench_recipe_cmd(data: Optional[List[Path]] = typer.Option(None, help=f"{DATA_WHAT}; repeat for several subsets {DATA_DEFAULT}"),
                     against: str = typer.Option("classic", help="classic: the classic recipe written without tinyfast (benchmarks/classic.py), each at its LRs; plain: a plain PyTorch loop of tinyfast's own recipe"),
                     classes: Optional[int] = typer.Option(10, help="the first N classes (a real subset); 0 for all"),
                     train_per_class: Optional[int] = typer.Option(200, help="the first M training images of each class; 0 for all"),
                     size: int = typer.Option(32, help="input size in pixels"),
                     bs: int = typer.Option(64, help="batch size"),
                     epochs: int = typer.Option(8, help="epochs of one-cycle"),
                     lr: Optional[List[str]] = typer.Option(None, help="peak LRs (default: LRS of benchmarks/recipe.py, 0.0125 to 0.1); repeat; 'auto' (tinyfast only) is fit --lr auto's pick"),
                     seed: List[int] = typer.Option([0, 1], help="seeds; repeat the flag for several"),
                     trainer: List[str] = typer.Option(["classic", "tinyfast"], help="classic, tinyfast; repeat"),
                     variant: str = typer.Option("defaults", help="tinyfast with one recipe choice changed (benchmarks/recipe.py VARIANTS: previous, kaiming-init, no-label-smoothing, ...)"),
                     results: Path = typer.Option(Path("recipe.jsonl"), help="one JSON line per run; runs already there are skipped"),
                     precision: List[str] = typer.Option(["auto", "fp32"], help="--against plain: tinyfast precisions; repeat"),
                     plain: bool = typer.Option(True, help="--against plain: also train the plain loop")):
    """Accuracy on a real subset: tinyfast against the classic recipe (default) or a plain loop of its own recipe."""
    check_ranges(locals(), classes="[0, inf)", train_per_class="[0, inf)")
    subset = dict(classes=classes or None, train_per_class=train_per_class or None)
    if against == "plain":
        bench = _benchmarks("bench")
        rows = run_safely(bench.bench_recipe, data=(data or [None])[0], size=size, bs=bs, epochs=epochs, lr=_float((lr or ["0.025"])[0], "--lr"),
                          seeds=tuple(seed), precisions=tuple(precision), plain=plain, **subset)
        typer.echo(bench.format_bench_recipe(rows))
        return
    if against != "classic":
        fail(f"--against must be classic or plain, not {against!r}", 2)
    recipe = _benchmarks("recipe")
    from tinyfast.dataset import resolve_dataset
    lrs = tuple(x if x == "auto" else _float(x, "--lr") for x in lr) if lr else recipe.LRS
    roots = [run_safely(resolve_dataset, d) for d in (data or [None])]
    rows = run_safely(recipe.sweep, roots, trainers=tuple(trainer), lrs=lrs, seeds=tuple(seed), epochs=epochs, bs=bs,
                      size=size, variant=variant, results=results, **subset)
    typer.echo(recipe.format_results(rows))


def _show_brackets_in_help(*typers: typer.Typer) -> None:
    """typer renders help as rich markup, where "[default: the run's]" reads as a style tag and vanishes from the
    screen: every option's help is escaped once, here (each option is its own object, in one command), so the
    strings stay plain where they are written."""
    from rich.markup import escape
    from typer.models import ParameterInfo
    for group in typers:
        for command in group.registered_commands:
            for parameter in inspect.signature(command.callback).parameters.values():
                if isinstance(parameter.default, ParameterInfo) and parameter.default.help:
                    parameter.default.help = escape(parameter.default.help)


_show_brackets_in_help(app, bench_app)


def main() -> None:
    """The `tinyfast` console script."""
    app()


if __name__ == "__main__":
    app()
