"""The published Wan 2.1 transformer configs, written once: ``transformer/config.json`` of the
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

#: diffusers folder name -> (transformer class, config) of the published models a config may
#: name without the folder on disk (``distill-pl estimate-memory``; see
#: :func:`~distill_pl.families.registry.published_configs`)
PUBLISHED = {
    "Wan2.1-T2V-1.3B-Diffusers": (WAN_T2V_CLASS, WAN_2_1_T2V_1_3B),
    "Wan2.1-T2V-14B-Diffusers": (WAN_T2V_CLASS, WAN_2_1_T2V_14B),
}
