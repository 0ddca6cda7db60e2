"""KD pairs on disk: the shard format, its writing and lazy reading with validation.

A KD pair is the teacher's N-step CFG output for one noise and one conditioning. Pairs live in
``<pairs_dir>/<split>/shard_{k:05d}.safetensors`` (split ``train`` or ``val``), laid out,
written and read as :mod:`distill_pl.data.shards` describes (atomic, deterministic: shard ``k``
holds examples ``[k * shard_size, (k + 1) * shard_size)``, equal inputs give equal bytes).

Format version 2 (written; S = rows of the shard, P = distinct prompts of the shard, K = levels
of ``trajectory_sigmas``, C/T'/H'/W' = the denoiser's space: VAE latents, or the pixels
themselves for a pixel-space teacher; ``<storage>`` = ``storage_dtype``, bfloat16 by default):

======================  ==============================  =====================================
tensor                  shape, dtype                    meaning
======================  ==============================  =====================================
``teacher_output``      [S, C, T', H', W'] <storage>    teacher's N-step CFG sample
``teacher_trajectory``  [S, K, C, T', H', W'] <storage> teacher's noisy state x at its first
                                                        step with sigma <= each level (only
                                                        when ``trajectory_sigmas`` is set)
``trajectory_sigmas``   [S, K] float32                  the sigma of each stored state
``num_cond_frames``     [S] int64                       leading latent frames of the clip the
                                                        teacher was given as conditional frames
                                                        (only when
                                                        ``conditional_frame_probabilities`` is set)
``text_index``          [S] int64                       row of the example's prompt in the table
``text_table_embeds``   [P, L, D] <storage>             prompt embeddings, zero at padding
``text_table_mask``     [P, L] bool                     True at real tokens
``seed``                [S] int64                       seed of the example's noise
``index``               [S] int64                       example index within the split
``start``               [S] int64                       first frame of the clip in its video
``negative_...``        [1, L, D] f32, [1, L] bool      ``negative_text_embeds`` / ``_mask``:
                                                        the negative prompt of the CFG
======================  ==============================  =====================================

Not stored: the noise, regenerated from ``seed`` (:func:`example_noise`) and checked against the
row's ``noise_sha256`` (:func:`noise_fingerprint`); the clip and its control, stored by
reference (video path, ``start`` and the clip settings below; with ``control: video`` also
the control video's path; with ``control: clip`` the conditioning image the manifest named,
if any) and re-derived at read time (:mod:`distill_pl.data.clip_reference`), after checking
each referenced file's ``video_sha256``.

Metadata (JSON under :data:`METADATA_KEY`):

- per shard: ``shard_index``, ``count`` (= S), ``first_index``, ``captions`` and ``paths``
  (lists of S strings: the prompt and the source video of every row), ``noise_sha256`` (S hex
  digests), ``text_prompts`` (the P prompts of the table rows), ``video_sha256`` ({path: sha256}
  of every referenced file, control videos and conditioning images included); with ``control:
  video`` also ``control_paths`` (S strings: the control video of every row); with ``control:
  clip`` and a manifest that names conditioning images also ``image_paths`` (S strings: the
  image of every row, "" for a row whose image is its clip's first frame);
- common to every shard of a split: ``format_version``, ``split``, ``num_examples``,
  ``shard_size``, ``storage_dtype``, ``trajectory_sigmas`` (the requested levels, [] = none);
  the teacher: ``teacher`` (absolute folder path), ``teacher_sha256`` (see
  :func:`teacher_fingerprint`), ``teacher_dtype``, ``vae_path`` (None = pixel space),
  ``scheduler`` (diffusers class name), ``scheduler_shift``, ``num_steps``, ``guidance`` (common
  form ``u + w (c - u)``; Cosmos' ``g`` is ``w - 1``), ``guidance_2`` (a two-expert teacher's
  weight at its low-noise expert's levels; absent = ``guidance`` there), ``guidance_form``, ``negative_prompt``,
  ``seed`` (base noise seed, see :func:`example_seed`), ``denoiser_options`` (the teacher
  adapter's own options, e.g. a ControlNet's ``control_scale``), ``conditional_frame_probabilities``
  (how often 0, 1, ... conditional frames were drawn; [] or absent = none); shapes without the batch
  dimension: ``latent_shape`` [C, T', H', W'], ``video_shape`` [3, T, H, W], ``text_shape`` [L, D]; the
  clip settings ``manifest`` (None = bundled clips), ``num_frames``, ``frame_stride``,
  ``height``, ``width``, ``val_fraction``, ``val_clips_per_video``, ``canny_low``,
  ``canny_high``, ``control`` and ``control_key`` (absent for edge controls, see
  :meth:`~distill_pl.data.controls.ControlSettings.metadata`), ``text_encoder``,
  ``max_text_length``, ``data_seed`` (train windows).

Format version 1 (still read): float32 ``noise``, ``teacher_output`` [S, C, T', H', W'],
``control`` and ``video`` [S, 3, T, H, W] pixels, ``text_embeds`` [S, L, D], ``text_mask``
[S, L], plus ``seed``, ``index``, ``start`` and the negative prompt as above; no
``noise_sha256``, ``text_prompts``, ``video_sha256``, ``storage_dtype`` or trajectory.

Reading (:class:`PairShardDataset`) validates every shard header at construction, keeps only
file names and the common metadata, and reads one row per item with ``safe_open`` slices
(memory-mapped, no whole-shard loads), so memory stays flat as the data set grows.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from distill_pl.data import shards
from distill_pl.data.clip_reference import ClipSettings, ReferencedClips
from distill_pl.data.shards import (
    ShardError,
    ShardLayout,
    check_rows,
    check_tensors,
    metadata_differences,
    open_split,
    remove_temp_files,
    storage_dtype,
)
from distill_pl.util.hashing import file_sha256, named_files_sha256
from distill_pl.util.paths import resolve_path

__all__ = [
    "FORMAT_VERSION", "METADATA_KEY", "SPLITS", "PairRowDecoder", "PairShardDataset", "ShardError", "ShardLayout",
    "build_pair_shard", "check_shard", "example_noise", "example_seed", "finished_shards",
    "metadata_differences", "noise_fingerprint", "read_shard_header", "remove_temp_files",
    "teacher_fingerprint", "write_shard",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: the safetensors metadata entry that holds the JSON metadata
METADATA_KEY = "distill_pl.kd_pairs"
SPLITS = ("train", "val")

#: version 1: tensors and their dtypes
V1_TENSOR_DTYPES: dict[str, torch.dtype] = {
    "noise": torch.float32, "teacher_output": torch.float32, "control": torch.float32,
    "video": torch.float32, "text_embeds": torch.float32, "text_mask": torch.bool,
    "seed": torch.int64, "index": torch.int64, "start": torch.int64,
    "negative_text_embeds": torch.float32, "negative_text_mask": torch.bool,
}
#: version 1: tensors with one row per example (the others have a single row)
V1_EXAMPLE_TENSORS = ("noise", "teacher_output", "control", "video", "text_embeds", "text_mask", "seed", "index", "start")
#: metadata that differs from shard to shard, per version; every other key is common to a split
PER_SHARD_KEYS = {
    1: ("shard_index", "count", "first_index", "captions", "paths"),
    2: ("shard_index", "count", "first_index", "captions", "paths", "noise_sha256", "text_prompts", "video_sha256"),
}
#: per-shard metadata of some shards only: ``control_paths`` (``control: video``),
#: ``image_paths`` (``control: clip`` with conditioning images named in the manifest)
OPTIONAL_PER_SHARD_KEYS = ("control_paths", "image_paths")
#: metadata every shard must have
REQUIRED_KEYS = (
    "format_version", "split", "num_examples", "shard_size", "teacher", "teacher_sha256",
    "num_steps", "guidance", "scheduler", "seed", "latent_shape", "video_shape", "text_shape",
)
V2_REQUIRED_KEYS = ("storage_dtype", "trajectory_sigmas", "num_frames", "frame_stride", "height", "width",
                    "canny_low", "canny_high")
#: seeds of val examples start here, so they never repeat a train example's noise
VAL_SEED_OFFSET = 1_000_000_000


def example_seed(seed: int, split: str, index: int) -> int:
    """Seed of the noise of example ``index``: ``seed + index`` (train), shifted by
    :data:`VAL_SEED_OFFSET` for val (see :func:`example_noise`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return seed + index + (VAL_SEED_OFFSET if split == "val" else 0)


def example_noise(seed: int, shape: tuple[int, ...] | list[int]) -> Tensor:
    """The unit Gaussian noise [*shape] float32 of the example with seed ``seed``
    (:func:`example_seed`): ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``
    on the CPU, whatever the device the teacher runs on."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def noise_fingerprint(noise: Tensor) -> str:
    """sha256 hex digest of a float32 noise tensor's bytes (C order)."""
    return hashlib.sha256(noise.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def teacher_fingerprint(teacher: str | Path) -> str:
    """sha256 of a teacher folder's content: the transformer's ``*.json`` and ``*.safetensors``
    files and the scheduler config (names and bytes). Equal content, equal fingerprint."""
    from distill_pl.families.registry import transformer_folder

    root = resolve_path(teacher)
    transformer = transformer_folder(root)
    files = sorted(p for p in transformer.iterdir() if p.suffix in (".json", ".safetensors"))
    files += [p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
              if p.is_file()][:1]
    return named_files_sha256((str(file.relative_to(root)), file) for file in files)


def write_shard(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write one KD pair shard atomically (see :func:`distill_pl.data.shards.write_shard`)."""
    return shards.write_shard(path, tensors, metadata, METADATA_KEY)


def read_shard_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """(metadata, {tensor: (shape, safetensors dtype)}) of a KD pair shard (header only)."""
    return shards.read_shard_header(path, METADATA_KEY)


def read_checked_header(path: Path) -> dict:
    """The metadata of a shard whose header passed :func:`check_shard`."""
    metadata, tensors = read_shard_header(path)
    check_shard(path, metadata, tensors)
    return metadata


def finished_shards(layout: ShardLayout, expected: dict) -> set[int]:
    """Finished KD pair shards of ``layout`` (see :func:`distill_pl.data.shards.finished_shards`)."""
    return shards.finished_shards(layout, expected, read_checked_header)


class _VideoDigests:
    """sha256 of each video file, computed once per (path, size, modification time)."""

    def __init__(self) -> None:
        self._digests: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str) -> str:
        stat = Path(path).stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]


video_digests = _VideoDigests()


def prompt_table(rows: list[dict[str, Any]], dtype: torch.dtype) -> tuple[list[str], dict[str, Tensor]]:
    """(the distinct prompts in order of first use, {``text_index`` [S] int64,
    ``text_table_embeds`` [P, L, D] ``dtype``, ``text_table_mask`` [P, L] bool}) of rows with
    ``caption``, ``text_embeds`` [L, D] and ``text_mask`` [L]."""
    prompts = list(dict.fromkeys(row["caption"] for row in rows))
    first_row = {p: next(row for row in rows if row["caption"] == p) for p in prompts}
    return prompts, {
        "text_index": torch.tensor([prompts.index(row["caption"]) for row in rows], dtype=torch.int64),
        "text_table_embeds": torch.stack([first_row[p]["text_embeds"] for p in prompts]).to(dtype),
        "text_table_mask": torch.stack([first_row[p]["text_mask"] for p in prompts]).bool(),
    }


def build_pair_shard(
    rows: list[dict[str, Any]], common: dict, negative: tuple[Tensor, Tensor]
) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a version 2 shard (without the per-shard ``shard_index``,
    ``count`` and ``first_index``, which the writer adds).

    ``rows``: one dict per example, in index order, with ``teacher_output`` [C, T', H', W'],
    ``text_embeds`` [L, D], ``text_mask`` [L], ``seed``, ``index``, ``start`` (0-dim), the
    noise's ``noise_sha256``, ``caption`` and ``path`` (with ``control: video`` also
    ``control_path``, the row's control video; with ``control: clip`` also ``image_path``, the
    row's conditioning image or ""); with trajectory levels also
    ``teacher_trajectory`` [K, C, T', H', W'] and ``trajectory_sigmas`` [K]; with
    ``conditional_frame_probabilities`` also ``num_cond_frames`` (0-dim). ``common``: the
    common metadata (``storage_dtype``, ``trajectory_sigmas``, ...). ``negative``: the
    negative-prompt embeds [1, L, D] and mask [1, L].
    """
    dtype = storage_dtype(common["storage_dtype"])
    prompts, table = prompt_table(rows, dtype)
    tensors = {
        "teacher_output": torch.stack([row["teacher_output"] for row in rows]).to(dtype),
        **table,
        **{key: torch.stack([torch.as_tensor(row[key]) for row in rows]).long() for key in ("seed", "index", "start")},
        "negative_text_embeds": negative[0].float(),
        "negative_text_mask": negative[1].bool(),
    }
    if common["trajectory_sigmas"]:
        tensors["teacher_trajectory"] = torch.stack([row["teacher_trajectory"] for row in rows]).to(dtype)
        tensors["trajectory_sigmas"] = torch.stack([row["trajectory_sigmas"] for row in rows]).float()
    if common.get("conditional_frame_probabilities"):
        tensors["num_cond_frames"] = torch.stack([torch.as_tensor(row["num_cond_frames"]) for row in rows]).long()
    paths = [row["path"] for row in rows]
    control_paths = [row["control_path"] for row in rows] if "control_path" in rows[0] else []
    image_paths = [row.get("image_path", "") for row in rows]
    if not any(image_paths):  # no row names an image: the shard is written as before images existed
        image_paths = []
    metadata = {
        **common,
        "format_version": FORMAT_VERSION,
        "latent_shape": list(tensors["teacher_output"].shape[1:]),
        "text_shape": list(tensors["text_table_embeds"].shape[1:]),
        "captions": [row["caption"] for row in rows],
        "paths": paths,
        "noise_sha256": [row["noise_sha256"] for row in rows],
        "text_prompts": prompts,
        "video_sha256": {path: video_digests(path)
                         for path in dict.fromkeys(paths + control_paths + [p for p in image_paths if p])},
        **({"control_paths": control_paths} if control_paths else {}),
        **({"image_paths": image_paths} if image_paths else {}),
    }
    return tensors, metadata


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
    if version not in READABLE_VERSIONS:
        raise ShardError(f"{path}: format version {version!r}, this code reads versions {list(READABLE_VERSIONS)}")
    required = (*REQUIRED_KEYS, *PER_SHARD_KEYS[version], *(V2_REQUIRED_KEYS if version == 2 else ()))
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ShardError(f"{path}: metadata lacks {missing}")
    check_rows(path, metadata)
    count = metadata["count"]
    lists = ("captions", "paths") + (("noise_sha256",) if version == 2 else ())
    if any(len(metadata[key]) != count for key in lists):
        raise ShardError(f"{path}: {'/'.join(lists)} do not have {count} entries")
    latent, video, (length, dim) = metadata["latent_shape"], metadata["video_shape"], metadata["text_shape"]
    negative = {"negative_text_embeds": ([1, length, dim], torch.float32),
                "negative_text_mask": ([1, length], torch.bool)}
    rows = {key: ([count], torch.int64) for key in ("seed", "index", "start")}
    if version == 1:
        expected = {
            "noise": ([count, *latent], torch.float32), "teacher_output": ([count, *latent], torch.float32),
            "control": ([count, *video], torch.float32), "video": ([count, *video], torch.float32),
            "text_embeds": ([count, length, dim], torch.float32), "text_mask": ([count, length], torch.bool),
            **rows, **negative,
        }
    else:
        control_paths = metadata.get("control_paths", [])
        if metadata.get("control") == "video" and len(control_paths) != count:
            raise ShardError(f"{path}: control: video, but control_paths does not have {count} entries")
        image_paths = metadata.get("image_paths", [])
        if image_paths and len(image_paths) != count:
            raise ShardError(f"{path}: image_paths does not have {count} entries")
        referenced = metadata["paths"] + control_paths + [p for p in image_paths if p]
        missing = sorted(set(referenced) - set(metadata["video_sha256"]))
        if missing:
            raise ShardError(f"{path}: video_sha256 lacks the referenced videos {missing[:3]}")
        dtype, prompts = storage_dtype(metadata["storage_dtype"]), len(metadata["text_prompts"])
        expected = {
            "teacher_output": ([count, *latent], dtype), "text_index": ([count], torch.int64),
            "text_table_embeds": ([prompts, length, dim], dtype), "text_table_mask": ([prompts, length], torch.bool),
            **rows, **negative,
        }
        levels = len(metadata["trajectory_sigmas"])
        if levels:
            expected["teacher_trajectory"] = ([count, levels, *latent], dtype)
            expected["trajectory_sigmas"] = ([count, levels], torch.float32)
        if metadata.get("conditional_frame_probabilities"):
            expected["num_cond_frames"] = ([count], torch.int64)
    check_tensors(path, tensors, expected)


class PairShardDataset(Dataset):
    """The KD pairs of one split folder (``<pairs_dir>/<split>``), read lazily.

    At construction every ``shard_*.safetensors`` header is read and checked: readable,
    complete (``count`` rows, all of ``0..num_shards-1`` present), tensors of the shapes its
    metadata states, and common metadata equal across shards. Any problem raises a
    :class:`ShardError` (a ValueError) naming the file. Only file names and the common
    metadata are kept; items are read row by row with ``safe_open``.

    Items (both versions): ``noise`` and ``teacher_output`` [C, T', H', W'] float32,
    ``control`` and ``video`` [3, T, H, W] float32 (pixels in [-1, 1]), ``text_embeds`` [L, D]
    float32, ``text_mask`` [L] bool, ``caption`` str, ``seed`` int, ``index`` int; with a
    trajectory also ``teacher_trajectory`` [K, C, T', H', W'] and ``trajectory_sigmas`` [K]
    float32. Version 2 regenerates the noise from the seed and re-derives the clip and its
    control from the referenced video: a noise that does not match its stored hash, or a video
    whose content changed, raises a ShardError naming the shard or the video.

    ``cache_frames``: keep each referenced video decoded at the clip size in memory (see
    :class:`~distill_pl.data.clip_reference.ReferencedClips`; small videos only).

    Attributes: ``metadata`` (the common metadata, see the module docstring), ``files``
    (shard paths in order), ``shard_size``.
    """

    def __init__(self, folder: str | Path, cache_frames: bool = False):
        self.folder = Path(folder)
        per_shard = lambda m: (*PER_SHARD_KEYS[m["format_version"]], *OPTIONAL_PER_SHARD_KEYS)  # noqa: E731
        self.metadata, layout = open_split(self.folder, read_checked_header, per_shard, "KD pair")
        self.files = [str(layout.path(k)) for k in range(layout.num_shards)]
        self.shard_size = layout.shard_size
        self.version = self.metadata["format_version"]
        self._len = layout.num_examples
        self.decoder = PairRowDecoder(self.metadata, cache_frames=cache_frames)

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
        return self.decoder(self.stored_row(index), where=self.files[index // self.shard_size])

    def stored_row(self, index: int) -> dict:
        """Example ``index`` as its shard stores it, the input of :class:`PairRowDecoder`:
        the row's tensors in their stored dtypes (version 2: ``teacher_output``,
        ``text_embeds`` / ``text_mask`` (its table row), ``seed``, ``index``, ``start``, the
        trajectory if any; version 1: the tensors of :data:`V1_EXAMPLE_TENSORS` but
        ``start``), ``caption`` and, for version 2, ``path``, ``noise_sha256`` and
        ``video_sha256`` (the digest of that video), with ``control: video`` also
        ``control_path`` and ``control_sha256``, with conditioning images also ``image_path``
        and ``image_sha256`` ("" for a row without one). A row holding non-finite values warns,
        naming the shard file, the row and the tensors."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} KD pairs")
        path, row = self.files[index // self.shard_size], index % self.shard_size
        read = self._read_v1 if self.version == 1 else self._read_v2
        try:
            with safe_open(path, framework="pt") as f:
                stored, metadata = read(f, row), json.loads(f.metadata()[METADATA_KEY])
        except Exception as err:
            raise ShardError(f"{path}: cannot read row {row} ({err})") from None
        if int(stored["index"]) != index:
            raise ShardError(f"{path}: row {row} holds example {int(stored['index'])}, expected {index}")
        nonfinite = [name for name, value in stored.items()
                     if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if nonfinite:  # the KD step on it is skipped (non-finite loss); say where the bad values are
            warnings.warn(f"{path}: row {row} (example {index}) holds non-finite values in "
                          f"{', '.join(sorted(nonfinite))}; a training step on it will be skipped", stacklevel=2)
        stored["caption"] = metadata["captions"][row]
        if self.version == 2:
            video_path = metadata["paths"][row]
            stored.update(path=video_path, noise_sha256=metadata["noise_sha256"][row],
                          video_sha256=metadata["video_sha256"][video_path])
            if "control_paths" in metadata:
                control_path = metadata["control_paths"][row]
                stored.update(control_path=control_path, control_sha256=metadata["video_sha256"][control_path])
            if "image_paths" in metadata:
                image_path = metadata["image_paths"][row]
                stored.update(image_path=image_path, image_sha256=metadata["video_sha256"].get(image_path, ""))
        return stored

    @staticmethod
    def _read_v1(f, row: int) -> dict:
        item = {name: f.get_slice(name)[row] for name in V1_EXAMPLE_TENSORS}
        del item["start"]
        return item

    @staticmethod
    def _read_v2(f, row: int) -> dict:
        table_row = int(f.get_slice("text_index")[row])
        item = {
            "teacher_output": f.get_slice("teacher_output")[row],
            "text_embeds": f.get_slice("text_table_embeds")[table_row],
            "text_mask": f.get_slice("text_table_mask")[table_row],
            **{key: f.get_slice(key)[row] for key in ("seed", "index", "start")},
        }
        if "teacher_trajectory" in f.keys():
            item["teacher_trajectory"] = f.get_slice("teacher_trajectory")[row]
            item["trajectory_sigmas"] = f.get_slice("trajectory_sigmas")[row]
        if "num_cond_frames" in f.keys():
            item["num_cond_frames"] = f.get_slice("num_cond_frames")[row]
        return item


class PairRowDecoder:
    """Turns a stored row (:meth:`PairShardDataset.stored_row`) into a data set item, given
    the split's common ``metadata``: floats to float32, ``seed`` / ``index`` to int and, for
    version 2, the noise regenerated from the seed (checked against ``noise_sha256``) and the
    clip and its control re-derived from the referenced videos (checked against their
    ``video_sha256``). Shared by the shard reader and the streaming reader
    (:mod:`distill_pl.data.streaming`). ``cache_frames``: see
    :class:`~distill_pl.data.clip_reference.ReferencedClips`."""

    FLOAT_KEYS = ("teacher_output", "text_embeds", "teacher_trajectory")

    def __init__(self, metadata: dict, cache_frames: bool = False):
        self.metadata = metadata
        self.version = metadata["format_version"]
        self._clips = None
        if self.version == 2:
            self._clips = ReferencedClips(ClipSettings.from_metadata(metadata), cache_frames=cache_frames)

    def __call__(self, stored: dict, where: str) -> dict:
        """The item of ``stored``; ``where`` (the shard or folder it came from) names it in errors."""
        item = dict(stored)
        item.update(seed=int(item["seed"]), index=int(item["index"]))
        if self.version == 1:
            return item
        for key in self.FLOAT_KEYS:
            if key in item:
                item[key] = item[key].float()
        noise = example_noise(item["seed"], self.metadata["latent_shape"])
        if noise_fingerprint(noise) != item.pop("noise_sha256"):
            raise ShardError(
                f"{where}: row {item['index'] % self.metadata['shard_size']}: the noise regenerated from seed "
                f"{item['seed']} does not match the stored noise_sha256 (another torch random generator?); "
                "the pair cannot be used"
            )
        video_path, start, control_path = item.pop("path"), int(item.pop("start")), item.pop("control_path", None)
        self._clips.check(video_path, item.pop("video_sha256"), where=where)
        if control_path is not None:
            self._clips.check(control_path, item.pop("control_sha256"), where=where)
        image_path, image_sha256 = item.pop("image_path", ""), item.pop("image_sha256", "")
        if image_path:
            self._clips.check(image_path, image_sha256, where=where)
        item["video"], item["control"] = self._clips.read(video_path, start, control_path, image_path or None)
        item["noise"] = noise
        return item
