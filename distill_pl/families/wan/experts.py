"""The :class:`Denoiser` adapter for Wan 2.2 A14B: two experts of one architecture and the noise
boundary between them, as ONE denoiser that routes each sample by its noise level exactly as
``WanPipeline`` / ``WanImageToVideoPipeline`` do.

- ``transformer`` (the high-noise expert, :attr:`WanExpertsDenoiser.high_noise`) denoises the
  samples whose timestep ``1000 * sigma`` (float32, as the transformer takes it) is
  ``>= boundary_ratio * 1000``; ``transformer_2`` (the low-noise expert,
  :attr:`WanExpertsDenoiser.low_noise`) the others. A batch with levels on both sides is split,
  each part run by its expert, and put back in order.
- The pipeline's ``guidance_scale_2`` (the CFG weight of the low-noise expert) is the
  ``guidance_2`` of :func:`~distill_pl.models.guidance.velocity_fn`, which asks
  :meth:`WanExpertsDenoiser.low_noise_levels` where it applies.
- Each expert is a :class:`~distill_pl.families.wan.adapter.WanDenoiser` (or a
  :class:`~distill_pl.families.wan.ti2v.WanTI2VDenoiser` when the pipeline sets
  ``expand_timesteps``): same velocity, timestep and text conventions. Image-to-video
  (``WanImageToVideoPipeline``, no image encoder): ``Conditioning.control`` is the first-frame
  mask and latents concatenated on channels
  (:func:`~distill_pl.families.wan.image_condition.first_frame_condition`).
- Module names: ``high_noise.transformer.*`` and ``low_noise.transformer.*`` (state dicts,
  LoRA and FSDP units cover both experts; each expert's blocks are FSDP units; context
  parallelism splits each expert with Wan's plan).

``config`` (and :attr:`WanExpertsDenoiser.backbone_config`) is what
:func:`~distill_pl.families.wan.layout.wan_folder_config` reads from a two-expert folder:
``{"transformer", "transformer_2", "boundary_ratio", "pipeline_class"[, "expand_timesteps"]}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from distill_pl.families.wan.adapter import WAN_BLOCK_LINEARS, WanDenoiser, check_one_source, wan_timestep
from distill_pl.families.wan.image_condition import first_frame_condition
from distill_pl.families.wan.layout import SECOND_EXPERT, wan_folder_config, write_layout_index
from distill_pl.families.wan.ti2v import WanTI2VDenoiser
from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import ModelFolderError
from distill_pl.util.paths import resolve_path

#: the image-to-video pipeline, whose experts take the first-frame condition as control
I2V_PIPELINE = "WanImageToVideoPipeline"


class WanExpertsDenoiser(Denoiser):
    """Two Wan experts switched at ``boundary_ratio`` (see the module docstring).

    Exactly one of ``path`` (a local two-expert pipeline folder: ``transformer/``,
    ``transformer_2/``, ``model_index.json`` with ``boundary_ratio``) or ``config`` must be
    given; ``config`` is read from ``path`` when loading. The experts must have the same
    transformer config (ValueError naming the keys that differ).
    """

    class_name = "WanTransformer3DModel"
    lora_targets = WAN_BLOCK_LINEARS
    #: the HIGH/LOW pair: ``load_lora_weights(high)`` loads into ``transformer`` (high noise),
    #: ``load_lora_weights(low, load_into_transformer_2=True)`` into ``transformer_2``
    lora_files = {"high_noise_lora.safetensors": ("high_noise.", "transformer"),
                  "low_noise_lora.safetensors": ("low_noise.", SECOND_EXPERT)}
    control_input = (
        "WanImageToVideoPipeline(image=the control video's first frame as a PIL RGB image, "
        "(frame + 1) * 127.5): the pipeline builds the first-frame mask and latents itself"
    )

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        check_one_source(self, path, config)
        if path is not None:
            root = resolve_path(path)
            config = wan_folder_config(root)
            where = root
        else:
            where = "the two-expert config"
        if SECOND_EXPERT not in config:
            raise ModelFolderError(f"{where}: not a two-expert Wan folder (no {SECOND_EXPERT})")
        _check_same_experts(config["transformer"], config[SECOND_EXPERT], where)
        self.boundary_ratio = float(config["boundary_ratio"])
        self.pipeline_class_name = config.get("pipeline_class", "WanPipeline")
        self.expand_timesteps = bool(config.get("expand_timesteps", False))
        expert = WanTI2VDenoiser if self.expand_timesteps else WanDenoiser
        options = dict(gradient_checkpointing=gradient_checkpointing, dtype=dtype)
        if path is not None:
            self.high_noise = expert(path=str(root / "transformer"), **options)
            self.low_noise = expert(path=str(root / SECOND_EXPERT), **options)
        else:
            self.high_noise = expert(config=Denoiser.constructor_config(config["transformer"]), **options)
            self.low_noise = expert(config=Denoiser.constructor_config(config[SECOND_EXPERT]), **options)
        self.folder = None if path is None else root
        high = self.high_noise
        self.latent_channels, self.control_channels = high.latent_channels, high.control_channels
        self.text_dim, self.num_blocks = high.text_dim, high.num_blocks
        self.feature_dim, self.patch_size = high.feature_dim, high.patch_size

    @property
    def experts(self) -> tuple[WanDenoiser, WanDenoiser]:
        """(high-noise expert, low-noise expert)."""
        return self.high_noise, self.low_noise

    @property
    def named_experts(self) -> dict[str, WanDenoiser]:
        """``{"high_noise": ..., "low_noise": ...}``, highest noise levels first."""
        return {"high_noise": self.high_noise, "low_noise": self.low_noise}

    @property
    def backbone_config(self) -> dict:
        config = {
            "transformer": self.high_noise.transformer_config, SECOND_EXPERT: self.low_noise.transformer_config,
            "boundary_ratio": self.boundary_ratio, "pipeline_class": self.pipeline_class_name,
        }
        if self.expand_timesteps:
            config["expand_timesteps"] = True
        return config

    @property
    def blocks(self) -> nn.ModuleList:
        """The high-noise expert's blocks (each expert taps its own block ``feature_block``)."""
        return self.high_noise.blocks

    def feature_blocks(self, feature_block: int) -> list[nn.Module]:
        """Block ``feature_block`` of the high-noise expert, then of the low-noise one: each
        sample's features come from the expert that owns its noise level."""
        return [expert.blocks[feature_block] for expert in self.experts]

    @property
    def components(self) -> dict[str, nn.Module]:
        """The experts' transformers: ``transformer`` (high noise), ``transformer_2`` (low noise)."""
        return {"transformer": self.high_noise.transformer, SECOND_EXPERT: self.low_noise.transformer}

    @property
    def fsdp_units(self) -> list[nn.Module]:
        return [*self.high_noise.fsdp_units, *self.low_noise.fsdp_units]

    @property
    def context_parallel_plans(self) -> dict[str, dict]:
        """Each expert's plan under its path (``high_noise.transformer``,
        ``low_noise.transformer``): every call runs one expert or both on their parts of the
        batch, each split over the same group."""
        named = (("high_noise", self.high_noise), ("low_noise", self.low_noise))
        return {f"{name}.{path}": plan for name, expert in named for path, plan in expert.context_parallel_plans.items()}

    @property
    def context_parallel_group(self):
        """The context-parallel group (None: none), the experts': the expert that runs a sample
        checks its token count and gathers its block features over it."""
        return self.high_noise.context_parallel_group

    @context_parallel_group.setter
    def context_parallel_group(self, group) -> None:
        for expert in self.experts:
            expert.context_parallel_group = group

    def sampler_sigma(self, timestep: Tensor, sigma: Tensor) -> Tensor:
        return self.high_noise.sampler_sigma(timestep, sigma)

    def low_noise_levels(self, sigma: Tensor) -> Tensor:
        """bool [B]: ``1000 * sigma < boundary_ratio * 1000``, compared in float32 on the
        timestep the transformer takes (the pipeline compares its timestep with the boundary
        the same way)."""
        return wan_timestep(sigma) < self.boundary_ratio * 1000.0

    def forward(
        self, x_t: Tensor, sigma: Tensor, cond: Conditioning, feature_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity (and features after block ``feature_block``) of each sample from the
        expert owning its noise level. Levels on the meta device (a memory estimate) have no
        values: the high-noise expert runs the whole batch (a split batch holds the same
        activations). Sharded over several processes, an expert that owns no sample here but
        one on another process runs on this batch's first sample, and zero times its output is
        added to the result (:meth:`_experts_to_run`)."""
        self.high_noise._check_inputs(x_t, sigma, cond)
        if sigma.is_meta:
            return self.high_noise(x_t, sigma, cond, feature_block)
        low = self.low_noise_levels(sigma)
        run_high, run_low = self._experts_to_run(low)
        if not run_low:
            return self.high_noise(x_t, sigma, cond, feature_block)
        if not run_high:
            return self.low_noise(x_t, sigma, cond, feature_block)
        high = ~low
        parts, placeholders = [], []
        for expert, mine in ((self.high_noise, high), (self.low_noise, low)):
            if mine.any():
                out = expert(x_t[mine], sigma[mine], cond.select(mine), feature_block)
                parts.append(out if feature_block is not None else (out,))
            else:  # needed on another process only: run it on this process's first sample, unused
                out = expert(x_t[:1], sigma[:1], cond.select(slice(0, 1)), feature_block)
                placeholders.extend(out if feature_block is not None else (out,))
        # nothing of the placeholder's values, but its backward (zero gradients) joins FSDP's reduction
        unused = sum(t.sum() for t in placeholders) * 0.0 if placeholders else None
        order = torch.cat([high.nonzero()[:, 0], low.nonzero()[:, 0]]).argsort()
        merged = []
        for tensors in zip(*parts):
            joined = torch.cat(tensors)[order]
            merged.append(joined if unused is None else joined + unused.to(joined.dtype))
        return merged[0] if feature_block is None else tuple(merged)

    def _experts_to_run(self, low: Tensor) -> tuple[bool, bool]:
        """(run the high-noise expert, run the low-noise one) for a batch whose low-noise
        levels are ``low`` (bool [B]): each expert that owns a sample here, or, when the
        experts are sharded with FSDP2 over several processes, on any process. Sharded, every
        process must call the same FSDP units (each forward all-gathers the unit's weights
        over all of them, each backward reduce-scatters its gradients), yet each data-parallel
        rank routes its own samples; a process that owns no sample of an expert another one
        runs calls it anyway on a placeholder (see :meth:`forward`)."""
        needed = torch.stack([(~low).any(), low.any()])
        if isinstance(self, FSDPModule) and torch.distributed.get_world_size() > 1:
            # the stages shard every network over all processes (distill_pl.models.sharding)
            needed = needed.to(torch.int32)
            torch.distributed.all_reduce(needed, op=torch.distributed.ReduceOp.MAX)
        run_high, run_low = (bool(n) for n in needed.tolist())
        return run_high, run_low

    def finish_sample(self, x0: Tensor, cond: Conditioning) -> Tensor:
        return self.low_noise.finish_sample(x0, cond)

    def encode_control(self, control: Tensor, autoencoder: VideoAutoencoder) -> Tensor | None:
        """Image-to-video: the first-frame condition [B, k + z, T', H', W'] of a video
        [B, 3, T, H, W] in [-1, 1] whose first frame is the conditioning image; otherwise as
        the experts encode it."""
        if self.pipeline_class_name == I2V_PIPELINE and not self.expand_timesteps:
            frames, height, width = control.shape[2:]
            return first_frame_condition(control[:, :, 0], frames, height, width, autoencoder)
        return self.high_noise.encode_control(control, autoencoder)

    def encoded_control_channels(self, autoencoder: VideoAutoencoder) -> int:
        if self.pipeline_class_name == I2V_PIPELINE and not self.expand_timesteps:
            return autoencoder.temporal_compression + autoencoder.latent_channels
        return self.high_noise.encoded_control_channels(autoencoder)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for expert in self.experts:
            expert.set_gradient_checkpointing(enabled)

    def save_components(self, folder: str) -> None:
        """``folder/transformer`` (high noise), ``folder/transformer_2`` (low noise) and
        ``folder/model_index.json`` with the pipeline class, ``boundary_ratio`` and
        ``expand_timesteps`` (:func:`~distill_pl.families.wan.layout.write_layout_index`): the
        folder reloads as these two experts."""
        super().save_components(folder)
        write_layout_index(folder, self.pipeline_class_name, self.components,
                           boundary_ratio=self.boundary_ratio, expand_timesteps=self.expand_timesteps)

    def save_pretrained(self, folder: str) -> None:
        """:meth:`save_components`."""
        self.save_components(folder)

    def save_student_pipeline(
        self, folder: str, teacher: str | None, shift: float, noise_levels: tuple[float, ...] = (1.0,),
        sampler: str = "renoise",
    ) -> Path:
        """The full two-expert pipeline folder of this student (the teacher's
        ``pipeline_class``): the ``teacher`` pipeline folder's ``model_index.json`` (with its
        ``boundary_ratio``), VAE, and text encoder and tokenizer where it has them, the
        student's experts as ``transformer/`` and ``transformer_2/``, and a flow-match Euler
        ``scheduler/`` with ``shift`` (stochastic for more than one of ``noise_levels`` with a
        re-noising ``sampler``; an earlier export in ``folder`` is replaced). Called with
        ``guidance_scale=1.0`` and ``num_inference_steps = K`` (custom levels bound as for
        ``WanVACEPipeline``), each step runs the expert that owns its timestep, as here."""
        from distill_pl.diffusion.sampling import build_student_scheduler
        from distill_pl.families.pipeline_export import save_pipeline_folder

        if teacher is None:
            raise ValueError(f"a two-expert Wan student is exported as a full {self.pipeline_class_name} folder: "
                             "the teacher pipeline folder (model_index.json with boundary_ratio, VAE) is needed")
        return save_pipeline_folder(folder, self, teacher, self.pipeline_class_name,
                                    build_student_scheduler(shift, len(noise_levels), sampler), replace=True)

    def pretrained_state_dict(self, path: str) -> dict[str, Tensor]:
        """The safetensors of ``path``'s ``transformer/`` and ``transformer_2/`` as
        ``high_noise.transformer.*`` and ``low_noise.transformer.*`` keys."""
        root = resolve_path(path)
        state = {}
        for name, subfolder in (("high_noise", "transformer"), ("low_noise", SECOND_EXPERT)):
            expert_state = self.high_noise.pretrained_state_dict(str(root / subfolder))
            state.update({f"{name}.{k}": v for k, v in expert_state.items()})
        return state


def _check_same_experts(high: dict, low: dict, where) -> None:
    """ModelFolderError naming ``where`` and the keys when the experts' configs differ."""
    keys = sorted(k for k in set(high) | set(low) if not k.startswith("_") and high.get(k) != low.get(k))
    if keys:
        details = ", ".join(f"{k}: {high.get(k)!r} vs {low.get(k)!r}" for k in keys)
        raise ModelFolderError(f"{where}: the experts transformer/ and {SECOND_EXPERT}/ differ in shape "
                               f"({details}); a two-expert model needs two experts of one architecture")
