"""Files of an evaluation run: ``report.md`` (table), ``report.json``, ``contact_sheet.png``
(rows = the control, labelled with its modality, each method, the real clip; columns =
first, middle, last frame; one block per held-out window, all from the same noise) and
``samples/*.mp4``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch
from torch import Tensor

from distill_pl.eval.features import MOTION
from distill_pl.eval.features import NAME as FEATURE_NETWORK
from distill_pl.eval.methods import Method
from distill_pl.util.media import frame_grid, label_rows, upscale, write_mp4, write_png, write_text

LABEL_WIDTH = 180


def machine() -> dict:
    """Where the numbers were measured."""
    return dict(
        date=datetime.date.today().isoformat(),
        platform=platform.platform(),
        processor=platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        device="cpu",
    )


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fd(row: dict, name: str) -> str:
    """A Fréchet distance column ``name`` of ``row`` as "value ± spread", "-" where absent."""
    if row.get(name) is None:
        return "-"
    spread = row.get(f"{name}_std")
    return f"{row[name]:.1f}" + ("" if spread is None else f" ± {spread:.1f}")


def distance_columns(report: dict) -> list[tuple[str, str]]:
    """(report key, column title) of the Fréchet distance columns: to the real clips, to each
    teacher reference (the reference, then the extra one where set) and of the motion."""
    s = report.get("settings", {})
    columns = [("frechet_distance", "Fréchet to real clips")]
    for name, title in (("teacher", "Fréchet to teacher"), ("extra_teacher", "Fréchet to extra teacher")):
        guidance = s.get("guidance") if name == "teacher" else s.get("extra_reference_guidance")
        if name in report.get("references", {"teacher": None}):
            columns.append((f"frechet_to_{name}", title + ("" if guidance is None else f" w={guidance:g}")))
    columns.append(("motion_frechet_distance", "motion Fréchet to real clips"))
    return columns


def markdown_table(report: dict) -> str:
    """The report's table: one row per method, then the real-clip floor."""
    columns = distance_columns(report)
    fidelity = report["settings"]["control_fidelity"]
    lines = [
        "| method | NFE / video | s / video | speed-up | NFE ratio (ceiling) | speed-up / ceiling "
        f"| PSNR vs ref (dB) | SSIM vs ref | {fidelity['title']} | "
        + " | ".join(title for _, title in columns) + " | diversity |",
        "|---|" + "---:|" * (9 + len(columns)),
    ]
    for row in report["methods"]:
        lines.append(
            f"| {row['name']} | {row['nfe']} | {row['seconds_per_video']:.4f} | {row['speedup']:.1f}x "
            f"| {row['nfe_ratio']:.3g}x | {100 * row['speedup_fraction_of_ceiling']:.0f}% "
            f"| {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'], 3)} | {_fmt(row[fidelity['key']], fidelity['digits'])} "
            f"| {' | '.join(_fd(row, key) for key, _ in columns)} | {row['diversity']:.3f} |"
        )
    floor = report["real_floor"]
    lines.append(f"| {floor['name']} (floor) | - | - | - | - | - | - | - | - "
                 f"| {' | '.join(_fd(floor, key) for key, _ in columns)} | - |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    fidelity = s["control_fidelity"]
    ref = report["methods"][0]["name"]
    warnings = "".join(f"- **warning**: {w}\n" for w in report.get("warnings", []))
    extra_ref = report.get("references", {}).get("extra_teacher")
    extra = "" if extra_ref is None else (
        f"\n  Fréchet to extra teacher: to the videos of {extra_ref['name']} (`extra_reference_guidance`,"
        " e.g. the guidance the DMD2 stage trains with); its own row is 0 by construction.")
    given = s.get("given_frames", 0)
    given_line = "" if not given else (
        f"- Given frames: the first {given} frame(s) of every video are given to the model (the conditioning "
        f"image); PSNR, SSIM, the Fréchet distances (of the real clips too) and the diversity are computed on\n"
        f"  the frames after them, the generated ones; {fidelity['title']} measures the given frames apart.\n")
    return f"""# Evaluation report

{markdown_table(report)}

{warnings}
{given_line}- Held-out data: {s['held_out_windows']} windows of the held-out (last) part of each video x
  {s['samples_per_clip']} noise seeds = {s['held_out_windows'] * s['samples_per_clip']} videos per
  method (frames x height x width {s['frames']}); every method starts from the same noise.
- Reference ("ref"): {ref}. PSNR/SSIM: each video against the reference video from the
  same noise (mean over videos).
- NFE: network calls per video (a CFG step counts 2). Seconds per video: median of the
  timed generation batches of {s['batch_size']} videos after a warm-up batch, sampling +
  decoding; the methods' batches are generated in turn (batch 0 of each, then batch 1, ...),
  so load on the machine affects them alike. Speed-up: reference seconds / method seconds;
  its ceiling is the NFE ratio. Warnings: a speed-up above its ceiling, batch times more than
  {100 * s['timing_spread_limit']:.0f}% from their median, methods timed in different runs.
- {fidelity['title']} (control: {fidelity['control']}): {fidelity['definition']}.
- Fréchet distance: between Gaussians fitted to {FEATURE_NETWORK} of every frame of the
  method's videos and of the real held-out clips. Floor: the same distance for real clips
  from the training part of the same videos (same count as a method's videos). "±": the
  standard deviation over {s['bootstrap_resamples']} bootstrap draws of the method's videos
  (real side fixed). Not FID or FVD: other network, frame-level, few samples (biased
  upwards; compare rows, not papers).
- Fréchet to teacher: the same distance, with the reference's videos ({ref}) in place of
  the real clips: how close a method's samples are to the teacher's distribution (what DMD
  matches), not to the data. The reference row is 0 by construction; its "±" is the spread
  of its own resampled videos, the level below which differences to it are noise.{extra}
- Motion Fréchet: the same distance to the real held-out clips on frame differences,
  {MOTION}: how things change from frame to frame, which single-frame features do not
  see. A frozen video's differences are all mid grey. Floor: real training-part clips.
- Diversity: mean pairwise RMS pixel distance (on [-1, 1]) between the
  {s['samples_per_clip']} samples of one window, averaged over windows.
- Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']}
  threads, {m['date']}.
"""


def _sheet_windows(paths: list[str], count: int) -> list[int]:
    """The first window of each video, then further windows in order, ``count`` in all."""
    firsts = [i for i, p in enumerate(paths) if p not in paths[:i]]
    rest = [i for i in range(len(paths)) if i not in firsts]
    return (firsts + rest)[:count]


def contact_sheet(rows: dict[str, list[Tensor]], scale: int, pad: int = 2) -> Tensor:
    """Labelled uint8 image: one row per entry of ``rows`` (label -> one video per block),
    blocks side by side, each block the first / middle / last frame of its videos."""
    labels = list(rows)
    blocks = [upscale(frame_grid([rows[label][b] for label in labels], pad=pad), scale)
              for b in range(len(rows[labels[0]]))]
    gap = torch.full((3, blocks[0].shape[1], 3 * pad * scale), 255, dtype=torch.uint8)
    sheet = torch.cat([part for block in blocks for part in (block, gap)][:-1], dim=2)
    return label_rows(sheet, labels, row_height=(blocks[0].shape[1] + pad * scale) / len(labels), width=LABEL_WIDTH)


def write_report(
    out_dir: Path,
    report: dict,
    methods: list[Method],
    videos: dict[str, Tensor],
    clips: dict,
    sheet_clips: int,
    fps: int,
    scale: int,
) -> dict[str, Path]:
    """Write every report file into ``out_dir``; returns their paths by kind."""
    report["machine"] = machine()
    chosen = _sheet_windows(clips["path"], sheet_clips)
    modality = report["settings"]["control_fidelity"]["control"]
    rows = {f"control: {modality}": [clips["control"][k] for k in chosen]}
    rows.update({m.name: [videos[m.key][k] for k in chosen] for m in methods})  # seed 0 of window k
    rows["real clip (held out)"] = [clips["video"][k] for k in chosen]
    files = {
        "json": write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n"),
        "markdown": write_text(out_dir / "report.md", markdown_report(report)),
        "contact_sheet": write_png(out_dir / "contact_sheet.png", contact_sheet(rows, scale)),
    }
    keys = ["control"] + [m.key for m in methods] + ["real"]
    for key, label in zip(keys, rows):
        for k, video in zip(chosen, rows[label]):
            write_mp4(out_dir / "samples" / f"{key}_window{k}.mp4", video, fps=fps, scale=scale)
    files["samples"] = out_dir / "samples"
    print(markdown_table(report))
    for warning in report.get("warnings", []):
        print(f"warning: {warning}")
    print(f"report: {files['markdown'].resolve()}")
    return files
