"""`python main.py bench recipe --against classic`: does tinyfast learn a real subset at least as well as the
classic recipe (benchmarks/classic.py), each at its own best LR?

One training run is one (trainer, data, lr, seed) and one JSON line in the results file; a line already there
is not run again, so a sweep interrupted (or extended with more LRs, seeds, subsets) picks up where it was.
The tinyfast side is `fit` with a `RunConfig`, the REPL path a user takes, with tinyfast's defaults, or with one
recipe choice changed (`VARIANTS`: an option of fit, or a `RecipeChange` callback for a choice fit has no option
for), or at the LR its `--lr auto` picks. The top-1 of the model fit keeps is also counted independently, against
val_annotations.txt.
"""
from __future__ import annotations

import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from fastai.callback.core import Callback

from .classic import classic_fit, read_split

# tinyfast with one recipe choice changed: (fit's options, as RunConfig names them; what no option of fit says,
# as `RecipeChange`'s arguments). EMA's decay is 0.99 here, for runs of ~250 steps; 0.999 suits the ~12k steps of
# 30 full epochs. "half": half the training size.
DECOUPLED = {"decouple_wd": True, "nesterov": False, "wd_bn_bias": False}  # fastai's SGD, as before 2026-12-02
VARIANTS = {
    "defaults": ({}, {}),
    "previous": ({"wd": 5e-4}, {"init": "kaiming", "zero_init_residual": True, "optimizer": DECOUPLED}),  # until 12-01
    "decoupled-wd-5e-4": ({"wd": 5e-4}, {"optimizer": DECOUPLED}),  # the optimizer until 2026-12-02
    "decoupled-wd-5e-3": ({"wd": 5e-3}, {"optimizer": DECOUPLED}),  # ... with 10x its decay: ~ the L2 5e-4
    "no-nesterov": ({}, {"optimizer": {"nesterov": False}}),
    "no-wd-bn-bias": ({}, {"optimizer": {"wd_bn_bias": False}}),
    "kaiming-init": ({}, {"init": "kaiming"}),
    "zero-init-residual": ({}, {"zero_init_residual": True}),
    "no-label-smoothing": ({"label_smoothing": 0.0}, {}),
    "no-cutout": ({}, {"cutout": False}),
    "ema-0.99": ({"ema": 0.99}, {}),
    "mixup-0.4": ({"mixup": 0.4}, {}),
    "cutmix-1.0": ({"cutmix": 1.0}, {}),
    "progressive-half": ({"progressive": "half"}, {}),  # from size/2 over the first half of the epochs
    "one-cycle-pct-0.5": ({}, {"one_cycle": {"pct_start": 0.5}}),  # warm-up over half the run, not 1/4
    "one-cycle-div-final-1e4": ({}, {"one_cycle": {"div_final": 1e4}}),  # torch's final LR, lr/1e4
}
TRAINERS = ("classic", "tinyfast")
LRS = (0.0125, 0.025, 0.05, 0.1)  # both recipes peaked at 0.0125-0.025 at batch 64 on the 10-class subsets


