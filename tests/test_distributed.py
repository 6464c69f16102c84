"""Data-parallel training: two CPU processes (gloo) launched by torchrun train one `fit` together.

The launch runs once (tests/distributed_driver.py, ~35 s on 2 cores); the tests below read what each rank
reported. The in-process tests cover the single-process defaults and fastai's DistributedDL on gloo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tinyfast import distributed as D
from tinyfast.data import tiny_imagenet_dls

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("distributed_driver.py")
N_PROC = 2

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend: no multi-process training on CPUs")


def torchrun(driver: Path, args: list, cwd: Path, timeout: int, env: dict | None = None):
    """`torchrun --nproc_per_node N_PROC driver args...` on CPU processes; a test failure if a rank is still
    waiting for the other after `timeout` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={N_PROC}",
           str(driver), *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank waiting for the other?):\n{(e.stdout or '')[-3000:]}")


# ---------------------------------------------------------------------------------------------------------
# One launch: torchrun, 2 processes, tinyfast.train.fit in each
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tiny_root, tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no gloo backend: no multi-process training on CPUs")
    base = tmp_path_factory.mktemp("ddp")
    work, reports = base / "work", base / "reports"
    work.mkdir()
    reports.mkdir()
    # as `accelerate launch --mixed_precision fp16` would set it: fit's precision must win (no autocast from accelerate)
    proc = torchrun(DRIVER, [tiny_root, work / "run", reports], base, timeout=300,
                    env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{output[-6000:]}"
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(N_PROC)]
    weights = [torch.load(reports / f"weights_rank{r}.pth") for r in range(N_PROC)]
    return dict(work=work, run=work / "run", ranks=ranks, weights=weights)


def test_every_process_ran_a_distributed_fit(launch):
    for r, rep in enumerate(launch["ranks"]):
        assert rep["rank"] == r and rep["world_size"] == N_PROC
        assert rep["loaders"] == ["DistributedDL"], "training and validation must go through fastai's DistributedDL"


def test_accelerates_mixed_precision_is_off_whatever_the_launcher_says(launch):
    """ACCELERATE_MIXED_PRECISION=fp16 would wrap the forward in fp16 autocast, and fastai never calls
    `accelerator.backward`, so nothing would scale the loss: the precision is fit's (FastDevice's) alone."""
    for rep in launch["ranks"]:
        assert rep["mixed_precision"] == "no" and rep["forward_autocast"] is False


