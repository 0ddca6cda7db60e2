"""The :class:`Denoiser` adapter for Cosmos-Transfer2.5: diffusers' ``CosmosTransformer3DModel``
(the base) and ``CosmosControlNetModel`` (the control branch), trained together.

Conventions (checked against diffusers' ``Cosmos2_5_TransferPipeline``, first chunk, no
conditional frames, i.e. generation from pure noise; its UniPC scheduler has
``prediction_type="flow_prediction"``, where ``x0 = x_t - sigma * model_output``):

- the transformer predicts the flow velocity ``v = eps - x0`` (the pipeline's ``noise_pred``
  goes into ``scheduler.step`` as it is);
- it takes ``timestep = sigma`` itself (the pipeline passes ``scheduler.sigmas[i]``, rounded to
  the transformer dtype, then as float32), one value per latent frame: [B, 1, T, 1, 1];
- the transformer's ``in_channels`` is the latent channel count + 1: a condition-mask channel,
  passed as ``condition_mask`` [B, 1, T, H, W]: 1 on the conditional latent frames
  (``Conditioning.num_cond_frames`` leading frames), 0 elsewhere (all zeros without them);
  ``padding_mask`` [1, 1, H, W] is zeros (no padding), as the pipeline passes it;
- conditional frames (the pipeline's ``cond_latent``, ``cond_mask``, ``cond_indicator``): the
  model sees ``m * cond_latents + (1 - m) * x_t`` and, per latent frame, the timestep
  ``conditional_frame_timestep`` on the conditional frames and ``sigma`` on the others (the
  pipeline's default 0.1 for Transfer2.5); on the conditional frames the adapter returns the
  velocity of the straight path through ``x_t`` to the given latents, ``(x_t - cond_latents) /
  sigma``, whose clean estimate is the given latents (as Cosmos replaces the clean estimate of
  conditional frames by them): a loss on them is zero and trains nothing; samplers put the
  pipeline's ``noise - cond_latents`` there (:mod:`distill_pl.diffusion.conditional_frames`);
- text: ``encoder_hidden_states`` is ``Conditioning.text_embeds`` [B, L, D] unchanged: the
  pipeline feeds the transformer every one of its ``max_sequence_length`` positions, the
  padding tokens' hidden states included, with no attention mask; ``text_mask`` is not used.
  When the config has ``img_context_dim_in``, the pair ``(text, zeros [B, img_context_num_tokens,
  img_context_dim_in])`` is passed instead, as the pipeline does (no image context);
- control: ``Conditioning.control`` holds the control video's VAE latents, normalised like the
  clips', ``(z - latents_mean) / latents_std`` (:meth:`CosmosTransferDenoiser.encode_control`),
  with the shape of ``x_t``; the ControlNet pads them with zero channels to its
  ``in_channels - 2`` and returns one residual per ``controlnet_block_every_n`` base blocks,
  each multiplied by ``control_scale`` (the pipeline's ``controls_conditioning_scale``);
- CFG is outside the adapter: the pipeline's ``pred + g (pred - neg)`` is the project's
  ``u + w (c - u)`` with ``w = g + 1``; the ControlNet sees the control in both branches;
- tokens: the patch embedding orders tokens frame-major, then rows, then columns, so block
  features [B, t*h*w, D] are reshaped to [B, D, t, h, w].

The control encoding is an option (``control_encoding``): the pipeline encodes the control
video with a *sample* of the VAE posterior drawn from its generator (``"sample"``); by default
the project uses the posterior mean (``"mean"``, :meth:`~distill_pl.models.autoencoder.WanVAE.encode`),
so a control gives one conditioning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import CosmosControlNetModel, CosmosTransformer3DModel
from torch import Tensor, nn

from distill_pl.families.cosmos_transfer import padding_resize
from distill_pl.families.cosmos_transfer.configs import CONTROLNET_CLASS, PIPELINE_CLASS, TRANSFORMER_CLASS
from distill_pl.families.cosmos_transfer.context_parallel import (
    COSMOS_CONTROLNET_CP_PLAN,
    COSMOS_TRANSFORMER_CP_PLAN,
    install_self_attention_processors,
)
from distill_pl.families.cosmos_transfer.export import save_cosmos_student_pipeline
from distill_pl.models.autoencoder import VideoAutoencoder, WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import ModelFolderError, cast_parameters, find_diffusers_model_folder, parse_dtype
from distill_pl.util.paths import resolve_path

padding_resize.install()

#: Linear layers of every Cosmos block (diffusers' ``CosmosTransformerBlock``), in the base
#: and in the ControlNet: self-attention ``attn1`` and text cross-attention ``attn2`` (q, k,
#: v, out), the image-context projections of ``attn2`` (models with ``img_context_dim_in``),
#: and the FFN (``ff.net.0.proj`` in, ``ff.net.2`` out). peft matches module-path suffixes.
COSMOS_BLOCK_LINEARS = (
    "to_q", "to_k", "to_v", "to_out.0", "q_img", "k_img", "v_img", "ff.net.0.proj", "ff.net.2",
)
#: the values of ``control_encoding``: the VAE posterior's mean, or a draw from it (the pipeline's)
CONTROL_ENCODINGS = ("mean", "sample")


class CosmosTransferDenoiser(Denoiser):
    """Cosmos-Transfer2.5 base + ControlNet as one velocity predictor ``(x_t, sigma, cond) -> v``.

    Exactly one of ``path`` or ``config`` must be given:

    - ``path``: a local folder holding ``transformer/`` (``CosmosTransformer3DModel``) and
      ``controlnet/`` (``CosmosControlNetModel``): a diffusers pipeline folder
      (``model_index.json`` beside them) or a folder :meth:`save_pretrained` wrote;
      safetensors only, never the hub. ``controlnet_path`` (a ControlNet model folder, or a
      folder with ``controlnet/``) replaces ``path``'s ControlNet, for a base pipeline and a
      ControlNet variant (edge, depth, ...) kept apart;
    - ``config``: ``{"transformer": {...}, "controlnet": {...}}``, keyword arguments of the two
      diffusers classes, random weights.

    ``control_scale`` multiplies every ControlNet residual (a float, or one per control block).
    ``freeze_control_branch`` keeps every ControlNet parameter at ``requires_grad=False``,
    whatever ``requires_grad_`` is later called with; by default base and ControlNet train
    together. ``control_encoding`` is how :meth:`encode_control` encodes the control video:
    ``"mean"`` (the VAE posterior's mean, the default) or ``"sample"`` (a draw from the
    posterior, as the pipeline encodes it). ``conditional_frame_timestep`` is the noise level
    the model is told for conditional frames (the pipeline's argument of that name, 0.1 by
    default). ``dtype`` is the parameter dtype; ``_keep_in_fp32_modules`` stay float32.
    Gradient checkpointing is per block (base and ControlNet), non-reentrant.
    """

    class_name = TRANSFORMER_CLASS
    #: the ``_class_name`` of the diffusers pipeline folder this adapter loads
    pipeline_class_name = PIPELINE_CLASS
    lora_targets = COSMOS_BLOCK_LINEARS
    control_input = (
        "Cosmos2_5_TransferPipeline(controls=(control + 1) / 2), the control video as "
        "[B, T, 3, H, W] in [0, 1]; the pipeline encodes it with the VAE for the ControlNet"
    )
    takes_conditional_frames = True

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        controlnet_path: str | None = None,
        control_scale: float | list[float] = 1.0,
        freeze_control_branch: bool = False,
        control_encoding: str = "mean",
        conditional_frame_timestep: float = 0.1,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError(
                "CosmosTransferDenoiser needs exactly one of `path` (a local folder) or `config`"
            )
        if control_encoding not in CONTROL_ENCODINGS:
            raise ValueError(
                f"denoiser_options.control_encoding must be one of {CONTROL_ENCODINGS}, got {control_encoding!r}"
            )
        torch_dtype = parse_dtype(dtype)
        if path is not None:
            transformer_folder, controlnet_folder = transfer_model_folders(path, controlnet_path)
            where = str(resolve_path(path))
            load = dict(local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype)
            self.transformer = CosmosTransformer3DModel.from_pretrained(transformer_folder, **load)
            self.controlnet = CosmosControlNetModel.from_pretrained(controlnet_folder, **load)
        else:
            if controlnet_path is not None:
                raise ValueError("controlnet_path goes with path, not with config")
            where = "config"
            self.transformer = CosmosTransformer3DModel(**config["transformer"])
            self.controlnet = CosmosControlNetModel(**config["controlnet"])
            cast_parameters(self.transformer, torch_dtype)
            cast_parameters(self.controlnet, torch_dtype)
        check_transfer_pair(dict(self.transformer.config), dict(self.controlnet.config), where)
        install_self_attention_processors(self.transformer.transformer_blocks)
        install_self_attention_processors(self.controlnet.control_blocks)
        cfg = self.transformer.config
        self.latent_channels = cfg.out_channels
        self.control_channels = cfg.out_channels
        self.num_blocks = len(self.transformer.transformer_blocks)
        self.feature_dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)
        self.control_scale = control_scale
        self.freeze_control_branch = freeze_control_branch
        self.control_encoding = control_encoding
        self.conditional_frame_timestep = float(conditional_frame_timestep)
        self.requires_grad_(True)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_config(cls, config: dict, dtype: str = "float32", gradient_checkpointing: bool = False,
                    on_meta: bool = False, **adapter_options) -> "CosmosTransferDenoiser":
        """As :meth:`Denoiser.from_config`, ``config`` holding both models' configs; a
        ``controlnet_path`` option (where a ControlNet variant's weights are) is not used: the
        variants of one base share its ControlNet's architecture, and weights are random here."""
        adapter_options.pop("controlnet_path", None)
        return super().from_config(config, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                                   on_meta=on_meta, **adapter_options)

    @classmethod
    def constructor_config(cls, config: dict) -> dict:
        """``{"transformer": {...}, "controlnet": {...}}`` without the ``_`` keys of either."""
        return {part: super(CosmosTransferDenoiser, cls).constructor_config(config[part])
                for part in ("transformer", "controlnet")}

    @property
    def backbone_config(self) -> dict:
        """``{"transformer": ..., "controlnet": ...}``: the two diffusers configs, no ``_`` keys."""
        return {
            "transformer": public_config(self.transformer.config),
            "controlnet": public_config(self.controlnet.config),
        }

    training_options = ("freeze_control_branch",)

    @property
    def adapter_options(self) -> dict:
        return {"control_scale": self.control_scale, "freeze_control_branch": self.freeze_control_branch,
                "control_encoding": self.control_encoding,
                "conditional_frame_timestep": self.conditional_frame_timestep}

    @property
    def blocks(self) -> nn.ModuleList:
        """The base transformer's blocks (feature taps); the ControlNet's are in :attr:`fsdp_units`."""
        return self.transformer.transformer_blocks

    @property
    def fsdp_units(self) -> list[nn.Module]:
        """Every base block and every ControlNet block."""
        return [*self.transformer.transformer_blocks, *self.controlnet.control_blocks]

    @property
    def context_parallel_plans(self) -> dict[str, dict]:
        """The base's and the ControlNet's plans (:mod:`.context_parallel`): both split their
        tokens the same way, so each rank's ControlNet residuals meet its own base tokens."""
        return {"transformer": COSMOS_TRANSFORMER_CP_PLAN, "controlnet": COSMOS_CONTROLNET_CP_PLAN}

    def requires_grad_(self, requires_grad: bool = True) -> "CosmosTransferDenoiser":
        """As ``nn.Module.requires_grad_``, but a frozen control branch stays frozen."""
        super().requires_grad_(requires_grad)
        if self.freeze_control_branch:
            self.controlnet.requires_grad_(False)
        return self

    def encode_control(
        self, control: Tensor, autoencoder: VideoAutoencoder, generator: torch.Generator | None = None
    ) -> Tensor:
        """``Conditioning.control`` from the control video [B, 3, T, H, W] in [-1, 1]: its
        normalised VAE latents [B, C, 1 + (T - 1) / tc, H / s, W / s], as the pipeline encodes
        each chunk's control video: the posterior mean (``autoencoder.encode``) with
        ``control_encoding="mean"``; with ``"sample"``, a posterior draw
        (:meth:`WanVAE.encode_sample`) from ``generator`` (torch's global RNG without one), the
        pipeline's draw when ``generator`` is in the state the pipeline's is at that point.

        T must be ``1 + tc * k`` (tc: the VAE's temporal compression) and H, W multiples of
        ``s * patch`` (s: its spatial compression), the pipeline's frame and size rule."""
        if control.ndim != 5 or control.shape[1] != 3:
            raise ValueError(f"control video must be [B, 3, T, H, W] in [-1, 1], got {list(control.shape)}")
        frames, height, width = control.shape[2:]
        step_t = autoencoder.temporal_compression
        if (frames - 1) % step_t:
            raise ValueError(
                f"control video has {frames} frames; the VAE needs 1 + {step_t}k frames "
                f"(e.g. {1 + step_t * ((frames - 1) // step_t)} or {1 + step_t * ((frames - 1) // step_t + 1)})"
            )
        step_hw = autoencoder.spatial_compression * self.patch_size[1]
        if height % step_hw or width % step_hw:
            raise ValueError(
                f"control video is {height}x{width}; height and width must be multiples of {step_hw} "
                f"(VAE compression {autoencoder.spatial_compression} x patch {self.patch_size[1]})"
            )
        if self.control_encoding == "mean":
            return autoencoder.encode(control)
        if not isinstance(autoencoder, WanVAE):
            raise ValueError(
                f"control_encoding 'sample' draws from a VAE posterior; {type(autoencoder).__name__} has none"
            )
        return autoencoder.encode_sample(control, generator)

    def forward(
        self, x_t: Tensor, sigma: Tensor, cond: Conditioning, feature_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity [B, C, T, H, W] (dtype of ``x_t``), and features [B, D, T/pt, H/ph, W/pw]
        after base block ``feature_block`` if it is given (gradients flow through both). On the
        conditional frames of ``cond``, the path velocity (see the module notes)."""
        self._check_inputs(x_t, sigma, cond)
        dtype = self.transformer.dtype
        inputs = CosmosInputs.of(x_t, sigma, cond, dtype, self.conditional_frame_timestep)
        common = dict(
            timestep=inputs.timestep,
            encoder_hidden_states=self._encoder_hidden_states(cond.text_embeds.to(dtype)),
            condition_mask=inputs.condition_mask,
            padding_mask=inputs.padding_mask,
            return_dict=False,
        )
        residuals = self.controlnet(
            controls_latents=cond.control.to(dtype),
            latents=inputs.latents,
            conditioning_scale=self.control_scale,
            **common,
        )[0]
        kwargs = dict(hidden_states=inputs.latents, block_controlnet_hidden_states=residuals, **common)
        run = inputs.velocity(lambda: self.transformer(**kwargs)[0], x_t, sigma, cond)
        return self.run_with_feature_tap(run, feature_block, x_t)

    def _encoder_hidden_states(self, text: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``text``, or ``(text, zero image context)`` for a model with ``img_context_dim_in``."""
        cfg = self.transformer.config
        if not cfg.img_context_dim_in:
            return text
        image = text.new_zeros(text.shape[0], cfg.img_context_num_tokens, cfg.img_context_dim_in)
        return text, image

    @property
    def text_dim(self) -> int:
        """D of ``Conditioning.text_embeds``: the cross-attention projection's input width when
        the model has one (Cosmos 2.5: Qwen2.5-VL layers concatenated), else ``text_embed_dim``."""
        return text_input_dim(dict(self.transformer.config))

    def _check_inputs(self, x_t: Tensor, sigma: Tensor, cond: Conditioning) -> None:
        self.check_inputs(x_t, sigma, cond)
        batch, _, *sizes = x_t.shape
        expected = [batch, self.control_channels, *sizes]
        if cond.control is None:
            raise ValueError(
                f"Cosmos-Transfer2.5 needs cond.control (control-video latents) of shape {expected}, got None"
            )
        if list(cond.control.shape) != expected:
            raise ValueError(
                f"cond.control must be {expected} (the control video's latents, matching x_t), "
                f"got {list(cond.control.shape)}: is the control video as long and as large as the clip?"
            )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each base and ControlNet block in backward (non-reentrant)."""
        for model in (self.transformer, self.controlnet):
            if enabled:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()

    def save_pretrained(self, folder: str) -> None:
        """Write ``folder/transformer`` and ``folder/controlnet`` (diffusers model folders)."""
        self.transformer.save_pretrained(str(Path(folder) / "transformer"), safe_serialization=True)
        self.controlnet.save_pretrained(str(Path(folder) / "controlnet"), safe_serialization=True)

    def save_components(self, folder: str) -> None:
        """``folder/transformer`` and ``folder/controlnet`` (:meth:`save_pretrained`)."""
        self.save_pretrained(folder)

    def save_student_pipeline(
        self, folder: str, teacher: str | None, shift: float, noise_levels: tuple[float, ...] = (1.0,),
        sampler: str = "renoise",
    ) -> Path:
        """The full ``Cosmos2_5_TransferPipeline`` folder of this student at ``noise_levels``
        (its K steps), its VAE, text encoder and tokenizer copied from the ``teacher`` pipeline
        folder (an earlier export in ``folder`` is replaced): see
        :func:`save_cosmos_student_pipeline`.
        Call it with ``num_inference_steps = K`` and ``controls_conditioning_scale =
        control_scale``. ``shift`` is not needed: the scheduler is fitted to the levels."""
        if teacher is None:
            raise ValueError(
                "a Cosmos-Transfer2.5 student is exported as a full pipeline folder: the "
                "teacher pipeline folder (VAE, text encoder, tokenizer) is needed"
            )
        return save_cosmos_student_pipeline(folder, self, teacher, replace=True, noise_levels=noise_levels,
                                            sampler=sampler)

    def check_student_levels(self, noise_levels: tuple[float, ...]) -> None:
        """ValueError unless a ``FlowMatchEulerDiscreteScheduler`` gives these levels from
        ``set_timesteps(K)`` (the pipeline passes no custom sigmas)."""
        from distill_pl.diffusion.student_scheduler import few_step_euler_scheduler

        few_step_euler_scheduler(noise_levels)

    @classmethod
    def folder_config(cls, path: str) -> dict:
        """``{"transformer": ..., "controlnet": ...}`` from the ``config.json`` files of the
        folder's ``transformer/`` and ``controlnet/`` (weights not needed)."""
        from distill_pl.models.loading import read_config

        root = resolve_path(path)
        config = {}
        for part in ("transformer", "controlnet"):
            file = root / part / "config.json"
            if not file.is_file():
                raise ModelFolderError(
                    f"{root}: no {part}/config.json; a Cosmos-Transfer2.5 folder holds "
                    "transformer/ and controlnet/"
                )
            config[part] = read_config(file)
        return config

    def pretrained_state_dict(self, path: str) -> dict[str, Tensor]:
        """The safetensors of ``path``'s ``transformer/`` and ``controlnet/`` as
        ``transformer.*`` and ``controlnet.*`` keys (``self.state_dict()``'s)."""
        from safetensors.torch import load_file

        state = {}
        for prefix, folder in zip(("transformer", "controlnet"), transfer_model_folders(path)):
            for file in sorted(folder.glob("*.safetensors")):
                state.update({f"{prefix}.{k}": v for k, v in load_file(file).items()})
        return state


@dataclass
class CosmosInputs:
    """What a Cosmos 2.5 pipeline feeds its transformer (and ControlNet) for ``x_t`` [B, C, T,
    H, W] at ``sigma`` [B]: ``latents`` (the given latents on conditional frames, ``x_t``
    elsewhere), ``timestep`` [B, 1, T, 1, 1] float32 (``conditional_frame_timestep`` on
    conditional frames, ``sigma`` in the model dtype elsewhere), ``condition_mask`` [B, 1, T, H,
    W] (1 on conditional frames), ``padding_mask`` [1, 1, H, W] zeros; ``given`` [B, 1, T, 1, 1]
    the conditional-frame mask (None without conditional frames)."""

    latents: Tensor
    timestep: Tensor
    condition_mask: Tensor
    padding_mask: Tensor
    given: Tensor | None

    @classmethod
    def of(cls, x_t: Tensor, sigma: Tensor, cond: Conditioning, dtype: torch.dtype,
           conditional_frame_timestep: float) -> "CosmosInputs":
        batch, _, frames, height, width = x_t.shape
        latents = x_t.to(dtype)
        padding_mask = latents.new_zeros(1, 1, height, width)
        timestep = sigma.to(dtype).float().view(batch, 1, 1, 1, 1).expand(batch, 1, frames, 1, 1)
        given = cond.conditional_frame_mask(frames, dtype)
        if given is None:
            return cls(latents, timestep, latents.new_zeros(batch, 1, frames, height, width), padding_mask, None)
        latents = given * cond.cond_latents.to(dtype) + (1 - given) * latents
        timestep = given.float() * conditional_frame_timestep + (1 - given.float()) * timestep
        return cls(latents, timestep, given.expand(batch, 1, frames, height, width), padding_mask, given)

    def velocity(self, run, x_t: Tensor, sigma: Tensor, cond: Conditioning):
        """``run`` (the network's velocity), with the conditional frames' replaced by
        ``(x_t - cond_latents) / sigma``: the velocity whose clean estimate ``x_t - sigma v`` is
        the given latents (sigma clamped above 1e-6); ``run`` itself without them."""
        if self.given is None:
            return run
        given = self.given
        level = sigma.float().clamp_min(1e-6).view(-1, 1, 1, 1, 1)

        def velocity() -> Tensor:
            raw = run()
            path = ((x_t.float() - cond.cond_latents.float()) / level).to(raw.dtype)
            return raw * (1 - given) + path * given

        return velocity


def transfer_model_folders(path: str, controlnet_path: str | None = None) -> tuple[Path, Path]:
    """The ``transformer/`` and ``controlnet/`` folders of a Cosmos-Transfer2.5 folder ``path``
    (``controlnet_path``, if given, supplies the ControlNet instead).

    Raises :class:`ModelFolderError` naming the folder when ``path`` is a model folder itself
    (a bare ControlNet has no base), or lacks ``transformer/`` or ``controlnet/``.
    """
    root = resolve_path(path)
    if not root.is_dir():
        raise ModelFolderError(
            f"{root}: folder does not exist. Only local diffusers folders are loaded "
            "(never from the Hugging Face hub); download the model and give its local path."
        )
    if (root / "config.json").is_file():
        found = _class_name(root / "config.json")
        if found == CONTROLNET_CLASS:
            raise ModelFolderError(
                f"{root}: a bare {CONTROLNET_CLASS} folder has no base model; give the "
                f"Cosmos-Transfer2.5 pipeline folder (transformer/ + controlnet/), or this "
                "folder as controlnet_path beside the base pipeline folder"
            )
        raise ModelFolderError(
            f"{root}: a {found!r} model folder; expected a Cosmos-Transfer2.5 pipeline folder "
            "with transformer/ and controlnet/"
        )
    if not (root / "transformer").is_dir():
        has = "has controlnet/ but" if (root / "controlnet").is_dir() else "has"
        raise ModelFolderError(
            f"{root}: {has} no transformer/: a Cosmos-Transfer2.5 ControlNet needs its base "
            f"{TRANSFORMER_CLASS} in transformer/"
        )
    transformer = find_diffusers_model_folder(str(root), TRANSFORMER_CLASS, "transformer")
    if controlnet_path is not None:
        return transformer, find_diffusers_model_folder(controlnet_path, CONTROLNET_CLASS, "controlnet")
    if not (root / "controlnet").is_dir():
        raise ModelFolderError(
            f"{root}: no controlnet/ ({CONTROLNET_CLASS}); a Cosmos model without its ControlNet "
            "is not a Transfer model (or give the ControlNet folder as controlnet_path)"
        )
    return transformer, find_diffusers_model_folder(str(root), CONTROLNET_CLASS, "controlnet")


def check_transfer_pair(transformer: dict, controlnet: dict, where: str) -> None:
    """ValueError naming ``where`` unless the two configs form a Cosmos-Transfer2.5 model: base
    ``in_channels = out_channels + 1`` (condition mask), ``controlnet_block_every_n`` set, one
    ControlNet block per injection point, the ControlNet's base input ``latent_channels =
    out_channels + 2`` (condition and padding masks), room for the control latents in its
    ``in_channels - 2``, equal widths and patch sizes, and the same text embedding width D.
    (The image context may differ: the ControlNet ignores it without ``img_context_dim_in``.)"""
    latent = transformer["out_channels"]
    every = transformer.get("controlnet_block_every_n")
    hidden = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    problems = []
    if transformer["in_channels"] != latent + 1:
        problems.append(
            f"transformer in_channels {transformer['in_channels']} != out_channels {latent} + 1 "
            "(the condition-mask channel)"
        )
    if not every:
        problems.append("transformer has no controlnet_block_every_n (not a Transfer base)")
    else:
        points = len(range(0, transformer["num_layers"], every))
        if controlnet["n_controlnet_blocks"] != points:
            problems.append(
                f"controlnet has {controlnet['n_controlnet_blocks']} blocks, the transformer "
                f"injects {points} residuals ({transformer['num_layers']} layers, every {every})"
            )
    if controlnet["latent_channels"] != latent + 2:
        problems.append(
            f"controlnet latent_channels {controlnet['latent_channels']} != {latent} + 2 "
            "(latents + condition mask + padding mask)"
        )
    if controlnet["in_channels"] - 2 < latent:
        problems.append(
            f"controlnet in_channels {controlnet['in_channels']} leaves no room for {latent} "
            "control latent channels + 2 masks"
        )
    if controlnet["model_channels"] != hidden:
        problems.append(f"controlnet model_channels {controlnet['model_channels']} != transformer width {hidden}")
    if text_input_dim(controlnet) != text_input_dim(transformer):
        problems.append(
            f"text embeddings: the controlnet takes D = {text_input_dim(controlnet)}, "
            f"the transformer D = {text_input_dim(transformer)}"
        )
    for key in ("text_embed_dim", "patch_size"):
        if _as_tuple(controlnet.get(key)) != _as_tuple(transformer.get(key)):
            problems.append(f"{key}: controlnet {controlnet.get(key)} != transformer {transformer.get(key)}")
    if problems:
        raise ValueError(f"{where}: not a Cosmos-Transfer2.5 base + ControlNet pair: {'; '.join(problems)}")


def text_input_dim(config: dict) -> int:
    """D of the text embeddings a Cosmos model takes (before its cross-attention projection)."""
    if config.get("use_crossattn_projection"):
        return config["crossattn_proj_in_channels"]
    return config["text_embed_dim"]


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _class_name(config_file: Path) -> str | None:
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{config_file}: not valid JSON ({error})") from error
    return config.get("_class_name") if isinstance(config, dict) else None


def public_config(config) -> dict:
    """A diffusers config as a dict without its ``_`` keys (what the model class takes)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}

