"""Shard files: the layout of examples in shards, atomic writing and header reading.

Shared by every sharded data set of distill_pl (KD pairs, :mod:`distill_pl.data.pairs`;
precomputed clip latents, :mod:`distill_pl.data.clip_latents`). A split of ``num_examples``
examples lives in ``<folder>/shard_{k:05d}.safetensors``; shard ``k`` holds examples
``[k * shard_size, min((k + 1) * shard_size, num_examples))`` in order, so a shard's content
depends only on its index, never on how the writing was scheduled.

Metadata: a single safetensors metadata entry (the format's key, e.g. ``distill_pl.kd_pairs``)
holding a JSON object serialised with sorted keys, so equal shards are equal bytes.

Writing is atomic: a shard is written to ``.shard_{k:05d}.safetensors.tmp`` in the same folder,
flushed to disk and renamed over the final name, so a killed run leaves finished shards and at
most a stale temp file (removed by the next run), never a partial shard.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

SHARD_PATTERN = re.compile(r"shard_(\d{5,})\.safetensors")
#: safetensors' names of the dtypes shards use
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.bool: "BOOL", torch.int64: "I64"}
#: storage dtypes by config name
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage dtype name (``float32``, ``bfloat16``, ``float16``)."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, not {name!r}")
    return STORAGE_DTYPES[name]


@dataclass(frozen=True)
class ShardLayout:
    """Which examples of a split go in which shard file."""

    folder: Path
    num_examples: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.num_examples < 1 or self.shard_size < 1:
            raise ValueError(
                f"{self.folder}: num_examples ({self.num_examples}) and shard_size "
                f"({self.shard_size}) must be >= 1"
            )

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    def path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.safetensors"

    def temp_path(self, k: int) -> Path:
        return self.folder / f".shard_{k:05d}.safetensors.tmp"

    def examples(self, k: int) -> range:
        """Indices of the examples of shard ``k``."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_examples))

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def shards_of_rank(self, rank: int, world_size: int) -> list[int]:
        """Shards written by ``rank``: ``k % world_size == rank``."""
        return list(range(rank, self.num_shards, world_size))


class ShardError(ValueError):
    """A shard file is unreadable, incomplete or does not match (the message names the file)."""


class UnreadableShardError(ShardError):
    """A shard file is unreadable (corrupt, truncated) or holds fewer rows than its layout:
    unfinished work, which a rerun of the generation regenerates."""


def write_shard(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any], metadata_key: str) -> Path:
    """Write one shard atomically: ``.<name>.tmp`` in the same folder, fsync, rename. An OS
    error (a full disk) raises :class:`ShardWriteError` naming the shard, the temp file removed.

    ``tensors`` are stored as they are (moved to the CPU, made contiguous); ``metadata`` is
    any JSON-serialisable dict, stored under ``metadata_key``.
    """
    path = Path(path)
    data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.tmp"
    try:
        save_file(data, str(temp), metadata={metadata_key: json.dumps(metadata, sort_keys=True)})
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # safetensors creates files 0600; shards are shared data
        os.replace(temp, path)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder: one line naming the shard
        temp.unlink(missing_ok=True)
        raise ShardWriteError(f"cannot write shard {path}: {_reason(err)}") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


class ShardWriteError(OSError):
    """A shard could not be written (disk full, folder not writable); the message names the
    shard and the reason. No partial shard is left."""


