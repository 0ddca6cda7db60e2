"""``distill-pl sample``: an exported few-step student is sampled at its own noise levels; a
two-expert teacher with ``guidance_2``; one-line errors."""

from __future__ import annotations

import pytest
import torch

import distill_pl.eval.sample as sample_module
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.export.model_folders import save_student_folder
from distill_pl.families.registry import build_denoiser
from tests.families.wan22_tiny import write_tiny_wan22

TINY = dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=8, in_channels=6, out_channels=3,
            text_dim=384, freq_dim=16, ffn_dim=32, num_layers=1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> VideoDataModule:
    """Validation clips of 5 frames of 32x32 (the tiny Wan 2.2 VAE's input: latents [4, 2, 4, 4]),
    in batches of 2; one module for the file's samplings, so the clips and captions are read once."""
    return VideoDataModule(num_frames=5, frame_stride=2, height=32, width=32, val_batch_size=2, max_text_length=8,
                           cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_a_student_folder_is_sampled_at_its_levels_and_with_its_sampler_without_cfg(tmp_path, monkeypatch, capsys,
                                                                                     data):
    torch.manual_seed(0)
    student = build_denoiser("WanTransformer3DModel", TINY)
    folder = save_student_folder(tmp_path / "student", student, 1.0, None, (1.0, 0.5), sampler="euler")
    calls = []
    student_sample = sample_module.student_sample

    def recording(fn, noise, sigmas, sampler, generator=None):
        calls.append((list(sigmas), sampler))
        return student_sample(fn, noise, sigmas, sampler, generator)

    monkeypatch.setattr(sample_module, "student_sample", recording)
    monkeypatch.setattr(sample_module, "sample_with_scheduler", None)  # the teacher's sampler is not used
    written = sample_module.sample_teacher(str(folder), str(tmp_path / "out"), data, num_videos=2, steps=36,
                                           guidance=5.0)
    assert calls == [([1.0, 0.5], "euler")]  # one batch of 2 videos, with the folder's sampler
    assert "a 2-step student, sampled at its noise levels without CFG" in capsys.readouterr().out
    assert (tmp_path / "out" / "sample_1.mp4") in written and (tmp_path / "out" / "grid.png") in written


def test_guidance_2_weighs_the_low_noise_expert_of_a_two_expert_teacher(tmp_path, monkeypatch, data):
    """A tiny two-expert (Wan 2.2 T2V-A14B-shaped) teacher sampled with ``guidance 3,
    guidance_2 2``: its velocity is the ``w = 3`` one at a level of the high-noise expert and
    the ``w = 2`` one at a level of the low-noise expert (where the two differ)."""
    teacher = write_tiny_wan22(tmp_path / "teacher", "t2v-a14b")
    sample_with_scheduler = sample_module.sample_with_scheduler
    velocities = {}

    def recording(fn, noise, *args, **kwargs):
        velocities[weights] = fn, noise
        return sample_with_scheduler(fn, noise, *args, **kwargs)

    monkeypatch.setattr(sample_module, "sample_with_scheduler", recording)
    for weights in ((3.0, 2.0), (3.0, None), (2.0, None)):
        sample_module.sample_teacher(str(teacher), str(tmp_path / "out"), data, vae_path=str(teacher), num_videos=1,
                                     steps=2, guidance=weights[0], guidance_2=weights[1])
    both, noise = velocities[3.0, 2.0]
    high, low = torch.full((2,), 0.95), torch.full((2,), 0.5)  # timesteps 950 >= 875 > 500
    with torch.no_grad():
        assert torch.equal(both(noise, high), velocities[3.0, None][0](noise, high))
        assert torch.equal(both(noise, low), velocities[2.0, None][0](noise, low))
        assert not torch.allclose(both(noise, low), velocities[3.0, None][0](noise, low))


def test_sample_refuses_zero_steps_and_a_truncated_teacher_in_one_line(tmp_path, monkeypatch, capsys):
    """``--steps 0``: one line before any model loads (the teacher folder is not even read);
    ``--guidance_2`` with a teacher of one network: one line; a teacher folder whose
    safetensors file is truncated: one line naming the file."""
    from distill_pl.cli.main import main
    from distill_pl.export.model_folders import save_teacher_folder

    monkeypatch.chdir(tmp_path)
    teacher = save_teacher_folder(tmp_path / "teacher", build_denoiser("WanTransformer3DModel", TINY), "unipc", 1.0)
    weights = teacher / "transformer/diffusion_pytorch_model.safetensors"
    data = ["--data.cache_dir", str(tmp_path / "cache"), "--data.height", "32", "--data.width", "32",
            "--data.num_frames", "8", "--data.frame_stride", "4"]

    def fails(args: list[str]) -> list[str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["sample", "--out", str(tmp_path / "out"), *args, *data])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code != 0 and len(err) <= 3, err
        return err

    err = fails(["--teacher", str(tmp_path / "missing"), "--steps", "0"])
    assert "--steps must be a whole number of sampling steps, at least 1 (got 0)" in err[0], err

    err = fails(["--teacher", str(teacher), "--steps", "2", "--guidance_2", "2"])
    assert "--guidance_2=2: the low-noise expert's CFG weight needs a two-expert teacher" in err[0], err
    assert not (tmp_path / "out").exists()

    data_bytes = weights.read_bytes()
    weights.write_bytes(data_bytes[: len(data_bytes) // 2])
    err = fails(["--teacher", str(teacher), "--steps", "2"])
    assert f"{weights}: unreadable safetensors weights" in err[0], err
    assert not (tmp_path / "out").exists()
