"""What ``--ckpt_path last`` resumes from: the newest intact checkpoint of the run.

``distill-pl fit --ckpt_path last`` looks in the ``dirpath`` of every ``ModelCheckpoint`` of
the config's trainer for checkpoints (``*.ckpt`` files, or distributed checkpoint folders)
and resumes from the intact one with the highest ``global_step`` (ties: the newest file,
then a ``last*`` name). So Lightning's versioned ``last-v1.ckpt`` beside an older
``last.ckpt`` is no ambiguity, and a newest checkpoint that cannot be read (a torn file)
falls back to the newest intact one, with a warning naming both. A checkpoint counts as
intact when ``torch.load`` (``weights_only``, memory-mapped, so nothing is read in full)
opens it and finds its ``global_step``.

With no usable checkpoint ``--ckpt_path last`` is an error; ``--ckpt_path last_or_fresh``
resumes the same way when there is one and starts a new run otherwise.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

#: ckpt_path values resolved here
LAST, LAST_OR_FRESH = "last", "last_or_fresh"
_SHARDED_METADATA = "meta.pt"  # Lightning's metadata file of a distributed checkpoint


class NoCheckpointError(ValueError):
    """``--ckpt_path last`` with nothing to resume from."""


def resolve_ckpt_path(subcommand_config) -> None:
    """Replace ``last`` / ``last_or_fresh`` in a parsed LightningCLI subcommand config
    (``ckpt_path``, ``trainer.callbacks``) by the checkpoint to resume from, or None to start
    fresh (``last_or_fresh`` only); exit with the error when there is none. Other values are
    left as they are."""
    ckpt_path = subcommand_config.get("ckpt_path")
    if ckpt_path not in (LAST, LAST_OR_FRESH):
        return
    folders = checkpoint_folders(subcommand_config.get("trainer") or {})
    try:
        subcommand_config["ckpt_path"] = resume_checkpoint(folders, allow_fresh=ckpt_path == LAST_OR_FRESH)
    except NoCheckpointError as err:
        sys.exit(f"distill-pl: {err}")


def checkpoint_folders(trainer_config) -> list[Path]:
    """The ``dirpath`` of every ``ModelCheckpoint`` among the trainer config's callbacks."""
    callbacks = trainer_config.get("callbacks") or []
    folders = []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = str(_get(callback, "class_path") or type(callback).__name__)
        dirpath = _get(_get(callback, "init_args") or {}, "dirpath") or getattr(callback, "dirpath", None)
        if class_path.endswith("ModelCheckpoint") and dirpath:
            folders.append(Path(dirpath))
    return folders


def resume_checkpoint(folders: list[Path], allow_fresh: bool = False) -> str | None:
    """The checkpoint in ``folders`` to resume from (see the module docstring)."""
    if not folders:
        raise NoCheckpointError(
            "--ckpt_path last: the config has no ModelCheckpoint with a dirpath to look for checkpoints in"
        )
    found = [p for folder in folders if folder.is_dir() for p in folder.iterdir()
             if p.suffix == ".ckpt" and not p.name.startswith(".")]
    steps, problems = {}, {}
    for path in found:
        step, problem = checkpoint_step(path)
        if step is None:
            problems[path] = problem
        else:
            steps[path] = step
    where = ", ".join(str(f) for f in folders)
    if not steps:
        unreadable = "".join(f"; {p}: {why}" for p, why in problems.items())
        if allow_fresh:
            warnings.warn(f"--ckpt_path last_or_fresh: no usable checkpoint in {where}{unreadable}: starting a new run")
            return None
        raise NoCheckpointError(
            f"--ckpt_path last: no usable checkpoint in {where}{unreadable or ' (none there)'}. "
            "Pass --ckpt_path last_or_fresh to start a new run when there is none, or no --ckpt_path."
        )
    chosen = max(steps, key=lambda p: (steps[p], p.stat().st_mtime, p.name.startswith(LAST)))
    # Lightning writes last.ckpt just after the step's own file: on equal (coarse) mtimes it is the newer.
    newest = max(found, key=lambda p: (p.stat().st_mtime, p.name.startswith(LAST)))
    if newest in problems:
        warnings.warn(
            f"--ckpt_path last: the newest checkpoint {newest} cannot be read ({problems[newest]}); "
            f"resuming from {chosen} (step {steps[chosen]}), the newest intact one"
        )
    return str(chosen)


def checkpoint_step(path: Path) -> tuple[int | None, str]:
    """(global_step, "") of an intact checkpoint file or distributed checkpoint folder, or
    (None, why it cannot be read)."""
    file = path / _SHARDED_METADATA if path.is_dir() else path
    if path.is_dir() and not (path / ".metadata").is_file():
        return None, "a checkpoint folder without .metadata"
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"]), ""
    except Exception as err:  # torch raises RuntimeError, pickle and zip errors, KeyError
        text = str(err).strip().splitlines()
        return None, f"{type(err).__name__}: {text[0] if text else ''}"


def _get(obj, key: str):
    if isinstance(obj, dict) or hasattr(obj, "get"):
        try:
            return obj.get(key)
        except TypeError:
            return None
    return getattr(obj, key, None)