def _reason(err: Exception) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    # safetensors wraps the OS error: "Error while serializing: IoError(Os { code: 28, ..., message: "No space left on device" })"
    found = re.search(r'message: "([^"]+)"', str(err))
    return found.group(1) if found else str(err)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_shard_header(path: str | Path, metadata_key: str) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """(metadata, {tensor: (shape, safetensors dtype)}) of a shard, reading only its header.

    Raises :class:`ShardError` naming the file if it cannot be read as a shard of this kind.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(metadata_key)
            tensors = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise UnreadableShardError(f"{path}: not a readable safetensors file, corrupt or truncated ({err})") from None
    if raw is None:
        raise ShardError(f"{path}: no '{metadata_key}' metadata; not a shard of this kind")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: metadata is not valid JSON ({err.msg})") from None
    if not isinstance(metadata, dict):
        raise ShardError(f"{path}: metadata is not a JSON object")
    return metadata, tensors


def check_rows(path: Path, metadata: dict) -> None:
    """ShardError naming ``path`` unless its ``shard_index``, ``count`` and ``first_index``
    agree with the file name and the layout (``num_examples``, ``shard_size``)."""
    k = metadata["shard_index"]
    if path.name != f"shard_{k:05d}.safetensors":
        raise ShardError(f"{path}: metadata says shard_index {k}, which does not match the file name")
    layout = ShardLayout(path.parent, metadata["num_examples"], metadata["shard_size"])
    count, expected = metadata["count"], len(layout.examples(k))
    if count != expected or metadata["first_index"] != k * layout.shard_size:
        raise UnreadableShardError(
            f"{path}: incomplete shard: {count} examples from {metadata['first_index']}, expected "
            f"{expected} from {k * layout.shard_size} (num_examples {layout.num_examples}, "
            f"shard_size {layout.shard_size})"
        )


def check_tensors(path: Path, tensors: dict[str, tuple[list[int], str]], expected: dict[str, tuple[list[int], torch.dtype]]) -> None:
    """ShardError naming ``path`` unless it holds exactly the tensors ``expected``
    ({name: (shape, dtype)})."""
    if set(tensors) != set(expected):
        raise ShardError(f"{path}: tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (shape, dtype) in tensors.items():
        want_shape, want_dtype = list(expected[name][0]), SAFETENSORS_DTYPES[expected[name][1]]
        if list(shape) != want_shape or dtype != want_dtype:
            raise ShardError(f"{path}: tensor {name} is {dtype} {list(shape)}, expected {want_dtype} {want_shape}")


def metadata_differences(found: dict, expected: dict) -> list[str]:
    """``"key: found != expected"`` for each key of ``expected`` whose value differs."""
    return [
        f"{key}: {found.get(key)!r} != {value!r}"
        for key, value in expected.items()
        if found.get(key) != value
    ]


def finished_shards(layout: ShardLayout, expected: dict, read_checked_header: Callable[[Path], dict]) -> set[int]:
    """Shards of ``layout`` already written, after checking each one (``read_checked_header(path)``,
    the format's reader, raises ShardError). A shard that is unreadable or incomplete
    (:class:`UnreadableShardError`: truncated, corrupt) is unfinished work like a missing one:
    a warning names it and it is left out, so the rerun regenerates it (the atomic write
    replaces it). ShardError naming the file when a shard is otherwise malformed or was made
    with other settings (a key of ``expected`` differs)."""
    done = set()
    for k in range(layout.num_shards):
        path = layout.path(k)
        if not path.is_file():
            continue
        try:
            metadata = read_checked_header(path)
        except UnreadableShardError as err:
            warnings.warn(f"{err}; regenerating it", stacklevel=2)
            continue
        differences = metadata_differences(metadata, expected)
        if differences:
            raise ShardError(
                f"{path}: this finished shard was generated with other settings "
                f"({'; '.join(differences)}); use another output folder or delete the old shards"
            )
        done.add(k)
    return done


def remove_temp_files(layout: ShardLayout, shards: list[int]) -> None:
    """Remove stale temp files of ``shards`` (left by a killed run)."""
    for k in shards:
        layout.temp_path(k).unlink(missing_ok=True)




def open_split(folder: Path, read_checked_header: Callable[[Path], dict], per_shard_keys: Callable[[dict], tuple],
               what: str) -> tuple[dict, ShardLayout]:
    """(the common metadata, the layout) of a complete split folder of shards of kind
    ``what``: every header checked (``read_checked_header``), the metadata other than
    ``per_shard_keys(metadata)`` equal across shards, every shard present. ShardError naming
    the file or folder otherwise."""
    files = sorted(p for p in folder.glob("shard_*.safetensors") if SHARD_PATTERN.fullmatch(p.name))
    if not files:
        raise ShardError(f"{folder}: no {what} shards (shard_*.safetensors); run distill-pl predict first")
    common: dict = {}
    for path in files:
        metadata = read_checked_header(path)
        shared = {key: value for key, value in metadata.items() if key not in per_shard_keys(metadata)}
        if not common:
            common = shared
            continue
        differences = metadata_differences(shared, common) + [
            f"{key}: {value!r} != (absent)" for key, value in shared.items() if key not in common
        ]
        if differences:
            raise ShardError(f"{path}: metadata differs from {files[0].name} ({'; '.join(differences)})")
    layout = ShardLayout(folder, common["num_examples"], common["shard_size"])
    present = set(files)
    missing = [layout.path(k).name for k in range(layout.num_shards) if layout.path(k) not in present]
    if missing:
        raise ShardError(
            f"{folder}: incomplete {what}, missing {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} of {layout.num_shards} shards; "
            "rerun distill-pl predict to finish them"
        )
    return common, layout
