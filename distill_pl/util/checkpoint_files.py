"""Checks of a checkpoint's files before ``torch.load`` reads them, with errors that name the
file: a Lightning checkpoint is a zip archive (torch's format) holding ``<name>/data.pkl``; a
distributed one is a folder with ``meta.pt`` (such an archive) and ``.metadata``. Random bytes,
a text file or a truncated checkpoint (its zip index, at the end, is missing) are refused here,
by the zip structure alone, so nothing is unpickled and the user never sees torch's advice
about ``weights_only``."""

from __future__ import annotations

import zipfile
from pathlib import Path

#: the metadata file of a distributed checkpoint folder (Lightning's)
SHARDED_METADATA = "meta.pt"


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read (the message names the file or folder)."""


def check_checkpoint(path: str | Path, option: str = "--ckpt_path") -> Path:
    """``path`` if it is a checkpoint file or a distributed checkpoint folder whose structure
    is intact; else :class:`CheckpointReadError` naming it (``option``: the flag that gave it)."""
    path = Path(path)
    if path.is_dir():
        if not (path / SHARDED_METADATA).is_file():
            raise CheckpointReadError(
                f"{option} {path}: a folder without {SHARDED_METADATA}, not a distributed checkpoint "
                f"(give a .ckpt file or a checkpoint folder written by the run)")
        if not (path / ".metadata").is_file():
            raise CheckpointReadError(f"{option} {path}: a checkpoint folder without .metadata (an unfinished save?)")
        check_checkpoint_file(path / SHARDED_METADATA, option)
        return path
    if not path.exists():
        raise CheckpointReadError(f"{option} {path}: no such checkpoint file or folder")
    return check_checkpoint_file(path, option)


def check_checkpoint_file(file: Path, option: str = "--ckpt_path") -> Path:
    """``file`` if it is a zip archive with a ``data.pkl`` (torch's checkpoint format), else
    :class:`CheckpointReadError` naming it."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointReadError(
                f"{option} {file}: a truncated or torn checkpoint (it starts like one, but its zip index "
                f"is missing or broken: {err})") from None
        raise CheckpointReadError(
            f"{option} {file}: not a PyTorch checkpoint (not a zip archive: random bytes, text or another "
            f"format)") from None
    except OSError as err:
        raise CheckpointReadError(f"{option} {file}: cannot be read ({err.strerror or err})") from None
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise CheckpointReadError(f"{option} {file}: a zip archive without data.pkl, not a PyTorch checkpoint")
    return file


def load_error(file: Path, err: Exception, option: str = "--ckpt_path") -> CheckpointReadError:
    """A one-line :class:`CheckpointReadError` for ``torch.load`` failing on ``file`` whose
    structure passed :func:`check_checkpoint_file` (torn contents, or objects this project
    does not write)."""
    lines = str(err).strip().splitlines()
    detail = lines[0][:200] if lines and "weights_only" not in str(err) else type(err).__name__
    return CheckpointReadError(f"{option} {file}: cannot be read as a checkpoint ({detail}); "
                               f"a torn file, or not a checkpoint written by distill-pl")


def check_lightning_checkpoint(checkpoint, file: Path, option: str = "--ckpt_path", key: str = "state_dict") -> dict:
    """``checkpoint`` (what ``torch.load`` gave for ``file``) if it is a Lightning checkpoint
    dict holding ``key``, else :class:`CheckpointReadError` naming the file."""
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        found = f"a dict without {key!r}" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise CheckpointReadError(f"{option} {file}: a torch file holding {found}, not a Lightning checkpoint")
    return checkpoint
