"""RUN_DIR/log.txt: what a command printed, kept in the run folder beside the metrics, as timm's train.py keeps
its log. Progress bars are left out: fastprogress redraws a bar with carriage returns dozens of times a second,
and only what it leaves on the screen when done (fastai's epoch table, the messages) is worth keeping.
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Iterator, TextIO

from .errors import one_line
from .layout import LOG

BAR = re.compile(r"\|[█\-]*\|\s*\d+(\.\d+)?%\s*\[")  # fastprogress's console bar: |███---| 40.00% [2/5 ...]


class _LogFile:
    """log.txt, appended to line by line. Where a write fails (a full disk, a folder gone read-only) it says so in
    one line on the screen and stops: the log is a copy of what is printed, not worth stopping a run for."""

    def __init__(self, path: Path, screen: TextIO):
        self.path, self.screen = path, screen
        try:
            self.file: TextIO | None = open(path, "a", encoding="utf-8")
        except OSError as e:
            self._give_up(e)

    def write(self, text: str) -> None:
        if self.file is None:
            return
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        self.screen.write(f"warning: {self.path} is not written from here on: {error.strerror or error}\n")
        self.close()

    def close(self) -> None:
        file, self.file = getattr(self, "file", None), None
        if file is not None:
            with suppress(OSError):
                file.close()


class _Tee:
    """A text stream that writes through to `stream` and sends each finished line, as it ends up on the screen
    (the text after its last carriage return), to `log`, unless it is a progress bar or blank."""

    def __init__(self, stream: TextIO, log: _LogFile):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._keep(line)
        return len(text)

    def _keep(self, line: str) -> None:
        shown = line.rsplit("\r", 1)[-1].rstrip()
        if shown.strip() and not BAR.search(shown):
            self.log.write(shown + "\n")

    def close_line(self) -> None:
        if self.pending:
            self._keep(self.pending)
            self.pending = ""

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno ...: the real stream's
        return getattr(self.stream, name)


@contextmanager
def run_log(folder: Path | str, header: str | None = None) -> Iterator[Path]:
    """Append what is printed to stdout and stderr inside the block to `folder`/log.txt (and still print it).
    `header` (the command, say) opens the entry with a timestamp. An exception that ends the block is logged as
    the one line the CLI prints for it. A log that cannot be written is a warning, never a failure."""
    path = Path(folder) / LOG
    log = _LogFile(path, sys.stderr)
    if header is not None:
        log.write(f"[{datetime.now().isoformat(timespec='seconds')}] {header}\n")
    out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    sys.stdout, sys.stderr = out, err
    try:
        yield path
    except Exception as e:
        if not hasattr(e, "exit_code"):  # typer's Exit: the CLI has already printed (and so logged) its line
            log.write(f"error: {one_line(e)}\n")
        raise
    except KeyboardInterrupt:
        log.write("interrupted\n")
        raise
    finally:
        out.close_line()
        err.close_line()
        sys.stdout, sys.stderr = out.stream, err.stream
        log.close()
