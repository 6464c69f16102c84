"""The errors a user can act on, raised by the package and turned by the CLI into one line and a non-zero exit
(`tinyfast.dataset.DatasetError` is the dataset's own). Nothing is imported here, so every module can raise them."""


class RunError(Exception):
    """A one-line, user-facing reason a run cannot start or go on."""


class NonFiniteLoss(RunError):
    """The training loss became NaN or inf (`tinyfast.callbacks.StopOnNaN` says where, and what to try)."""


class RunInterrupted(RunError):
    """Ctrl-C or SIGTERM during `fit`: the checkpoint is kept and the message says how to resume."""


def one_line(error: BaseException) -> str:
    """The error's message without the line fastai puts before an error raised inside a callback ("Exception
    occured in `StopOnNaN` when calling event `after_loss`:"), which would make the CLI's one line two."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception occured in `"):
        lines = lines[1:]
    return " ".join(lines)
