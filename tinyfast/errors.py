"""The errors a user can act on, raised by the package and turned by the CLI into one line and a non-zero exit
(`tinyfast.dataset.DatasetError` is the dataset's own). Nothing is imported here, so every module can raise them."""


class RunError(Exception):
    """A one-line, user-facing reason a run cannot start or go on."""


class NonFiniteLoss(RunError):
    """The training loss became NaN or inf (`tinyfast.callbacks.StopOnNaN` says where, and what to try)."""


class RunInterrupted(RunError):
    """Ctrl-C or SIGTERM during `fit`: the checkpoint is kept and the message says how to resume."""
