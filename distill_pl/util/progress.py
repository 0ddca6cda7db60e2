"""Progress lines for logs: long jobs (KD pair generation, the evaluation) print one line per
finished unit with the rate and the estimated time left, when their output is not a terminal
(on a terminal their progress bars show the same)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``3h02m``, ``4m05s`` or ``12s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLines:
    """Counts ``total`` items of work; ``advance(n, note)`` prints
    ``<what>: <note> (<done>/<total> <unit>); <rate> <unit>/s, elapsed <t>, ETA <t>``.

    Prints only when ``stream`` (default: stdout) is not a terminal, or with ``force``.
    """

    def __init__(self, what: str, total: int, unit: str, stream: TextIO | None = None, force: bool = False):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stdout
        self.enabled = force or not self.stream.isatty()
        self.done = 0
        self.started = time.perf_counter()

    def advance(self, count: int, note: str) -> str:
        """Add ``count`` finished items; return (and print, when enabled) the line."""
        self.done += count
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"{self.what}: {note} ({self.done}/{self.total} {self.unit}); {rate:.3g} {self.unit}/s, "
                f"elapsed {duration(elapsed)}, ETA {duration(max(left, 0.0))}")
        if self.enabled:
            self.stream.write(line + "\n")
            self.stream.flush()
        return line
