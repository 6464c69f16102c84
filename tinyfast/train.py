"""A training run: `fit_one_cycle` or SGD + ReduceLROnPlateau, written to a self-describing run folder
(`tinyfast.run_folder` owns what is in it; the callbacks that write it after every epoch are in
`tinyfast.callbacks`; a `--budget` is planned by `tinyfast.budget`).

The randomness of an epoch (shuffle, augmentation) comes from the train DataLoader's `rng`, saved in the
checkpoint, so a resumed run ends where the uninterrupted one would.
"""
from __future__ import annotations

import json
import random
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import fastai.callback.hook  # noqa: F401  (patches Learner.summary)
from fastai.learner import Learner
from fastcore.xtras import ContextManagers
from fastai.torch_core import set_seed

from .budget import apply_budget, budget_choice, no_folder_if_budget_too_small, record_budget_outcome
from .callbacks import (SYNC_EVERY, BudgetPace, Plateau, RunLogger, SmoothLossOnDevice, StopOnNaN, TimeLeft,  # noqa: F401
                        check_tracker, lever_callbacks, progressive_costs, tracker_callbacks)
from .config import DEFAULT_SIZE, DEFAULT_STEM, RunConfig, resume_changes
from .data import tiny_imagenet_dls
from .doctor import check_device, versions
from .errors import NonFiniteLoss, RunError, RunInterrupted, one_line
from .interpret import tta_accuracy
from .distributed import (distributed_context, is_main_process, main_process_first, on_main,
                          setup_distributed, unwrap_model, world_size)
from .learner import CompileModel, FastDevice, optimizer_state_to_params, tiny_learner
from .layout import CHECKPOINT, CONFIG, INTERRUPTED, LEARNER, LR_FIND_PNG, MODEL, SUMMARY, TTA, atomic_save, atomic_write, atomic_write_text
from .run_folder import (METRIC_COLUMNS, dataset_info, latest_run, new_run_dir, read_checkpoint, read_config,  # noqa: F401
                         read_metrics, read_model, write_config, write_plots)
from .runlog import run_log

# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    learn: Learner
    run_dir: Path
    best_accuracy: float
    best_epoch: int | None
    seconds: float
    tta_accuracy: float | None = None


