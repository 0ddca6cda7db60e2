"""A LoRA student of a Wan 2.2 teacher: adapters on both experts, and ``distill-pl export`` of
its checkpoint as the full pipeline folder AND as LoRA files for the teacher pipeline (the
HIGH/LOW pair of a two-expert student, one file for one network).

Both ways of running the exported student -- the full folder through ``WanPipeline``, and the
TEACHER folder through ``WanPipeline`` with ``load_lora_weights`` and the student's scheduler --
equal the project's K-step sample of the adapted student (float32, 1e-5; the re-noising draws
recorded from the pipeline's scheduler). Tiny random folders of scripts/make_tiny_wan22.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.schedulers import scheduling_flow_match_euler_discrete as euler_module
from safetensors.torch import load_file

from distill_pl.diffusion.sampling import few_step_sample
from distill_pl.export.checkpoint import export_student
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.lora import lora_parameters
from distill_pl.models.student_init import STUDENT_PREFIX
from distill_pl.training.dmd2 import DMD2Module
from tests.families.test_wan_vace import vace_folder  # noqa: F401
from tests.families.wan22_tiny import write_tiny_wan22

TOLERANCE = 1e-5
FRAMES = 9
SIZE = {"t2v-a14b": 32, "i2v-a14b": 32, "ti2v-5b": 64}  # latents [1, 4, 3, 4, 4] for each
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """kind -> the tiny teacher pipeline folder, written on first use."""
    root = tmp_path_factory.mktemp("wan22_lora")

    class Folders(dict):
        def __missing__(self, kind):
            self[kind] = write_tiny_wan22(root / kind, kind)
            return self[kind]

    return Folders()


def lora_student(teacher: Path, ckpt: Path, sigmas: list[float], options: dict | None = None):
    """A DMD2 LoRA student (rank 2, alpha 4: scale 2) of ``teacher`` (adapter ``options``)
    with random non-zero adapters, saved as a Lightning-style checkpoint ``ckpt`` (its
    ``student.*`` weights and the run's hyper-parameters); returns the adapted student."""
    module = DMD2Module(str(teacher), student_lora_rank=2, student_lora_alpha=4.0, student_sigmas=sigmas,
                        denoiser_options=options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(module.student).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    state = {STUDENT_PREFIX + k: v for k, v in module.student.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, ckpt)
    return module.student.eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 7, 384, generator=g)


def pipeline_run(pipe, folder: Path, noise, prompt, size: int, monkeypatch, **extra):
    """``pipe`` called as the docs say for the student exported to ``folder`` (no CFG, K = its
    number of levels, the levels bound to ``set_timesteps`` for K > 1, a seeded global RNG;
    ``extra``: more inputs, e.g. the image); returns (latents, the scheduler's re-noising
    draws)."""
    steps = json.loads((folder / "student_steps.json").read_text())
    if len(steps["noise_levels"]) > 1:
        pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps,
                                                         sigmas=steps["scheduler_sigmas"])
    draws = []
    randn = euler_module.randn_tensor
    monkeypatch.setattr(euler_module, "randn_tensor", lambda *a, **k: draws.append(randn(*a, **k)) or draws[-1])
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(7)
    with torch.no_grad():
        latents = pipe(prompt_embeds=prompt, latents=noise.clone(), height=size, width=size, num_frames=FRAMES,
                       num_inference_steps=len(steps["noise_levels"]), guidance_scale=1.0,
                       output_type="latent", **extra).frames
    return latents, draws


def project_sample(student, folder: Path, noise, prompt, draws):
    levels = json.loads((folder / "student_steps.json").read_text())["noise_levels"]
    with torch.no_grad():
        return few_step_sample(velocity_fn(student, Conditioning(prompt)), noise.clone(), levels,
                               renoise=draws[:len(levels) - 1])


def load(folder: Path) -> WanPipeline:
    return WanPipeline.from_pretrained(str(folder), local_files_only=True, text_encoder=None, tokenizer=None)


def teacher_with_lora(teacher: Path, out: Path, components: dict[str, str]) -> WanPipeline:
    """The teacher's pipeline with the LoRA files ``components`` (file in ``out/lora`` ->
    pipeline component) loaded as the docs say, and the student's scheduler ``out/scheduler``."""
    pipe = load(teacher)
    for name, component in components.items():
        pipe.load_lora_weights(str(out / "lora" / name), load_into_transformer_2=component == "transformer_2")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    return pipe


