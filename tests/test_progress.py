"""The demo's one-line-per-stage progress: in-place terminal updates with items, elapsed time and ETA; one plain
line per stage in a log; the quiet switch for the stages' own logs."""
from __future__ import annotations

import io
import logging

import pytest

from pipelines import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_line_is_rewritten_in_place_with_items_elapsed_and_eta():
    clock, out = FakeClock(), Terminal()
    line = progress.StageLine("[ 2/5] profile-real", out, clock=clock)
    line.start()
    line.update(0, 4)
    clock.now += 30.0
    line.update(advance=1)   # 1 of 4 in 30 s -> 90 s left
    assert line.eta() == pytest.approx(90.0)
    assert line.text() == "[ 2/5] profile-real  1/4  elapsed 0:30  ETA 1:30"
    clock.now += 90.0
    line.update(4)
    line.note = "wells=12"
    line.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("[ 2/5] profile-real  4/4  elapsed 2:00  done  wells=12\n")
    frames = text.split("\r")[1:]
    assert len(frames) >= 3 and "ETA 1:30" in frames[-3]
    # a shorter frame blanks what is left of a longer one
    assert all(len(f.rstrip("\n")) >= len(frames[0]) for f in frames[1:])


def test_log_gets_one_plain_line_per_stage_and_report_goes_to_the_open_stage():
    out = io.StringIO()
    progress.report(1, 2)   # no stage open: nothing happens
    with progress.stage_line("[ 1/1] ingest", out) as line:
        assert progress.active()
        for i in range(3):
            progress.report(i + 1, 3)
        assert (line.done, line.total) == (3, 3)
    assert not progress.active()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[ 1/1] ingest  3/3  elapsed 0:00  done")
    with pytest.raises(RuntimeError):
        with progress.stage_line("[ 1/1] embed", out):
            raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].endswith("failed")


def test_quiet_stage_logs_unless_verbose(monkeypatch):
    logger = logging.getLogger("pipelines.some_stage")
    monkeypatch.setenv(progress.VERBOSE_ENV, "0")
    with progress.quiet_stage_logs():
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("diffusers.models").isEnabledFor(logging.WARNING)
    monkeypatch.setenv(progress.VERBOSE_ENV, "1")
    with progress.quiet_stage_logs():
        assert logging.getLogger("pipelines").level == logging.NOTSET
