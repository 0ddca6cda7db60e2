"""The :class:`Denoiser` adapter for diffusers' ``WanTransformer3DModel`` (Wan 2.1 / 2.2).

Conventions (checked against diffusers' ``WanPipeline`` with UniPC
``prediction_type="flow_prediction"``, where ``x0 = x_t - sigma * model_output``):

- the transformer predicts the flow velocity ``v = eps - x0``;
- it takes ``timestep = 1000 * sigma`` (a float, not rounded; computed in float64 and then
  cast to float32, so a sampler step's ``sigma = timesteps[i] / 1000`` in float64 gives the
  pipeline's integer ``timesteps[i]`` back exactly, see :meth:`WanDenoiser.sampler_sigma`);
- text: ``encoder_hidden_states`` [B, L, text_dim] with padding positions zeroed, as the
  pipeline pads the T5 output with zeros (the transformer has no text attention mask);
- control by channel concatenation: the transformer input is ``cat([x_t, control], dim=1)``,
  so ``in_channels = latent_channels + control_channels`` and ``out_channels`` is the latent
  channel count;
- tokens: the Conv3d patch embedding output [B, D, t, h, w] is flattened to [B, t*h*w, D]
  (frame-major, then rows, then columns); block features are reshaped back to that grid.

A student whose teacher is a ``WanPipeline`` folder is exported as a full ``WanPipeline``
folder (:meth:`WanDenoiser.save_student_pipeline`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor

from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import TransformerDenoiser
from distill_pl.models.loading import cast_parameters, find_diffusers_model_folder, parse_dtype
from distill_pl.util.paths import resolve_path

#: Linear layers of every Wan transformer block (diffusers' ``WanTransformerBlock``):
#: self-attention ``attn1`` and text cross-attention ``attn2`` (q, k, v, out) and the FFN
#: (``net.0.proj`` in, ``net.2`` out). peft matches a name when a module path ends with it.
WAN_BLOCK_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def wan_timestep(sigma: Tensor) -> Tensor:
    """``1000 * sigma`` [B] in float64, cast to float32: the timestep Wan's transformers take
    (a sampler's ``sigma = timesteps[i] / 1000`` in float64 gives the integer back exactly)."""
    return (1000.0 * sigma.double()).float()


def check_one_source(adapter: object, path: str | None, config: dict | None) -> None:
    """ValueError unless exactly one of ``path`` (a local folder) or ``config`` is given: the
    two ways a Wan adapter is built."""
    if (path is None) == (config is None):
        raise ValueError(f"{type(adapter).__name__} needs exactly one of `path` (a local folder) or `config`")


class WanDenoiser(TransformerDenoiser):
    """Wan transformer as a velocity predictor ``(x_t, sigma, cond) -> v``.

    Exactly one of ``path`` (a local diffusers folder: the transformer folder or a pipeline
    root with ``transformer/``; safetensors only, never the hub) or ``config`` (keyword
    arguments of ``WanTransformer3DModel``, randomly initialised) must be given.
    ``dtype`` is the parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); like
    diffusers' ``from_pretrained``, modules in ``_keep_in_fp32_modules`` stay float32.
    Gradient checkpointing is per block and non-reentrant (diffusers' default).
    ``folder`` is the transformer folder it was loaded from (None when built from a config).
    """

    class_name = "WanTransformer3DModel"
    lora_targets = WAN_BLOCK_LINEARS
    #: ``WanPipeline.load_lora_weights(file)`` loads it into ``transformer``
    lora_files = {"lora.safetensors": ("", "transformer")}
    control_input = (
        "the control video [B, 3, T, H, W] concatenated to the noisy state on channels: "
        "hidden_states = torch.cat([x, control], dim=1) (transformer in_channels = latent + control channels)"
    )
    #: the diffusers model class of the backbone
    transformer_class = WanTransformer3DModel
    #: the ``_class_name`` of the diffusers pipeline folder a student is exported as
    pipeline_class_name = "WanPipeline"

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        check_one_source(self, path, config)
        torch_dtype = parse_dtype(dtype)
        if path is not None:
            self.folder = find_diffusers_model_folder(path, self.class_name, "transformer")
            self.transformer = self.transformer_class.from_pretrained(
                self.folder, local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype
            )
        else:
            self.folder = None
            self.transformer = self.transformer_class(**config)
            cast_parameters(self.transformer, torch_dtype)
        cfg = self.transformer.config
        self.latent_channels = cfg.out_channels
        self.control_channels = self._control_channels()
        self.text_dim = cfg.text_dim
        self.num_blocks = len(self.transformer.blocks)
        self.feature_dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def folder_config(cls, path: str) -> dict:
        """The folder's layout (:func:`~distill_pl.families.wan.layout.wan_folder_config`):
        the transformer's config for Wan 2.1, the Wan 2.2 keys around it otherwise."""
        from distill_pl.families.wan.layout import wan_folder_config

        return wan_folder_config(path)

    @classmethod
    def variant(cls, config: dict) -> str | None:
        """A Wan 2.2 layout's adapter (:mod:`distill_pl.families.wan.layout`): two experts
        (:class:`~distill_pl.families.wan.experts.WanExpertsDenoiser`) or per-token timesteps
        (:class:`~distill_pl.families.wan.ti2v.WanTI2VDenoiser`), named as the registry names
        adapters (those modules import this one); None for one transformer config. ValueError
        for a Wan 2.2 layout of another class (VACE)."""
        if "transformer" not in config:
            return None
        if cls is not WanDenoiser:
            raise ValueError(f"{cls.class_name}: the Wan 2.2 layouts (two experts, expand_timesteps) are "
                             "supported for WanTransformer3DModel only")
        if "transformer_2" in config:
            return "distill_pl.families.wan.experts:WanExpertsDenoiser"
        return "distill_pl.families.wan.ti2v:WanTI2VDenoiser"

    @property
    def transformer_config(self) -> dict:
        """The transformer's diffusers config without ``_`` keys."""
        return {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}

    @property
    def backbone_config(self) -> dict:
        return self.transformer_config

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.transformer.blocks

    @property
    def context_parallel_plans(self) -> dict[str, dict]:
        """diffusers' own plan of the transformer class, where it has one
        (``WanTransformer3DModel``: split the tokens at the first block's input and the rotary
        embedding's output, gather them at ``proj_out``)."""
        plan = type(self.transformer)._cp_plan
        return {"transformer": plan} if plan else {}

    def sampler_sigma(self, timestep: Tensor, sigma: Tensor) -> Tensor:
        """``timesteps[i] / 1000`` in float64: ``WanPipeline`` passes the scheduler's timestep
        (an integer for UniPC) to the transformer, and :meth:`forward` turns this sigma back
        into exactly that timestep."""
        return timestep.double() / 1000.0

    def forward(
        self, x_t: Tensor, sigma: Tensor, cond: Conditioning, feature_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity [B, C, T, H, W] (dtype of ``x_t``), and features [B, D, T/pt, H/ph, W/pw]
        after block ``feature_block`` if it is given (gradients flow through both)."""
        self._check_inputs(x_t, sigma, cond)
        model_dtype = self.transformer.dtype
        hidden = self._hidden_states(x_t, cond)
        text = cond.text_embeds
        if cond.text_mask is not None:
            text = text.masked_fill(~cond.text_mask.bool()[..., None], 0.0)
        kwargs = dict(
            hidden_states=hidden.to(model_dtype),
            timestep=self._timestep(sigma, x_t, cond),
            encoder_hidden_states=text.to(model_dtype),
            return_dict=False,
            **self._transformer_inputs(cond),
        )
        return self.run_with_feature_tap(lambda: self.transformer(**kwargs)[0], feature_block, x_t)

    def _timestep(self, sigma: Tensor, x_t: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's ``timestep`` [B]: ``1000 * sigma`` computed in float64, cast to
        float32."""
        return wan_timestep(sigma)

    def _control_channels(self) -> int:
        """Control by channel concatenation: ``in_channels - out_channels``."""
        return self.transformer.config.in_channels - self.transformer.config.out_channels

    def _hidden_states(self, x_t: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's ``hidden_states``: ``cat([x_t, control], dim=1)`` (or ``x_t``)."""
        return x_t if cond.control is None else torch.cat([x_t, cond.control], dim=1)

    def _transformer_inputs(self, cond: Conditioning) -> dict:
        """Extra keyword arguments of the transformer call (none for Wan T2V)."""
        return {}

    def _check_inputs(self, x_t: Tensor, sigma: Tensor, cond: Conditioning) -> None:
        self.check_inputs(x_t, sigma, cond)
        self._check_control(x_t, cond.control)

    def _check_control(self, x_t: Tensor, control: Tensor | None) -> None:
        if self.control_channels == 0:
            if control is not None:
                raise ValueError(
                    "this Wan model takes no control (in_channels == out_channels), "
                    "but cond.control was given"
                )
            return
        expected = [x_t.shape[0], self.control_channels, *x_t.shape[2:]]
        if control is None:
            raise ValueError(f"this Wan model needs cond.control of shape {expected}, got None")
        if list(control.shape) != expected:
            raise ValueError(
                f"cond.control must be {expected} (matching x_t), got {list(control.shape)}"
            )

    def save_student_pipeline(
        self, folder: str, teacher: str | None, shift: float, noise_levels: tuple[float, ...] = (1.0,),
        sampler: str = "renoise",
    ) -> Path:
        """With a ``teacher`` that is a ``WanPipeline`` folder (``model_index.json``), the full
        ``WanPipeline`` folder of this student: the teacher's components (VAE, and the text
        encoder and tokenizer where it has them) with the student's ``transformer/`` and a
        flow-match Euler ``scheduler/`` with ``shift`` (stochastic for more than one of
        ``noise_levels`` with a re-noising ``sampler``; an earlier export in ``folder`` is
        replaced), which ``WanPipeline.from_pretrained`` loads. Otherwise (no teacher, or a
        teacher that is a transformer folder) the default: ``transformer/`` and ``scheduler/``."""
        from distill_pl.diffusion.sampling import build_student_scheduler
        from distill_pl.families.pipeline_export import is_pipeline_folder, save_pipeline_folder

        if teacher is None or not is_pipeline_folder(resolve_path(teacher), self.pipeline_class_name):
            return super().save_student_pipeline(folder, teacher, shift, noise_levels, sampler)
        return save_pipeline_folder(folder, self, teacher, self.pipeline_class_name,
                                    build_student_scheduler(shift, len(noise_levels), sampler),
                                    replace=True)

    def pretrained_state_dict(self, path: str) -> dict[str, Tensor]:
        """The safetensors of ``path`` (a transformer folder or a folder with ``transformer/``)
        as ``transformer.*`` keys."""
        from safetensors.torch import load_file

        folder = find_diffusers_model_folder(path, self.class_name, "transformer")
        state = {}
        for file in sorted(folder.glob("*.safetensors")):
            state.update(load_file(file))
        return {f"transformer.{k}": v for k, v in state.items()}

