"""One writer per output folder: a lock file naming the process that holds it.

``FolderLock(folder, rank).acquire()`` creates ``folder/.lock.rank<rank>`` holding
``{"pid", "host", "since"}``, atomically (written to a temp file, then hard-linked to the lock
name, which fails if it exists), so the file is never seen half written. A second writer
fails at once with :class:`FolderLockedError` naming the holder's pid and host. A lock whose
holder is gone (same host, no such pid) is stale: it is taken over with a warning. A lock of
another host cannot be checked: remove it by hand once no run writes the folder.

Ranks of a multi-process run write different shards of one folder, so each rank holds its
own lock file: a second run collides with the first one's rank 0 at least.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path


class FolderLockedError(RuntimeError):
    """Another live process writes the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """The lock of ``folder`` for writer ``rank`` (see the module docstring)."""

    def __init__(self, folder: str | Path, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f".lock.rank{rank}"
        self.held = False

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        fd, tmp = tempfile.mkstemp(prefix=".lock.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(me, file)
            while True:
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    try:
                        holder = self._holder()
                    except FileNotFoundError:  # released meanwhile: try again
                        continue
                    if holder is None or (holder.get("host") == me["host"] and not _alive(int(holder["pid"]))):
                        warnings.warn(f"{self.path}: taking over a stale lock ({holder or 'unreadable'})")
                        self.path.unlink(missing_ok=True)
                        continue
                    raise FolderLockedError(
                        f"{self.folder} is being written by pid {holder['pid']} on host {holder['host']} "
                        f"(since {holder.get('since')}, lock file {self.path}); wait for that run to end, or "
                        "remove the lock file if no run writes this folder"
                    ) from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        """The lock file's content (None if it is not a lock record)."""
        try:
            holder = json.loads(self.path.read_text())
            int(holder["pid"]), holder["host"]
            return holder
        except (ValueError, KeyError, TypeError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
