"""One progress line per stage, and the switch between quiet (default) and ``--verbose`` output.

A terminal sees each stage as a single line rewritten in place (carriage return) with items done / total,
elapsed time and ETA; a log (stdout not a TTY) gets one plain line per stage when it ends, nothing in between.
Stages report items with :func:`report` (a no-op when no stage line is open), so they never print themselves:

    with stage_line("[ 3/17] fit-vae") as line:   # the demo opens one line per step
        fit_vae.run(lake, cfg)                     # ... which calls report(done, total) as units finish
        line.note = "epochs=4"

``CPLDM_VERBOSE=1`` (``cpldm --verbose``, inherited by Ray workers) brings back the stages' INFO logs, Ray Data's
progress output, Ray's own notices and the workers' logs.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Iterator, TextIO

#: Environment variable of the verbose switch (an environment variable so Ray workers see it too).
VERBOSE_ENV = "CPLDM_VERBOSE"
#: Minimum seconds between two rewrites of a terminal line.
REFRESH_S = 0.5

_open: list["StageLine"] = []


def verbose() -> bool:
    """True when ``--verbose`` (or ``CPLDM_VERBOSE=1``) asked for every log line."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def set_verbose(on: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0) + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StageLine:
    """The progress line of one stage.

    Args:
        name: what the line starts with (``"[ 3/17] fit-vae"``).
        stream: where to write (default ``sys.stdout``); a TTY gets in-place updates.
        clock: seconds source (tests pass a fake one).
    """

    def __init__(self, name: str, stream: TextIO | None = None, clock=time.monotonic):
        self.name, self.stream, self.clock = name, stream or sys.stdout, clock
        self.started = clock()
        self.done: int | None = None
        self.total: int | None = None
        self.note = ""
        self._shown = 0.0
        self._width = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def eta(self) -> float | None:
        """Seconds left, extrapolated linearly from the items done so far (None until one is done)."""
        if not self.done or not self.total:
            return None
        elapsed = self.clock() - self.started
        return elapsed * (self.total - self.done) / self.done

    def text(self, status: str = "") -> str:
        """``name  done/total  elapsed m:ss  ETA m:ss  note`` (the parts known so far)."""
        parts = [self.name]
        if self.total:
            parts.append(f"{self.done or 0}/{self.total}")
        parts.append(f"elapsed {_clock(self.clock() - self.started)}")
        eta = self.eta()
        if eta is not None and self.done != self.total and not status:
            parts.append(f"ETA {_clock(eta)}")
        if status:
            parts.append(status)
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _write_tty(self, text: str, end: str = "") -> None:
        pad = max(self._width - len(text), 0)
        self.stream.write("\r" + text + " " * pad + end)
        self.stream.flush()
        self._width = 0 if end else len(text)

    def update(self, done: int | None = None, total: int | None = None, advance: int = 0) -> None:
        """Set (or advance) the items done and the total; a terminal line is redrawn at most every REFRESH_S."""
        if total is not None:
            self.total = int(total)
        if done is not None:
            self.done = int(done)
        if advance:
            self.done = (self.done or 0) + advance
        now = self.clock()
        if self.tty and (now - self._shown >= REFRESH_S or self.done == self.total):
            self._shown = now
            self._write_tty(self.text())

    def start(self) -> None:
        if self.tty:
            self._write_tty(self.text("running"))

    def finish(self, status: str = "done") -> None:
        """The stage's last line: rewritten in place on a terminal, a plain line in a log."""
        text = self.text(status)
        if self.tty:
            self._write_tty(text, end="\n")
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


@contextmanager
def stage_line(name: str, stream: TextIO | None = None) -> Iterator[StageLine]:
    """Open the progress line of a stage; :func:`report` calls inside go to it. An exception ends the line with
    ``failed`` (the error itself is reported by the caller)."""
    line = StageLine(name, stream)
    _open.append(line)
    line.start()
    try:
        yield line
    except BaseException:
        line.finish("failed")
        raise
    else:
        line.finish()
    finally:
        _open.remove(line)


#: Loggers turned down inside a quiet demo step: the stages' own INFO lines (the step line replaces them) and the
#: model libraries' notices (diffusers' `accelerate` hint, transformers' deprecations).
QUIET_STAGE_LOGGERS = {"pipelines": logging.WARNING, "cpldm_core": logging.WARNING, "diffusers": logging.ERROR,
                       "transformers": logging.ERROR, "huggingface_hub": logging.ERROR}


@contextmanager
def quiet_stage_logs() -> Iterator[None]:
    """Unless ``--verbose``: QUIET_STAGE_LOGGERS and library Future/Deprecation warnings off for the block."""
    if verbose():
        yield
        return
    previous = {name: logging.getLogger(name).level for name in QUIET_STAGE_LOGGERS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            for name, level in QUIET_STAGE_LOGGERS.items():
                logging.getLogger(name).setLevel(level)
            yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def report(done: int | None = None, total: int | None = None, advance: int = 0) -> None:
    """Items done / total of the running stage (a no-op outside :func:`stage_line`)."""
    if _open:
        _open[-1].update(done, total, advance)


def active() -> bool:
    """True while a stage line is open (stages then leave their own progress bars off)."""
    return bool(_open)
