"""KD pairs on disk: the shard format, atomic shard writing, and lazy reading with validation.

A KD pair is the teacher's N-step CFG output for one noise and one conditioning. Pairs live in
``<pairs_dir>/<split>/shard_{k:05d}.safetensors`` (split ``train`` or ``val``). Shard ``k`` of a
split holds examples ``[k * shard_size, min((k + 1) * shard_size, num_examples))`` in order,
so a shard's content depends only on its index, never on how generation was scheduled.

Format version 1 (S = rows of the shard, C/T'/H'/W' = the denoiser's space: VAE latents, or the
pixels themselves for a pixel-space teacher):

=================  ===========================  =========================================
tensor             shape, dtype                 meaning
=================  ===========================  =========================================
``noise``          [S, C, T', H', W'] float32   unit Gaussian noise, the student's input
``teacher_output`` [S, C, T', H', W'] float32   teacher's N-step CFG sample from ``noise``
``control``        [S, 3, T, H, W] float32      control video, pixels (canny: -1 / +1)
``video``          [S, 3, T, H, W] float32      the real clip the caption/control came from
``text_embeds``    [S, L, D] float32            prompt embedding, zero at padding
``text_mask``      [S, L] bool                  True at real tokens
``seed``           [S] int64                    seed of the example's noise
``index``          [S] int64                    example index within the split
``start``          [S] int64                    first frame of the clip in its video
``negative_...``   [1, L, D] f32, [1, L] bool   ``negative_text_embeds`` / ``_mask``: the
                                                negative prompt of the teacher's CFG
=================  ===========================  =========================================

Metadata: a single safetensors metadata entry :data:`METADATA_KEY` holding a JSON object
(one entry, serialised with sorted keys, so equal shards are equal bytes):

- per shard: ``shard_index``, ``count`` (= S), ``first_index``, ``captions`` and ``paths``
  (lists of S strings: the prompt and the source video of every row);
- common to every shard of a split: ``format_version``, ``split``, ``num_examples``,
  ``shard_size``; the teacher: ``teacher`` (absolute folder path), ``teacher_sha256`` (see
  :func:`teacher_fingerprint`), ``teacher_dtype``, ``vae_path`` (None = pixel space),
  ``scheduler`` (diffusers class name), ``scheduler_shift``, ``num_steps``, ``guidance`` (common
  form ``u + w (c - u)``; Cosmos' ``g`` is ``w - 1``), ``guidance_form``, ``negative_prompt``,
  ``seed`` (base noise seed, see :func:`example_seed`), ``denoiser_options`` (the teacher
  adapter's own options, e.g. a ControlNet's ``control_scale``); shapes without the batch dimension:
  ``latent_shape`` [C, T', H', W'], ``video_shape`` [3, T, H, W], ``text_shape`` [L, D]; the
  clip settings ``manifest`` (None = bundled clips), ``num_frames``, ``frame_stride``,
  ``height``, ``width``, ``val_fraction``, ``val_clips_per_video``, ``canny_low``,
  ``canny_high``, ``text_encoder``, ``max_text_length``, ``data_seed`` (train windows).

Writing is atomic: a shard is written to ``.shard_{k:05d}.safetensors.tmp`` in the same folder,
flushed to disk and renamed over the final name, so a killed run leaves finished shards and at
most a stale temp file (removed by the next run), never a partial shard.

Reading (:class:`PairShardDataset`) validates every shard header at construction, keeps only
file names and the common metadata, and reads one row per item with ``safe_open`` slices
(memory-mapped, no whole-shard loads), so memory stays flat as the data set grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from distill_pl.paths import resolve_path

FORMAT_VERSION = 1
#: the safetensors metadata entry that holds the JSON metadata
METADATA_KEY = "distill_pl.kd_pairs"
SPLITS = ("train", "val")
SHARD_PATTERN = re.compile(r"shard_(\d{5,})\.safetensors")

#: tensors of a shard and their dtypes
TENSOR_DTYPES: dict[str, torch.dtype] = {
    "noise": torch.float32,
    "teacher_output": torch.float32,
    "control": torch.float32,
    "video": torch.float32,
    "text_embeds": torch.float32,
    "text_mask": torch.bool,
    "seed": torch.int64,
    "index": torch.int64,
    "start": torch.int64,
    "negative_text_embeds": torch.float32,
    "negative_text_mask": torch.bool,
}
#: tensors with one row per example (the others have a single row)
EXAMPLE_TENSORS = ("noise", "teacher_output", "control", "video", "text_embeds", "text_mask", "seed", "index", "start")
#: metadata that differs from shard to shard; every other key is common to a split
PER_SHARD_KEYS = ("shard_index", "count", "first_index", "captions", "paths")
#: metadata every shard must have
REQUIRED_KEYS = (
    "format_version", "split", "num_examples", "shard_size", "teacher", "teacher_sha256",
    "num_steps", "guidance", "scheduler", "seed", "latent_shape", "video_shape", "text_shape",
    *PER_SHARD_KEYS,
)
#: seeds of val examples start here, so they never repeat a train example's noise
VAL_SEED_OFFSET = 1_000_000_000


def example_seed(seed: int, split: str, index: int) -> int:
    """Seed of the noise of example ``index``: ``seed + index`` (train), shifted by
    :data:`VAL_SEED_OFFSET` for val. The noise is ``torch.randn(shape,
    generator=torch.Generator().manual_seed(example_seed(...)))`` on the CPU."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return seed + index + (VAL_SEED_OFFSET if split == "val" else 0)


