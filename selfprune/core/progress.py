"""Progress of the long steps (calibration, a generation's candidates, the final test scoring, a
report's rows, an export), reported to one sink per process.

The library calls :func:`step` and never draws. By default a step is logged at INFO on the
``selfprune.core.progress`` logger and rate-limited (a start line, a line at most every
:data:`EVERY_S` seconds, a done line with the seconds it took), so a log gets a handful of lines
per step whatever its length. Where the application configured no logging at all (a notebook, a
script), the ``selfprune`` logger gets a stderr handler at INFO so those lines show, as
transformers does; ``logging.getLogger("selfprune").setLevel(logging.WARNING)`` silences them. Where
logging is configured (a Prefect worker, an application), its levels decide: Prefect's root level
WARNING keeps workers' logs as quiet as before. The CLI installs rich bars for a command
(:func:`reporting`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
Advance = Callable[[int], None]  # n more units done
Sink = Callable[[str, int], Advance]  # (label, total) -> advance

log = logging.getLogger("selfprune.core.progress")
EVERY_S = 30.0  # at most one line per step this often, between its start and done lines


class _Logged:
    """One step's rate-limited log lines."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()  # a flow's futures may resolve in other threads
        _visible()
        log.info("%s: 0/%d", label, total)

    def __call__(self, n: int) -> None:
        with self.lock:
            before, self.done = self.done, self.done + n
            now = time.monotonic()
            elapsed = now - self.start
            if self.done >= self.total > before:
                log.info("%s: %d/%d done in %.1f s", self.label, self.done, self.total, elapsed)
            elif self.done < self.total and now - self.last >= EVERY_S:
                self.last = now
                left = elapsed * (self.total - self.done) / max(self.done, 1)
                log.info("%s: %d/%d, %.0f s, about %.0f s left", self.label, self.done, self.total, elapsed, left)


def ignore(n: int) -> None:
    """An advance that reports nothing: a scorer's default when no step counts its candidates."""


def silent(label: str, total: int) -> Advance:
    """A sink that reports nothing: the passes a caller does not want shown."""
    return ignore


def one_by_one(score_one: Callable[[T], R], items: list[T], advance: Advance = ignore) -> list[R]:
    """``score_one`` of each item in order, ``advance(1)`` as each is done."""
    records = []
    for item in items:
        records.append(score_one(item))
        advance(1)
    return records


def logged(label: str, total: int) -> Advance:
    """The default sink: the step's progress as rate-limited log lines."""
    return _Logged(label, total)


_sink: Sink = logged


def step(label: str, total: int) -> Advance:
    """Start reporting a step of ``total`` units to the process's sink; call the result with each
    number of units done."""
    return _sink(label, total)


@contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Steps started in the block (in any thread of this process) go to ``sink``: the CLI's rich bars."""
    global _sink
    saved, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = saved


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is logged: a notebook kernel or
    a test harness may replace it after the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _visible() -> None:
    """A process that configured no logging would show only warnings (Python's last-resort
    handler): then the ``selfprune`` logger gets a stderr handler, at INFO unless a level was set."""
    if log.hasHandlers():
        return
    library = logging.getLogger("selfprune")
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    library.addHandler(handler)
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)
