"""Precompute the VAE latents of real clips and of their control, once, for training.

    distill-pl predict --config configs/tiny/clip_latents.yaml

A predict-only stage, like KD pair generation: the data module (``mode: latents``) serves the
clips of unfinished shards with their caption embedding and canny control; this module encodes
the clip and the control with the VAE; the
:class:`~distill_pl.callbacks.shard_writer.PairShardWriter` callback stores them in shards
(format: :mod:`distill_pl.data.clip_latents`). Rerunning the same command completes an
interrupted run and produces the same files as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from distill_pl.data import clip_latents
from distill_pl.data.shards import storage_dtype as storage_dtype_of
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.util.paths import resolve_path


class ClipLatentModule(L.LightningModule):
    """Encodes the clips and controls of ``predict_dataloader`` with a frozen VAE (predict only).

    Args:
        vae_path: local diffusers VAE (or pipeline) folder; None = pixel space (the latents are
            the pixels: only useful for tests and pixel-space models).
        dtype: parameter dtype of the VAE.
        storage_dtype: dtype of the stored latents and prompt embeddings.

    ``predict_step`` returns, per batch of B clips: ``video_latents`` and ``control_latents``
    [B, C, T', H', W'] float32, ``text_embeds`` [B, L, D], ``text_mask`` [B, L], ``index``
    and ``start`` [B] long, and the lists ``split``, ``caption``, ``path``.
    """

    def __init__(self, vae_path: str | None = None, dtype: str = "float32", storage_dtype: str = "bfloat16") -> None:
        super().__init__()
        self.save_hyperparameters()
        storage_dtype_of(storage_dtype)  # ValueError naming the choices for an unknown name
        self.autoencoder = build_autoencoder(vae_path, dtype)
        self.vae_sha256 = clip_latents.vae_fingerprint(vae_path)

    def train(self, mode: bool = True) -> "ClipLatentModule":
        """The VAE stays in eval mode."""
        return super().train(False)

    def setup(self, stage: str) -> None:
        from distill_pl.callbacks.shard_writer import PairShardWriter

        if stage != "predict":
            raise ValueError("ClipLatentModule only predicts: run `distill-pl predict`")
        if not any(isinstance(cb, PairShardWriter) for cb in self.trainer.callbacks):
            raise ValueError("precomputing latents needs the shard writer: add "
                             "distill_pl.callbacks.shard_writer.PairShardWriter to trainer.callbacks")

    def on_predict_start(self) -> None:
        self.trainer.predict_loop.return_predictions = False

    def pair_generation_metadata(self) -> dict:
        """The model part of the metadata of every shard (see :mod:`distill_pl.data.clip_latents`)."""
        h = self.hparams
        return {
            "vae_path": None if h.vae_path is None else str(Path(resolve_path(h.vae_path)).resolve()),
            "vae_sha256": self.vae_sha256,
            "vae_dtype": h.dtype,
            "storage_dtype": h.storage_dtype,
        }

    def build_shard(self, rows: list[dict], common: dict) -> tuple[dict[str, Tensor], dict]:
        return clip_latents.build_latent_shard(rows, common, self.trainer.datamodule.negative_prompt_embedding())

    write_shard = staticmethod(clip_latents.write_shard)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {
            "video_latents": self.autoencoder.encode(batch["video"].float()).float(),
            "control_latents": self.autoencoder.encode(batch["control"].float()).float(),
            "text_embeds": batch["text_embeds"],
            "text_mask": batch["text_mask"],
            "index": batch["index"],
            "start": batch["start"],
            "split": list(batch["split"]),
            "caption": list(batch["caption"]),
            "path": list(batch["path"]),
        }
