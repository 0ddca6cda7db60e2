"""The stages with a two-expert teacher (the tiny Wan 2.2 T2V-A14B-shaped folder of
scripts/make_tiny_wan22.py). DMD2: a 2-step student whose levels lie on both sides of the
experts' boundary trains both of its experts; the fake score is a two-expert copy of the
teacher; a run killed and resumed with ``ckpt_path`` is bit-exact (optimizer moments and EMA
are per parameter, so per expert). DMD2 and KD pair generation: ``guidance_2`` weighs the
teacher's CFG at the low-noise expert's levels only.

The batches are precomputed clip latents [4, 2, 4, 4] with random text embeddings, so no video
is decoded.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distill_pl.diffusion.sampling import sample_with_scheduler
from distill_pl.export.model_folders import load_scheduler, save_teacher_folder
from distill_pl.families.registry import build_denoiser
from distill_pl.families.wan.experts import WanExpertsDenoiser
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import velocity_fn
from distill_pl.training.dmd2 import DMD2Module
from distill_pl.training.kd_pairs import KDPairGenerationModule
from tests.families.wan22_tiny import write_tiny_wan22
from tests.training.test_dmd2 import Kill, Killed, adam_steps, tensors, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LATENTS = (4, 2, 4, 4)  # the tiny VAE's latents of a 5 x 32 x 32 clip
TEXT = (8, 384)
#: through the tiny teacher's shift 3: levels 1.0 (timestep 1000 >= 875: high-noise expert)
#: and 0.75 (750: low-noise expert)
STUDENT_SIGMAS = [1.0, 0.5]
SETTINGS = dict(student_lr=1e-3, fake_score_lr=1e-3, discriminator_lr=1e-3, discriminator_hidden=8,
                feature_block=1, guidance=3.0, guidance_2=2.0, ema_decay=0.9, student_sigmas=STUDENT_SIGMAS)


class LatentClips(Dataset):
    """Two random clip latents with random text embeddings: one batch of 2 per epoch, so every
    step (a resumed run's too) sees the same batch and only the step-keyed draws vary."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"video_latents": torch.randn(*LATENTS, generator=g), "control": torch.zeros(3, 5, 32, 32),
                "text_embeds": torch.randn(*TEXT, generator=g), "text_mask": torch.ones(TEXT[0], dtype=torch.long)}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return write_tiny_wan22(tmp_path_factory.mktemp("wan22") / "teacher", "t2v-a14b")


def module(teacher_dir, **more) -> DMD2Module:
    dmd2 = DMD2Module(str(teacher_dir), vae_path=str(teacher_dir), **{**SETTINGS, **more})
    g = torch.Generator().manual_seed(123)
    dmd2.set_negative_prompt(torch.randn(1, *TEXT, generator=g), torch.ones(1, TEXT[0], dtype=torch.long))
    return dmd2


def loader() -> DataLoader:
    return DataLoader(LatentClips(), batch_size=2, shuffle=False)


def expert_changed(before: dict, after: dict, expert: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"{expert}."))


