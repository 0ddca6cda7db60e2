"""KD pair generation: the teacher's N-step CFG samples for fresh noise and real conditioning.

    distill-pl predict --config configs/tiny/kd_pairs.yaml

A predict-only stage. The data module (``mode: pairs``) serves real clips with their caption
embedding and control (computed, or the manifest's control video), only for shards not
finished yet; this module draws each example's noise from its own seed and runs the teacher; the
:class:`~distill_pl.callbacks.shard_writer.PairShardWriter` callback stores the results in
shards (format: :mod:`distill_pl.data.pairs`). Rerunning the same command completes an
interrupted generation and produces the same files as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from distill_pl.data.pairs import (
    build_pair_shard,
    example_noise,
    example_seed,
    noise_fingerprint,
    teacher_fingerprint,
    write_shard,
)
from distill_pl.data.shards import storage_dtype as storage_dtype_of
from distill_pl.diffusion.conditional_frames import draw_num_conditional_frames
from distill_pl.diffusion.sampling import sample_with_scheduler, scheduler_step_sigmas, trajectory_steps
from distill_pl.models.autoencoder import VideoAutoencoder, build_autoencoder
from distill_pl.families.registry import load_denoiser
from distill_pl.models.guidance import check_guidance_2, sampling_velocity_fn
from distill_pl.models.negative_prompt import NegativePrompt
from distill_pl.export.model_folders import load_scheduler, scheduler_shift
from distill_pl.util.paths import resolve_path
from distill_pl.training.batch import (
    batch_conditioning,
    clip_latents,
    give_first_frames,
)
from distill_pl.training.batch import conditional_frame_probabilities as resolve_conditional_frames
from distill_pl.util.randomness import step_generator

#: the stream of :func:`~distill_pl.util.randomness.step_generator` (keyed by the example's
#: seed) that draws an example's number of conditional frames
CONDITIONAL_FRAMES_STREAM = 1


def latent_shape(autoencoder: VideoAutoencoder, video_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[C, T', H', W'] of the latents of a video [3, T, H, W] (the video's own shape in pixel space)."""
    _, frames, height, width = video_shape
    return (autoencoder.latent_channels, *autoencoder.latent_grid(frames, height, width))