def test_lora_two_expert_student_has_adapters_on_both_experts_targets(teachers):
    """``student_lora_rank`` on a two-expert student: every target Linear of BOTH experts
    (the teacher's Linear layers whose paths end in ``lora_targets``) gets an adapter; the
    base is frozen, the adapters train."""
    module = DMD2Module(str(teachers["t2v-a14b"]), student_lora_rank=2)
    student, teacher = module.student, module.teacher
    adapted = {name.rpartition(".lora_A.")[0] for name in lora_parameters(student) if ".lora_A." in name}
    for expert in ("high_noise", "low_noise"):
        targets = {name for name, m in teacher.named_modules() if name.startswith(expert + ".")
                   and isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in student.lora_targets)}
        assert len(targets) == 2 * 10  # 2 blocks x (4 self-attention, 4 cross-attention, 2 feed-forward)
        assert {a for a in adapted if a.startswith(expert + ".")} == targets
    assert all(not p.requires_grad for n, p in student.named_parameters() if ".lora_" not in n)
    assert all(p.requires_grad for p in lora_parameters(student).values())


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.75, 0.5, 0.25]])
def test_two_expert_lora_student_exports_full_folder_and_high_low_pair(teachers, tmp_path, monkeypatch, sigmas):
    """(a) the full exported folder through ``WanPipeline`` and (b) the TEACHER pipeline with
    the HIGH/LOW pair and the student's scheduler both equal the project's K-step sample of the
    adapted student. Four steps: levels 1, 0.9, 0.75, 0.5 after the teacher's shift 3, the
    first two on the high-noise expert (timestep >= 875), the last two on the low-noise one."""
    teacher = teachers["t2v-a14b"]
    student = lora_student(teacher, tmp_path / "last.ckpt", sigmas)
    out = export_student(tmp_path / "last.ckpt", tmp_path / "student")
    levels = json.loads((out / "student_steps.json").read_text())["noise_levels"]
    assert levels == pytest.approx([1.0, 0.9, 0.75, 0.5][:len(sigmas)])
    pair = out / "lora"
    index = json.loads((pair / "lora.json").read_text())
    assert index["components"] == {"high_noise_lora.safetensors": "transformer",
                                   "low_noise_lora.safetensors": "transformer_2"}
    assert index["teacher"] == str(teacher) and (index["rank"], index["alpha"]) == (2, 4.0)
    for name in index["components"]:  # diffusers' own layout: read as it is, every key a LoRA factor
        keys = WanPipeline.lora_state_dict(str(pair / name)).keys()
        assert len(keys) == 2 * 2 * 10 and all(k.startswith("transformer.blocks.") for k in keys)
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    noise, prompt = inputs()

    full, draws = pipeline_run(load(out), out, noise, prompt, SIZE["t2v-a14b"], monkeypatch)
    ours = project_sample(student, out, noise, prompt, draws)
    assert (full - ours).abs().max() < TOLERANCE

    with_pair, draws = pipeline_run(teacher_with_lora(teacher, out, index["components"]), out, noise, prompt,
                                    SIZE["t2v-a14b"], monkeypatch)
    ours = project_sample(student, out, noise, prompt, draws)
    assert (with_pair - ours).abs().max() < TOLERANCE
    plain, _ = pipeline_run(teacher_with_lora(teacher, out, {}), out, noise, prompt, SIZE["t2v-a14b"], monkeypatch)
    assert (plain - ours).abs().max() > 1e-2  # the adapters matter
    if len(sigmas) > 1:  # the low-noise file matters: the high one alone gives another sample
        high_only = teacher_with_lora(teacher, out, {"high_noise_lora.safetensors": "transformer"})
        alone, _ = pipeline_run(high_only, out, noise, prompt, SIZE["t2v-a14b"], monkeypatch)
        assert (alone - ours).abs().max() > 1e-2


def test_one_network_lora_student_exports_one_lora_file(teachers, tmp_path, monkeypatch):
    """A one-network Wan student (the TI2V-5B layout): one ``lora.safetensors`` that the
    teacher's ``WanPipeline`` loads; two re-noising steps equal the project's."""
    teacher = teachers["ti2v-5b"]
    student = lora_student(teacher, tmp_path / "last.ckpt", [1.0, 0.5])
    out = export_student(tmp_path / "last.ckpt", tmp_path / "student")
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["lora.json", "lora.safetensors"]
    pipe = teacher_with_lora(teacher, out, {"lora.safetensors": "transformer"})
    noise, prompt = inputs()
    with_lora, draws = pipeline_run(pipe, out, noise, prompt, SIZE["ti2v-5b"], monkeypatch)
    assert (with_lora - project_sample(student, out, noise, prompt, draws)).abs().max() < TOLERANCE


