"""KD of a Cosmos-Transfer2.5 teacher: it refuses pairs generated with other adapter options
(denoiser_options) than its own, and a student its pipeline export could not run."""

from __future__ import annotations

import pytest

from distill_pl.data.pairs import teacher_fingerprint
from distill_pl.training.kd import KDModule
from tests.families import cosmos_tiny


@pytest.fixture(scope="module")
def cosmos_teacher(tmp_path_factory, one_thread) -> str:
    folder = tmp_path_factory.mktemp("cosmos") / "pipeline"
    cosmos_tiny.save_tiny_pipeline(folder)
    return str(folder)


def cosmos_metadata(teacher: str, options: dict | None) -> dict:
    """The pairs metadata of 5 frames of 32x32 through the tiny VAE ([16, 2, 4, 4])."""
    meta = dict(teacher=teacher, teacher_sha256=teacher_fingerprint(teacher), vae_path=teacher,
                latent_shape=[16, 2, 4, 4], num_frames=5, height=32, width=32, guidance=3.0, num_steps=4)
    if options is not None:
        meta["denoiser_options"] = options
    return meta


def test_pairs_with_other_denoiser_options_are_refused(cosmos_teacher, tmp_path):
    kd = KDModule(cosmos_teacher, vae_path=cosmos_teacher,
                  denoiser_options={"control_scale": 0.5, "freeze_control_branch": True})
    pairs = str(tmp_path / "pairs")
    # the same options, and options that only change training (freeze_control_branch), pass
    kd.check_pairs_metadata(cosmos_metadata(cosmos_teacher, {"control_scale": 0.5}), pairs)
    kd.check_pairs_metadata(cosmos_metadata(cosmos_teacher, {"control_scale": 0.5, "freeze_control_branch": False}), pairs)
    message = (rf"^{pairs}: the pairs were generated with denoiser_options.control_scale = 1.0, this KD "
               r"run has 0.5; set model.denoiser_options.control_scale to 1.0 or regenerate the pairs$")
    with pytest.raises(ValueError, match=message):
        kd.check_pairs_metadata(cosmos_metadata(cosmos_teacher, {"control_scale": 1.0}), pairs)
    # an option left out has the adapter's default (control_scale 1.0), on either side
    with pytest.raises(ValueError, match=message):
        kd.check_pairs_metadata(cosmos_metadata(cosmos_teacher, {}), pairs)
    default = KDModule(cosmos_teacher, vae_path=cosmos_teacher)
    default.check_pairs_metadata(cosmos_metadata(cosmos_teacher, None), pairs)  # pairs before the key: defaults
    with pytest.raises(ValueError, match=r"control_scale = \[1.0, 0.5\], this KD run has 1.0;"):
        default.check_pairs_metadata(cosmos_metadata(cosmos_teacher, {"control_scale": [1.0, 0.5]}), pairs)


def test_a_ladder_the_exported_pipeline_cannot_run_is_refused_before_training(cosmos_teacher, tmp_path):
    """Cosmos2_5_TransferPipeline sets its own K sigmas: levels its scheduler cannot produce
    fail at construction when the run exports, not after training."""
    with pytest.raises(ValueError, match=r"noise levels \[1.0, 0.9, 0.5, 0.1\] from set_timesteps\(4\)"):
        KDModule(cosmos_teacher, vae_path=cosmos_teacher, student_sigmas=[1.0, 0.9, 0.5, 0.1],
                 export_dir=str(tmp_path / "export"))
    KDModule(cosmos_teacher, vae_path=cosmos_teacher, student_sigmas=[1.0, 0.9, 0.5, 0.1])  # no export: fine
    KDModule(cosmos_teacher, vae_path=cosmos_teacher, student_sigmas=[1.0, 0.75, 0.5, 0.25],
             export_dir=str(tmp_path / "export"))


def test_pairs_with_conditional_frames_give_the_student_the_same_frames(cosmos_teacher):
    """A pairs batch with ``num_cond_frames`` gives the student the clip's first latent frames
    (its VAE latents), and the KD loss leaves them out."""
    import torch

    from distill_pl.methods.kd import kd_loss
    from distill_pl.models.autoencoder import WanVAE

    kd = KDModule(cosmos_teacher, vae_path=cosmos_teacher)
    g = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1,
        "control": torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1,
        "text_embeds": torch.randn(2, 6, cosmos_tiny.TEXT_DIM, generator=g),
        "text_mask": torch.ones(2, 6, dtype=torch.bool),
        "noise": torch.randn(2, 16, 2, 4, 4, generator=g),
        "teacher_output": torch.randn(2, 16, 2, 4, 4, generator=g),
        "num_cond_frames": torch.tensor([0, 1]),
    }
    noise, target, cond = kd.pair_inputs(batch)
    assert cond.num_cond_frames.tolist() == [0, 1]
    torch.testing.assert_close(cond.cond_latents, WanVAE(cosmos_teacher).encode(batch["video"]), rtol=0, atol=1e-6)
    with torch.no_grad():
        x_g = kd.objective().generate(noise, cond)
    # the given frame is the clip's latents; the loss is each sample's mean over its generated
    # frames (2 and 1), then the mean over the samples
    torch.testing.assert_close(x_g[1, :, 0], cond.cond_latents[1, :, 0], rtol=0, atol=1e-5)
    error = (x_g - target).square()
    expected = (error[0].mean() + error[1, :, 1].mean()) / 2
    torch.testing.assert_close(kd_loss(x_g, target, cond), expected)
    del batch["num_cond_frames"]
    assert kd.pair_inputs(batch)[2].cond_latents is None
