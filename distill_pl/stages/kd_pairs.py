"""KD pair generation: the teacher's N-step CFG samples for fresh noise and real conditioning.

    distill-pl predict --config configs/tiny/kd_pairs.yaml

A predict-only stage. The data module (``mode: pairs``) serves real clips with their caption
embedding and canny control, only for shards not finished yet; this module draws each
example's noise from its own seed and runs the teacher; the
:class:`~distill_pl.callbacks.shard_writer.PairShardWriter` callback stores the results in
shards (format: :mod:`distill_pl.data.pairs`). Rerunning the same command completes an
interrupted generation and produces the same files as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from distill_pl.data.pairs import example_seed, teacher_fingerprint
from distill_pl.diffusion.sampling import sample_with_scheduler
from distill_pl.models.autoencoder import VideoAutoencoder, build_autoencoder
from distill_pl.models.families.registry import load_denoiser
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.negative_prompt import NegativePrompt
from distill_pl.models.teacher_folder import load_scheduler, scheduler_shift
from distill_pl.paths import resolve_path
from distill_pl.stages.batch import batch_conditioning


def latent_shape(autoencoder: VideoAutoencoder, video_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[C, T', H', W'] of the latents of a video [3, T, H, W] (the video's own shape in pixel space)."""
    _, frames, height, width = video_shape
    return (
        autoencoder.latent_channels,
        1 + (frames - 1) // autoencoder.temporal_compression,
        height // autoencoder.spatial_compression,
        width // autoencoder.spatial_compression,
    )


class KDPairGenerationModule(L.LightningModule):
    """Runs a frozen teacher on the examples of ``predict_dataloader`` (predict only).

    Args:
        teacher: teacher folder (``transformer/`` + ``scheduler/``, see
            :mod:`distill_pl.models.teacher_folder`); sampled with its own saved scheduler.
        vae_path: local diffusers VAE folder of a latent teacher; None = pixel space.
        num_steps: teacher sampling steps (the reference recipe: 36).
        guidance: CFG weight ``w`` in the common form ``u + w (c - u)``, the unconditional
            branch from the datamodule's negative prompt. The reference recipe writes ``c + g (c - u)``:
            its guidance 7 is ``w = 8`` here (:func:`~distill_pl.diffusion.flow.cosmos_guidance_to_w`).
        seed: base seed; example ``i`` of a split gets noise from
            ``torch.Generator().manual_seed(example_seed(seed, split, i))`` (``seed + i`` for
            train), drawn on the CPU, whatever the batch it falls in.
        dtype: parameter dtype of the teacher and VAE (``"float32"``, ``"bfloat16"``, ...).
        denoiser_options: the teacher adapter's own options (e.g. a ControlNet's
            ``control_scale``), recorded in the pairs' metadata.

    ``predict_step`` returns, per batch of B examples: ``noise`` and ``teacher_output``
    [B, C, T', H', W'] float32, ``control`` and ``video`` [B, 3, T, H, W] (pixels, from the
    batch), ``text_embeds`` [B, L, D], ``text_mask`` [B, L], ``seed``, ``index`` and ``start``
    [B] long, and the lists ``split``, ``caption``, ``path``.
    """

    def __init__(
        self,
        teacher: str,
        vae_path: str | None = None,
        num_steps: int = 36,
        guidance: float = 8.0,
        seed: int = 0,
        dtype: str = "float32",
        denoiser_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = load_denoiser(teacher, dtype=dtype, **(denoiser_options or {})).requires_grad_(False).eval()
        self.autoencoder = build_autoencoder(vae_path, dtype)
        if self.autoencoder.latent_channels != self.teacher.latent_channels:
            raise ValueError(
                f"teacher {teacher} denoises {self.teacher.latent_channels} channels, the "
                f"{'VAE ' + vae_path if vae_path else 'pixel space'} has {self.autoencoder.latent_channels}"
            )
        self.scheduler = load_scheduler(teacher)
        self.teacher_sha256 = teacher_fingerprint(teacher)
        self.negative_prompt = NegativePrompt()

    def train(self, mode: bool = True) -> "KDPairGenerationModule":
        """The teacher and VAE stay in eval mode."""
        return super().train(False)

    def setup(self, stage: str) -> None:
        from distill_pl.callbacks.shard_writer import PairShardWriter

        if stage != "predict":
            raise ValueError("KDPairGenerationModule only predicts: run `distill-pl predict`")
        if not any(isinstance(cb, PairShardWriter) for cb in self.trainer.callbacks):
            raise ValueError(
                "KD pair generation needs the shard writer: add "
                "distill_pl.callbacks.shard_writer.PairShardWriter to trainer.callbacks"
            )
        self.negative_prompt.set(*self.trainer.datamodule.negative_prompt_embedding())

    def on_predict_start(self) -> None:
        # outputs go to the shard writer; keeping them all would grow memory with the data set
        self.trainer.predict_loop.return_predictions = False

    def pair_generation_metadata(self) -> dict:
        """The teacher part of the metadata of every shard (see :mod:`distill_pl.data.pairs`)."""
        h = self.hparams
        return {
            "teacher": str(Path(resolve_path(h.teacher)).resolve()),
            "teacher_sha256": self.teacher_sha256,
            "teacher_dtype": h.dtype,
            "vae_path": h.vae_path,
            "scheduler": type(self.scheduler).__name__,
            "scheduler_shift": scheduler_shift(self.scheduler),
            "num_steps": h.num_steps,
            "guidance": float(h.guidance),
            "guidance_form": "u + w (c - u)",
            "seed": h.seed,
            "denoiser_options": dict(h.denoiser_options or {}),
        }

    def example_noise(self, splits: list[str], indices: list[int], shape: tuple[int, ...]) -> Tensor:
        """[B, *shape] float32 unit noise, row j from the seed of example (splits[j], indices[j])."""
        rows = [
            torch.randn(shape, generator=torch.Generator().manual_seed(example_seed(self.hparams.seed, s, i)))
            for s, i in zip(splits, indices)
        ]
        return torch.stack(rows).to(self.device)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        video = batch["video"]
        indices = batch["index"].tolist()
        splits = list(batch["split"])
        cond = batch_conditioning(batch, self.autoencoder, self.teacher)
        uncond = self.negative_prompt.conditioning(cond)
        noise = self.example_noise(splits, indices, latent_shape(self.autoencoder, tuple(video.shape[1:])))
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        fn = velocity_fn(self.teacher, cond, uncond, self.hparams.guidance)
        output = sample_with_scheduler(fn, noise, scheduler, self.hparams.num_steps,
                                       step_sigma=self.teacher.sampler_sigma)
        return {
            "noise": noise,
            "teacher_output": output.float(),
            "control": batch["control"],
            "video": video,
            "text_embeds": batch["text_embeds"],
            "text_mask": batch["text_mask"],
            "seed": torch.tensor([example_seed(self.hparams.seed, s, i) for s, i in zip(splits, indices)]),
            "index": batch["index"],
            "start": batch["start"],
            "split": splits,
            "caption": list(batch["caption"]),
            "path": list(batch["path"]),
        }
