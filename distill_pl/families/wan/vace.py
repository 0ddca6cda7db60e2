"""The :class:`Denoiser` adapter for diffusers' ``WanVACETransformer3DModel`` (Wan 2.1 VACE).

Everything of :mod:`distill_pl.families.wan.adapter` holds (velocity, ``timestep = 1000 *
sigma``, zero-padded text, token grid), except how control enters: the transformer's input is
the latents alone, and the control is the VACE context ``control_hidden_states``
[B, vace_in_channels, T', H', W'], which a side stream of ``vace_blocks`` turns into hints
added after the main blocks listed in ``vace_layers``, each times ``conditioning_scale``.

The context is built as ``WanVACEPipeline`` builds it from a ``video`` and a ``mask``
(``preprocess_conditions``, ``prepare_video_latents``, ``prepare_masks``), without reference
images: for a control video in [-1, 1] and a mask in [0, 1] (1 = generate, 0 = keep; an edge
or depth control video is control everywhere, so its mask is all ones, as the pipeline's
default when no mask is given),

- ``inactive = video * (1 - m)``, ``reactive = video * m`` with ``m = (mask > 0.5)``, each
  through the VAE (posterior mode) and normalised per channel ``(z - mean) / std``;
- the mask's first channel, each ``s x s`` pixel cell (``s`` the VAE's spatial factor) laid
  out on ``s * s`` channels, frames resized to the latent frames (nearest-exact);
- ``context = cat([inactive, reactive, mask], dim=1)``: ``2 * z_dim + s * s`` channels, which
  must be the model's ``vace_in_channels`` (96 for Wan 2.1's VAE: 2 x 16 + 64).

A student is exported as a full ``WanVACEPipeline`` folder (:meth:`WanVACEDenoiser.save_student_pipeline`)
that reproduces the project's K-step student output when called as

    pipe = WanVACEPipeline.from_pretrained(folder)
    steps = json.load(open(f"{folder}/student_steps.json"))     # the K noise levels
    options = json.load(open(f"{folder}/student.json"))["adapter_options"]
    if len(steps["noise_levels"]) > 1:  # the call sets its own K timesteps
        pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps,
                                                         sigmas=steps["scheduler_sigmas"])
    torch.manual_seed(seed)  # a K-step student's re-noising draws from the global generator
    pipe(video=control_frames, prompt=..., num_inference_steps=len(steps["noise_levels"]),
         guidance_scale=1.0, conditioning_scale=options["conditioning_scale"],
         height=..., width=..., num_frames=...)

``guidance_scale <= 1`` turns the pipeline's CFG off (the student needs none); without ``mask``
the pipeline's mask is all ones, as for the project's edge control. A teacher folder without a
text encoder (the tiny ones) gives a folder that loads with ``text_encoder=None, tokenizer=None``
and is called with ``prompt_embeds``. ``WanVACEPipeline.__call__``
takes no ``sigmas`` and calls ``scheduler.set_timesteps(num_inference_steps)``, whose timesteps
for K > 1 are not the student's; binding ``sigmas`` (the levels before the scheduler's shift)
as above makes them so. ``student.json`` (with ``adapter_options``) is written when the run's
data settings are known (the stages' exports and ``distill-pl export``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelInput
from torch import Tensor, nn

from distill_pl.families.wan.adapter import WanDenoiser
from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning

PIPELINE_CLASS = "WanVACEPipeline"


#: The context-parallel plan of ``WanVACETransformer3DModel`` (diffusers' ``_cp_plan`` format):
#: the plan of ``WanTransformer3DModel`` (tokens split at the first main block's input and at
#: the rotary embedding's output, gathered at ``proj_out``) plus the first VACE block's inputs:
#: the patch-embedded latents and the padded VACE context [B, N, D], split over the tokens. The
#: later VACE blocks take the split context from the first; each hint they return is a rank's
#: tokens and is added to the same rank's tokens of the main stream (``hidden_states`` reaches the
#: later VACE blocks unsplit but only the first one reads it).
VACE_CP_PLAN = {
    **WanTransformer3DModel._cp_plan,
    "vace_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        "control_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
    },
}


class WanVACEDenoiser(WanDenoiser):
    """Wan VACE transformer as a velocity predictor; control = the VACE context.

    ``conditioning_scale`` multiplies every VACE hint (the pipeline's ``conditioning_scale``,
    default 1.0). LoRA targets (``lora_targets``) match the same Linear names in the main and
    the VACE blocks; both block lists are FSDP units.
    """

    class_name = "WanVACETransformer3DModel"
    transformer_class = WanVACETransformer3DModel
    pipeline_class_name = PIPELINE_CLASS
    control_input = (
        "WanVACEPipeline(video=control frames, conditioning_scale=adapter_options['conditioning_scale']): "
        "the control video as a list of T PIL RGB frames, (control + 1) * 127.5; no mask (the "
        "pipeline's default, all ones: control everywhere), no reference images"
    )

    def __init__(self, *, conditioning_scale: float = 1.0, **backbone) -> None:
        """``backbone``: :class:`~distill_pl.families.wan.adapter.WanDenoiser`'s ``path``,
        ``config``, ``gradient_checkpointing`` and ``dtype``."""
        super().__init__(**backbone)
        self.conditioning_scale = float(conditioning_scale)

    @property
    def adapter_options(self) -> dict:
        return {"conditioning_scale": self.conditioning_scale}

    @property
    def fsdp_units(self) -> list[nn.Module]:
        return [*self.transformer.blocks, *self.transformer.vace_blocks]

    @property
    def context_parallel_plans(self) -> dict[str, dict]:
        """:data:`VACE_CP_PLAN` (diffusers has no plan for the VACE transformer)."""
        return {"transformer": VACE_CP_PLAN}

    def _control_channels(self) -> int:
        return self.transformer.config.vace_in_channels

    def _hidden_states(self, x_t: Tensor, cond: Conditioning) -> Tensor:
        return x_t

    def _transformer_inputs(self, cond: Conditioning) -> dict:
        dtype = self.transformer.dtype
        scale = torch.full((len(self.transformer.config.vace_layers),), self.conditioning_scale,
                           device=cond.control.device, dtype=dtype)
        return dict(control_hidden_states=cond.control.to(dtype), control_hidden_states_scale=scale)

    def _check_control(self, x_t: Tensor, control: Tensor | None) -> None:
        expected = [x_t.shape[0], self.control_channels, *x_t.shape[2:]]
        if control is None or list(control.shape) != expected:
            got = None if control is None else list(control.shape)
            raise ValueError(f"{self._name()}: cond.control must be the VACE context {expected} "
                             f"(matching x_t), got {got}")

    def encode_control(self, control: Tensor, autoencoder: VideoAutoencoder) -> Tensor:
        """The VACE context [B, vace_in_channels, T', H', W'] of a control video
        [B, 3, T, H, W] in [-1, 1] that is control everywhere (mask all ones)."""
        mask = torch.ones_like(control[:, :1])
        return self.vace_context(control, mask, autoencoder)

    def vace_context(self, video: Tensor, mask: Tensor, autoencoder: VideoAutoencoder) -> Tensor:
        """``WanVACEPipeline``'s conditioning latents + masks for ``video`` [B, 3, T, H, W] in
        [-1, 1] and ``mask`` [B, 1, T, H, W] in [0, 1] (1 = generate), batched."""
        self._check_context_inputs(video, mask, autoencoder)
        binary = (mask > 0.5).to(video.dtype)
        inactive = autoencoder.encode(video * (1 - binary))
        reactive = autoencoder.encode(video * binary)
        return torch.cat([inactive, reactive, self._latent_mask(mask, autoencoder).to(inactive)], dim=1)

    def _latent_mask(self, mask: Tensor, autoencoder: VideoAutoencoder) -> Tensor:
        """[B, 1, T, H, W] -> [B, s*s, T', H/s, W/s] as ``WanVACEPipeline.prepare_masks``."""
        s = autoencoder.spatial_compression
        batch, _, frames, height, width = mask.shape
        cells = mask[:, 0].reshape(batch, frames, height // s, s, width // s, s)
        cells = cells.permute(0, 3, 5, 1, 2, 4).flatten(1, 2)  # [B, s*s, T, H/s, W/s]
        latent_frames = (frames + autoencoder.temporal_compression - 1) // autoencoder.temporal_compression
        return F.interpolate(cells, size=(latent_frames, height // s, width // s), mode="nearest-exact")

    def encoded_control_channels(self, autoencoder: VideoAutoencoder) -> int:
        """``2 * z_dim + s * s``: inactive and reactive latents and the mask cells."""
        return 2 * autoencoder.latent_channels + autoencoder.spatial_compression ** 2

    def _check_context_inputs(self, video: Tensor, mask: Tensor, autoencoder: VideoAutoencoder) -> None:
        s, k = autoencoder.spatial_compression, autoencoder.temporal_compression
        expected = self.encoded_control_channels(autoencoder)
        if expected != self.control_channels:
            raise ValueError(
                f"{self._name()}: vace_in_channels = {self.control_channels}, but the VAE gives "
                f"2 x {autoencoder.latent_channels} latent + {s * s} mask channels = {expected}"
            )
        if video.ndim != 5 or video.shape[1] != 3 or mask.shape != (video.shape[0], 1, *video.shape[2:]):
            raise ValueError(f"{self._name()}: control video must be [B, 3, T, H, W] and its mask "
                             f"[B, 1, T, H, W], got {list(video.shape)} and {list(mask.shape)}")
        frames, height, width = video.shape[2:]
        cell = s * self.patch_size[1], s * self.patch_size[2]
        if (frames - 1) % k:
            raise ValueError(f"{self._name()}: the control video has {frames} frames; it needs "
                             f"1 + {k} n frames (the VAE keeps 1 + (T - 1) // {k} of them)")
        if height % cell[0] or width % cell[1]:
            raise ValueError(f"{self._name()}: control video {height}x{width} is not a multiple of "
                             f"{cell[0]}x{cell[1]} (VAE factor {s} x patch size)")

    def save_student_pipeline(
        self, folder: str, teacher: str | None, shift: float, noise_levels: tuple[float, ...] = (1.0,),
        sampler: str = "renoise",
    ) -> Path:
        """The full ``WanVACEPipeline`` folder of this student: the ``teacher`` pipeline folder
        (VAE, and the text encoder and tokenizer where it has them) with the student's
        ``transformer/`` and a flow-match Euler ``scheduler/`` with ``shift``, stochastic for
        more than one of ``noise_levels`` with a re-noising ``sampler`` (an earlier export in ``folder`` is replaced). How to
        call it (``conditioning_scale``, the levels of a K-step student) is in the module
        docstring of :mod:`distill_pl.families.wan.vace`."""
        from distill_pl.diffusion.sampling import build_student_scheduler
        from distill_pl.families.pipeline_export import save_pipeline_folder

        if teacher is None:
            raise ValueError(
                f"a Wan VACE student is exported as a full {PIPELINE_CLASS} folder: the teacher "
                "pipeline folder (VAE, text encoder, tokenizer) is needed"
            )
        return save_pipeline_folder(folder, self, teacher, PIPELINE_CLASS,
                                    build_student_scheduler(shift, len(noise_levels), sampler),
                                    replace=True)

    def _name(self) -> str:
        return f"VACE model {self.folder}" if self.folder is not None else "VACE model"