def test_each_rank_trains_on_its_share_of_every_epoch(launch):
    r0 = launch["ranks"][0]
    assert r0["batches_single"] == 12  # 96 images, bs 8: the single-process epoch
    for rep in launch["ranks"]:
        assert rep["train_batches"] == [r0["batches_single"] // N_PROC] * 2
        assert rep["train_samples"] == [r0["n_train"] // N_PROC] * 2
        assert rep["valid_batches"] == [2, 2]  # 32 val images: 16 per rank, bs 8


def test_shards_partition_rank0_shuffle(launch):
    """Each rank shuffled with its own seed: only rank 0's order, broadcast over gloo, makes a partition."""
    shards = [rep["shard"] for rep in launch["ranks"]]
    n = launch["ranks"][0]["n_train"]
    assert all(len(s) == n // N_PROC for s in shards)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(n))
    assert shards[0] != sorted(shards[0]), "the train shard should be shuffled"


def test_ranks_end_with_identical_weights(launch):
    """Different batches on each rank, the same weights after: DDP averaged the gradients. The BatchNorm buffers
    agree too (DDP broadcasts rank 0's before the validation forward)."""
    w0, w1 = launch["weights"]
    assert w0.keys() == w1.keys() and not any(k.startswith("module.") for k in w0)
    different = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not different, f"weights differ between ranks: {different[:5]}"


def test_metrics_are_gathered_across_ranks(launch):
    r0, r1 = launch["ranks"]
    rows = (launch["run"] / "metrics.csv").read_text().splitlines()
    best = max(float(line.split(",")[3]) for line in rows[1:])
    assert r0["best_accuracy"] == r1["best_accuracy"] == pytest.approx(best)


def test_only_rank0_writes_the_run_folder(launch):
    assert launch["ranks"][1]["writes"] == [], "rank 1 wrote files where the run folder goes"
    assert sorted(p.name for p in launch["work"].iterdir()) == ["run"]
    names = {p.name for p in launch["run"].iterdir()}
    assert {"config.json", "summary.txt", "metrics.csv", "model.pth", "checkpoint.pth", "learner.pkl",
            "curves.png", "schedule.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert len((launch["run"] / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((launch["run"] / "config.json").read_text())["processes"] == N_PROC
    saved = torch.load(launch["run"] / "model.pth")
    assert saved.keys() == launch["weights"][0].keys(), "model.pth must hold the unwrapped model's state_dict"


# ---------------------------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_a_plain_process_is_main_and_not_distributed(no_launch_env):
    from fastai.test_utils import synth_learner
    assert not D.is_distributed() and D.is_main_process() and D.world_size() == 1
    assert D.setup_distributed() is False and not dist.is_initialized()
    assert D.on_main(lambda x: x + 1, 41) == 42
    with D.main_process_first():
        pass
    learn = synth_learner()
    model = learn.model
    with D.distributed_context(learn) as inside:
        assert inside is learn and not hasattr(learn, "distributed_trainer")
    assert learn.model is model


def test_launcher_env_decides_rank_and_single_process_hides_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert D.is_distributed() and not D.is_main_process() and D.world_size() == 2
    with D.single_process():
        assert not D.is_distributed()
    assert os.environ["WORLD_SIZE"] == "2"
    monkeypatch.delenv("WORLD_SIZE")
    with D.single_process():
        pass
    assert "WORLD_SIZE" not in os.environ


@needs_gloo
def test_distributed_dl_runs_on_a_gloo_group(tiny_root, tmp_path, no_launch_env):
    """fastai's own `_broadcast` moves the indices to CUDA; the patched one works on a CPU process group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert D.collective_device() == torch.device("cpu")
        dls = tiny_imagenet_dls(tiny_root, bs=8, size=16, aug=False)
        ddl = D.DistributedDL(dls.train, rank=0, world_size=1)
        assert ddl._broadcast([3, 1, 2], 0) == [3, 1, 2]
        assert ddl.rng is dls.train.rng
        batches = list(ddl)
        assert sum(len(y) for _, y in batches) == len(dls.train) * 8
        ddl.num_workers, ddl.offs = 2, 1  # as fastai's worker init sets them on the wrapper
        ddl.wif()
        assert (dls.train.num_workers, dls.train.offs) == (2, 1)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# A NaN on one rank: every rank stops, naming the same batch
# ---------------------------------------------------------------------------------------------------------
NAN_DRIVER = Path(__file__).with_name("distributed_nan_driver.py")


@needs_gloo
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_batch(tiny_root, tmp_path):
    """Rank 1's loss turns NaN in the last batch of epoch 1, after which rank 0's loss is still finite: the verdict is
    shared at the check (an all-reduce), so both stop with the same message. Without it, rank 1 alone raises and
    rank 0 waits for it in validation until the launcher or the process group's timeout kills it."""
    proc = torchrun(NAN_DRIVER, [tiny_root, tmp_path / "run", tmp_path], tmp_path, timeout=240)
    reports = [tmp_path / f"nan_rank{r}.json" for r in range(N_PROC)]
    assert all(p.exists() for p in reports), (proc.stdout + proc.stderr)[-4000:]
    messages = [json.loads(p.read_text())["error"] for p in reports]
    assert messages[0] == messages[1] and "NaN or inf at epoch 1, batch 6" in messages[0], messages