def fit(config: RunConfig | Path | str | None = None, *, out: Path | str | None = None, resume: bool = False,
        command: str | None = None, cbs: list | None = None, quiet: bool = False, changed: set[str] | None = None,
        **options) -> FitResult:
    """Train and write a run folder. `config` is a `RunConfig` (tinyfast.config: every option, its default and
    meaning), or the data path for short; `options` override its fields by name: `fit(RunConfig(epochs=5))`,
    `fit("data/tiny-imagenet-200", epochs=5, lr="auto")`. `lr="auto"` first runs the LR range test `lr_mode` and
    uses its suggestion; a `budget` plans the epochs (and the size, where none is given) for that wall time.
    `resume=True` continues `out` (or the newest run under runs/) from its checkpoint, with its saved
    configuration; an option that differs from it is applied if `resume_changes` allows it and refused otherwise.
    Which options the caller set: `changed` (the CLI passes the flags on its command line), else those that differ
    from their defaults. `cbs`: more fastai callbacks for this fit; `quiet`: no summary, no progress bars.

    config.json keeps the configuration under "args" (with `lr_picked` and `budget_plan`, what the run decided)."""
    called = time.time()  # a --budget counts from here: the cache build and the range test are in it
    if not isinstance(config, RunConfig):
        options = {"data": config, **options} if config is not None else options
        config = None
    config = RunConfig.make(config, **options)
    check_tracker(config.log)
    args = config.as_dict()
    check_device()  # a GPU this torch has no kernels for: one line, before any folder
    command = command or shlex.join([Path(sys.executable).name] + sys.argv)
    setup_distributed()  # a no-op unless launched by torchrun / accelerate launch
    if resume:
        run_dir, args, start, resumed_with = _resume(out, args, changed, command)
    else:
        run_dir, start, resumed_with = on_main(new_run_dir, out), None, None  # one folder, named by rank 0
    config = RunConfig.from_dict(args)  # on a resume, the saved options (an older folder's missing ones: defaults)
    state = {k: args.get(k) for k in STATE}
    main = is_main_process()
    with run_log(run_dir, header=command) if main else nullcontext():  # rank 0 writes log.txt
        if resumed_with and not quiet and main:
            print(resumed_with)
        set_seed(config.seed)
        if config.size is None and config.budget is not None:  # the budget's choice (the stem's too, if not given)
            with no_folder_if_budget_too_small(run_dir, new=start is None):
                stem, size = on_main(budget_choice, config, time.time() - called)
                config = config.replace(stem=stem, size=size)
        config = config.replace(size=config.size or DEFAULT_SIZE, stem=config.stem or DEFAULT_STEM)
        with main_process_first():  # rank 0 decodes the image cache, the others reuse it
            dls = tiny_imagenet_dls(config.data, bs=config.bs, size=config.size, num_workers=config.num_workers,
                                    aug=None if config.aug else False, classes=config.classes,
                                    train_per_class=config.train_per_class, progress=not quiet)
        learn = tiny_learner(dls, stem=config.stem, wd=config.wd, mom=config.mom,
                             label_smoothing=config.label_smoothing, precision=config.precision)
        learn.path, learn.model_dir = run_dir, "."
        if start is None:  # rank 0 writes the files and picks the LR; the others take its LR
            state["lr_picked"] = on_main(_start_run, learn, run_dir, config, command, world_size(), quiet)
        with no_folder_if_budget_too_small(run_dir, new=start is None):
            costs = progressive_costs(config.size, config.progressive)
            deadline, config = (apply_budget(learn, config, state, run_dir, start, called, quiet, costs)
                                if config.budget is not None else (None, config))
        logger, first_epoch = RunLogger(run_dir, start), start["epoch"] if start else 0
        pace = (BudgetPace(deadline, state["budget_plan"], state["budget_plan"]["reserve_s"],
                           costs(config.epochs) if costs else None, first_epoch) if deadline else None)
        run_cbs = ([logger, StopOnNaN(), SmoothLossOnDevice(1 if config.log != "csv" else SYNC_EVERY),
                    TimeLeft(deadline, show=not quiet and main, start_epoch=first_epoch)] + ([pace] if pace else [])
                   + lever_callbacks(config.as_dict(), start) + tracker_callbacks(config.as_dict(), run_dir, start, quiet)
                   + list(cbs or []))
        if config.compile:
            run_cbs.append(CompileModel())
        if config.schedule == "plateau":
            run_cbs.append(Plateau(monitor=config.monitor, patience=config.patience, factor=config.factor,
                                   state=start and start["plateau"], start_epoch=start["epoch"] if start else 0))
        lr = float(state["lr_picked"] if state["lr_picked"] is not None else config.lr)
        start_epoch = 0
        if start is not None:
            start_epoch = _load_checkpoint(learn, start)
            lr = start["lr"] if config.schedule == "plateau" else lr
            if not quiet and main:
                print(f"resuming {run_dir} after epoch {start_epoch}/{config.epochs}")
        t0 = time.perf_counter()
        try:
            with (ContextManagers([learn.no_bar(), learn.no_logging()]) if quiet else nullcontext(),
                  distributed_context(learn), sigterm_as_interrupt()):
                schedule = learn.fit_one_cycle if config.schedule == "one-cycle" else learn.fit
                schedule(config.epochs, lr, cbs=run_cbs, start_epoch=start_epoch, reset_opt=start is None)
        except KeyboardInterrupt:
            _cleanup(learn)
            if main:
                atomic_save(unwrap_model(learn.model).state_dict(), run_dir / INTERRUPTED)
                write_plots(run_dir, logger.rows, logger.lrs, logger.moms)
            done = logger.rows[-1]["epoch"] if logger.rows else 0
            raise RunInterrupted(f"interrupted during epoch {done + 1}; checkpoint after epoch {done} is in {run_dir}: "
                                 f"continue with `python main.py fit --out {run_dir} --resume`") from None
        except NonFiniteLoss:
            _cleanup(learn)
            if main:
                write_plots(run_dir, logger.rows, logger.lrs, logger.moms)
            raise
        seconds = time.perf_counter() - t0
        if (run_dir / MODEL).exists():  # complete on every rank: distributed_context waits for rank 0
            learn.model.load_state_dict(read_model(run_dir))
        tta_scores = _score_with_tta(learn, run_dir, logger.best, quiet) if config.tta else None
        if main:
            write_plots(run_dir, logger.rows, logger.lrs, logger.moms)
            # fastai's export writes to learn.path / the name given: absolute, or a relative --out is joined twice
            atomic_write(run_dir / LEARNER, lambda tmp: learn.export(Path(tmp).absolute()))
            if config.budget is not None:
                record_budget_outcome(run_dir, config, state, start, called, pace.outcome())
            if config.log == "wandb":
                import wandb
                wandb.finish()
        return FitResult(learn, run_dir, logger.best, logger.best_epoch, seconds,
                         tta_scores["accuracy"] if tta_scores else None)


STATE = ("lr_picked", "budget_plan")  # what a run decided, kept in config.json's "args" beside its options