@pytest.mark.parametrize("fake_score_experts", ["per_expert", "shared"])
def test_two_expert_dmd2_trains_both_experts_and_resumes_bit_exact(teacher_dir, tmp_path, fake_score_experts):
    """10 steps straight (2 student steps, 8 critic steps) vs. killed at step 7 and resumed from
    the step-5 checkpoint: every weight, EMA weight and optimizer moment equal, bit for bit;
    both experts of the student moved, and the fake score: one per expert (both moved), or
    shared: one network, a copy of the teacher's low-noise expert, which alone the checkpoint
    holds as fake_score.*."""
    full = module(teacher_dir, fake_score_experts=fake_score_experts)
    shared = fake_score_experts == "shared"
    if shared:
        assert not full.fake_score.named_experts
        assert tensors(full.fake_score).keys() == tensors(full.teacher.low_noise).keys()
        low_noise = full.teacher.low_noise.state_dict()
        assert all(torch.equal(v, low_noise[k]) for k, v in tensors(full.fake_score).items())
    else:
        assert isinstance(full.fake_score, WanExpertsDenoiser)  # one fake score per expert
    student_before, fake_before = tensors(full.student), tensors(full.fake_score)
    t_full = trainer(10)
    t_full.fit(full, train_dataloaders=loader())
    for expert in ("high_noise", "low_noise"):
        assert expert_changed(student_before, tensors(full.student), expert), f"student.{expert} did not train"
        if not shared:
            assert expert_changed(fake_before, tensors(full.fake_score), expert), f"fake_score.{expert} did not train"
    if shared:
        assert expert_changed(fake_before, tensors(full.fake_score), "transformer")

    ckpts = tmp_path / "ckpts"
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=5, save_top_k=-1)
    killed = trainer(10, [saver, Kill(7)], enable_checkpointing=True, root=tmp_path)
    with pytest.raises(Killed):
        killed.fit(module(teacher_dir, fake_score_experts=fake_score_experts), train_dataloaders=loader())
    (ckpt,) = ckpts.glob("*step=5.ckpt")
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    stored = {k for k in stored if k.startswith("fake_score.")}
    fake_score_of = full.teacher.low_noise if shared else full.teacher
    assert stored == {f"fake_score.{k}" for k in fake_score_of.state_dict()}

    resumed = module(teacher_dir, fake_score_experts=fake_score_experts)
    t_resumed = trainer(10)
    t_resumed.fit(resumed, train_dataloaders=loader(), ckpt_path=ckpt)
    for name in ("student", "fake_score", "discriminator", "student_ema"):
        a, b = tensors(getattr(full, name)), tensors(getattr(resumed, name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    for opt_a, opt_b in zip(t_full.optimizers, t_resumed.optimizers):
        assert adam_steps(opt_a) == adam_steps(opt_b)
        for state_a, state_b in zip(opt_a.state.values(), opt_b.state.values()):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state_a[key], state_b[key])


class ExpertChanges(L.Callback):
    """Per step: which experts of the student, its EMA and the fake score changed (keys
    ``<network>.<expert>``), and whether the discriminator did."""

    #: network -> the state-dict prefix of its experts
    networks = {"student": "", "student_ema": "module.", "fake_score": ""}

    def __init__(self):
        self.rows: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = {n: tensors(getattr(module, n)) for n in (*self.networks, "discriminator")}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = {n: tensors(getattr(module, n)) for n in self._before}
        row = {f"{n}.{e}": expert_changed(self._before[n], after[n], prefix + e)
               for n, prefix in self.networks.items() for e in ("high_noise", "low_noise")}
        before = self._before["discriminator"]
        row["discriminator"] = any(not torch.equal(v, after["discriminator"][k]) for k, v in before.items())
        self.rows.append(row)


def test_a_non_finite_gradient_in_one_expert_skips_that_expert_only(teacher_dir):
    """Every sample's noise level and trained step fixed so that each step trains both experts
    (sample 0 the high-noise one, sample 1 the low-noise one); a NaN put into the gradient of
    the fake score's high-noise expert at critic step 2 and of the student's low-noise expert at
    student step 3 (2-step cycles, 5 steps): that expert's weights, optimizer state and EMA stay, the
    other expert and the discriminator move, the step counts as applied, and the skips are
    counted per expert (logged and in the checkpointed counters)."""
    dmd2 = module(teacher_dir, student_update_freq=2)
    draws_of = dmd2.step_draws

    def one_sample_per_expert(batch, step):
        draws = draws_of(batch, step)
        draws.sigma = torch.tensor([0.95, 0.5])  # timesteps 950 >= 875 > 500
        draws.step = torch.tensor([0, 1])  # student levels 1.0 (high-noise expert) and 0.75 (low-noise)
        return draws

    dmd2.step_draws = one_sample_per_expert
    for step, expert in {2: dmd2.fake_score.high_noise, 3: dmd2.student.low_noise}.items():
        for p in expert.parameters():
            p.register_hook(lambda g, at=step: g * math.nan if dmd2.global_step == at else g)
    changes = ExpertChanges()
    t = trainer(5, [changes])
    with pytest.warns(UserWarning, match=r"DMD2 step 2 \(critic phase\): non-finite gradient in "
                                         r"fake_score.high_noise only, its update skipped, the rest applied"):
        t.fit(dmd2, train_dataloaders=loader())

    for step, row in enumerate(changes.rows):
        critic = step % 2 == 0
        expected = {name: name.startswith("student") != critic for name in row}
        if step == 2:
            expected["fake_score.high_noise"] = False
        if step == 3:
            expected["student.low_noise"] = expected["student_ema.low_noise"] = False
        assert row == expected, (step, row)
    critic, student = t.optimizers

    def adam_steps_of(optimizer, expert):
        return {int(optimizer.state[p]["step"]) for p in expert.parameters()}

    assert adam_steps_of(critic, dmd2.fake_score.high_noise) == {2}
    assert adam_steps_of(critic, dmd2.fake_score.low_noise) == {3}
    assert adam_steps_of(student, dmd2.student.high_noise) == {2}
    assert adam_steps_of(student, dmd2.student.low_noise) == {1}
    assert all(torch.isfinite(p).all() for p in dmd2.parameters())

    metrics = t.callback_metrics
    assert metrics["train/nonfinite_steps"] == 0 and metrics["train/update_skipped"] == 0
    assert {k: float(v) for k, v in metrics.items() if k.startswith("train/nonfinite_steps_")} == {
        "train/nonfinite_steps_fake_score.high_noise": 1.0, "train/nonfinite_steps_fake_score.low_noise": 0.0,
        "train/nonfinite_steps_student.high_noise": 0.0, "train/nonfinite_steps_student.low_noise": 1.0}
    counters = dmd2.nonfinite.state_dict()["nonfinite_experts"]
    assert counters["student.low_noise"] == {"total": 1, "streak": 1}
    assert counters["fake_score.high_noise"] == {"total": 1, "streak": 0}  # applied again at step 4


def test_guidance_2_weighs_the_low_noise_levels_of_the_dmd_term(teacher_dir):
    """The generator loss with ``guidance_2`` equals the one with ``guidance`` alone at a level of
    the high-noise expert, and the one with ``guidance = guidance_2`` at a level of the low-noise
    expert (where it differs from the first)."""
    dmd2 = module(teacher_dir, gan_weight=0.0)
    objective = dmd2.objective
    g = torch.Generator().manual_seed(0)
    x_g, noise = torch.randn(2, *LATENTS, generator=g), torch.randn(2, *LATENTS, generator=g)
    batch = LatentClips()[0]
    cond = dmd2.conditioning({k: v[None].expand(2, *v.shape) for k, v in batch.items()})
    uncond = dmd2.guidance_uncond(cond)

    def loss(sigma, guidance, guidance_2):
        objective.guidance, objective.guidance_2 = guidance, guidance_2
        with torch.no_grad():
            return objective.generator_loss(x_g, torch.full((2,), sigma), noise, cond, uncond)[0]

    high, low = 0.95, 0.5  # timesteps 950 >= 875 > 500
    assert torch.equal(loss(high, 3.0, 2.0), loss(high, 3.0, None))
    assert torch.equal(loss(low, 3.0, 2.0), loss(low, 2.0, None))
    assert not torch.equal(loss(low, 3.0, 2.0), loss(low, 3.0, None))


def test_pair_generation_samples_the_teacher_with_guidance_2_and_records_it(teacher_dir):
    """The pairs' teacher output is the 4-step CFG sample with ``guidance`` at the high-noise
    expert's steps and ``guidance_2`` at the low-noise expert's (not the one-weight sample);
    the metadata records ``guidance_2`` when it is set."""
    clip = LatentClips()[0]
    batch = {"video": torch.zeros(1, 3, 5, 32, 32), "control": torch.zeros(1, 3, 5, 32, 32),
             "text_embeds": clip["text_embeds"][None], "text_mask": clip["text_mask"][None],
             "index": torch.tensor([0]), "start": torch.tensor([0]), "split": ["train"], "caption": ["a"],
             "path": ["a.mp4"]}
    negative = torch.randn(1, *TEXT, generator=torch.Generator().manual_seed(123))
    outputs, metadata = {}, {}
    for guidance_2 in (None, 2.0):
        pairs = KDPairGenerationModule(str(teacher_dir), vae_path=str(teacher_dir), num_steps=4, guidance=3.0,
                                       guidance_2=guidance_2, storage_dtype="float32")
        pairs.negative_prompt.set(negative, torch.ones(1, TEXT[0], dtype=torch.long))
        outputs[guidance_2] = pairs.predict_step(batch, 0)["teacher_output"]
        metadata[guidance_2] = pairs.pair_generation_metadata()
    assert "guidance_2" not in metadata[None] and metadata[2.0]["guidance_2"] == 2.0

    teacher = pairs.teacher
    cond = Conditioning(batch["text_embeds"], batch["text_mask"])
    noise = torch.randn(1, *LATENTS, generator=torch.Generator().manual_seed(0))  # example 0's seed: 0
    with torch.no_grad():
        expected = sample_with_scheduler(velocity_fn(teacher, cond, cond.with_text(negative, batch["text_mask"]), 3.0, 2.0),
                                         noise, load_scheduler(str(teacher_dir)), 4, step_sigma=teacher.sampler_sigma)
    torch.testing.assert_close(outputs[2.0], expected, rtol=0, atol=1e-6)
    assert (outputs[2.0] - outputs[None]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def one_network_dir(tmp_path_factory) -> Path:
    """A tiny Wan 2.1 teacher folder: one network."""
    folder = tmp_path_factory.mktemp("one") / "teacher"
    save_teacher_folder(folder, build_denoiser("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
        text_dim=384, freq_dim=16, ffn_dim=32, num_layers=2)), "unipc", shift=2.0)
    return folder


def test_guidance_2_with_a_one_network_teacher_is_a_one_line_error(one_network_dir):
    for stage in (lambda: DMD2Module(str(one_network_dir), guidance_2=4.0),
                  lambda: KDPairGenerationModule(str(one_network_dir), guidance_2=4.0)):
        with pytest.raises(ValueError, match=r"^model.init_args.guidance_2=4: .*two-expert teacher[^\n]*$"):
            stage()


def test_shared_fake_score_needs_a_two_expert_teacher(one_network_dir, teacher_dir):
    with pytest.raises(ValueError, match=r"^model.init_args.fake_score_experts='shared': .*two-expert teacher"
                                         r".*WanDenoiser is one network[^\n]*$"):
        DMD2Module(str(one_network_dir), fake_score_experts="shared")
    with pytest.raises(ValueError, match=r"^model.init_args.fake_score_experts='both': must be "
                                         r"'per_expert' or 'shared'$"):
        DMD2Module(str(teacher_dir), fake_score_experts="both")


def test_guidance_2_with_decoupled_dmd_is_refused(teacher_dir):
    with pytest.raises(ValueError, match="guidance_2 is not supported with Decoupled DMD"):
        DMD2Module(str(teacher_dir), vae_path=str(teacher_dir), decoupled_dmd=True, guidance_2=2.0)