class RecipeChange(Callback):
    """A recipe choice that is not an option of `fit` (the ones its history measured), undone on the Learner `fit`
    built, as the fit begins: the same model re-initialised in place, the optimizer made again with other
    arguments, the training split's augmentation without cutout, the one-cycle schedule of another shape. `fit`
    has created the optimizer and the one-cycle schedule by then, so each is replaced, not patched."""
    order = -20  # before every other callback's before_fit

    def __init__(self, size: int, init: str = "pytorch", zero_init_residual: bool = False,
                 optimizer: dict | None = None, cutout: bool = True, one_cycle: dict | None = None):
        self.size, self.init, self.zero_init_residual = size, init, zero_init_residual
        self.optimizer, self.cutout, self.one_cycle = dict(optimizer or {}), cutout, dict(one_cycle or {})

    def before_fit(self):
        from fastai.callback.schedule import ParamScheduler, combined_cos
        from tinyfast.data import AlbumentationsTransform, default_augmentation
        from tinyfast.model import resnet18

        learn = self.learn
        if self.init != "pytorch" or self.zero_init_residual:  # copied into the same tensors: the optimizer's
            fresh = resnet18(learn.dls.c, init=self.init, zero_init_residual=self.zero_init_residual)
            learn.model.load_state_dict(fresh.state_dict())
        if self.optimizer:
            changes = dict(self.optimizer)
            learn.wd_bn_bias = changes.pop("wd_bn_bias", learn.wd_bn_bias)
            learn.opt_func = partial(learn.opt_func, **changes)
            learn.create_opt()
            learn.opt.set_hypers(wd=learn.wd)  # as Learner.fit set it on the optimizer this one replaces
        if not self.cutout:
            for t in learn.dls.train.after_item.fs:
                if isinstance(t, AlbumentationsTransform):
                    t.aug = default_augmentation(self.size, cutout=False)
        if self.one_cycle:
            schedule = next(cb for cb in learn.cbs if isinstance(cb, ParamScheduler))
            lr_max = schedule.scheds["lr"](0.25)  # the peak of fit_one_cycle's default shape, which fit uses
            pct, div, div_final = (self.one_cycle.get(k, d) for k, d in
                                   (("pct_start", 0.25), ("div", 25.0), ("div_final", 1e5)))
            schedule.scheds = {"lr": combined_cos(pct, lr_max / div, lr_max, lr_max / div_final),
                               "mom": combined_cos(pct, *learn.moms)}