def teacher_fingerprint(teacher: str | Path) -> str:
    """sha256 of a teacher folder's content: the transformer's ``*.json`` and ``*.safetensors``
    files and the scheduler config (names and bytes). Equal content, equal fingerprint."""
    from distill_pl.models.families.registry import transformer_folder

    root = resolve_path(teacher)
    transformer = transformer_folder(root)
    files = sorted(p for p in transformer.iterdir() if p.suffix in (".json", ".safetensors"))
    files += [p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
              if p.is_file()][:1]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


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


def write_shard(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write one shard atomically: ``.<name>.tmp`` in the same folder, fsync, rename.

    ``tensors`` must be exactly :data:`TENSOR_DTYPES` (cast to those dtypes, made
    contiguous); ``metadata`` is any JSON-serialisable dict, stored under :data:`METADATA_KEY`.
    """
    path = Path(path)
    if set(tensors) != set(TENSOR_DTYPES):
        raise ValueError(f"{path}: shard tensors must be {sorted(TENSOR_DTYPES)}, got {sorted(tensors)}")
    data = {name: t.detach().to("cpu", TENSOR_DTYPES[name]).contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.tmp"
    try:
        save_file(data, str(temp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # safetensors creates files 0600; shards are shared data
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_shard_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """(metadata, {tensor: (shape, safetensors dtype)}) of a shard, reading only its header.

    Raises :class:`ShardError` naming the file if it cannot be read as a shard.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ShardError(f"{path}: not a readable safetensors file, corrupt or truncated ({err})") from None
    if raw is None:
        raise ShardError(f"{path}: no '{METADATA_KEY}' metadata; not a KD pair shard")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: metadata is not valid JSON ({err.msg})") from None
    if not isinstance(metadata, dict):
        raise ShardError(f"{path}: metadata is not a JSON object")
    return metadata, tensors


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bool: "BOOL", torch.int64: "I64"}


def check_shard(path: Path, metadata: dict, tensors: dict[str, tuple[list[int], str]]) -> None:
    """Check that a shard header is complete and self-consistent (ShardError naming ``path``)."""
    try:
        _check_shard(path, metadata, tensors)
    except ShardError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ShardError(f"{path}: malformed metadata ({type(err).__name__}: {err})") from None


def _check_shard(path: Path, metadata: dict, tensors: dict[str, tuple[list[int], str]]) -> None:
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ShardError(f"{path}: metadata lacks {missing}")
    k = metadata["shard_index"]
    if path.name != f"shard_{k:05d}.safetensors":
        raise ShardError(f"{path}: metadata says shard_index {k}, which does not match the file name")
    layout = ShardLayout(path.parent, metadata["num_examples"], metadata["shard_size"])
    count, expected = metadata["count"], len(layout.examples(k))
    if count != expected or metadata["first_index"] != k * layout.shard_size:
        raise ShardError(
            f"{path}: incomplete shard: {count} examples from {metadata['first_index']}, expected "
            f"{expected} from {k * layout.shard_size} (num_examples {layout.num_examples}, "
            f"shard_size {layout.shard_size})"
        )
    if len(metadata["captions"]) != count or len(metadata["paths"]) != count:
        raise ShardError(f"{path}: captions/paths do not have {count} entries")
    if set(tensors) != set(TENSOR_DTYPES):
        raise ShardError(f"{path}: tensors {sorted(tensors)}, expected {sorted(TENSOR_DTYPES)}")
    length = metadata["text_shape"][0]
    shapes = {
        "noise": metadata["latent_shape"], "teacher_output": metadata["latent_shape"],
        "control": metadata["video_shape"], "video": metadata["video_shape"],
        "text_embeds": metadata["text_shape"], "text_mask": [length],
        "seed": [], "index": [], "start": [],
        "negative_text_embeds": metadata["text_shape"], "negative_text_mask": [length],
    }
    for name, (shape, dtype) in tensors.items():
        rows = count if name in EXAMPLE_TENSORS else 1
        want_shape, want_dtype = [rows, *shapes[name]], _SAFETENSORS_DTYPES[TENSOR_DTYPES[name]]
        if list(shape) != want_shape or dtype != want_dtype:
            raise ShardError(f"{path}: tensor {name} is {dtype} {list(shape)}, expected {want_dtype} {want_shape}")


