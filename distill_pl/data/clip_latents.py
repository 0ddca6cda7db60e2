"""Precomputed VAE latents of real clips: the shard format, its writing and lazy reading.

``distill-pl predict`` with :class:`~distill_pl.training.clip_latents.ClipLatentModule` encodes
the clips of a manifest (train: items ``0..num_examples-1`` of the train split, the windows
of epoch 0; val: the val windows) and their canny control once; ``data.mode: latents``
serves them to training instead of encoding online. Shards live in
``<latents_dir>/<split>/shard_{k:05d}.safetensors``, laid out, written and read as
:mod:`distill_pl.data.shards` describes (atomic, resumable, equal inputs give equal bytes).

Format version 1 (S rows, P distinct prompts, ``<storage>`` = ``storage_dtype``):

=====================  ===========================  ===========================================
tensor                 shape, dtype                 meaning
=====================  ===========================  ===========================================
``video_latents``      [S, C, T', H', W'] <storage> normalised VAE latents of the clip
``control_latents``    [S, C, T', H', W'] <storage> the same of its canny control video
``text_index``         [S] int64                    row of the example's prompt in the table
``text_table_embeds``  [P, L, D] <storage>          prompt embeddings, zero at padding
``text_table_mask``    [P, L] bool                  True at real tokens
``index``, ``start``   [S] int64                    example index; first frame in its video
``negative_...``       [1, L, D] f32, [1, L] bool   the negative prompt's embedding and mask
=====================  ===========================  ===========================================

Metadata (JSON under :data:`METADATA_KEY`): per shard ``shard_index``, ``count``,
``first_index``, ``captions``, ``paths``, ``text_prompts``; common to a split
``format_version``, ``split``, ``num_examples``, ``shard_size``, ``storage_dtype``,
``vae_path`` (absolute; None = pixel space), ``vae_sha256`` (:func:`vae_fingerprint`),
``vae_dtype``, ``latent_shape``, ``text_shape`` and the data settings of the clips (the keys of
:data:`DATA_KEYS`, as in :mod:`distill_pl.data.pairs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from distill_pl.data import shards
from distill_pl.data.pairs import prompt_table
from distill_pl.data.shards import (
    ShardError,
    ShardLayout,
    check_rows,
    check_tensors,
    metadata_differences,
    open_split,
    storage_dtype,
)
from distill_pl.util.hashing import named_files_sha256
from distill_pl.util.paths import resolve_path

FORMAT_VERSION = 1
METADATA_KEY = "distill_pl.clip_latents"
PER_SHARD_KEYS = ("shard_index", "count", "first_index", "captions", "paths", "text_prompts")
#: the clip settings a latents data set was made with; training must use the same
DATA_KEYS = ("manifest", "num_frames", "frame_stride", "height", "width", "val_fraction", "val_clips_per_video",
             "canny_low", "canny_high", "text_encoder", "max_text_length", "negative_prompt", "data_seed")
REQUIRED_KEYS = ("format_version", "split", "num_examples", "shard_size", "storage_dtype", "vae_path",
                 "vae_sha256", "latent_shape", "text_shape", *DATA_KEYS, *PER_SHARD_KEYS)


def vae_fingerprint(vae_path: str | None) -> str | None:
    """sha256 of a VAE folder's ``*.json`` and ``*.safetensors`` files (names and bytes);
    None for pixel space."""
    if vae_path is None:
        return None
    from distill_pl.models.loading import find_diffusers_model_folder

    folder = find_diffusers_model_folder(str(resolve_path(vae_path)), "AutoencoderKLWan", "vae")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors"))
    return named_files_sha256((file.name, file) for file in files)


def write_shard(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    return shards.write_shard(path, tensors, metadata, METADATA_KEY)


def read_checked_header(path: Path) -> dict:
    """The metadata of a latents shard whose header is complete and self-consistent."""
    metadata, tensors = shards.read_shard_header(path, METADATA_KEY)
    try:
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}")
        missing = [key for key in REQUIRED_KEYS if key not in metadata]
        if missing:
            raise ShardError(f"{path}: metadata lacks {missing}")
        check_rows(path, metadata)
        count, latent, (length, dim) = metadata["count"], metadata["latent_shape"], metadata["text_shape"]
        if len(metadata["captions"]) != count or len(metadata["paths"]) != count:
            raise ShardError(f"{path}: captions/paths do not have {count} entries")
        dtype, prompts = storage_dtype(metadata["storage_dtype"]), len(metadata["text_prompts"])
        check_tensors(path, tensors, {
            "video_latents": ([count, *latent], dtype), "control_latents": ([count, *latent], dtype),
            "text_index": ([count], torch.int64), "text_table_embeds": ([prompts, length, dim], dtype),
            "text_table_mask": ([prompts, length], torch.bool), "index": ([count], torch.int64),
            "start": ([count], torch.int64), "negative_text_embeds": ([1, length, dim], torch.float32),
            "negative_text_mask": ([1, length], torch.bool),
        })
    except ShardError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ShardError(f"{path}: malformed metadata ({type(err).__name__}: {err})") from None
    return metadata


def finished_shards(layout: ShardLayout, expected: dict) -> set[int]:
    return shards.finished_shards(layout, expected, read_checked_header)


def build_latent_shard(
    rows: list[dict[str, Any]], common: dict, negative: tuple[Tensor, Tensor]
) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a latents shard (without ``shard_index``, ``count``,
    ``first_index``). ``rows``: per example ``video_latents`` and ``control_latents``
    [C, T', H', W'], ``text_embeds`` [L, D], ``text_mask`` [L], ``index``, ``start``,
    ``caption``, ``path``."""
    dtype = storage_dtype(common["storage_dtype"])
    prompts, table = prompt_table(rows, dtype)
    tensors = {
        "video_latents": torch.stack([row["video_latents"] for row in rows]).to(dtype),
        "control_latents": torch.stack([row["control_latents"] for row in rows]).to(dtype),
        **table,
        "index": torch.stack([torch.as_tensor(row["index"]) for row in rows]).long(),
        "start": torch.stack([torch.as_tensor(row["start"]) for row in rows]).long(),
        "negative_text_embeds": negative[0].float(),
        "negative_text_mask": negative[1].bool(),
    }
    metadata = {
        **common,
        "format_version": FORMAT_VERSION,
        "latent_shape": list(tensors["video_latents"].shape[1:]),
        "text_shape": list(tensors["text_table_embeds"].shape[1:]),
        "captions": [row["caption"] for row in rows],
        "paths": [row["path"] for row in rows],
        "text_prompts": prompts,
    }
    return tensors, metadata


