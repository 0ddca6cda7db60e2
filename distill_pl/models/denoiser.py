"""The Denoiser contract: the seam between training stages and any video backbone.

Stages, evaluation, export, sharding, LoRA and the memory estimate use only what is declared
here; an adapter in :mod:`distill_pl.families` hides the diffusers classes of one model
family, and :mod:`distill_pl.families.registry` picks the adapter of a folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from distill_pl.models.conditioning import Conditioning

if TYPE_CHECKING:
    from distill_pl.models.autoencoder import VideoAutoencoder


class Denoiser(nn.Module):
    """A velocity predictor for rectified flow.

    ``forward(x_t, sigma, cond)`` takes latents ``x_t`` [B, C, T, H, W], noise levels
    ``sigma`` [B] in [0, 1] (``x_t = (1 - sigma) x0 + sigma eps``) and a
    :class:`Conditioning`, and returns the velocity ``v = eps - x0`` with the shape (and
    dtype) of ``x_t``. With ``feature_block=k`` it returns ``(velocity, features)`` where
    ``features`` [B, feature_dim, T/pt, H/ph, W/pw] are the hidden states after
    ``blocks[k]`` arranged on the token grid (used by the discriminator head).

    An adapter's constructor takes ``path`` (a local folder) or ``config`` (the backbone's
    diffusers config, random weights), and ``dtype`` and ``gradient_checkpointing``, plus its
    own options (:attr:`adapter_options`).
    """

    #: the diffusers ``_class_name`` of the backbone (the registry's key for this adapter); a
    #: family whose transformer class another family shares is keyed by its pipeline class and
    #: names its transformer's class in ``transformer_class_name``
    class_name: ClassVar[str]
    #: default LoRA targets: suffixes of module paths of the Linear layers inside
    #: :attr:`blocks` (peft ``target_modules``)
    lora_targets: ClassVar[tuple[str, ...]]
    #: a LoRA student's adapters as the files its family's diffusers pipeline loads with
    #: ``load_lora_weights`` (:func:`~distill_pl.models.lora.diffusers_lora_state`): file name
    #: -> (the prefix of this denoiser's state-dict keys whose adapters the file holds, the
    #: pipeline component it loads into); empty: the family has no such LoRA format
    lora_files: ClassVar[dict[str, tuple[str, str]]] = {}
    #: adapter options that change how the model trains, not what it computes (e.g. a frozen
    #: branch): KD does not compare them with the options its pairs were generated with
    training_options: ClassVar[tuple[str, ...]] = ()
    #: how an exported student takes the control video (``student.json``'s ``control_input``);
    #: read from the adapter class itself, never inherited (a subclass may take control
    #: differently); None: not described
    control_input: ClassVar[str | None] = None
    #: whether the model takes conditional frames (``Conditioning.cond_latents`` and
    #: ``num_cond_frames``: leading latent frames given clean); a model that does not refuses them
    takes_conditional_frames: ClassVar[bool] = False

    #: channels C of the latents it denoises
    latent_channels: int
    #: channels of ``Conditioning.control`` (0 = the model takes no control)
    control_channels: int
    #: width D of the text embeddings ``Conditioning.text_embeds`` [B, L, D]
    text_dim: int
    #: number of transformer blocks (valid feature_block values are 0..num_blocks-1)
    num_blocks: int
    #: hidden size D of the block features
    feature_dim: int
    #: (pt, ph, pw): latent frames, height and width must be multiples of it
    patch_size: tuple[int, int, int]
    #: the context-parallel group this denoiser's passes are split over (a device mesh), set by
    #: :func:`~distill_pl.models.context_parallel.enable_context_parallel`; None: not split
    context_parallel_group = None

    @classmethod
    def from_config(
        cls,
        config: dict,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        on_meta: bool = False,
        **adapter_options,
    ) -> "Denoiser":
        """Random weights from the backbone ``config`` (``on_meta``: every tensor on the meta
        device: shapes and parameter counts of real-size configs without allocating them).
        The adapter is built as ``cls(config=cls.constructor_config(config), ...)``."""
        kwargs = dict(config=cls.constructor_config(config), dtype=dtype,
                      gradient_checkpointing=gradient_checkpointing, **adapter_options)
        if on_meta:
            with torch.device("meta"):
                return cls(**kwargs)
        return cls(**kwargs)

    @classmethod
    def constructor_config(cls, config: dict) -> dict:
        """``config`` as the adapter's ``config=`` argument takes it: without the ``_`` keys
        diffusers writes (``_class_name``, ``_diffusers_version``, ...)."""
        return {k: v for k, v in config.items() if not k.startswith("_")}

    @classmethod
    def folder_config(cls, path: str) -> dict:
        """What :meth:`from_config` takes, read from a local folder of this class without its
        weights (default: the ``transformer/`` (or the folder's own) ``config.json`` without
        ``_`` keys; an adapter of several models returns them all)."""
        from distill_pl.models.loading import read_config, transformer_config_file

        return read_config(transformer_config_file(path))

    @classmethod
    def variant(cls, config: dict) -> str | None:
        """The adapter that builds ``config`` (what :meth:`folder_config` returns), as the
        registry names adapters (``"module:AdapterClass"``), or None when this class does (the
        default). A family whose one diffusers class comes in several layouts (Wan 2.2's two
        experts, its per-token timesteps) names the adapter of the layout; the registry asks it
        before building or loading a denoiser and imports the adapter it names."""
        return None

    @property
    def backbone_config(self) -> dict:
        """The backbone's diffusers config without ``_`` keys (what :meth:`from_config` takes)."""
        raise NotImplementedError

    @property
    def adapter_options(self) -> dict:
        """The adapter's own constructor options (none by default); copies keep them."""
        return {}

    @property
    def blocks(self) -> nn.ModuleList:
        """The ``num_blocks`` transformer blocks of the main stream, in order: the
        discriminator's feature taps and the units of gradient checkpointing."""
        raise NotImplementedError

    def feature_blocks(self, feature_block: int) -> list[nn.Module]:
        """Every module whose output ``forward(..., feature_block=k)`` can return as features:
        ``[blocks[k]]`` by default; a model of several networks (Wan 2.2's two experts) lists
        block ``k`` of each, one of which gives each sample's features."""
        return [self.blocks[feature_block]]

    @property
    def components(self) -> dict[str, nn.Module]:
        """Pipeline component folder name -> the diffusers model (``ModelMixin``) that
        :meth:`save_components` writes there: by default each ``ModelMixin`` child module under
        its own name (``transformer``, and e.g. ``controlnet``)."""
        from diffusers import ModelMixin

        return {name: module for name, module in self.named_children() if isinstance(module, ModelMixin)}

    @property
    def fsdp_units(self) -> list[nn.Module]:
        """Modules sharded as one FSDP unit each (then the denoiser as the root unit):
        the blocks by default; an adapter adds its side branches' blocks."""
        return list(self.blocks)

    @property
    def context_parallel_plans(self) -> dict[str, dict]:
        """Context-parallel plans of the diffusers backbones: module path of a backbone (a
        diffusers ``ModelMixin``; dotted for a nested one, as ``get_submodule`` takes it) -> its
        plan in diffusers' ``_cp_plan`` format (which inputs and outputs of which submodules are
        split over the tokens and gathered back); see :mod:`distill_pl.models.context_parallel`.
        Empty (default): the family does not support context parallelism."""
        return {}

    def compile_blocks(self, **compile_options) -> None:
        """Regional compilation: each of :attr:`fsdp_units` (the repeated blocks, side branches
        included) is compiled on its own with ``torch.compile(**compile_options)``, as diffusers'
        ``compile_repeated_blocks`` does for the models that declare their repeated blocks; the
        rest of the network stays eager. Compiling is lazy: each block compiles at its first call
        (and again for new input shapes)."""
        for unit in self.fsdp_units:
            unit.compile(**compile_options)

    def eager_blocks(self) -> None:
        """Undo :meth:`compile_blocks`: every block runs eagerly again (``nn.Module.compile``
        keeps the compiled call in ``_compiled_call_impl``; None is the eager call)."""
        for unit in self.fsdp_units:
            unit._compiled_call_impl = None

    def forward(
        self, x_t: Tensor, sigma: Tensor, cond: Conditioning, feature_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

    def check_inputs(self, x_t: Tensor, sigma: Tensor, cond: Conditioning) -> None:
        """Raise ValueError unless ``x_t`` is [B, latent_channels, T, H, W] with T, H, W
        multiples of :attr:`patch_size`, ``sigma`` is [B], ``cond.text_embeds`` is
        [B, L, text_dim], ``cond.text_mask`` (if any) [B, L], and conditional frames (if any)
        go to a model that takes them, ``cond_latents`` shaped like ``x_t`` and
        ``num_cond_frames`` [B] within 0..T. The control is the adapter's own check."""
        if x_t.ndim != 5 or x_t.shape[1] != self.latent_channels:
            raise ValueError(
                f"x_t must be [B, {self.latent_channels}, T, H, W], got {list(x_t.shape)}"
            )
        batch, _, *sizes = x_t.shape
        if any(size % patch for size, patch in zip(sizes, self.patch_size)):
            raise ValueError(
                f"x_t frames/height/width {sizes} must be multiples of the patch size "
                f"{list(self.patch_size)}"
            )
        group = self.context_parallel_group
        tokens = math.prod(size // patch for size, patch in zip(sizes, self.patch_size))
        if group is not None and tokens % group.size():
            raise ValueError(f"{tokens} tokens per video cannot be split over the {group.size()} context-parallel "
                             f"processes: the token count (frames x height x width / patch) must be a multiple")
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be [B] = [{batch}], got {list(sigma.shape)}")
        text = cond.text_embeds
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(
                f"text_embeds must be [{batch}, L, {self.text_dim}], got {list(text.shape)}"
            )
        if cond.text_mask is not None and cond.text_mask.shape != text.shape[:2]:
            raise ValueError(
                f"text_mask must be [B, L] = {list(text.shape[:2])}, "
                f"got {list(cond.text_mask.shape)}"
            )
        if cond.cond_latents is None:
            return
        if not self.takes_conditional_frames:
            raise ValueError(f"{type(self).__name__} takes no conditional frames (cond.cond_latents is set)")
        if cond.cond_latents.shape != x_t.shape:
            raise ValueError(
                f"cond.cond_latents must be shaped like x_t {list(x_t.shape)}, got {list(cond.cond_latents.shape)}"
            )
        counts = cond.num_cond_frames
        if counts.shape != (batch,) or counts.is_floating_point() or (counts < 0).any() or (counts > sizes[0]).any():
            raise ValueError(
                f"cond.num_cond_frames must be [B] = [{batch}] integers in 0..{sizes[0]}, got {counts.tolist()}"
            )

    def run_with_feature_tap(self, run, feature_block: int | None, x_t: Tensor):
        """``run()`` (the backbone's velocity) in ``x_t``'s dtype; with ``feature_block``, also the
        hidden states of that block of :attr:`blocks` as a grid (:meth:`tokens_to_grid`), taken by
        a forward hook that is removed before backward (so checkpointing's recomputation does not
        fire it again); under context parallelism the block holds this rank's tokens, which are
        gathered first. ValueError for a block outside ``0 .. num_blocks - 1``."""
        if feature_block is None:
            return run().to(x_t.dtype)
        if not 0 <= feature_block < self.num_blocks:
            raise ValueError(f"feature_block={feature_block}: valid blocks are 0..{self.num_blocks - 1}")
        captured: list[Tensor] = []
        hook = self.blocks[feature_block].register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            velocity = run()
        finally:
            hook.remove()
        tokens = captured[0]
        if self.context_parallel_group is not None:
            from distill_pl.models.context_parallel import gather_tokens

            tokens = gather_tokens(tokens, self.context_parallel_group)
        return velocity.to(x_t.dtype), self.tokens_to_grid(tokens, x_t.shape).to(x_t.dtype)

    def tokens_to_grid(self, tokens: Tensor, shape: torch.Size) -> Tensor:
        """[B, N, D] block tokens -> [B, D, t, h, w] features on the token grid of latents of
        ``shape`` [B, C, T, H, W] (t = T / pt, ...), the inverse of the patch embedding's
        ``flatten(2).transpose(1, 2)`` (tokens frame-major, then rows, then columns)."""
        batch, _, frames, height, width = shape
        p_t, p_h, p_w = self.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        return tokens.transpose(1, 2).reshape(batch, tokens.shape[-1], *grid)

    def control_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape of ``Conditioning.control`` for latents ``x_t`` of ``latent_shape``
        [B, C, T, H, W]: [B, control_channels, T, H, W] by default (a control on the latent
        grid); a model that takes fewer control frames (an image's one latent frame) says so;
        None for a model without control."""
        if self.control_channels == 0:
            return None
        batch, _, *grid = latent_shape
        return (batch, self.control_channels, *grid)

    def encode_control(self, control: Tensor, autoencoder: "VideoAutoencoder") -> Tensor | None:
        """What ``Conditioning.control`` holds for this model, from the control video
        [B, 3, T, H, W] in [-1, 1]: None for a model without control, else by default the
        video encoded like the clips (``autoencoder.encode``; identity in pixel space)."""
        if self.control_channels == 0:
            return None
        return autoencoder.encode(control)

    def encoded_control_channels(self, autoencoder: "VideoAutoencoder") -> int:
        """Channels of :meth:`encode_control`'s output with ``autoencoder`` (0 without
        control); a model fits the autoencoder when this equals :attr:`control_channels`."""
        return autoencoder.latent_channels if self.control_channels else 0

    def sampler_sigma(self, timestep: Tensor, sigma: Tensor) -> Tensor:
        """The ``sigma`` (0-d tensor) a scheduler sampler passes to :meth:`forward` at the step
        with the scheduler's ``timesteps[i]`` and ``sigmas[i]``, as the model's official
        pipeline feeds its transformer. Default: ``sigmas[i]`` itself."""
        return sigma

    @property
    def named_experts(self) -> dict[str, "Denoiser"]:
        """A model of several experts, each denoising its own range of noise levels (Wan 2.2
        A14B's two): submodule name -> expert, itself a :class:`Denoiser` of one network,
        from the highest noise levels to the lowest. Each expert's gradient is its own (the
        non-finite policy can skip one expert's update alone) and each can stand alone (a
        shared DMD2 fake score is a copy of one). Empty (the default): one network."""
        return {}

    def low_noise_levels(self, sigma: Tensor) -> Tensor | None:
        """bool [B]: True where a two-expert model hands ``sigma`` [B] to its low-noise expert
        (the levels that take the pipeline's ``guidance_scale_2``); None for a model of one
        network (the default)."""
        return None

    def finish_sample(self, x0: Tensor, cond: Conditioning) -> Tensor:
        """The sample [B, C, T, H, W] as the model's pipeline returns it from the state ``x0``
        its sampler ends in: ``x0`` itself by default; a model that keeps conditioning frames
        clean puts them back."""
        return x0

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each of :attr:`blocks` in backward (non-reentrant)."""
        raise NotImplementedError

    def save_pretrained(self, folder: str) -> None:
        """Write the backbone as a diffusers model folder (config.json + safetensors)."""
        raise NotImplementedError

    def save_components(self, folder: str) -> None:
        """Write the model's component folders into a teacher or pipeline folder ``folder``:
        each of :attr:`components` as a diffusers model folder (config.json + safetensors)
        ``folder/<component>``."""
        for name, model in self.components.items():
            model.save_pretrained(str(Path(folder) / name), safe_serialization=True)

    def save_student_pipeline(
        self, folder: str, teacher: str | None, shift: float, noise_levels: tuple[float, ...] = (1.0,),
        sampler: str = "renoise",
    ) -> Path:
        """Write this model as a student folder that plain diffusers classes load: by default
        its components (:meth:`save_components`) and a flow-match Euler ``scheduler/`` with
        ``shift`` (``stochastic_sampling`` for more than one of ``noise_levels`` when the
        student's ``sampler`` is ``"renoise"``, plain Euler steps for ``"euler"``; one Euler
        step from sigma = 1 is ``eps - v(eps, 1)``); an adapter whose family has a diffusers
        pipeline writes that pipeline's full folder, its other components taken from the
        ``teacher`` folder. Returns the folder."""
        from distill_pl.diffusion.sampling import build_student_scheduler

        self.save_components(folder)
        build_student_scheduler(shift, len(noise_levels), sampler).save_pretrained(str(Path(folder) / "scheduler"))
        return Path(folder)

    def check_student_levels(self, noise_levels: tuple[float, ...]) -> None:
        """ValueError when :meth:`save_student_pipeline` cannot export a student at these
        noise levels (called by the stages before training, so a run does not fail at its
        export); every ladder is exportable by default."""

    def pretrained_state_dict(self, path: str) -> dict[str, Tensor]:
        """The weights of a folder of this model's class (a model or teacher folder, as
        :meth:`save_pretrained` writes it), keyed as ``self.state_dict()``."""
        raise NotImplementedError

    def empty_copy(self) -> "Denoiser":
        """An unsharded copy of this architecture (same config and adapter options) whose
        parameters are on the meta device and whose buffers are computed on the CPU; fill it
        with ``load_state_dict(state, assign=True)``. Works on an FSDP-sharded denoiser."""
        from accelerate import init_empty_weights
        from torch.distributed.fsdp import FSDPModule

        # fully_shard swaps the class for a subclass of (FSDPModule, adapter): take the adapter
        adapter = next(c for c in type(self).__mro__ if issubclass(c, Denoiser) and not issubclass(c, FSDPModule))
        with init_empty_weights(include_buffers=False):
            return adapter.from_config(self.backbone_config, **self.adapter_options)


class TransformerDenoiser(Denoiser):
    """A :class:`Denoiser` around ONE diffusers transformer, ``self.transformer`` (its only
    backbone): gradient checkpointing and the model folder are the transformer's."""

    transformer: nn.Module

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward (non-reentrant ``torch.utils.checkpoint``)."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def save_pretrained(self, folder: str) -> None:
        """Write the transformer as a diffusers model folder (config.json + safetensors)."""
        self.transformer.save_pretrained(folder, safe_serialization=True)