class KDPairGenerationModule(L.LightningModule):
    """Runs a frozen teacher on the examples of ``predict_dataloader`` (predict only).

    Args:
        teacher: teacher folder (``transformer/`` + ``scheduler/``, see
            :mod:`distill_pl.export.model_folders`); sampled with its own saved scheduler.
        vae_path: local diffusers VAE folder of a latent teacher; None = pixel space.
        num_steps: teacher sampling steps (the reference recipe: 36).
        guidance: CFG weight ``w`` in the common form ``u + w (c - u)``, the unconditional
            branch from the datamodule's negative prompt. The reference recipe writes ``c + g (c - u)``:
            its guidance 7 is ``w = 8`` here (:func:`~distill_pl.diffusion.flow.cosmos_guidance_to_w`).
        guidance_2: a two-expert teacher's (Wan 2.2 A14B) CFG weight at the levels its
            low-noise expert denoises (the pipelines' ``guidance_scale_2``); None: ``guidance``
            everywhere. ValueError for a teacher of one network. Recorded in the pairs'
            metadata when set.
        seed: base seed; example ``i`` of a split gets noise
            :func:`~distill_pl.data.pairs.example_noise` of ``example_seed(seed, split, i)``
            (``seed + i`` for train), drawn on the CPU, whatever the batch it falls in.
        dtype: parameter dtype of the teacher and VAE (``"float32"``, ``"bfloat16"``, ...).
        storage_dtype: dtype of the stored latents and prompt embeddings (``"bfloat16"``,
            ``"float16"`` or ``"float32"``).
        trajectory_sigmas: noise levels, e.g. ``[0.75, 0.5, 0.25]`` (decreasing, in (0, 1)):
            for each, the teacher's noisy state x at its first sampling step whose sigma is
            <= the level is stored too, with that step's sigma (few-step KD targets).
        denoiser_options: the teacher adapter's own options (e.g. a ControlNet's
            ``control_scale``), recorded in the pairs' metadata.
        conditional_frame_probabilities: for a teacher that takes conditional frames
            (Cosmos 2.5), the probabilities of giving the first 0, 1, 2, ... latent frames of
            the clip to the teacher as conditional frames (capped at T' - 1); each example's
            number is drawn from its seed and stored (``num_cond_frames``). None: the model's
            default (0.6 / 0.2 / 0.2 for 0 / 1 / 2; none for a model without conditional
            frames); ``[1.0]``: none.

    ``predict_step`` returns, per batch of B examples: ``teacher_output`` [B, C, T', H', W']
    float32, with levels ``teacher_trajectory`` [B, K, C, T', H', W'] and
    ``trajectory_sigmas`` [B, K]; with conditional frames ``num_cond_frames`` [B] long;
    ``text_embeds`` [B, L, D], ``text_mask`` [B, L], ``seed``,
    ``index`` and ``start`` [B] long, and the lists ``noise_sha256``, ``split``, ``caption``,
    ``path`` (with ``control: video`` also ``control_path``, with ``control: clip`` also
    ``image_path``: the conditioning image the manifest named, or "").
    """

    def __init__(
        self,
        teacher: str,
        vae_path: str | None = None,
        num_steps: int = 36,
        guidance: float = 8.0,
        guidance_2: float | None = None,
        seed: int = 0,
        dtype: str = "float32",
        storage_dtype: str = "bfloat16",
        trajectory_sigmas: list[float] | None = None,
        denoiser_options: dict[str, object] | None = None,
        conditional_frame_probabilities: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = load_denoiser(teacher, dtype=dtype, **(denoiser_options or {})).requires_grad_(False).eval()
        check_guidance_2(self.teacher, guidance_2, "model.init_args.guidance_2")
        self.conditional_frame_probabilities = resolve_conditional_frames(
            self.teacher, conditional_frame_probabilities)
        self.autoencoder = build_autoencoder(vae_path, dtype)
        if self.autoencoder.latent_channels != self.teacher.latent_channels:
            raise ValueError(
                f"teacher {teacher} denoises {self.teacher.latent_channels} channels, the "
                f"{'VAE ' + vae_path if vae_path else 'pixel space'} has {self.autoencoder.latent_channels}"
            )
        self.scheduler = load_scheduler(teacher)
        self.teacher_sha256 = teacher_fingerprint(teacher)
        storage_dtype_of(storage_dtype)  # ValueError naming the choices for an unknown name
        self.trajectory_levels = [float(level) for level in trajectory_sigmas or []]
        if any(not 0 < level < 1 for level in self.trajectory_levels) or self.trajectory_levels != sorted(
            self.trajectory_levels, reverse=True
        ):
            raise ValueError(f"trajectory_sigmas must decrease within (0, 1), got {trajectory_sigmas}")
        step_sigmas = scheduler_step_sigmas(type(self.scheduler).from_config(self.scheduler.config), num_steps)
        self.trajectory_steps = trajectory_steps(step_sigmas, self.trajectory_levels)
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
        frames = {"conditional_frame_probabilities": list(self.conditional_frame_probabilities)}
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
            "storage_dtype": h.storage_dtype,
            "trajectory_sigmas": self.trajectory_levels,
            "denoiser_options": dict(h.denoiser_options or {}),
            **(frames if self.conditional_frame_probabilities else {}),
            **({} if h.guidance_2 is None else {"guidance_2": float(h.guidance_2)}),
        }

    def build_shard(self, rows: list[dict], common: dict) -> tuple[dict[str, Tensor], dict]:
        """Tensors and metadata of a pair shard (format version 2, :mod:`distill_pl.data.pairs`)."""
        return build_pair_shard(rows, common, self.trainer.datamodule.negative_prompt_embedding())

    write_shard = staticmethod(write_shard)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        video = batch["video"]
        indices = batch["index"].tolist()
        splits = list(batch["split"])
        cond = batch_conditioning(batch, self.autoencoder, self.teacher)
        seeds = [example_seed(self.hparams.seed, s, i) for s, i in zip(splits, indices)]
        if self.conditional_frame_probabilities:
            counts = torch.cat([
                draw_num_conditional_frames(1, self.conditional_frame_probabilities,
                                            step_generator(seed, 0, CONDITIONAL_FRAMES_STREAM))
                for seed in seeds
            ])
            cond = give_first_frames(cond, clip_latents(batch, self.autoencoder), counts)
        uncond = self.negative_prompt.conditioning(cond)
        shape = latent_shape(self.autoencoder, tuple(video.shape[1:]))
        noise = torch.stack([example_noise(seed, shape) for seed in seeds])
        start = noise.to(self.device)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        fn = sampling_velocity_fn(self.teacher, start, cond, uncond, self.hparams.guidance, self.hparams.guidance_2)
        states: dict[int, tuple[float, Tensor]] = {}

        def keep_state(i: int, sigma: float, x: Tensor) -> None:
            if i in self.trajectory_steps:
                states[i] = (sigma, x.float())

        output = sample_with_scheduler(fn, start, scheduler, self.hparams.num_steps,
                                       step_sigma=self.teacher.sampler_sigma, on_step=keep_state)
        output = self.teacher.finish_sample(output, cond)
        prediction = {
            "teacher_output": output.float(),
            "text_embeds": batch["text_embeds"],
            "text_mask": batch["text_mask"],
            "seed": torch.tensor(seeds),
            "index": batch["index"],
            "start": batch["start"],
            "noise_sha256": [noise_fingerprint(row) for row in noise],
            "split": splits,
            "caption": list(batch["caption"]),
            "path": list(batch["path"]),
        }
        if "control_path" in batch:  # control: video: the shard references the control video too
            prediction["control_path"] = list(batch["control_path"])
        if "image_path" in batch:  # control: clip: the shard references the manifest's images too
            prediction["image_path"] = list(batch["image_path"])
        if cond.num_cond_frames is not None:
            prediction["num_cond_frames"] = cond.num_cond_frames.cpu()
        if self.trajectory_steps:
            picked = [states[i] for i in self.trajectory_steps]
            prediction["teacher_trajectory"] = torch.stack([x for _, x in picked], dim=1)
            prediction["trajectory_sigmas"] = torch.tensor([[s for s, _ in picked]] * len(seeds))
        return prediction