def common_metadata(metadata: dict) -> dict:
    """The keys of a shard's metadata shared by all shards of its split."""
    return {key: value for key, value in metadata.items() if key not in PER_SHARD_KEYS}


def metadata_differences(found: dict, expected: dict) -> list[str]:
    """``"key: found != expected"`` for each key of ``expected`` whose value differs."""
    return [
        f"{key}: {found.get(key)!r} != {value!r}"
        for key, value in expected.items()
        if found.get(key) != value
    ]


def finished_shards(layout: ShardLayout, expected: dict) -> set[int]:
    """Shards of ``layout`` already written, after checking each one: ShardError naming the
    file when a shard is unreadable, incomplete, or was made with other settings (a key of
    ``expected`` differs)."""
    done = set()
    for k in range(layout.num_shards):
        path = layout.path(k)
        if not path.is_file():
            continue
        metadata, tensors = read_shard_header(path)
        check_shard(path, metadata, tensors)
        differences = metadata_differences(metadata, expected)
        if differences:
            raise ShardError(
                f"{path}: this finished shard was generated with other settings "
                f"({'; '.join(differences)}); use another pairs_dir or delete the old shards"
            )
        done.add(k)
    return done


def remove_temp_files(layout: ShardLayout, shards: list[int]) -> None:
    """Remove stale temp files of ``shards`` (left by a killed run)."""
    for k in shards:
        layout.temp_path(k).unlink(missing_ok=True)


class PairShardDataset(Dataset):
    """The KD pairs of one split folder (``<pairs_dir>/<split>``), read lazily.

    At construction every ``shard_*.safetensors`` header is read and checked: readable,
    complete (``count`` rows, all of ``0..num_shards-1`` present), tensors of the shapes its
    metadata states, and common metadata equal across shards. Any problem raises a
    :class:`ShardError` (a ValueError) naming the file. Only file names and the common
    metadata are kept; items are read row by row with ``safe_open``.

    Items: ``noise`` and ``teacher_output`` [C, T', H', W'] float32, ``control`` and ``video``
    [3, T, H, W] float32 (pixels in [-1, 1]), ``text_embeds`` [L, D] float32, ``text_mask`` [L]
    bool, ``caption`` str, ``seed`` int, ``index`` int.

    Attributes: ``metadata`` (the common metadata, see the module docstring), ``files``
    (shard paths in order), ``shard_size``.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(p for p in self.folder.glob("shard_*.safetensors") if SHARD_PATTERN.fullmatch(p.name))
        if not files:
            raise ShardError(f"{self.folder}: no KD pair shards (shard_*.safetensors); run distill-pl predict first")
        self.metadata: dict = {}
        first = files[0]
        for path in files:
            metadata, tensors = read_shard_header(path)
            check_shard(path, metadata, tensors)
            common = common_metadata(metadata)
            if not self.metadata:
                self.metadata = common
                continue
            differences = metadata_differences(common, self.metadata) + [
                f"{key}: {value!r} != (absent)" for key, value in common.items() if key not in self.metadata
            ]
            if differences:
                raise ShardError(f"{path}: metadata differs from {first.name} ({'; '.join(differences)})")
        layout = ShardLayout(self.folder, self.metadata["num_examples"], self.metadata["shard_size"])
        present = set(files)
        missing = [layout.path(k).name for k in range(layout.num_shards) if layout.path(k) not in present]
        if missing:
            raise ShardError(
                f"{self.folder}: incomplete KD pairs, missing {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''} of {layout.num_shards} shards; "
                "rerun distill-pl predict to finish them"
            )
        self.files = [str(layout.path(k)) for k in range(layout.num_shards)]
        self.shard_size = layout.shard_size
        self._len = layout.num_examples

    def __len__(self) -> int:
        return self._len

    def negative_prompt_embedding(self) -> tuple[Tensor, Tensor]:
        """The teacher's negative-prompt embedding: embeds [1, L, D] float32, mask [1, L] bool."""
        path = self.files[0]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor("negative_text_embeds"), f.get_tensor("negative_text_mask")
        except Exception as err:
            raise ShardError(f"{path}: cannot read the negative prompt embedding ({err})") from None

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} KD pairs")
        path, row = self.files[index // self.shard_size], index % self.shard_size
        try:
            with safe_open(path, framework="pt") as f:
                item = {name: f.get_slice(name)[row] for name in EXAMPLE_TENSORS}
                caption = json.loads(f.metadata()[METADATA_KEY])["captions"][row]
        except Exception as err:
            raise ShardError(f"{path}: cannot read row {row} ({err})") from None
        if int(item["index"]) != index:
            raise ShardError(f"{path}: row {row} holds example {int(item['index'])}, expected {index}")
        return {
            "noise": item["noise"],
            "teacher_output": item["teacher_output"],
            "control": item["control"],
            "video": item["video"],
            "text_embeds": item["text_embeds"],
            "text_mask": item["text_mask"],
            "caption": caption,
            "seed": int(item["seed"]),
            "index": int(item["index"]),
        }
