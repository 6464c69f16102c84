"""`fit --budget` (issue #29): the planning arithmetic, the size rule, and the finished one-cycle schedule of a
budgeted run on tiny data, its resume, and the time left shown after each epoch. Whether a run lands within 5% of
its budget is measured by benchmarks/budget.py, not here."""
from __future__ import annotations

import json
import time

import pytest
from fastai.callback.core import Callback
from typer.testing import CliRunner

import tinyfast.budget as B
from tinyfast.budget import (BudgetTooSmall, Timing, choose_size, format_seconds, paced_share, parse_budget,
                             plan_epochs)
from tinyfast.callbacks import BudgetPace
from tinyfast.config import RunConfig
from tinyfast.cli import app
from tinyfast.errors import RunError, RunInterrupted
from tinyfast.train import fit, read_metrics

SMALL = dict(bs=8, num_workers=0, quiet=True)


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("1.5h", 5400), ("300s", 300), ("45", 45), (120, 120),
                                           (" 2H ", 7200)])
def test_a_budget_reads_seconds_minutes_and_hours(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["ninety", "90 min", "-5m", "0", "1d"])
def test_a_malformed_budget_is_refused_before_any_work(text, tmp_path):
    with pytest.raises(RunError, match="--budget"):
        parse_budget(text)
    res = CliRunner().invoke(app, ["fit", "--budget", text, "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--budget" in res.output and not (tmp_path / "run").exists()


def test_the_plan_spends_the_budget_on_training_with_every_epoch_validated():
    timing = Timing(train_batch_s=1.0, valid_batch_s=0.5, train_batches=100, valid_batches=10, checkpoint_s=1.0)
    plan = plan_epochs(1000, 100, timing, 32)
    left = 1000 - 100 - B.reserve_for(1000)
    # the fewest validated epochs that leave room for all the training within PLAN_SHARE of each epoch's shuffle
    # (the rest is room for the pacing to give a faster run more): 11 epochs of 74% of the set
    assert plan.n_epoch == 11 and plan.epoch_share == pytest.approx((left - 11 * 6) / 1100)
    assert plan.epochs == pytest.approx(plan.n_epoch * plan.epoch_share)
    spent = 100 + plan.n_epoch * (plan.epoch_share * 100 + 6) + plan.reserve_s
    assert spent == pytest.approx(1000)
    ten = (left - 10 * 6) / 1000
    assert ten > B.PLAN_SHARE, "10 validated epochs could hold the training there is time for within PLAN_SHARE"
    assert "8.2 epochs at 32 px (11 of 74% of the training set)" in plan.line("1000s")
    # validations ten times dearer: the room would cost more than ROOM_FIXED_MAX of the time, so the fewest epochs
    # that hold the training, as large as they must be
    dear = plan_epochs(1000, 100, Timing(1.0, 5.0, 100, 10, 1.0), 32)
    assert dear.n_epoch == 6 and dear.epoch_share == pytest.approx((left - 6 * 51) / 600)
    assert B.PLAN_SHARE < dear.epoch_share <= 1


def test_progressive_resizing_buys_more_epochs():
    timing = Timing(1.0, 0.5, 100, 10, 1.0)
    plain = plan_epochs(1000, 100, timing, 32)
    cheaper = plan_epochs(1000, 100, timing, 32, cost_of_epoch=lambda n: [0.25] * (n // 2) + [1.0] * (n - n // 2))
    assert cheaper.epochs > plain.epochs


def test_a_budget_too_small_for_one_epoch_names_the_smallest_that_works():
    timing = Timing(1.0, 0.5, 100, 10, 1.0)
    with pytest.raises(BudgetTooSmall, match=r"the smallest workable budget is about 4m") as small:
        plan_epochs(150, 100, timing, 16)
    assert "\n" not in str(small.value) and small.value.exit_code == 2
    smallest = 4 * 60
    assert plan_epochs(smallest, 100, timing, 16).epochs >= 1  # the one it names does buy an epoch


def test_the_size_is_the_largest_that_affords_enough_epochs():
    train = {16: 10.0, 24: 22.5, 32: 40.0, 48: 90.0, 64: 160.0}
    valid = {s: t / 10 for s, t in train.items()}
    k = B.MIN_EPOCHS_FOR_SIZE
    assert choose_size(train, valid, k * 44) == 32
    assert choose_size(train, valid, k * 44 - 1) == 24
    assert choose_size(train, valid, 10_000 * k) == 64
    assert choose_size(train, valid, 1) == 16


def test_step_times_at_each_size_are_a_fixed_cost_plus_a_cost_per_pixel():
    """As measured on the 2-core CPU for the whole dataset (2026-12-07): a step at 16 px costs about half of one
    at 32 px, not a quarter: a pure per-pixel scaling would promise 16 px twice the epochs it gives."""
    at = B.per_size({16: 1.0, 32: 2.0})
    assert at[16] == pytest.approx(1.0) and at[32] == pytest.approx(2.0)
    assert at[64] == pytest.approx(2 / 3 + 4096 / 768)  # fixed 2/3, 1/768 a pixel
    assert B.per_size({16: 1.0, 32: 4.0})[64] == pytest.approx(16.0)  # a pure per-pixel cost stays one


def test_format_seconds():
    assert [format_seconds(s) for s in (5, 89, 600, 5399, 5400, 7320)] == ["5 s", "89 s", "10 min", "90 min",
                                                                           "1 h 30 min", "2 h 02 min"]


# ---------------------------------------------------------------------------------------------------------
# A budgeted fit on tiny data, with the measurement fixed so that the plan is known
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fixed_timing(monkeypatch):
    """This machine's timing as `measure` would give it, fixed: 1 s a training batch, 0.2 s a validation batch."""
    def measure(learn, lr, **kwargs):
        return Timing(1.0, 0.2, len(learn.dls.train), len(learn.dls.valid), 1.0)
    monkeypatch.setattr(B, "measure", measure)


class PlanClock(Callback):
    """The clock `BudgetPace` keeps the deadline by, running at `pace` times the plan of `fixed_timing` (1 s a
    training batch, 0.2 s a validation batch, 1 s a checkpoint), from the real time it was made at: the real
    time of tiny data, which a loaded machine stretches, does not count."""
    def __init__(self, pace: float = 1.0):
        self.pace, self.start, self.offset = pace, time.time(), 0.0

    def now(self) -> float:
        return self.start + self.offset

    def after_batch(self):
        self.offset += self.pace * (1.0 if self.training else 0.2)

    def after_validate(self):
        self.offset += self.pace * 1.0


@pytest.fixture
def plan_clock(monkeypatch):
    def at(pace: float = 1.0) -> PlanClock:
        clock = PlanClock(pace)
        monkeypatch.setattr(BudgetPace, "clock", clock.now)
        return clock
    return at


class CountBatches(Callback):
    def before_fit(self):
        self.per_epoch = []

    def before_train(self):
        self.per_epoch.append(0)

    def after_batch(self):
        if self.training:
            self.per_epoch[-1] += 1


def test_a_budgeted_run_plans_trains_the_plan_and_records_it(tiny_root, tmp_path, fixed_timing, plan_clock):
    counter, clock = CountBatches(), plan_clock(1.0)
    result = fit(tiny_root, lr=0.05, size=16, budget="40s", out=tmp_path / "run", cbs=[counter, clock], **SMALL)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    plan = config["args"]["budget_plan"]
    assert config["args"]["epochs"] == plan["n_epoch"] == len(read_metrics(tmp_path / "run")) == len(counter.per_epoch)
    # tiny_root: 96 training images, bs 8 -> 12 batches a full epoch; each epoch trains on its share, which the
    # pacing keeps where the plan put it when time passes as planned
    planned = round(96 * plan["epoch_share"]) // 8
    assert all(abs(n - planned) <= 1 for n in counter.per_epoch), (counter.per_epoch, planned)
    assert 0 < plan["epoch_share"] <= 1 and plan["epochs"] == pytest.approx(plan["n_epoch"] * plan["epoch_share"], abs=1e-3)
    lrs = result.learn.recorder.lrs  # the one-cycle schedule ran to its end
    assert result.learn.pct_train == pytest.approx(1.0) and lrs[-1] == min(lrs[len(lrs) // 2:])
    assert max(lrs) == pytest.approx(0.05, rel=0.05)
    outcome = config["budget"]
    assert outcome["budget_s"] == 40 and outcome["wall_s"] > 0 and outcome["plan"] == plan
    assert len(outcome["epoch_shares"]) == plan["n_epoch"] and outcome["stopped_early"] == {}


def test_the_pace_is_the_plans_arithmetic_with_the_time_left():
    # 3 epochs to go, 100 s an epoch of the whole set, 5 s of validation and checkpoint each: 165 s left buys half
    assert paced_share(165.0, [1.0, 1.0, 1.0], 100.0, 5.0) == pytest.approx(0.5)
    assert paced_share(165.0, [0.25, 0.5, 1.0], 100.0, 5.0) == pytest.approx(150 / 175)  # progressive: cheaper epochs
    assert paced_share(1e6, [1.0], 100.0, 5.0) == 1.0  # never more than the whole set
    assert paced_share(-50.0, [1.0], 100.0, 5.0) == B.MIN_SHARE  # behind: a sliver, each epoch still validated


def _slow_run(tmp_path, pace, plan_clock, **options):
    counter, clock = CountBatches(), plan_clock(pace)
    start = clock.now()
    result = fit(tiny_root_path[0], lr=0.05, size=16, budget="40s", out=tmp_path / "run", cbs=[counter, clock],
                 **SMALL, **options)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    return result, counter, config, clock.now() - start


tiny_root_path = []


@pytest.fixture
def tiny(tiny_root):
    tiny_root_path[:] = [tiny_root]


@pytest.mark.parametrize("pace", [1.3])
def test_a_run_slower_than_its_plan_trains_less_and_ends_by_its_deadline(tiny, tmp_path, fixed_timing, plan_clock, pace):
    """The plan's throwaway batches said 1 s a batch; the run takes `pace` s. The epochs after the first train on
    less, an epoch stops early if it must, and the run, by the clock it kept, ends by its budget with its
    one-cycle schedule complete."""
    result, counter, config, took = _slow_run(tmp_path, pace, plan_clock)
    plan, outcome = config["args"]["budget_plan"], config["budget"]
    first = round(96 * outcome["epoch_shares"][0]) // 8  # the planned share's batches
    assert counter.per_epoch[0] == outcome["stopped_early"].get("1", first) <= first
    assert max(counter.per_epoch[1:]) < first, (counter.per_epoch, outcome)
    # within the budget (less its reserve for the end), by the clock the run kept, to a batch; and used
    assert 0.85 * (40 - plan["spent_s"] - plan["reserve_s"]) <= took <= 40 - plan["reserve_s"] + pace, (took, outcome)
    assert result.learn.pct_train == pytest.approx(1.0) and len(result.learn.recorder.lrs) == sum(counter.per_epoch)
    assert len(read_metrics(tmp_path / "run")) == plan["n_epoch"]


def test_an_epoch_stops_early_with_its_schedule_complete(tiny, tmp_path, fixed_timing, plan_clock):
    """Far behind (4x the planned step time), the shares alone cannot save the deadline: the first epoch stops at
    the batch that leaves the others their time, and the one-cycle ends on time."""
    result, counter, config, took = _slow_run(tmp_path, 4.0, plan_clock)
    outcome = config["budget"]
    assert outcome["stopped_early"]["1"] == counter.per_epoch[0] < round(96 * outcome["epoch_shares"][0]) // 8
    # unpaced, its ~27 planned batches at 4 s would take about three times the budget; paced, it ends near it
    assert took <= 1.1 * 40, (took, json.dumps(outcome))
    lrs = result.learn.recorder.lrs  # the one-cycle went on to its end, in the batches there were
    assert result.learn.pct_train == pytest.approx(1.0) and lrs[-1] == min(lrs[len(lrs) // 2:])


@pytest.mark.parametrize("pace", [0.8])
def test_a_run_faster_than_its_plan_trains_more_and_uses_its_budget(tiny, tmp_path, fixed_timing, plan_clock, pace,
                                                                     monkeypatch):
    """The throwaway batches said 1 s a batch; the run takes `pace` s. The plan left each epoch room
    (PLAN_SHARE; on tiny data only where the room's validations are let cost what they do), so the later epochs
    train on more and the run still spends its budget on training."""
    monkeypatch.setattr(B, "ROOM_FIXED_MAX", 1.0)
    result, counter, config, took = _slow_run(tmp_path, pace, plan_clock)
    plan = config["args"]["budget_plan"]
    assert counter.per_epoch[-1] > counter.per_epoch[0], counter.per_epoch
    assert 0.9 * (40 - plan["spent_s"] - plan["reserve_s"]) <= took <= 40 - plan["reserve_s"] + pace, took


def test_the_plan_and_the_time_left_are_said(tiny_root, tmp_path, fixed_timing, capsys):
    fit(tiny_root, lr=0.05, size=16, budget="40s", out=tmp_path / "run", bs=8, num_workers=0)
    out = capsys.readouterr().out
    assert "budget 40s: " in out and " at 16 px (" in out
    assert "epoch 1/" in out and "left in the run" in out
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "budget 40s: " in log and "left in the run" in log


def test_an_unbudgeted_run_shows_the_time_left_too(tiny_root, tmp_path, capsys):
    fit(tiny_root, epochs=2, lr=0.05, size=16, out=tmp_path / "run", bs=8, num_workers=0)
    assert "epoch 1/2 done: ~" in capsys.readouterr().out


def test_a_budget_too_small_leaves_no_folder_and_exits_2(tiny_root, tmp_path):
    res = CliRunner().invoke(app, ["fit", "--data", str(tiny_root), "--budget", "2s", "--bs", "8", "--num-workers",
                                   "0", "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 2 and "smallest workable budget" in res.output, res.output
    assert not (tmp_path / "run").exists()


def imagenet_stem(model) -> bool:
    return model.stem[0].kernel_size == (7, 7)


def test_without_a_size_the_budget_chooses_one(tiny_root, tmp_path, fixed_timing, monkeypatch):
    monkeypatch.setattr(B, "probe_step_s", lambda *a, **k: (0.01, 0.002))  # fast: 64 px affords enough epochs
    r = fit(tiny_root, lr=0.05, budget="40s", out=tmp_path / "fast", **SMALL)
    args = json.loads((tmp_path / "fast" / "config.json").read_text())["args"]
    assert args["size"] == 64 == r.learn.dls.train.one_batch()[0].shape[-1]
    assert args["stem"] == "cifar" and not imagenet_stem(r.learn.model)  # a cifar stem at 32 px or more stays
    probed = []

    def slow(model, bs, size, *a, **k):  # 12 batches an epoch: 16 px affords 4 epochs of 40 s, 64 px does not
        probed.append(("imagenet" if imagenet_stem(model) else "cifar", size))
        return 5.0 * (size / 32) ** 2, (size / 32) ** 2
    monkeypatch.setattr(B, "probe_step_s", slow)
    fit(tiny_root, lr=0.05, budget="40s", out=tmp_path / "slow", **SMALL)
    args = json.loads((tmp_path / "slow" / "config.json").read_text())["args"]
    assert (args["stem"], args["size"]) == ("cifar", 16)  # the imagenet stem was as slow: no 4 epochs at 64 px
    assert probed == [("cifar", 16), ("cifar", 32), ("imagenet", 64)]


def test_where_the_cifar_stem_would_train_small_the_budget_takes_the_imagenet_stem_at_64_px(
        tiny_root, tmp_path, fixed_timing, monkeypatch, capsys):
    def probe(model, bs, size, *a, **k):  # the imagenet stem at 64 px costs what the cifar stem does at 16
        return (0.2, 0.05) if imagenet_stem(model) else (0.2 * (size / 16) ** 2, 0.05 * (size / 16) ** 2)
    monkeypatch.setattr(B, "probe_step_s", probe)
    r = fit(tiny_root, lr=0.05, budget="40s", out=tmp_path / "run", **SMALL)
    args = json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    assert (args["stem"], args["size"]) == ("imagenet", 64) and imagenet_stem(r.learn.model)
    assert r.learn.dls.train.one_batch()[0].shape[-1] == 64
    assert "the imagenet stem at 64 px" in capsys.readouterr().out
    run = RunConfig(data=str(tiny_root), budget="40s", bs=8)
    assert B.budget_choice(run, 0.0) == ("imagenet", 64)
    assert B.budget_choice(run.replace(stem="cifar"), 0.0)[0] == "cifar"  # a stem given is kept
    assert B.budget_choice(run.replace(progressive=16), 0.0)[0] == "cifar"  # progressive resizing: the cifar stem's sizes


def test_the_stem_rule():
    assert B.choose_stem(24, 100.0, 400.0) == ("imagenet", 64)
    assert B.choose_stem(24, 100.0, 399.0) == ("cifar", 24)  # not 4 epochs at 64 px
    assert B.choose_stem(32, 1.0, 400.0) == ("cifar", 32)    # the cifar stem at 32 px or more stays
    assert B.choose_stem(16, None, 400.0) == ("cifar", 16)


class InterruptAfterEpoch(Callback):
    order = 80  # after RunLogger (70) has checkpointed the epoch

    def after_epoch(self):
        if self.epoch == 0:
            raise KeyboardInterrupt


def test_a_resumed_budget_run_goes_on_with_its_plan(tiny_root, tmp_path, fixed_timing, plan_clock, capsys):
    with pytest.raises(RunInterrupted):
        fit(tiny_root, lr=0.05, size=16, budget="40s", out=tmp_path / "run",
            cbs=[InterruptAfterEpoch(), plan_clock(1.0)], **SMALL)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    counter = CountBatches()
    result = fit(out=tmp_path / "run", resume=True, cbs=[counter, plan_clock(1.0)], bs=8, num_workers=0)
    assert "the plan goes on" in capsys.readouterr().out
    assert len(read_metrics(tmp_path / "run")) == saved["epochs"] == len(counter.per_epoch) + 1
    # the resumed epochs are paced on what is left of the budget (the first session's time, as metrics.csv has
    # it, is spent), and the schedule goes on from where it was to its end
    shares = json.loads((tmp_path / "run" / "config.json").read_text())["budget"]["epoch_shares"]
    assert len(shares) == len(counter.per_epoch) and all(1 <= n <= 12 for n in counter.per_epoch)
    assert result.learn.pct_train == pytest.approx(1.0)
    with pytest.raises(RunError, match="--budget"):  # the plan cannot change under a resume
        fit(out=tmp_path / "run", resume=True, budget="1h", quiet=True)


def _bench_budget():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import benchmarks.budget
    return benchmarks.budget


def test_the_budget_benchmark_reads_a_finished_run(tiny_root, tmp_path, fixed_timing):
    """benchmarks/budget.py times `fit --budget` from outside; what the run folder says goes into its row."""
    fit(tiny_root, lr=0.05, size=16, budget="40s", out=tmp_path / "run", **SMALL)
    row = _bench_budget().budget_row(tmp_path / "run", str(tiny_root), "40s", ["--size", "16"], 0, 41.2, 1.5, ["done"])
    assert row["budget_s"] == 40 and row["share_of_budget"] == 1.03 and row["within_5pct"] is True
    assert row["size"] == 16 and row["plan"]["n_epoch"] == row["epochs_done"] >= 1 and 0 <= row["best_top1"] <= 1
    assert row["fit_wall_s"] > 0 and row["train_seconds"] > 0


def test_the_budget_benchmark_writes_a_row_for_a_failed_run_too(tiny_root, tmp_path):
    results = tmp_path / "budget.jsonl"
    row = _bench_budget().main(["--data", str(tiny_root), "--budget", "1s", "--results", str(results),
                                "--out", str(tmp_path / "run"), "--", "--size", "16", "--bs", "8", "--num-workers", "0"])
    assert json.loads(results.read_text().splitlines()[-1]) == row
    assert row["exit_code"] == 2 and "smallest workable budget" in row["last_line"][0] and row["peak_rss_gib"] > 0
    assert "plan" not in row  # no folder was left
