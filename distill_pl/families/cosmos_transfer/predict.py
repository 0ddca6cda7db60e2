"""The :class:`Denoiser` adapter for Cosmos-Predict2.5: diffusers' ``CosmosTransformer3DModel``
without a ControlNet, as ``Cosmos2_5_PredictBasePipeline`` runs it.

The transformer is Cosmos-Transfer2.5's base (:mod:`.adapter`, whose notes on the velocity,
``timestep = sigma`` per latent frame, the condition-mask and padding-mask channels and the
token order hold here too). What differs:

- no control: ``Conditioning.control`` is None (``control_channels = 0``);
- text: ``encoder_hidden_states`` is ``Conditioning.text_embeds`` alone, as the pipeline passes
  it (no image context);
- text-, image- and video-to-world are one model: image- and video-to-world give the first 1
  or 2 latent frames as conditional frames (``Conditioning.cond_latents`` /
  ``num_cond_frames``, the pipeline's ``num_latent_conditional_frames``), fed as the Transfer
  adapter feeds them, at ``conditional_frame_timestep`` (the pipeline's default 1e-4).

The registry finds this adapter by the folder's pipeline class (``model_index.json``'s
``_class_name``): the transformer class is Cosmos-Transfer2.5's too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import CosmosTransformer3DModel
from torch import Tensor, nn

from distill_pl.families.cosmos_transfer import padding_resize
from distill_pl.families.cosmos_transfer.adapter import COSMOS_BLOCK_LINEARS, CosmosInputs, public_config, text_input_dim
from distill_pl.families.cosmos_transfer.configs import PREDICT_PIPELINE_CLASS, TRANSFORMER_CLASS
from distill_pl.families.cosmos_transfer.context_parallel import (
    COSMOS_TRANSFORMER_CP_PLAN,
    install_self_attention_processors,
)
from distill_pl.families.cosmos_transfer.export import save_cosmos_student_pipeline
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import TransformerDenoiser
from distill_pl.models.loading import cast_parameters, find_diffusers_model_folder, parse_dtype
from distill_pl.util.paths import resolve_path

padding_resize.install()


class CosmosPredictDenoiser(TransformerDenoiser):
    """Cosmos-Predict2.5 as one velocity predictor ``(x_t, sigma, cond) -> v``.

    Exactly one of ``path`` (a local ``Cosmos2_5_PredictBasePipeline`` folder or a folder with
    ``transformer/``; safetensors only) or ``config`` (``CosmosTransformer3DModel`` keyword
    arguments, random weights). ``conditional_frame_timestep``: the noise level the model is
    told for conditional frames. ``dtype`` is the parameter dtype. Gradient checkpointing is
    per block, non-reentrant.
    """

    #: the registry's key: the pipeline class (the transformer class is shared with Transfer2.5)
    class_name = PREDICT_PIPELINE_CLASS
    pipeline_class_name = PREDICT_PIPELINE_CLASS
    #: the ``_class_name`` of its ``transformer/``
    transformer_class_name = TRANSFORMER_CLASS
    #: the block linears without the image-context projections (the pipeline passes no image context)
    lora_targets = tuple(name for name in COSMOS_BLOCK_LINEARS if not name.endswith("_img"))
    takes_conditional_frames = True

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        conditional_frame_timestep: float = 1e-4,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError("CosmosPredictDenoiser needs exactly one of `path` (a local folder) or `config`")
        torch_dtype = parse_dtype(dtype)
        if path is not None:
            folder = find_diffusers_model_folder(path, TRANSFORMER_CLASS, "transformer")
            self.transformer = CosmosTransformer3DModel.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype)
        else:
            self.transformer = CosmosTransformer3DModel(**config)
            cast_parameters(self.transformer, torch_dtype)
        cfg = self.transformer.config
        if cfg.in_channels != cfg.out_channels + 1:
            raise ValueError(
                f"{path or 'config'}: transformer in_channels {cfg.in_channels} != out_channels "
                f"{cfg.out_channels} + 1 (the condition-mask channel): not a Cosmos 2.5 transformer"
            )
        install_self_attention_processors(self.transformer.transformer_blocks)
        self.latent_channels = cfg.out_channels
        self.control_channels = 0
        self.num_blocks = len(self.transformer.transformer_blocks)
        self.feature_dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)
        self.conditional_frame_timestep = float(conditional_frame_timestep)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def backbone_config(self) -> dict:
        return public_config(self.transformer.config)

    @property
    def adapter_options(self) -> dict:
        return {"conditional_frame_timestep": self.conditional_frame_timestep}

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def context_parallel_plans(self) -> dict[str, dict]:
        """The transformer's plan (:mod:`.context_parallel`), Transfer2.5's base plan."""
        return {"transformer": COSMOS_TRANSFORMER_CP_PLAN}

    @property
    def text_dim(self) -> int:
        """D of ``Conditioning.text_embeds`` (the cross-attention projection's input width)."""
        return text_input_dim(dict(self.transformer.config))

    def forward(
        self, x_t: Tensor, sigma: Tensor, cond: Conditioning, feature_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity [B, C, T, H, W] (dtype of ``x_t``), and features [B, D, T/pt, H/ph, W/pw]
        after block ``feature_block`` if it is given; on conditional frames, the path velocity
        (see :class:`~distill_pl.families.cosmos_transfer.adapter.CosmosInputs`)."""
        self.check_inputs(x_t, sigma, cond)
        if cond.control is not None:
            raise ValueError("Cosmos-Predict2.5 takes no control (cond.control must be None)")
        dtype = self.transformer.dtype
        inputs = CosmosInputs.of(x_t, sigma, cond, dtype, self.conditional_frame_timestep)
        kwargs = dict(hidden_states=inputs.latents, timestep=inputs.timestep,
                      encoder_hidden_states=cond.text_embeds.to(dtype), condition_mask=inputs.condition_mask,
                      padding_mask=inputs.padding_mask, return_dict=False)
        run = inputs.velocity(lambda: self.transformer(**kwargs)[0], x_t, sigma, cond)
        return self.run_with_feature_tap(run, feature_block, x_t)

    def save_student_pipeline(
        self, folder: str, teacher: str | None, shift: float, noise_levels: tuple[float, ...] = (1.0,),
        sampler: str = "renoise",
    ) -> Path:
        """The full ``Cosmos2_5_PredictBasePipeline`` folder of this student at ``noise_levels``,
        its other components copied from the ``teacher`` pipeline folder (see
        :func:`~distill_pl.families.cosmos_transfer.export.save_cosmos_student_pipeline`)."""
        if teacher is None:
            raise ValueError(
                "a Cosmos-Predict2.5 student is exported as a full pipeline folder: the "
                "teacher pipeline folder (VAE, text encoder, tokenizer) is needed"
            )
        return save_cosmos_student_pipeline(folder, self, teacher, replace=True, noise_levels=noise_levels,
                                            sampler=sampler, pipeline_class=PREDICT_PIPELINE_CLASS)

    def check_student_levels(self, noise_levels: tuple[float, ...]) -> None:
        """ValueError unless the pipeline's ``set_timesteps(K)`` gives these levels."""
        from distill_pl.diffusion.student_scheduler import few_step_euler_scheduler

        few_step_euler_scheduler(noise_levels)

    def pretrained_state_dict(self, path: str) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        folder = find_diffusers_model_folder(str(resolve_path(path)), TRANSFORMER_CLASS, "transformer")
        state = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            state.update({f"transformer.{k}": v for k, v in load_file(file).items()})
        return state