def tinyfast_fit(root: Path | str, epochs: int = 8, lr: float | str = 0.1, bs: int = 64, size: int = 32,
                 seed: int = 0, variant: str = "defaults", classes: int | None = None,
                 train_per_class: int | None = None) -> tuple[list[dict], float, float, float]:
    """(rows per epoch, the LR used, the top-1 of the model `fit` keeps counted against val_annotations.txt, its
    top-1 with fastai's `tta`). The run is `fit` with a RunConfig, as from a REPL, in a throwaway folder: `lr`
    "auto" is fit's range test, a lever is fit's option, and the model kept is the best epoch's (EMA: the average)."""
    from tinyfast.config import RunConfig
    from tinyfast.run_folder import read_config, read_metrics
    from tinyfast.train import fit

    options, change = VARIANTS[variant]
    options = {k: (size // 2 if v == "half" else v) for k, v in options.items()}
    config = RunConfig(data=str(root), epochs=epochs, lr=lr, bs=bs, size=size, seed=seed, classes=classes,
                       train_per_class=train_per_class, tta=True, **options)
    with tempfile.TemporaryDirectory(prefix="tinyfast-recipe-") as tmp:
        result = fit(config, out=Path(tmp) / "run", quiet=True, cbs=[RecipeChange(size, **change)] if change else [])
        metrics = read_metrics(result.run_dir)
        used = read_config(result.run_dir)["args"]["lr_picked"] or lr
    rows = [{"epoch": m["epoch"], "train_loss": m["train_loss"], "accuracy": m["accuracy"], "seconds": round(t, 2)}
            for m, t in zip(metrics, np.cumsum([m["train_seconds"] for m in metrics]))]  # training seconds only,
    # as the classic loop counts them; then an independent count: the val files in the loader's order, labelled
    # from val_annotations.txt
    learn = result.learn
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=learn.dls.valid)
    wnids, _, val = read_split(root)
    label_of = {p.name: wnids[label] for p, label in val}
    predicted = [learn.dls.vocab[i] for i in probs.argmax(1).tolist()]
    truth = [label_of[Path(p).name] for p in learn.dls.valid_ds.items]
    independent = float(np.mean([a == b for a, b in zip(predicted, truth)]))
    return rows, float(used), independent, result.tta_accuracy


def run_one(trainer: str, data: Path | str, lr: float | str, seed: int, epochs: int, bs: int, size: int,
            variant: str = "defaults", precision: str = "bf16", classes: int | None = None,
            train_per_class: int | None = None) -> dict:
    start, subset = time.perf_counter(), dict(classes=classes, train_per_class=train_per_class)
    if trainer == "classic":
        rows, used, independent, tta = classic_fit(data, epochs=epochs, lr=float(lr), bs=bs, size=size, seed=seed,
                                                   precision=precision, **subset), float(lr), None, None
    else:
        rows, used, independent, tta = tinyfast_fit(data, epochs=epochs, lr=lr, bs=bs, size=size, seed=seed,
                                               variant=variant, **subset)
    accs = [r["accuracy"] for r in rows]
    return {"trainer": trainer, "variant": variant if trainer == "tinyfast" else precision, "data": str(data),
            **subset, "lr": lr, "lr_used": used, "seed": seed, "epochs": epochs, "bs": bs, "size": size,
            "best": max(accs), "final": accs[-1], "independent_best": independent, "tta_best": tta, "accuracies": accs,
            "train_seconds": rows[-1]["seconds"], "wall_seconds": round(time.perf_counter() - start, 1),
            "date": time.strftime("%Y-%m-%d")}


def _key(row: dict) -> tuple:
    return (row["trainer"], row["variant"], row["data"], row.get("classes"), row.get("train_per_class"), str(row["lr"]),
            row["seed"], row["epochs"], row["bs"], row["size"])


def read_results(path: Path | str) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def sweep(data: list[Path | str], trainers: tuple[str, ...] = TRAINERS, lrs: tuple = LRS,
          seeds: tuple[int, ...] = (0, 1), epochs: int = 8, bs: int = 64, size: int = 32,
          variant: str = "defaults", precision: str = "bf16", results: Path | str = "recipe.jsonl",
          classes: int | None = None, train_per_class: int | None = None, log=print) -> list[dict]:
    """Every (data, seed, trainer, lr) not yet in `results`, appended there as it finishes."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    for t in trainers:
        if t not in TRAINERS:
            raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}, got {t!r}")
        if t == "classic" and "auto" in lrs:
            raise ValueError("lr 'auto' is tinyfast's range test: the classic recipe takes numbers only")
    done = {_key(r) for r in read_results(results)}
    for root in data:
        for seed in seeds:
            for trainer in trainers:
                for lr in lrs:
                    probe = {"trainer": trainer, "variant": variant if trainer == "tinyfast" else precision,
                             "data": str(root), "classes": classes, "train_per_class": train_per_class, "lr": lr,
                             "seed": seed, "epochs": epochs, "bs": bs, "size": size}
                    if _key(probe) in done:
                        continue
                    row = run_one(trainer, root, lr, seed, epochs, bs, size, variant, precision, classes, train_per_class)
                    with open(results, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    log(f"{trainer} {probe['variant']} {root} lr {lr} (used {row['lr_used']:.3g}) seed {seed}: "
                        f"best {row['best']:.3f} final {row['final']:.3f} in {row['wall_seconds']:.0f} s")
    return read_results(results)


def format_results(rows: list[dict]) -> str:
    """A markdown table: one line per (trainer, variant, data, seed, epochs), top-1 best over epochs at each LR."""
    numbers = {r["lr"] for r in rows if not isinstance(r["lr"], str)}
    lrs = sorted(numbers, key=float) + sorted({r["lr"] for r in rows if isinstance(r["lr"], str)})  # then 'auto', ...
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r["trainer"], r["variant"], Path(r["data"]).parent.name or r["data"], r["seed"],
                               r["epochs"], r["size"]), {})
        g[r["lr"]] = r
    head = "| trainer | variant | data | seed | epochs, px | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best |"
    lines = [head, "|" + "---|" * (6 + len(lrs))]
    for (trainer, variant, data, seed, epochs, size), g in groups.items():
        cells = []
        for lr in lrs:
            r = g.get(lr)
            cells.append("—" if r is None else f"{r['best']:.3f}" + (f" (lr {r['lr_used']:.3g})" if isinstance(lr, str) else ""))
        best = max(g.values(), key=lambda r: r["best"])
        lines.append(f"| {trainer} | {variant} | {data} | {seed} | {epochs}, {size} | " + " | ".join(cells)
                     + f" | {best['best']:.3f} at {best['lr_used']:.3g} |")
    return "\n".join(lines)
