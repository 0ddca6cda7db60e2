"""Progress lines for logs."""

from __future__ import annotations

import io

from distill_pl.util.progress import ProgressLines, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_only_when_not_a_terminal(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr("distill_pl.util.progress.time.perf_counter", lambda: next(clock, 130.0))
    log = io.StringIO()
    progress = ProgressLines("KD pairs", 40, "examples", stream=log)
    progress.advance(10, "wrote train/shard_00000.safetensors")
    progress.advance(10, "wrote train/shard_00001.safetensors")
    assert log.getvalue().splitlines() == [
        "KD pairs: wrote train/shard_00000.safetensors (10/40 examples); 1 examples/s, elapsed 10s, ETA 30s",
        "KD pairs: wrote train/shard_00001.safetensors (20/40 examples); 0.667 examples/s, elapsed 30s, ETA 30s",
    ]
    terminal = Terminal()
    ProgressLines("x", 1, "rows", stream=terminal).advance(1, "done")
    assert terminal.getvalue() == ""


def test_duration():
    assert (duration(12.4), duration(245), duration(3 * 3600 + 125)) == ("12s", "4m05s", "3h02m")
