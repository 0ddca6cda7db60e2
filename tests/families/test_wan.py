"""WanDenoiser against diffusers' WanTransformer3DModel called by hand (tiny random models)."""

import copy
import re
from pathlib import Path

import pytest
import torch

from distill_pl.models.conditioning import Conditioning
from distill_pl.models.loading import ModelFolderError
from distill_pl.families.wan.adapter import WanDenoiser
from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B

# 3 latent + 3 control channels, D = 2 heads x 8 = 16, patches (1, 2, 2)
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=6,
    out_channels=3,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
)


@pytest.fixture
def denoiser():
    torch.manual_seed(0)
    return WanDenoiser(config=TINY).eval()


def make_inputs(batch=2, frames=3, height=4, width=6, text_len=5, seed=1):
    """x_t [B, 3, T, H, W], sigma [B], cond with a mask hiding the last 2 tokens of sample 0."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, frames, height, width, generator=g)
    sigma = torch.tensor([0.1234567, 0.9])[:batch]
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, -2:] = False
    text = torch.randn(batch, text_len, 16, generator=g) * mask[..., None]
    control = torch.randn(batch, 3, frames, height, width, generator=g)
    return x_t, sigma, Conditioning(text, mask, control)


def test_attributes(denoiser):
    assert (denoiser.latent_channels, denoiser.control_channels) == (3, 3)
    assert (denoiser.num_blocks, denoiser.feature_dim, denoiser.patch_size) == (2, 16, (1, 2, 2))


def test_equals_direct_transformer_call(denoiser):
    x_t, sigma, cond = make_inputs()
    velocity = denoiser(x_t, sigma, cond)
    direct = denoiser.transformer(
        hidden_states=torch.cat([x_t, cond.control], dim=1),
        timestep=sigma * 1000,
        encoder_hidden_states=cond.text_embeds,
        return_dict=False,
    )[0]
    assert velocity.shape == x_t.shape
    assert torch.equal(velocity, direct)
    rounded = denoiser.transformer(
        hidden_states=torch.cat([x_t, cond.control], dim=1),
        timestep=(sigma * 1000).round(),
        encoder_hidden_states=cond.text_embeds,
        return_dict=False,
    )[0]
    assert not torch.allclose(velocity, rounded)


def test_masked_text_positions_have_no_effect(denoiser):
    x_t, sigma, cond = make_inputs()
    velocity = denoiser(x_t, sigma, cond)
    text = cond.text_embeds.clone()
    text[0, -2:] = 100.0  # masked out
    assert torch.equal(denoiser(x_t, sigma, cond.with_text(text, cond.text_mask)), velocity)
    text[0, 0] = 100.0  # a real token
    assert not torch.allclose(denoiser(x_t, sigma, cond.with_text(text, cond.text_mask)), velocity)


def test_control_errors(denoiser):
    x_t, sigma, cond = make_inputs()
    with pytest.raises(ValueError, match=re.escape("needs cond.control of shape [2, 3, 3, 4, 6]")):
        denoiser(x_t, sigma, Conditioning(cond.text_embeds, cond.text_mask, None))
    with pytest.raises(ValueError, match="cond.control must be"):
        denoiser(x_t, sigma, Conditioning(cond.text_embeds, cond.text_mask, cond.control[:, :2]))
    no_control = WanDenoiser(config={**TINY, "in_channels": 3})
    with pytest.raises(ValueError, match="takes no control"):
        no_control(x_t, sigma, cond)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        denoiser(x_t[..., :5], sigma, cond)


def test_save_and_load_round_trip(denoiser, tmp_path):
    x_t, sigma, cond = make_inputs()
    denoiser.save_pretrained(str(tmp_path / "model"))
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = WanDenoiser(path=str(tmp_path / "model"))
    assert torch.equal(loaded(x_t, sigma, cond), denoiser(x_t, sigma, cond))

    denoiser.save_pretrained(str(tmp_path / "pipeline" / "transformer"))
    from_pipeline = WanDenoiser(path=str(tmp_path / "pipeline"))
    assert torch.equal(from_pipeline(x_t, sigma, cond), denoiser(x_t, sigma, cond))


def test_path_or_config_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        WanDenoiser()
    with pytest.raises(ModelFolderError, match="does not exist"):
        WanDenoiser(path=str(tmp_path / "absent"))


def test_bfloat16_keeps_fp32_modules():
    denoiser = WanDenoiser(config=TINY, dtype="bfloat16")
    assert denoiser.transformer.patch_embedding.weight.dtype == torch.bfloat16
    time_embedder = denoiser.transformer.condition_embedder.time_embedder
    assert time_embedder.linear_1.weight.dtype == torch.float32
    x_t, sigma, cond = make_inputs()
    assert denoiser(x_t, sigma, cond).dtype == torch.float32


def test_features_are_the_output_of_block_k(denoiser):
    x_t, sigma, cond = make_inputs()
    captured = []
    denoiser.blocks[1].register_forward_hook(lambda m, a, out: captured.append(out))
    velocity, features = denoiser(x_t, sigma, cond, feature_block=1)
    tokens = captured[-1]  # [B, N, D], N = t*h*w
    assert features.shape == (2, 16, 3, 2, 3)
    assert torch.equal(features.flatten(2).transpose(1, 2), tokens)
    assert torch.equal(velocity, denoiser(x_t, sigma, cond))
    with pytest.raises(ValueError, match="valid blocks are 0..1"):
        denoiser(x_t, sigma, cond, feature_block=2)


def test_feature_grid_matches_patch_embedding(denoiser):
    """With block 0 made the identity, its features are the Conv3d patch embedding grid."""
    identity = copy.deepcopy(denoiser)
    transformer = identity.transformer
    with torch.no_grad():  # zero gates, shifts and scales, and the (ungated) cross-attention output
        for module in [transformer.condition_embedder.time_proj, identity.blocks[0].attn2]:
            for param in module.parameters():
                param.zero_()
        identity.blocks[0].scale_shift_table.zero_()
    x_t, sigma, cond = make_inputs()
    _, features = identity(x_t, sigma, cond, feature_block=0)
    grid = transformer.patch_embedding(torch.cat([x_t, cond.control], dim=1))  # [B, D, t, h, w]
    assert torch.allclose(features, grid, atol=1e-6)
    # cell (frame 2, row 1, column 0) is made of pixels [2, 2:4, 0:2] only
    x_local = x_t.clone()
    x_local[:, :, 2, 2:4, 0:2] += 1.0
    _, moved = identity(x_local, sigma, cond, feature_block=0)
    changed = (moved - features).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().tolist() == [[2, 1, 0]]


def loss_and_grads(denoiser, x_t, sigma, cond):
    x_t = x_t.clone().requires_grad_(True)
    velocity, features = denoiser(x_t, sigma, cond, feature_block=0)
    (velocity.square().mean() + features.sin().mean()).backward()
    grads = {name: p.grad.clone() for name, p in denoiser.named_parameters()}
    return velocity.detach(), features.detach(), x_t.grad, grads


def test_gradient_checkpointing_same_outputs_and_gradients(denoiser):
    x_t, sigma, cond = make_inputs()
    denoiser.train()
    plain = loss_and_grads(denoiser, x_t, sigma, cond)
    denoiser.zero_grad()
    denoiser.set_gradient_checkpointing(True)
    assert denoiser.transformer.gradient_checkpointing
    checkpointed = loss_and_grads(denoiser, x_t, sigma, cond)
    assert not denoiser.blocks[0]._forward_hooks
    torch.testing.assert_close(checkpointed[:3], plain[:3])
    torch.testing.assert_close(checkpointed[3], plain[3])
    assert plain[2].abs().sum() > 0

    denoiser.zero_grad()  # features alone carry gradient into x_t
    x = x_t.clone().requires_grad_(True)
    denoiser(x, sigma, cond, feature_block=0)[1].sum().backward()
    assert x.grad.abs().sum() > 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_real_size_config_on_meta():
    before = rss_bytes()
    denoiser = WanDenoiser.from_config(WAN_2_1_T2V_1_3B, on_meta=True)
    assert rss_bytes() - before < 200e6  # 1.4e9 float32 parameters would be 5.7 GB
    assert all(t.is_meta for t in [*denoiser.parameters(), *denoiser.buffers()])
    count = sum(p.numel() for p in denoiser.parameters())
    assert 1.3e9 < count < 1.5e9  # "1.3B": 1.42e9 with the text and time embedders
    assert (denoiser.num_blocks, denoiser.feature_dim, denoiser.control_channels) == (30, 1536, 0)
