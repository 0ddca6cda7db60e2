"""A real-size architecture at its published widths on the CPU, with its block count cut to 1.

Wan2.1-T2V-1.3B's transformer (1536 wide, 12 heads x 128, FFN 8960, umT5 text 4096 wide, 16
latent channels, patches 1x2x2) with one block instead of 30 and random weights: 72 M
parameters, 0.29 GB in float32. It runs a forward in bf16, and ``estimate-memory``'s peak of
a KD step of it (its config read from a teacher folder that holds no weights) is compared
with the peak of a real CPU KD step: the tensors alive before the step (parameters, buffers,
the batch) plus the peak of what the step allocates, from torch.profiler's memory events
(:func:`tests.scale.test_memory_estimate.profiled_peaks`, two steps so the second holds the
AdamW state as every later step does; AdamW with ``foreach``, torch's default on a GPU, whose
full-size temporary the estimate counts). Tolerance 2% (measured 2026-12-07: 1520.6 MiB
estimated, 1522.6 MiB measured): at this size the step's memory is parameters, gradients,
AdamW moments and the AdamW temporary, which the estimate counts exactly; activations of 4
tokens are small.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill_pl.families.registry import build_denoiser
from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B, WAN_T2V_CLASS
from distill_pl.methods.kd import KDObjective, KDRoles
from distill_pl.methods.roles import config_denoisers
from distill_pl.models.conditioning import Conditioning
from distill_pl.scale.memory_estimate import estimate_memory
from tests.scale.test_memory_estimate import live_bytes, profiled_peaks

REPO = Path(__file__).resolve().parents[2]
#: Wan2.1-T2V-1.3B at its published widths, one block
CUT_1_3B = {**WAN_2_1_T2V_1_3B, "num_layers": 1}
#: latents [16, 1, 4, 4] -> 4 tokens; 8 text tokens
FRAMES, HEIGHT, WIDTH, TEXT_TOKENS = 1, 4, 4, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def write_config_only_teacher(folder: Path, transformer_config: dict) -> Path:
    """A teacher folder with ``transformer/config.json`` and a UniPC ``scheduler/``, no weights
    (all the estimate reads)."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer/config.json").write_text(json.dumps({"_class_name": WAN_T2V_CLASS, **transformer_config}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "prediction_type": "flow_prediction",
        "use_flow_sigmas": True}))
    return folder


def test_one_real_width_block_runs_in_bf16():
    torch.manual_seed(0)
    net = build_denoiser(WAN_T2V_CLASS, CUT_1_3B, dtype="bfloat16").eval()
    assert (net.feature_dim, net.text_dim, net.latent_channels, net.num_blocks) == (1536, 4096, 16, 1)
    assert 70e6 < sum(p.numel() for p in net.parameters()) < 75e6
    x = torch.randn(1, 16, FRAMES, HEIGHT, WIDTH, dtype=torch.bfloat16)
    cond = Conditioning(torch.randn(1, TEXT_TOKENS, 4096, dtype=torch.bfloat16), torch.ones(1, TEXT_TOKENS, dtype=torch.bool))
    with torch.no_grad():
        v, features = net(x, torch.tensor([0.5], dtype=torch.bfloat16), cond, feature_block=0)
    assert v.shape == x.shape and v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    assert features.shape == (1, 1536, FRAMES, HEIGHT // 2, WIDTH // 2)


def test_estimate_of_the_cut_model_matches_a_measured_cpu_kd_step(tmp_path):
    teacher = write_config_only_teacher(tmp_path / "wan-1.3b-1block", CUT_1_3B)
    config = yaml.safe_load((REPO / "configs/wan2.1-t2v-1.3b/kd.yaml").read_text())
    config["trainer"].update(precision="32-true", devices=1)
    config["model"]["init_args"].update(teacher=str(teacher), vae_path=None, gradient_checkpointing=False)
    config["data"].update(num_frames=FRAMES, height=HEIGHT, width=WIDTH, max_text_length=TEXT_TOKENS, batch_size=1)
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(config))
    estimate = estimate_memory(str(tmp_path / "kd.yaml"))

    settings = config["model"]["init_args"]
    torch.manual_seed(0)
    roles = KDRoles.from_settings(settings, config_denoisers(WAN_T2V_CLASS, CUT_1_3B))
    student = roles.student
    # foreach, as torch's default on a GPU (the CPU default is the per-parameter loop, without
    # the full-size temporary the estimate counts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
    g = torch.Generator().manual_seed(0)
    noise, target = (torch.randn(1, 16, FRAMES, HEIGHT, WIDTH, generator=g) for _ in range(2))
    cond = Conditioning(torch.randn(1, TEXT_TOKENS, 4096, generator=g), torch.ones(1, TEXT_TOKENS, dtype=torch.bool))

    def step():
        optimizer.zero_grad(set_to_none=True)
        KDObjective(student).loss(noise, target, cond).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = live_bytes(roles.parameters(), roles.buffers(), (noise, target, cond.text_embeds))
    measured = before + profiled_peaks([("first", step), ("second", step)])["second"]
    print(f"Wan2.1-1.3B widths, 1 block, KD step: estimated {estimate.total / 2**20:.1f} MiB, "
          f"measured {measured / 2**20:.1f} MiB")
    assert estimate.total > 1.0 * 2**30  # float32 student 0.29 GB, its gradients, 2 AdamW moments, the bf16 teacher
    assert estimate.total == pytest.approx(measured, rel=0.02)
