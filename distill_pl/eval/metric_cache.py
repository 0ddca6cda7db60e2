"""The evaluation's metrics on disk (``out/metrics.json``), each with the settings it depends
on, so a rerun with unchanged videos and metric settings recomputes nothing and a changed
setting recomputes only the rows it affects.

``{key: {"settings": {...}, "values": {...}}}``; ``settings`` are compared as JSON. The file is
rewritten atomically after each new entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill_pl.util.media import write_text


def _as_json(value) -> object:
    return json.loads(json.dumps(value, sort_keys=True))


class MetricCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:  # a damaged cache is rebuilt, not trusted
                print(f"{self.path}: unreadable ({err}); computing the metrics again")

    def get(self, key: str, settings: dict) -> dict | None:
        """The values stored for ``key`` if they were computed with ``settings``."""
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("settings") == _as_json(settings):
            return entry.get("values")
        return None

    def put(self, key: str, settings: dict, values: dict) -> None:
        self.entries[key] = {"settings": _as_json(settings), "values": _as_json(values)}
        write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
