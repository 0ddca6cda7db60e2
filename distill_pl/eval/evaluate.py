"""``distill-pl evaluate``: what distillation bought, on held-out real clips with fixed seeds.

For every held-out window of the clips split (its control, caption and real clip) and
``samples_per_clip`` noise seeds, each method generates a video from the same noise: the
teacher with ``teacher_steps`` steps and CFG (the reference), the teacher with each of
``few_steps`` steps (same CFG), and each student with the steps its export records
(``student_steps.json``: one network call per step). Reported per method (see
:mod:`distill_pl.eval.metrics` and :mod:`distill_pl.eval.report`): network calls and
measured seconds per video, speed-up over the reference and its NFE ceiling, PSNR/SSIM
against the reference from the same noise, canny-edge F1 against the control, a Fréchet
distance of frame features to the real held-out clips (with real clips from the training
part of the same videos as the floor) and the diversity across seeds.

    distill-pl evaluate --config configs/tiny/eval.yaml

Generated videos are kept in ``out/videos/`` so a rerun after an interruption only
generates what is missing, and metrics in ``out/metrics.json`` with the settings they depend
on, so an unchanged rerun recomputes none; the report files are rewritten each run. The
methods' batches are generated and timed in turn (:mod:`distill_pl.eval.timing`), and the
report warns when a speed-up exceeds its NFE ceiling or the timings vary too much.
"""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import default_collate

from distill_pl.data.control import canny_control
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.pairs import teacher_fingerprint
from distill_pl.eval import metrics
from distill_pl.eval.features import NAME as FEATURE_NETWORK
from distill_pl.eval.features import FrameFeatureNet, video_frame_features
from distill_pl.eval.generated import load_videos, save_videos
from distill_pl.eval.methods import Method, student_method, teacher_method
from distill_pl.eval.metric_cache import MetricCache
from distill_pl.eval.timing import generate_interleaved, timing_warnings
from distill_pl.eval.report import write_report
from distill_pl.cli.function_parser import run_with_data
from distill_pl.cli.settings import check_evaluation_settings
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import load_denoiser
from distill_pl.models.guidance import negative_conditioning
from distill_pl.export.model_folders import load_scheduler, student_noise_levels_of, student_sampler_of
from distill_pl.util.progress import ProgressLines


def held_out_clips(data: VideoDataModule) -> dict:
    """Every window of the validation split as one batch (video, control, text, caption...)."""
    data.setup("validate")
    batches = list(data.val_dataloader())
    if not batches:
        raise ValueError("the validation split has no clips to evaluate on")
    clips = {}
    for key, value in batches[0].items():
        parts = [b[key] for b in batches]
        clips[key] = torch.cat(parts) if isinstance(value, Tensor) else [x for p in parts for x in p]
    return clips


def real_training_clips(data: VideoDataModule, count: int) -> Tensor:
    """``count`` real clips from the training part of the same videos (fixed windows)."""
    dataset = data.clip_dataset("train", samples_per_epoch=count)
    return default_collate([dataset[i] for i in range(count)])["video"]


