"""The Cosmos 2.5 context-parallel plans and self-attention processor, in one process (the split
passes themselves, Transfer2.5 and Predict2.5 with Ulysses 2 x data parallel 2 == one process,
run in the slow tests/training/test_context_parallel_steps.py)."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

from distill_pl.families.cosmos_transfer.adapter import CosmosTransferDenoiser
from distill_pl.families.cosmos_transfer.context_parallel import (
    COSMOS_CONTROLNET_CP_PLAN,
    COSMOS_TRANSFORMER_CP_PLAN,
    CosmosSelfAttentionProcessor,
)
from distill_pl.families.cosmos_transfer.predict import CosmosPredictDenoiser
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.context_parallel import stage_context_parallel
from tests.families.cosmos_tiny import LATENT_CHANNELS, PREDICT_TRANSFORMER, TEXT_DIM, script

#: latents [2, 16, 2, 8, 12]: 2 x 4 x 6 = 48 tokens, a size no other dimension has (width 32,
#: 3 x 32, head 16, 5 text and 4 image-context tokens)
SHAPE, TOKENS = (2, LATENT_CHANNELS, 2, 8, 12), 48


@pytest.fixture(scope="module")
def transfer():
    torch.manual_seed(0)
    return CosmosTransferDenoiser(config={"transformer": script.TRANSFORMER, "controlnet": script.CONTROLNET})


def inputs(seed: int = 0):
    """x_t, sigma and a conditioning with a control and conditional frames (sample 0 gives its
    first latent frame): the timesteps and condition masks differ between frames."""
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(2, 5, TEXT_DIM, generator=g), control=torch.randn(SHAPE, generator=g))
    cond = cond.with_conditional_frames(torch.randn(SHAPE, generator=g), torch.tensor([1, 0]))
    return torch.randn(SHAPE, generator=g), torch.tensor([0.4, 0.9]), cond


def test_the_self_attention_processor_computes_what_diffusers_computes(transfer):
    """Every self-attention of the base and the ControlNet has the processor, no cross-attention
    has it; with diffusers' own processor back in every self-attention the velocity is equal."""
    blocks = [*transfer.transformer.transformer_blocks, *transfer.controlnet.control_blocks]
    assert all(type(block.attn1.processor) is CosmosSelfAttentionProcessor for block in blocks)
    assert not any(isinstance(block.attn2.processor, CosmosSelfAttentionProcessor) for block in blocks)
    x_t, sigma, cond = inputs()
    with torch.no_grad():
        ours = transfer(x_t, sigma, cond)
        for block in blocks:
            block.attn1.set_processor(CosmosAttnProcessor2_0())
        try:
            theirs = transfer(x_t, sigma, cond)
        finally:
            for block in blocks:
                block.attn1.set_processor(CosmosSelfAttentionProcessor())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def _split_names(plan: dict, blocks: str, index: int) -> dict:
    """Input name -> its ContextParallelInput for block ``index`` of ``blocks`` under ``plan``."""
    return {**plan.get(f"{blocks}.*", {}), **(plan.get(f"{blocks}.0", {}) if index == 0 else {})}


def test_the_plans_split_every_block_input_with_a_token_dimension(transfer):
    """Each input of each base and ControlNet block, and of the base's output norm, that has a
    token dimension (size 48) is split on that dimension by the plan, except the ones that
    arrive split: the hidden states after block 0 (the previous block's output), the rotary
    embedding (split at its output) and the base's ControlNet residuals (the ControlNet's split
    blocks' outputs); the base's ``proj_out`` output is gathered over the tokens."""
    seen: list[tuple[str, int, dict]] = []

    def record(where: str, index: int):
        def hook(module, args, kwargs):
            bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
            seen.append((where, index, dict(bound.arguments)))
        return hook

    handles = [block.register_forward_pre_hook(record(name, i), with_kwargs=True)
               for name, model in (("transformer_blocks", transfer.transformer),
                                   ("control_blocks", transfer.controlnet))
               for i, block in enumerate(getattr(model, name))]
    handles.append(transfer.transformer.norm_out.register_forward_pre_hook(record("norm_out", 0), with_kwargs=True))
    try:
        with torch.no_grad():
            transfer(*inputs())
    finally:
        for handle in handles:
            handle.remove()
    arrive_split = {"image_rotary_emb": "rope", "controlnet_residual": None}
    assert {where for where, _, _ in seen} == {"transformer_blocks", "control_blocks", "norm_out"}
    for where, index, arguments in seen:
        plan = COSMOS_CONTROLNET_CP_PLAN if where == "control_blocks" else COSMOS_TRANSFORMER_CP_PLAN
        split = plan["norm_out"] if where == "norm_out" else _split_names(plan, where, index)
        for name, value in arguments.items():
            tensors = [t for t in (value if isinstance(value, tuple) else (value,)) if isinstance(t, torch.Tensor)]
            token_dims = {t.shape.index(TOKENS) for t in tensors if TOKENS in t.shape}
            if not token_dims:
                assert name not in split, (where, index, name)
            elif name in split:
                assert token_dims == {split[name].split_dim} and tensors[0].ndim == split[name].expected_dims
            elif name in arrive_split:
                assert arrive_split[name] is None or arrive_split[name] in plan, (where, name)
            else:
                assert name == "hidden_states" and (index > 0 or where == "norm_out"), (where, index, name)
    assert COSMOS_TRANSFORMER_CP_PLAN["proj_out"].gather_dim == 1


def test_the_adapters_declare_their_plans_and_ulysses_must_divide_the_heads(transfer):
    assert transfer.context_parallel_plans == {"transformer": COSMOS_TRANSFORMER_CP_PLAN,
                                               "controlnet": COSMOS_CONTROLNET_CP_PLAN}
    assert stage_context_parallel({"ulysses": 2}, transfer).ulysses == 2
    with pytest.raises(ValueError, match="context_parallel.ulysses=4 must divide the 2 attention heads of "
                                         "CosmosTransferDenoiser"):
        stage_context_parallel({"ulysses": 4}, transfer)
    predict = CosmosPredictDenoiser(config=PREDICT_TRANSFORMER)
    assert predict.context_parallel_plans == {"transformer": COSMOS_TRANSFORMER_CP_PLAN}
    assert all(type(block.attn1.processor) is CosmosSelfAttentionProcessor for block in predict.blocks)
