"""The Denoiser contract: the seam between training stages and any video backbone."""

from __future__ import annotations

from torch import Tensor, nn

from distill_pl.models.conditioning import Conditioning


class Denoiser(nn.Module):
    """A velocity predictor for rectified flow.

    ``forward(x_t, sigma, cond)`` takes latents ``x_t`` [B, C, T, H, W], noise levels
    ``sigma`` [B] in [0, 1] (``x_t = (1 - sigma) x0 + sigma eps``) and a
    :class:`Conditioning`, and returns the velocity ``v = eps - x0`` with the shape of
    ``x_t``. With ``feature_block=k`` it returns ``(velocity, features)`` where
    ``features`` [B, D, t, h, w] are the hidden states after transformer block ``k``
    arranged on the token grid (used by the discriminator head).

    Stages only use this interface; adapters hide the backbone class.
    """

    #: channels of the latents it denoises (C)
    latent_channels: int
    #: channels of the control video it expects (0 = no control)
    control_channels: int
    #: number of transformer blocks (valid feature_block values are 0..num_blocks-1)
    num_blocks: int
    #: hidden size D of the block features
    feature_dim: int

    def forward(
        self, x_t: Tensor, sigma: Tensor, cond: Conditioning, feature_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        raise NotImplementedError

    def save_pretrained(self, folder: str) -> None:
        """Write the backbone as a diffusers model folder (config.json + safetensors)."""
        raise NotImplementedError
