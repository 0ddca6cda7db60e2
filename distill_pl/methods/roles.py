"""What every method's roles share: the denoiser factory they are built from, and the phases
that say which roles each kind of training step trains.

A method's roles (:class:`~distill_pl.methods.kd.KDRoles`,
:class:`~distill_pl.methods.dmd2.DMD2Roles`) are the networks it trains and uses, built from
its settings and a :data:`DenoiserFactory` on whatever device is current: the training
stages load the teacher folder (:func:`folder_denoisers`), the memory estimate builds the
architecture on the meta device and the family benchmark with random weights
(:func:`config_denoisers`).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from distill_pl.families.registry import build_denoiser, load_denoiser
from distill_pl.models.denoiser import Denoiser

#: ``make(dtype, gradient_checkpointing)``: a new Denoiser of the teacher's architecture with
#: parameters in ``dtype`` ("float32", "bfloat16", ...)
DenoiserFactory = Callable[[str, bool], Denoiser]


def folder_denoisers(path: str, adapter_options: dict | None = None) -> DenoiserFactory:
    """Denoisers loaded from the teacher folder ``path`` (its weights), with the adapter's
    own options (``load_denoiser``)."""
    def make(dtype: str, gradient_checkpointing: bool) -> Denoiser:
        return load_denoiser(path, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                             **(adapter_options or {}))
    return make


def config_denoisers(class_name: str, config: dict, adapter_options: dict | None = None,
                     on_meta: bool = False) -> DenoiserFactory:
    """Randomly initialised denoisers of ``class_name`` from its transformer ``config``
    (``build_denoiser``); ``on_meta``: every parameter and buffer on the meta device."""
    def make(dtype: str, gradient_checkpointing: bool) -> Denoiser:
        return build_denoiser(class_name, config, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                              on_meta=on_meta, **(adapter_options or {}))
    return make


def build_dtype(training_dtype: str, compute_dtype: str | None) -> str:
    """The dtype a network that trains in ``training_dtype`` is built in: ``compute_dtype``
    in place of float32 when given (forward passes that stand for autocast's copies), else
    its training dtype."""
    return compute_dtype if compute_dtype is not None and training_dtype == "float32" else training_dtype


class Roles(nn.Module):
    """A method's networks as named submodules (a role left out is None).

    ``phases``: each kind of training step -> the roles its optimizer updates; ``dtypes``:
    role -> the parameter dtype it trains in (a LoRA network: its frozen base's);
    ``batch_latents``: latent tensors of a video's shape each sample of the method's batches
    carries besides pixels and text.
    """

    phases: dict[str, tuple[str, ...]] = {}
    batch_latents: int = 0

    def __init__(self, dtypes: dict[str, str]) -> None:
        super().__init__()
        self.dtypes = dtypes

    @property
    def trained(self) -> tuple[str, ...]:
        """The roles some phase updates, in the order the phases name them."""
        return tuple(dict.fromkeys(name for names in self.phases.values() for name in names))

    def networks(self) -> dict[str, nn.Module]:
        """Role -> network, the roles that are present, in the order they were registered."""
        return dict(self.named_children())
