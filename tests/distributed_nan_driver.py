"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: a `fit` in which rank 1's loss turns NaN
in the last training batch of epoch 1; each rank writes the error it stopped with to nan_rank<R>.json.

usage: distributed_nan_driver.py DATA RUN_DIR REPORT_DIR
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from fastai.callback.core import Callback

from tinyfast.distributed import rank, setup_distributed
from tinyfast.errors import NonFiniteLoss
from tinyfast.train import fit

data, run_dir, report_dir = (Path(p).resolve() for p in sys.argv[1:4])


class PoisonLastBatchOnRank1(Callback):
    order = 14  # after the loss, before StopOnNaN (15) folds it in

    def after_loss(self):
        if self.training and rank() == 1 and self.epoch == 0 and self.iter == self.n_iter - 1:
            self.learn.loss_grad = self.loss_grad * math.nan
            self.learn.loss = self.loss * math.nan


if __name__ == "__main__":
    setup_distributed()
    try:
        fit(data=data, epochs=2, bs=8, lr=0.05, size=16, out=run_dir, seed=0, cbs=[PoisonLastBatchOnRank1()],
            quiet=True)
        error = None
    except NonFiniteLoss as e:
        error = str(e)
    (report_dir / f"nan_rank{rank()}.json").write_text(json.dumps({"rank": rank(), "error": error}))
    sys.exit(3 if error else 0)