def test_student_based_on_init_from_gets_no_lora_files(teachers, tmp_path, capsys):
    """A LoRA student whose base is a KD checkpoint's weights (``init_from``) exports its full
    folder only; the ``lora/`` an earlier export left in the same folder goes."""
    teacher = teachers["t2v-a14b"]
    lora_student(teacher, tmp_path / "teacher_based.ckpt", [1.0])
    checkpoint = torch.load(tmp_path / "teacher_based.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["init_from"] = str(tmp_path / "kd.ckpt")
    torch.save(checkpoint, tmp_path / "kd_based.ckpt")
    out = export_student(tmp_path / "teacher_based.ckpt", tmp_path / "student")
    assert (out / "lora" / "lora.json").is_file()
    export_student(tmp_path / "kd_based.ckpt", out)
    assert not (out / "lora").exists() and (out / "transformer_2").is_dir()
    assert f"no LoRA files written: the student's base is {tmp_path / 'kd.ckpt'} (init_from)" in capsys.readouterr().out


def test_vace_lora_student_exports_a_lora_file_for_the_teacher_pipeline(vace_folder, tmp_path):
    """A Wan VACE LoRA student (adapters in the main and the VACE blocks): the teacher's
    ``WanVACEPipeline`` with ``lora.safetensors`` and the student's scheduler, called as the
    full VACE export is, equals the project's two-step sample."""
    from diffusers import WanVACEPipeline

    from tests.families.test_wan_vace import FRAMES as VACE_FRAMES, HEIGHT, SCALE, WIDTH, edge_video

    teacher, _ = vace_folder
    student = lora_student(teacher, tmp_path / "last.ckpt", [1.0, 0.5], {"conditioning_scale": SCALE})
    out = export_student(tmp_path / "last.ckpt", tmp_path / "student")
    keys = load_file(out / "lora" / "lora.safetensors").keys()
    assert {k.split(".")[1] for k in keys} == {"blocks", "vace_blocks"}  # adapters in the main and the VACE blocks
    pipe = WanVACEPipeline.from_pretrained(str(teacher), text_encoder=None, tokenizer=None)
    pipe.load_lora_weights(str(out / "lora" / "lora.safetensors"))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    steps = json.loads((out / "student_steps.json").read_text())
    pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=steps["scheduler_sigmas"])
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    noise, prompt = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 7, 32, generator=g)
    frames, video = edge_video()
    torch.manual_seed(7)  # the re-noising draws of the pipeline's scheduler and of few_step_sample
    with torch.no_grad():
        theirs = pipe(video=frames, prompt_embeds=prompt, num_inference_steps=2, guidance_scale=1.0,
                      conditioning_scale=SCALE, height=HEIGHT, width=WIDTH, num_frames=VACE_FRAMES,
                      latents=noise.clone(), output_type="latent").frames
        cond = Conditioning(prompt, None, student.encode_control(video, WanVAE(str(out))))
        torch.manual_seed(7)
        ours = few_step_sample(velocity_fn(student, cond), noise.clone(), steps["noise_levels"])
    assert (ours - theirs).abs().max() < TOLERANCE


def test_image_to_video_pair_on_the_teacher_pipeline(teachers, tmp_path, monkeypatch):
    """The I2V-A14B layout: the teacher's ``WanImageToVideoPipeline`` with the HIGH/LOW pair
    and the student's scheduler, given the conditioning image, equals the project's two-step
    sample (levels 1 on the high-noise expert, 0.75 on the low-noise one: boundary 0.9)."""
    from diffusers import WanImageToVideoPipeline

    from tests.families.test_wan22 import first_frame_video, image

    teacher = teachers["i2v-a14b"]
    student = lora_student(teacher, tmp_path / "last.ckpt", [1.0, 0.5])
    out = export_student(tmp_path / "last.ckpt", tmp_path / "student")
    pipe = WanImageToVideoPipeline.from_pretrained(str(teacher), local_files_only=True, text_encoder=None,
                                                   tokenizer=None)
    pipe.load_lora_weights(str(out / "lora" / "high_noise_lora.safetensors"))
    pipe.load_lora_weights(str(out / "lora" / "low_noise_lora.safetensors"), load_into_transformer_2=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    picture, pixels = image(SIZE["i2v-a14b"])
    noise, prompt = inputs()
    theirs, draws = pipeline_run(pipe, out, noise, prompt, SIZE["i2v-a14b"], monkeypatch, image=picture)
    with torch.no_grad():
        control = student.encode_control(first_frame_video(pixels), WanVAE(str(teacher)))
        cond = Conditioning(prompt, control=control)
        levels = json.loads((out / "student_steps.json").read_text())["noise_levels"]
        assert levels == [1.0, 0.75]
        ours = student.finish_sample(few_step_sample(velocity_fn(student, cond), noise.clone(), levels,
                                                     renoise=draws[:1]), cond)
    assert (theirs - ours).abs().max() < TOLERANCE
