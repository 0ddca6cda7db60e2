"""Checkpoint files that are written atomically on the run's own filesystem.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` of every ``distill-pl fit``
(the CLI's trainer default): a checkpoint is ``torch.save``d into a temp file in the
destination folder (``.<name>.<random>.ckpt``), fsynced and renamed over the final name, then
the folder is fsynced. A run killed at any moment leaves the previous file or the new one at
the final name, never a partial one (Lightning's own save writes the final name in place
from a buffer, so a kill during it leaves a torn ``last.ckpt``). A save that fails (folder not
writable, disk full) raises :class:`CheckpointSaveError` naming the path and the OS error
and the run stops; the temp file is removed. (torch reports a failed write of its zip writer
as ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos``, the OS error
only in its context: that is a :class:`CheckpointSaveError` too.)

Distributed (sharded) checkpoints of :class:`distill_pl.training.strategies.FSDP2Strategy` get the
same guarantee from a staging folder that replaces the final folder when every rank is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from distill_pl.util.media import atomic_write


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the message names the path and the OS error)."""


def remove_stale_temp_files(path: Path) -> None:
    """Temp files of ``path`` left by a killed save (see :func:`~distill_pl.util.media.atomic_write`)."""
    for stale in path.parent.glob(f".{path.name}.*{path.suffix}"):
        stale.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through an fsynced temp file in its folder."""
    path = Path(path)
    try:
        if path.parent.is_dir():
            remove_stale_temp_files(path)
        with atomic_write(path, durable=True) as tmp, open(tmp, "wb") as file:
            torch.save(obj, file)
    except OSError as err:
        raise CheckpointSaveError(f"cannot write checkpoint {path}: {err}") from err
    except RuntimeError as err:
        reason = _write_failure(err)
        if reason is None:
            raise
        raise CheckpointSaveError(f"cannot write checkpoint {path}: {reason}") from err


def _write_failure(err: RuntimeError) -> str | None:
    """Why torch's zip writer failed (the OS error it swallowed, e.g. a full disk), or None
    when ``err`` is not a failed write."""
    context = err.__context__
    if isinstance(context, OSError):
        return str(context)
    text = str(err).strip()
    if "inline_container" in text or "PytorchStreamWriter" in text:
        first = text.splitlines()[0] if text else ""
        return f"the write failed ({first[:200]}); is the disk full?"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable on the destination's own
    filesystem, and fail loudly (see the module docstring). Loading is Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)


#: trainer defaults of ``distill-pl`` (LightningCLI ``trainer_defaults``): every run saves
#: through :class:`AtomicCheckpointIO` unless its config sets ``trainer.plugins`` itself
TRAINER_DEFAULTS = {"plugins": {"class_path": f"{__name__}.AtomicCheckpointIO"}}
