"""The published Cosmos 2.5 configs (Transfer2.5 and Predict2.5) and class names, written once: the model sizes
the memory estimate, the benchmark and the real-size config tests build, and the scheduler of
the pipeline folder (the teacher's sampler)."""

from __future__ import annotations

TRANSFORMER_CLASS = "CosmosTransformer3DModel"
CONTROLNET_CLASS = "CosmosControlNetModel"
PIPELINE_CLASS = "Cosmos2_5_TransferPipeline"
#: Cosmos-Predict2.5's pipeline: the same transformer without a ControlNet
PREDICT_PIPELINE_CLASS = "Cosmos2_5_PredictBasePipeline"

#: Cosmos-Transfer2.5-2B (general edge/depth/seg/blur ControlNets share it): ``from_config``'s
#: ``{"transformer": ..., "controlnet": ...}`` as diffusers' conversion script
#: (scripts/convert_cosmos_to_diffusers.py, "Cosmos-2.5-Transfer-General-2B") builds it; the
#: released config.json files were not available to check against. Base 2.41 B + ControlNet
#: 0.47 B parameters; 28 base blocks of width 2048, a ControlNet residual every 7 blocks, text
#: D = 100352 (Qwen2.5-VL-7B, 28 layers x 3584) projected to 1024.
COSMOS_TRANSFER_2_5_2B = {
    "transformer": dict(
        in_channels=16 + 1, out_channels=16, num_attention_heads=16, attention_head_dim=128,
        num_layers=28, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256,
        max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True, extra_pos_embed_type=None, use_crossattn_projection=True,
        crossattn_proj_in_channels=100352, encoder_hidden_states_channels=1024,
        controlnet_block_every_n=7, img_context_dim_in=1152, img_context_dim_out=2048,
        img_context_num_tokens=256,
    ),
    "controlnet": dict(
        n_controlnet_blocks=4, model_channels=2048, in_channels=130, latent_channels=18,
        num_attention_heads=16, attention_head_dim=128, mlp_ratio=4.0, text_embed_dim=1024,
        adaln_lora_dim=256, patch_size=(1, 2, 2), max_size=(128, 240, 240),
        rope_scale=(1.0, 3.0, 3.0), extra_pos_embed_type=None, img_context_dim_in=1152,
        img_context_dim_out=2048, use_crossattn_projection=True, crossattn_proj_in_channels=100352,
        encoder_hidden_states_channels=1024,
    ),
}
#: Cosmos-Predict2.5-2B: ``CosmosTransformer3DModel`` keyword arguments as diffusers' conversion
#: script ("Cosmos-2.5-Predict-Base-2B") builds them: Transfer2.5-2B's base without the ControlNet
#: injection points and image context (the released config.json files were not available to
#: check against)
COSMOS_PREDICT_2_5_2B = {
    k: v for k, v in COSMOS_TRANSFER_2_5_2B["transformer"].items()
    if k != "controlnet_block_every_n" and not k.startswith("img_context")
}
#: ``UniPCMultistepScheduler`` keyword arguments of the pipeline's ``scheduler/`` as diffusers'
#: conversion script writes it for Cosmos 2.5 (flow prediction, Karras flow sigmas, shift 1):
#: the teacher's N-step sampler (``sample_with_scheduler`` with it is the pipeline's loop)
COSMOS_TRANSFER_2_5_SCHEDULER = dict(
    use_karras_sigmas=True,
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    sigma_max=200.0,
    sigma_min=0.01,
)

#: diffusers folder name -> (transformer class, config) of the published models a config may
#: name without the folder on disk (see :func:`~distill_pl.families.registry.published_configs`)
PUBLISHED = {
    "Cosmos-Transfer2.5-2B": (TRANSFORMER_CLASS, COSMOS_TRANSFER_2_5_2B),
    "Cosmos-Predict2.5-2B": (PREDICT_PIPELINE_CLASS, COSMOS_PREDICT_2_5_2B),
}
#: text encoder ``model_type`` -> this family's prompt embedding (Cosmos 2.5: Qwen2.5-VL, every
#: layer's hidden states normalised and concatenated; see
#: :func:`~distill_pl.families.registry.text_encoders`)
TEXT_ENCODERS = {
    "qwen2_5_vl": "distill_pl.families.cosmos_transfer.text_encoder:CosmosTextEncoder",
}
