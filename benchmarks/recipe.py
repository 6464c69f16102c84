"""`python main.py bench recipe --against classic`: does tinyfast learn a real subset at least as well as the
classic recipe (benchmarks/classic.py), each at its own best LR?

One training run is one (trainer, data, lr, seed) and one JSON line in the results file; a line already there
is not run again, so a sweep interrupted (or extended with more LRs, seeds, subsets) picks up where it was.
The tinyfast side is the REPL path a user takes, `tiny_imagenet_dls` + `tiny_learner` + `fit_one_cycle`, with
tinyfast's defaults, or with one recipe choice changed (`VARIANTS`), or at the LR its `fit --lr auto` picks.
Its final val top-1 is also counted independently, against val_annotations.txt.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .classic import classic_fit, read_split

# tinyfast with one recipe choice changed: (resnet18 kwargs, tiny_learner kwargs, tiny_imagenet_dls aug, fit's
# lever arguments). EMA's decay is 0.99 here, for runs of ~250 steps; 0.999 suits the ~12k steps of 30 full epochs.
DECOUPLED = {"decouple_wd": True, "nesterov": False, "wd_bn_bias": False}  # fastai's SGD, as before 2026-12-02
VARIANTS = {
    "defaults": ({}, {}, None, {}),
    "previous": ({"init": "kaiming", "zero_init_residual": True}, {**DECOUPLED, "wd": 5e-4}, None, {}),  # until 12-01
    "decoupled-wd-5e-4": ({}, {**DECOUPLED, "wd": 5e-4}, None, {}),  # the optimizer until 2026-12-02
    "decoupled-wd-5e-3": ({}, {**DECOUPLED, "wd": 5e-3}, None, {}),  # ... with 10x its decay: ~ the L2 5e-4
    "no-nesterov": ({}, {"nesterov": False}, None, {}),
    "no-wd-bn-bias": ({}, {"wd_bn_bias": False}, None, {}),
    "kaiming-init": ({"init": "kaiming"}, {}, None, {}),
    "zero-init-residual": ({"zero_init_residual": True}, {}, None, {}),
    "no-label-smoothing": ({}, {"label_smoothing": 0.0}, None, {}),
    "no-cutout": ({}, {}, "no-cutout", {}),
    "ema-0.99": ({}, {}, None, {"ema": 0.99}),
    "mixup-0.4": ({}, {}, None, {"mixup": 0.4}),
    "cutmix-1.0": ({}, {}, None, {"cutmix": 1.0}),
    "progressive-half": ({}, {}, None, {"progressive": "half"}),  # from size/2 over the first half of the epochs
    "one-cycle-pct-0.5": ({}, {}, None, {"one_cycle": {"pct_start": 0.5}}),  # warm-up over half the run, not 1/4
    "one-cycle-div-final-1e4": ({}, {}, None, {"one_cycle": {"div_final": 1e4}}),  # torch's final LR, lr/1e4
}
TRAINERS = ("classic", "tinyfast")
LRS = (0.0125, 0.025, 0.05, 0.1)  # both recipes peaked at 0.0125-0.025 at batch 64 on the 10-class subsets


def _augmentation(name: str | None, size: int):
    if name is None:
        return None
    from tinyfast.data import default_augmentation
    assert name == "no-cutout"
    return default_augmentation(size, cutout=False)


def tinyfast_fit(root: Path | str, epochs: int = 8, lr: float | str = 0.1, bs: int = 64, size: int = 32,
                 seed: int = 0, variant: str = "defaults", classes: int | None = None,
                 train_per_class: int | None = None) -> tuple[list[dict], float, float, float]:
    """(rows per epoch, the LR used, final top-1 counted against val_annotations.txt, final top-1 with
    fastai's `tta`)."""
    from fastai.torch_core import set_seed
    from tinyfast.data import tiny_imagenet_dls
    from tinyfast.learner import tiny_learner
    from tinyfast.model import resnet18

    from tinyfast.callbacks import EMA
    from tinyfast.callbacks import lever_callbacks
    from tinyfast.interpret import tta_accuracy

    model_kwargs, learner_kwargs, aug, levers = VARIANTS[variant]
    levers = {k: (size // 2 if v == "half" else v) for k, v in levers.items()}
    one_cycle = levers.pop("one_cycle", {})
    set_seed(seed)
    dls = tiny_imagenet_dls(root, bs=bs, size=size, aug=_augmentation(aug, size), classes=classes,
                            train_per_class=train_per_class)
    learn = tiny_learner(dls, resnet18(dls.c, **model_kwargs), **learner_kwargs)
    if lr == "auto":  # as `fit --lr auto` does it, with fit's defaults
        from tinyfast.config import RunConfig
        from tinyfast.lr_range import lr_range_test
        d = RunConfig()
        with learn.no_bar():  # the sweep's bars would fill a benchmark's log
            lr = lr_range_test(learn, mode=d.lr_mode, num_it=d.lr_num_it, val_batches=d.lr_val_batches).suggested_lr
    from fastai.callback.core import Callback

    class TrainClock(Callback):  # training seconds only, as the classic loop counts them
        def before_train(self):
            self.start = time.perf_counter()

        def before_validate(self):
            times.append(time.perf_counter() - self.start)

    times = []
    with learn.no_bar(), learn.no_logging():
        lever_cbs = lever_callbacks({**levers, "size": size, "epochs": epochs})
        learn.fit_one_cycle(epochs, float(lr), cbs=[TrainClock()] + lever_cbs, **one_cycle)
        names = learn.recorder.metric_names[1:-1]  # values hold train_loss, valid_loss, the metrics
        rows = [{"epoch": i + 1, "train_loss": float(v[names.index("train_loss")]),
                 "accuracy": float(v[names.index("accuracy")]), "seconds": round(float(t), 2)}
                for i, (v, t) in enumerate(zip(learn.recorder.values, np.cumsum(times)))]
        for cb in lever_cbs:  # what an EMA run validated, and saves, is the average
            if isinstance(cb, EMA):
                learn.model.load_state_dict(cb.averaged_state())
        probs, _ = learn.get_preds(dl=dls.valid)  # get_preds resets the recorder's values: read them first
        tta = tta_accuracy(learn)["accuracy"]
    # independent count: the val files in the loader's order, labelled from val_annotations.txt
    wnids, _, val = read_split(root)
    label_of = {p.name: wnids[label] for p, label in val}
    predicted = [dls.vocab[i] for i in probs.argmax(1).tolist()]
    truth = [label_of[Path(p).name] for p in dls.valid_ds.items]
    independent = float(np.mean([a == b for a, b in zip(predicted, truth)]))
    return rows, float(lr), independent, tta


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
            "best": max(accs), "final": accs[-1], "independent_final": independent, "tta_final": tta, "accuracies": accs,
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
