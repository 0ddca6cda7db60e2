"""The published Wan 2.1 and 2.2 transformer configs, written once: ``transformer/config.json`` of the
diffusers folders (without ``_`` keys), as diffusers' scripts/convert_wan_to_diffusers.py writes
them and Wan's wan/configs/ define the sizes. What ``from_config`` (and
:func:`~distill_pl.families.registry.build_denoiser`) takes; the memory estimate, the
benchmark and the real-size config tests build their models from these.
"""

from __future__ import annotations

#: diffusers transformer class of the text-to-video models
WAN_T2V_CLASS = "WanTransformer3DModel"
#: diffusers transformer class of the VACE models
WAN_VACE_CLASS = "WanVACETransformer3DModel"

#: Wan-AI/Wan2.1-T2V-1.3B-Diffusers (dim 1536 = 12 heads x 128, 30 blocks)
WAN_2_1_T2V_1_3B = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
    "ffn_dim": 8960, "freq_dim": 256, "image_dim": None, "in_channels": 16, "num_attention_heads": 12,
    "num_layers": 30, "out_channels": 16, "patch_size": [1, 2, 2], "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096,
}
#: Wan-AI/Wan2.1-T2V-14B-Diffusers (dim 5120 = 40 heads x 128, 40 blocks), as in diffusers'
#: conversion script ("Wan-T2V-14B") and Wan's wan/configs/wan_t2v_14B.py
WAN_2_1_T2V_14B = {**WAN_2_1_T2V_1_3B, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40}
#: Wan2.1-VACE-1.3B: the T2V model plus the VACE branch, hints after every 2nd block, a
#: context of 2 x 16 latent + 64 mask channels
WAN_2_1_VACE_1_3B = {**WAN_2_1_T2V_1_3B, "vace_layers": list(range(0, 30, 2)), "vace_in_channels": 96}
#: Wan2.1-VACE-14B: hints after every 5th block
WAN_2_1_VACE_14B = {**WAN_2_1_T2V_14B, "vace_layers": list(range(0, 40, 5)), "vace_in_channels": 96}

#: Wan-AI/Wan2.2-T2V-A14B-Diffusers: each expert the Wan 2.1 14B architecture (40 blocks,
#: 5120 wide), as in diffusers' conversion script ("Wan2.2-T2V-A14B")
WAN_2_2_T2V_A14B_EXPERT = WAN_2_1_T2V_14B
#: Wan-AI/Wan2.2-I2V-A14B-Diffusers: the experts take 16 latent + 4 mask + 16 first-frame
#: condition channels ("Wan2.2-I2V-14B-720p" in the conversion script)
WAN_2_2_I2V_A14B_EXPERT = {**WAN_2_2_T2V_A14B_EXPERT, "in_channels": 36}
#: Wan-AI/Wan2.2-TI2V-5B-Diffusers (dim 3072 = 24 heads x 128, 30 blocks, 48 latent channels)
WAN_2_2_TI2V_5B = {**WAN_2_1_T2V_1_3B, "ffn_dim": 14336, "in_channels": 48, "num_attention_heads": 24,
                   "out_channels": 48}


def two_experts(expert: dict, boundary_ratio: float, pipeline_class: str) -> dict:
    """What the two-expert adapter's ``from_config`` takes: ``transformer`` (high noise) and
    ``transformer_2`` (low noise) of one config, switched at ``boundary_ratio``
    (:mod:`distill_pl.families.wan.layout`)."""
    return {"transformer": expert, "transformer_2": expert, "boundary_ratio": boundary_ratio,
            "pipeline_class": pipeline_class}


#: the published two-expert and TI2V models as ``from_config`` takes them (the boundaries and
#: ``expand_timesteps`` of the conversion script's pipelines)
WAN_2_2_T2V_A14B = two_experts(WAN_2_2_T2V_A14B_EXPERT, 0.875, "WanPipeline")
WAN_2_2_I2V_A14B = two_experts(WAN_2_2_I2V_A14B_EXPERT, 0.9, "WanImageToVideoPipeline")
WAN_2_2_TI2V_5B_PIPELINE = {"transformer": WAN_2_2_TI2V_5B, "expand_timesteps": True}

#: diffusers folder name -> (transformer class, config) of the published models a config may
#: name without the folder on disk (``distill-pl estimate-memory``; see
#: :func:`~distill_pl.families.registry.published_configs`)
PUBLISHED = {
    "Wan2.1-T2V-1.3B-Diffusers": (WAN_T2V_CLASS, WAN_2_1_T2V_1_3B),
    "Wan2.1-T2V-14B-Diffusers": (WAN_T2V_CLASS, WAN_2_1_T2V_14B),
    "Wan2.2-T2V-A14B-Diffusers": (WAN_T2V_CLASS, WAN_2_2_T2V_A14B),
    "Wan2.2-I2V-A14B-Diffusers": (WAN_T2V_CLASS, WAN_2_2_I2V_A14B),
    "Wan2.2-TI2V-5B-Diffusers": (WAN_T2V_CLASS, WAN_2_2_TI2V_5B_PIPELINE),
}

#: the Wan 2.2 VAE of Wan2.2-TI2V-5B-Diffusers (``vae/config.json``, as the conversion script
#: writes it): residual blocks, 2x2 pixel patches on 12 channels, 48 latent channels, x4 in
#: time and x16 in space
WAN_2_2_VAE = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
    "out_channels": 12, "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    "latents_std": [
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
}
#: diffusers folder name -> the ``vae/config.json`` of a published model whose VAE is not the
#: Wan 2.1 one (diffusers' ``AutoencoderKLWan`` defaults), for estimates without the folder
PUBLISHED_VAES = {"Wan2.2-TI2V-5B-Diffusers": WAN_2_2_VAE}