def _example_noise(shape: torch.Size, seed: int, index: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def seconds_per_video(batch_seconds: list[float], batch_size: int, num_examples: int) -> float:
    """Median seconds of the full batches after the first (a warm-up), per video."""
    full = batch_seconds[: num_examples // batch_size] or batch_seconds
    warm = full[1:] or full
    return statistics.median(warm) / batch_size


def evaluate(
    teacher: str,
    students: dict[str, str],
    out: str,
    data: VideoDataModule,
    vae_path: str | None = None,
    teacher_steps: int = 36,
    guidance: float = 8.0,
    few_steps: list[int] = [1, 2, 4],
    samples_per_clip: int = 3,
    batch_size: int = 8,
    seed: int = 0,
    edge_tolerance: int = 1,
    bootstrap_resamples: int = 10,
    sheet_clips: int = 4,
    fps: int = 8,
    scale: int = 4,
    timing_spread_limit: float = 0.5,
    denoiser_options: dict | None = None,
) -> dict:
    """Run the evaluation and write the report into ``out``; returns the report dict.

    Args:
        teacher: teacher folder (``transformer/`` + ``scheduler/``).
        students: report name -> exported student folder, e.g. ``{"KD": ..., "DMD2": ...}``.
        out: run folder for the report, the contact sheet, mp4 samples and cached videos.
        data: clips-mode data settings of the teacher (held-out split, control, captions).
        vae_path: the teacher's VAE folder, None for a pixel-space teacher.
        teacher_steps, guidance: the reference sampler (CFG in the form u + w (c - u)).
        few_steps: the teacher's few-step samplers to compare (same guidance).
        samples_per_clip: noise seeds per held-out window (>= 2, for diversity).
        batch_size: videos per generation call (timed; the same for every method).
        seed: noise of example i (seed s of window k is i = s * windows + k):
            ``torch.Generator().manual_seed(seed * 1000003 + i)``.
        edge_tolerance: pixel tolerance of the edge F1.
        bootstrap_resamples: draws of the videos for the spread of the Fréchet distance.
        sheet_clips: windows shown in the contact sheet and written as mp4 (one per video first).
        timing_spread_limit: the report warns when a method's timed batches deviate from their
            median by more than this fraction.
        denoiser_options: the adapter's own options for the teacher and every student, as the
            stages took them (e.g. a ControlNet's ``control_scale``).
    """
    if samples_per_clip < 2:
        raise ValueError("samples_per_clip must be >= 2 (diversity compares samples of one clip)")
    if data.hparams.mode != "clips":
        raise ValueError("evaluation needs the data in clips mode (real held-out clips)")
    out_dir = Path(out)
    clips = held_out_clips(data)
    windows = clips["video"].shape[0]
    num_examples = windows * samples_per_clip
    autoencoder = build_autoencoder(vae_path)
    options = denoiser_options or {}
    teacher_net = load_denoiser(teacher, **options).eval()
    scheduler = load_scheduler(teacher)

    index = torch.arange(num_examples) % windows  # example i shows window i % windows
    control = teacher_net.encode_control(clips["control"].float(), autoencoder)
    cond = Conditioning(clips["text_embeds"].float(), clips["text_mask"], control).select(index)
    uncond = negative_conditioning(cond, *data.negative_prompt_embedding())
    latent_shape = autoencoder.encode(clips["video"][:1].float()).shape[1:]
    noise = torch.stack([_example_noise(latent_shape, seed, i) for i in range(num_examples)])

    methods = [teacher_method(teacher_net, scheduler, teacher_steps, guidance)]
    methods += [teacher_method(teacher_net, scheduler, k, guidance) for k in few_steps if k != teacher_steps]
    fingerprints = {methods[0].key: teacher_fingerprint(teacher)}
    for name, folder in students.items():
        levels, sampler = student_noise_levels_of(folder), student_sampler_of(folder)
        methods.append(student_method(name, load_denoiser(folder, **options).eval(), levels, seed, sampler))
        fingerprints[methods[-1].key] = (f"{teacher_fingerprint(folder)} noise levels {list(levels)}"
                                         + ("" if sampler == "renoise" else f" sampler {sampler}"))
    settings = dict(
        data={k: v for k, v in data.hparams.items() if k not in ("batch_size", "val_batch_size", "num_workers")},
        seed=seed, samples_per_clip=samples_per_clip, batch_size=batch_size, vae_path=vae_path,
        teacher=fingerprints[methods[0].key],
    )

    videos: dict[str, Tensor] = {}
    batch_seconds: dict[str, list[float]] = {}
    timing_runs: dict[str, str] = {}
    video_settings = {m.key: dict(settings, method=m.name, model=fingerprints.get(m.key, settings["teacher"]))
                      for m in methods}
    pending = []
    for method in methods:
        cached = load_videos(out_dir / "videos" / f"{method.key}.safetensors", video_settings[method.key])
        if cached is None:
            pending.append(method)
        else:
            videos[method.key], batch_seconds[method.key], timing_runs[method.key] = cached
    timing_run = datetime.datetime.now().isoformat(timespec="seconds")
    for key, (made, seconds) in generate_interleaved(pending, noise, cond, uncond, batch_size, autoencoder).items():
        path = out_dir / "videos" / f"{key}.safetensors"
        save_videos(path, made, video_settings[key], seconds, timing_run)
        videos[key], batch_seconds[key], timing_runs[key] = load_videos(path, video_settings[key])  # the stored float16
    timing = {m.key: seconds_per_video(batch_seconds[m.key], batch_size, num_examples) for m in methods}
    for method in methods:
        print(f"{method.name}: {timing[method.key]:.4f} s/video ({method.nfe} network calls)")

    metric_settings = dict(edge_tolerance=edge_tolerance, canny=[data.hparams.canny_low, data.hparams.canny_high],
                           bootstrap_resamples=bootstrap_resamples, features=FEATURE_NETWORK)
    results = score_methods(
        methods, videos, timing, clips, lambda: real_training_clips(data, num_examples),
        samples_per_clip, edge_tolerance, data.hparams.canny_low, data.hparams.canny_high,
        bootstrap_resamples, MetricCache(out_dir / "metrics.json"),
        {m.key: dict(metric_settings, videos=video_settings[m.key], reference=video_settings[methods[0].key])
         for m in methods},
        dict(metric_settings, real=settings["data"], count=num_examples),
    )
    results["warnings"] = timing_warnings(results["methods"], batch_seconds, timing_runs, timing_spread_limit)
    report = dict(
        settings=dict(
            teacher=teacher, students=students, teacher_steps=teacher_steps, guidance=guidance,
            few_steps=few_steps, samples_per_clip=samples_per_clip, held_out_windows=windows,
            batch_size=batch_size, seed=seed, edge_tolerance_px=edge_tolerance,
            bootstrap_resamples=bootstrap_resamples, timing_spread_limit=timing_spread_limit,
            canny_thresholds=[data.hparams.canny_low, data.hparams.canny_high],
            frames=list(clips["video"].shape[2:]),
        ),
        **results,
    )
    write_report(out_dir, report, methods, videos, clips, sheet_clips, fps, scale)
    return report


def score_methods(
    methods: list[Method],
    videos: dict[str, Tensor],
    timing: dict[str, float],
    clips: dict,
    real_train: Callable[[], Tensor],
    samples_per_clip: int,
    edge_tolerance: int,
    canny_low: float,
    canny_high: float,
    bootstrap_resamples: int,
    cache: MetricCache,
    method_settings: dict[str, dict],
    floor_settings: dict,
) -> dict:
    """The metrics of every method (the first is the reference) and of the real floor.

    Quality metrics come from ``cache`` when it holds them for the same settings
    (``method_settings[key]``: what the method's videos, the reference's videos and the metrics
    depend on; ``floor_settings`` for the floor), else they are computed and stored. The
    feature network and the real clips (``real_train()``) are only loaded when needed.
    """
    windows = clips["video"].shape[0]
    reference = videos[methods[0].key]
    lazy: dict = {}

    def real_stats():
        if not lazy:
            lazy["features"] = FrameFeatureNet()
            lazy["real"] = metrics.gaussian_statistics(video_frame_features(lazy["features"], clips["video"]))
        return lazy["features"], lazy["real"]

    def distance(v: Tensor) -> dict[str, float]:
        """The Fréchet distance of videos ``v`` to the real clips, and its bootstrap spread."""
        features, real = real_stats()
        per_video = video_frame_features(features, v).reshape(v.shape[0], v.shape[2], -1)
        return dict(frechet_distance=metrics.frechet_distance_to(per_video.flatten(0, 1), real),
                    frechet_distance_std=metrics.bootstrap_frechet_std(per_video, real, bootstrap_resamples))

    def quality(method: Method) -> dict:
        v = videos[method.key]
        paired = method is not methods[0]
        control_edges = metrics.edges_from_control(clips["control"]).repeat(samples_per_clip, 1, 1, 1)
        per_clip = v.reshape(samples_per_clip, windows, *v.shape[1:]).transpose(0, 1)
        generated_edges = metrics.edges_from_control(canny_control(v, canny_low, canny_high))
        return dict(
            psnr=float(metrics.psnr_per_video(v, reference).mean()) if paired else None,
            ssim=float(metrics.ssim_per_video(v, reference).mean()) if paired else None,
            edge_f1=float(metrics.edge_f1(generated_edges, control_edges, edge_tolerance).mean()),
            **distance(v),
            diversity=statistics.mean(metrics.mean_pairwise_rms(samples) for samples in per_clip),
        )

    progress = ProgressLines("evaluate: metrics", len(methods) + 1, "rows", force=True)
    rows = []
    for method in methods:
        values = cache.get(method.key, method_settings[method.key])
        if values is None:
            values = quality(method)
            cache.put(method.key, method_settings[method.key], values)
            progress.advance(1, f"computed {method.name}")
        else:
            progress.advance(1, f"{method.name} from {cache.path.name}")
        rows.append(dict(
            key=method.key,
            name=method.name,
            nfe=method.nfe,
            seconds_per_video=timing[method.key],
            speedup=timing[methods[0].key] / timing[method.key],
            nfe_ratio=methods[0].nfe / method.nfe,
            **values,
        ))
        rows[-1]["speedup_fraction_of_ceiling"] = rows[-1]["speedup"] / rows[-1]["nfe_ratio"]
    floor = cache.get("real_floor", floor_settings)
    if floor is None:
        real = real_train()
        floor = dict(name="real clips, training part of the same videos", **distance(real), num_videos=int(real.shape[0]))
        cache.put("real_floor", floor_settings, floor)
    progress.advance(1, "real-clip floor")
    return dict(methods=rows, real_floor=floor)


def main(argv: list[str] | None = None) -> None:
    run_with_data(evaluate, "distill-pl evaluate", __doc__, argv, check=check_evaluation_settings)
