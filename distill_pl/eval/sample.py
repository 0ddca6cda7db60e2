"""``distill-pl sample``: samples of a teacher or an exported student folder on validation clips.

A teacher folder is sampled with ``steps`` steps of its scheduler and CFG ``guidance`` (a
two-expert teacher, Wan 2.2 A14B: ``guidance_2`` at the levels of its low-noise expert, the
pipelines' ``guidance_scale_2``; unset: ``guidance`` there too; a teacher of one network
refuses it in one line); a student folder (one with ``student_steps.json``) with its own
noise levels, no CFG (Euler re-noising, the re-noising noise seeded like the noise), loaded
with the adapter options its ``student.json`` records (e.g. Cosmos' ``control_scale``).

Writes, for each video: ``sample_<i>.mp4``, ``control_<i>.mp4``, ``ground_truth_<i>.mp4``,
``side_by_side_<i>.mp4`` (control | sample | ground truth, left to right) and ``grid_<i>.png``
(rows: control / sample / ground truth; columns: first, middle, last frame), plus
``grid.png`` stacking all grids.

    distill-pl sample --teacher teachers/tiny --out runs/tiny/teacher_samples
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill_pl.data.datamodule import VideoDataModule
from distill_pl.diffusion.sampling import sample_with_scheduler, student_sample
from distill_pl.cli.function_parser import run_with_data
from distill_pl.cli.settings import check_step_count, warn_guidance
from distill_pl.util.media import frame_grid, side_by_side, upscale, write_mp4, write_png
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.families.registry import load_denoiser
from distill_pl.models.guidance import check_guidance_2, negative_conditioning, velocity_fn
from distill_pl.export.model_folders import (
    STUDENT_STEPS_FILE,
    load_scheduler,
    student_adapter_options_of,
    student_noise_levels_of,
    student_sampler_of,
)
from distill_pl.util.paths import resolve_path
from distill_pl.training.batch import encode_clip_batch


def sample_teacher(
    teacher: str,
    out: str,
    data: VideoDataModule,
    vae_path: str | None = None,
    num_videos: int = 4,
    steps: int = 36,
    guidance: float = 5.0,
    seed: int = 0,
    fps: int = 8,
    scale: int = 4,
    guidance_2: float | None = None,
) -> list[Path]:
    """Sample ``num_videos`` validation clips' controls and captions with the teacher (or the
    student) folder ``teacher`` (see the module docstring for ``guidance`` and ``guidance_2``)."""
    check_step_count("--steps", steps)  # before any model loads
    is_student = (resolve_path(teacher) / STUDENT_STEPS_FILE).is_file()
    if not is_student:
        warn_guidance("--guidance", guidance)
        warn_guidance("--guidance_2", guidance_2)
    denoiser = load_denoiser(teacher, **student_adapter_options_of(teacher)).eval()
    if not is_student:
        check_guidance_2(denoiser, guidance_2, "--guidance_2")
    scheduler = load_scheduler(teacher)
    levels = student_noise_levels_of(teacher) if is_student else None
    if is_student:
        print(f"{teacher}: a {len(levels)}-step student, sampled at its noise levels without CFG")
    autoencoder = build_autoencoder(vae_path)
    data.setup("validate")
    batches = iter(data.val_dataloader())
    out_dir = Path(out)
    written: list[Path] = []
    grids = []
    index = 0
    null_embeds, null_mask = data.negative_prompt_embedding()
    while index < num_videos:
        try:
            batch = next(batches)
        except StopIteration:
            break
        x0, cond = encode_clip_batch(batch, autoencoder, denoiser)
        g = torch.Generator().manual_seed(seed + index)
        noise = torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            if is_student:
                x0 = student_sample(velocity_fn(denoiser, cond), noise, levels, student_sampler_of(teacher), g)
            else:
                fn = velocity_fn(denoiser, cond, negative_conditioning(cond, null_embeds, null_mask), guidance,
                                 guidance_2)
                x0 = denoiser.finish_sample(sample_with_scheduler(fn, noise, scheduler, steps, progress=True,
                                                                  step_sigma=denoiser.sampler_sigma), cond)
            video = autoencoder.decode(x0)
        for b in range(video.shape[0]):
            if index >= num_videos:
                break
            rows = {"control": batch["control"][b], "sample": video[b], "ground_truth": batch["video"][b]}
            for name, v in rows.items():
                written.append(write_mp4(out_dir / f"{name}_{index}.mp4", v, fps=fps, scale=scale))
            written.append(write_mp4(out_dir / f"side_by_side_{index}.mp4", side_by_side(list(rows.values())),
                                     fps=fps, scale=scale))
            grid = upscale(frame_grid(list(rows.values())), scale)
            grids.append(grid)
            written.append(write_png(out_dir / f"grid_{index}.png", grid))
            print(f"[{index}] {batch['caption'][b]!r} ({batch['path'][b]}, frame {int(batch['start'][b])})")
            index += 1
    if not grids:
        raise ValueError("the validation split produced no clips to sample")
    written.append(write_png(out_dir / "grid.png", torch.cat(grids, dim=1)))
    print(f"wrote {len(written)} files to {out_dir.resolve()}")
    return written


def main(argv: list[str] | None = None) -> None:
    run_with_data(sample_teacher, "distill-pl sample", __doc__, argv,
                  check=lambda flags: check_step_count("--steps", flags["steps"]))
