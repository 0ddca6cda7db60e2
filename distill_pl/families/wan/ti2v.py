"""The :class:`Denoiser` adapter for Wan 2.2 TI2V-5B: a ``WanTransformer3DModel`` whose pipeline
sets ``expand_timesteps`` (text-to-video with ``WanPipeline``, image-to-video with
``WanImageToVideoPipeline``), with the 48-channel VAE (16x in space).

Everything of :mod:`distill_pl.families.wan.adapter` holds (velocity, ``timestep = 1000 *
sigma``, zero-padded text, token grid), except:

- the transformer takes one timestep per token, [B, t*h*w] (frame-major, as the tokens);
- image-to-video (adapter option ``image_to_video=True``): ``Conditioning.control`` is the
  clean first latent frame [B, C, 1, H, W]
  (:func:`~distill_pl.families.wan.image_condition.first_frame_latent`); the transformer's
  input is ``(1 - m) * control + m * x_t`` with ``m`` 0 on the first latent frame and 1
  elsewhere, and the first frame's tokens take timestep 0; the pipeline puts the clean frame
  back into its final latents (:meth:`WanTI2VDenoiser.finish_sample`). Text-to-video (the
  default): no control, every token at the step's timestep.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_pl.families.wan.adapter import WanDenoiser, wan_timestep
from distill_pl.families.wan.image_condition import first_frame_latent
from distill_pl.families.wan.layout import write_layout_index
from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning


class WanTI2VDenoiser(WanDenoiser):
    """Wan 2.2 TI2V transformer as a velocity predictor; with ``image_to_video`` the control
    is the clean first latent frame, without it (text-to-video) the model takes no control.

    ``config`` (and :attr:`backbone_config`) is ``{"transformer": transformer config,
    "expand_timesteps": True}``, as :func:`~distill_pl.families.wan.layout.wan_folder_config`
    reads a TI2V folder.
    """

    control_input = (
        "WanImageToVideoPipeline(image=the first frame, ...) of the TI2V folder's components "
        "(expand_timesteps=True); without an image, WanPipeline"
    )

    def __init__(self, *, image_to_video: bool = False, **backbone) -> None:
        """``backbone``: :class:`~distill_pl.families.wan.adapter.WanDenoiser`'s ``path``,
        ``config``, ``gradient_checkpointing`` and ``dtype``."""
        self.image_to_video = bool(image_to_video)
        super().__init__(**backbone)

    @property
    def adapter_options(self) -> dict:
        return {"image_to_video": self.image_to_video}

    @classmethod
    def constructor_config(cls, config: dict) -> dict:
        return super().constructor_config(config["transformer"])

    @property
    def backbone_config(self) -> dict:
        return {"transformer": self.transformer_config, "expand_timesteps": True}

    def save_components(self, folder: str) -> None:
        """``folder/transformer`` and ``folder/model_index.json`` with ``expand_timesteps``
        (:func:`~distill_pl.families.wan.layout.write_layout_index`): the folder reloads as TI2V."""
        super().save_components(folder)
        write_layout_index(folder, self.pipeline_class_name, self.components, expand_timesteps=True)

    def _control_channels(self) -> int:
        """Image-to-video: the first latent frame, the latents' channels; else 0."""
        return self.transformer.config.out_channels if self.image_to_video else 0

    def _first_frame_mask(self, x_t: Tensor) -> Tensor:
        """[1, 1, T, H, W]: 0 on the first latent frame, 1 elsewhere (the pipeline's mask)."""
        mask = torch.ones(1, 1, *x_t.shape[2:], dtype=x_t.dtype, device=x_t.device)
        mask[:, :, 0] = 0.0
        return mask

    def _hidden_states(self, x_t: Tensor, cond: Conditioning) -> Tensor:
        if cond.control is None:
            return x_t
        mask = self._first_frame_mask(x_t)
        return (1 - mask) * cond.control.to(x_t.dtype) + mask * x_t

    def _timestep(self, sigma: Tensor, x_t: Tensor, cond: Conditioning) -> Tensor:
        """[B, t*h*w]: the step's timestep on every token, 0 on the first frame's tokens when an
        image conditions the video."""
        _, p_h, p_w = self.patch_size
        grid = torch.ones(x_t.shape[2:], dtype=torch.float32, device=x_t.device)
        if cond.control is not None:
            grid[0] = 0.0
        per_token = grid[:, ::p_h, ::p_w].flatten()
        return per_token[None] * wan_timestep(sigma)[:, None]

    def control_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Image-to-video: the clean first latent frame [B, C, 1, H, W]; text-to-video: None."""
        if not self.image_to_video:
            return None
        batch, channels, _, height, width = latent_shape
        return (batch, channels, 1, height, width)

    def _check_control(self, x_t: Tensor, control: Tensor | None) -> None:
        if not self.image_to_video:
            if control is not None:
                raise ValueError("this Wan 2.2 TI2V model is text-to-video (image_to_video=False), "
                                 "but cond.control was given")
            return
        expected = list(self.control_shape(x_t.shape))
        if control is None or list(control.shape) != expected:
            got = None if control is None else list(control.shape)
            raise ValueError(f"cond.control of a Wan 2.2 TI2V image-to-video model is the clean first "
                             f"latent frame {expected}, got {got}")

    def finish_sample(self, x0: Tensor, cond: Conditioning) -> Tensor:
        """The clean first frame put back, ``(1 - m) * control + m * x0``, as the pipeline
        ends (``x0`` itself for text-to-video)."""
        return self._hidden_states(x0, cond)

    def encode_control(self, control: Tensor, autoencoder: VideoAutoencoder) -> Tensor | None:
        """Image-to-video: the clean first latent frame [B, C, 1, H', W'] of a video
        [B, 3, T, H, W] in [-1, 1] whose first frame is the conditioning image; else None."""
        if not self.image_to_video:
            return None
        return first_frame_latent(control[:, :, 0], control.shape[3], control.shape[4], autoencoder)

    def encoded_control_channels(self, autoencoder: VideoAutoencoder) -> int:
        return autoencoder.latent_channels if self.image_to_video else 0