def check_latents_match(metadata: dict, vae_path: str | None) -> None:
    """ValueError naming the key unless latents (``latents_metadata``) were made with the VAE
    a stage uses (same folder content)."""
    wanted = {"vae_sha256": vae_fingerprint(vae_path)}
    differences = metadata_differences(metadata, wanted)
    if differences:
        raise ValueError(
            f"precomputed latents do not match this model's VAE {vae_path!r} (latents != model: "
            f"{'; '.join(differences)}); precompute them again with this VAE"
        )


class ClipLatentDataset(Dataset):
    """The precomputed clip latents of one split folder, read lazily (one row per item).

    Items: ``video_latents`` and ``control_latents`` [C, T', H', W'] float32, ``text_embeds``
    [L, D] float32, ``text_mask`` [L] bool, ``caption`` and ``path`` str, ``start`` and
    ``index`` int. Attributes: ``metadata`` (common), ``files``, ``shard_size``.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.metadata, layout = open_split(self.folder, read_checked_header, lambda m: PER_SHARD_KEYS, "clip latents")
        self.files = [str(layout.path(k)) for k in range(layout.num_shards)]
        self.shard_size = layout.shard_size
        self._len = layout.num_examples

    def __len__(self) -> int:
        return self._len

    def negative_prompt_embedding(self) -> tuple[Tensor, Tensor]:
        with safe_open(self.files[0], framework="pt") as f:
            return f.get_tensor("negative_text_embeds"), f.get_tensor("negative_text_mask")

    def __getitem__(self, index: int) -> dict:
        return decode_latent_row(self.stored_row(index))

    def stored_row(self, index: int) -> dict:
        """Example ``index`` as its shard stores it (latents and embeddings in the storage
        dtype, ``index`` / ``start`` 0-dim int64, ``caption``, ``path``), the input of
        :func:`decode_latent_row`."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} clips")
        path, row = self.files[index // self.shard_size], index % self.shard_size
        try:
            with safe_open(path, framework="pt") as f:
                table_row = int(f.get_slice("text_index")[row])
                stored = {
                    "video_latents": f.get_slice("video_latents")[row],
                    "control_latents": f.get_slice("control_latents")[row],
                    "text_embeds": f.get_slice("text_table_embeds")[table_row],
                    "text_mask": f.get_slice("text_table_mask")[table_row],
                    "index": f.get_slice("index")[row],
                    "start": f.get_slice("start")[row],
                }
                metadata = json.loads(f.metadata()[METADATA_KEY])
        except Exception as err:
            raise ShardError(f"{path}: cannot read row {row} ({err})") from None
        if int(stored["index"]) != index:
            raise ShardError(f"{path}: row {row} holds example {int(stored['index'])}, expected {index}")
        stored.update(caption=metadata["captions"][row], path=metadata["paths"][row])
        return stored


def decode_latent_row(stored: dict) -> dict:
    """The item of a stored row (:meth:`ClipLatentDataset.stored_row`): latents and embeddings
    to float32, ``index`` and ``start`` to int (shared with :mod:`distill_pl.data.streaming`)."""
    item = dict(stored)
    for key in ("video_latents", "control_latents", "text_embeds"):
        item[key] = item[key].float()
    item.update(index=int(item["index"]), start=int(item["start"]))
    return item