def _resume(out: Path | str | None, args: dict, changed: set[str] | None,
            command: str) -> tuple[Path, dict, dict, str | None]:
    """(run folder, the run's arguments: saved, with the changes `resume_changes` allows, its checkpoint, and
    the line that says what changed, if anything did)."""
    run_dir = Path(out) if out is not None else latest_run()
    if not (run_dir / CHECKPOINT).exists():
        raise RunError(f"{run_dir} has no checkpoint.pth to resume from")
    try:
        config = read_config(run_dir)
        saved = config["args"]
    except (RunError, KeyError) as e:
        raise RunError(f"cannot resume: {run_dir / CONFIG} is unreadable ({one_line(e) or 'no args'}); "
                       f"nothing in {run_dir} was changed") from None
    start = read_checkpoint(run_dir)
    defaults = RunConfig().as_dict()
    requested = {k: v for k, v in args.items()
                 if (k in changed if changed is not None else v != defaults[k]) and v is not None}
    applied = resume_changes(saved, requested, start["epoch"])
    args = {**saved, **applied}
    if applied and {k for k in applied if k != "data"}:
        config["args"] = args
        config.setdefault("resumed", []).append({"after_epoch": start["epoch"], "changed": applied, "command": command})
        on_main(write_config, run_dir, config)
        return run_dir, args, start, "resuming with " + ", ".join(f"{k}={v} (saved: {saved.get(k)})"
                                                                  for k, v in applied.items())
    return run_dir, args, start, None


def _start_run(learn: Learner, run_dir: Path, config: RunConfig, command: str, processes: int,
               quiet: bool) -> float | None:
    """A new run's files before its first epoch (summary.txt, config.json), and with `--lr auto` the range test
    (lr_find.*); returns the LR it picked, or None. Rank 0 alone (`on_main`, inside which the world is one
    process: `processes` is counted outside)."""
    with learn.no_bar():  # summary runs one batch through get_preds, which would draw an "Epoch 1/1" bar
        summary = learn.summary()
    atomic_write_text(run_dir / SUMMARY, summary)
    if not quiet:
        print(summary)
    saved = {"command": command, "args": config.as_dict() | dict.fromkeys(STATE), "versions": versions(),
             "device": str(learn.dls.device), "processes": processes, "dataset": dataset_info(learn.dls),
             "started": datetime.now().isoformat(timespec="seconds")}
    write_config(run_dir, saved)
    if config.lr != "auto":
        return None
    from .lr_range import lr_range_test
    from .lr_range_report import write_lr_range
    with learn.no_bar() if quiet else nullcontext():
        result = lr_range_test(learn, mode=config.lr_mode, num_it=config.lr_num_it, val_batches=config.lr_val_batches)
    write_lr_range(result, run_dir)
    saved["args"]["lr_picked"] = result.suggested_lr
    write_config(run_dir, saved)
    print(f"lr auto: {result.suggested_lr:.3g} ({result.reason}); curve in {run_dir / LR_FIND_PNG}")
    return result.suggested_lr


def _load_checkpoint(learn: Learner, start: dict) -> int:
    """The model, optimizer and every random state of the checkpoint `start`; returns the epochs it had done.
    The checkpoint was read onto the CPU: the model goes to the training device first, and the optimizer's state
    (momentum buffers) to its parameters' device, where fastai's `load_state_dict` would leave it on the CPU."""
    if learn.dls.device is not None:
        learn.model.to(learn.dls.device)
    learn.model.load_state_dict(start["model"])
    learn.create_opt()
    learn.opt.load_state_dict(start["opt"])
    optimizer_state_to_params(learn.opt)
    learn.fast_device.scaler_state = start.get("scaler")  # a resumed fp16 run: its loss scale
    learn.dls.train.rng.setstate(start["dl_rng"])
    random.setstate(start["py_rng"])
    np.random.set_state(start["np_rng"])
    torch.set_rng_state(start["torch_rng"])
    return start["epoch"]


def _score_with_tta(learn: Learner, run_dir: Path, best: float, quiet: bool) -> dict:
    """fastai's `tta` on the best model; tta.json and a line (rank 0)."""
    scores = tta_accuracy(learn)
    if is_main_process():
        atomic_write_text(run_dir / TTA, json.dumps({**scores, "without_tta": best}, indent=2) + "\n")
        if not quiet:
            print(f"with TTA: top-1 {scores['accuracy']:.4f} (without: {best:.4f}), top-5 {scores['top5']:.4f}")
    return scores


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what a cluster scheduler or `kill` sends) handled as Ctrl-C: the same message, interrupted.pth
    and plots. Only in the main thread, where Python delivers signals; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cleanup(learn: Learner) -> None:
    """An exception skips fastai's after_fit: close a bf16 autocast left open mid-batch."""
    for cb in learn.cbs:
        if isinstance(cb, FastDevice):
            cb.close_autocast()


def load_run(run_dir: Path | str, data: Path | str | None = None, bs: int | None = None,
             precision: str | None = None, num_workers: int | None = None) -> Learner:
    """A run folder back as a Learner (its best weights, its data settings, val set unaugmented order)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    weights = read_model(run_dir)
    run = RunConfig.from_dict(cfg["args"])
    dls = tiny_imagenet_dls(data or run.data or cfg["dataset"]["root"], bs=bs or run.bs, size=run.size,
                            num_workers=num_workers if num_workers is not None else run.num_workers,
                            aug=None if run.aug else False, classes=run.classes, train_per_class=run.train_per_class)
    learn = tiny_learner(dls, stem=run.stem, label_smoothing=run.label_smoothing, precision=precision or run.precision)
    learn.model.load_state_dict(weights)
    learn.path, learn.model_dir = run_dir, "."
    return learn
