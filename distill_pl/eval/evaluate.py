"""``distill-pl evaluate``: what distillation bought, on held-out real clips with fixed seeds.

For every held-out window of the clips split (its control, caption and real clip) and
``samples_per_clip`` noise seeds, each method generates a video from the same noise: the
teacher with ``teacher_steps`` steps and CFG (the reference), the teacher with each of
``few_steps`` steps (same CFG), and each student with the steps its export records
(``student_steps.json``: one network call per step). Reported per method (see
:mod:`distill_pl.eval.metrics` and :mod:`distill_pl.eval.report`): network calls and
measured seconds per video, speed-up over the reference and its NFE ceiling, PSNR/SSIM
against the reference from the same noise, the fidelity to the control (per modality, see
:mod:`distill_pl.eval.control_fidelity`: canny-edge F1 for edge controls), a Fréchet
distance of frame features to the real held-out clips (with real clips from the training
part of the same videos as the floor), the same distance to the reference teacher's samples
(and, with ``extra_reference_guidance``, to a second teacher reference at that guidance, e.g.
the one DMD2 trains with), a Fréchet distance of the features of frame differences to the
real clips' (motion) and the diversity across seeds.

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

from distill_pl.data.controls import ControlSettings
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.pairs import teacher_fingerprint
from distill_pl.eval import metrics
from distill_pl.eval.control_fidelity import ControlFidelity
from distill_pl.eval.features import NAME as FEATURE_NETWORK
from distill_pl.eval.features import MOTION, FrameFeatureNet, video_frame_features, video_motion_features
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
    denoiser_options: dict[str, object] | None = None,
    extra_reference_guidance: float | None = None,
    guidance_2: float | None = None,
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
        edge_tolerance: pixel tolerance of the edge F1 (edge controls and control videos).
        bootstrap_resamples: draws of the videos for the spread of the Fréchet distance.
        sheet_clips: windows shown in the contact sheet and written as mp4 (one per video first).
        timing_spread_limit: the report warns when a method's timed batches deviate from their
            median by more than this fraction.
        denoiser_options: the adapter's own options for the teacher and every student, as the
            stages took them (e.g. a ControlNet's ``control_scale``).
        extra_reference_guidance: None, or a second CFG weight for the teacher's
            ``teacher_steps``-step sampler (e.g. the guidance DMD2 trains with): adds that
            row (key ``teacher_<steps>step_w<guidance>``, second in the report) and every
            method's Fréchet distance to its samples. Ignored when equal to ``guidance``.
            The other rows, their videos and their metrics are the same with or without it.
        guidance_2: a two-expert teacher's CFG weight at the levels of its low-noise expert
            (its pipeline's ``guidance_scale_2``) in every teacher row; None: ``guidance`` there
            too. A teacher of one network refuses it.

    Image-to-video (``data.control: clip``: the control is the clip, whose first frame the
    teacher and the students take as the conditioning image): the given frame is left out of
    every metric but the control fidelity, which is its agreement with the image (see
    :func:`score_methods`); ``report.json`` records the count as ``settings.given_frames``.
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
    controls = ControlSettings.from_metadata(data.hparams)
    if controls.given_frames and not teacher_net.control_channels:
        raise ValueError(f"data.control {controls.control!r} gives the clip's first frame as the image, but the "
                         f"teacher {teacher} takes no control (a text-to-video model; a TI2V folder takes the image "
                         "with denoiser_options image_to_video: true)")

    index = torch.arange(num_examples) % windows  # example i shows window i % windows
    control = teacher_net.encode_control(clips["control"].float(), autoencoder)
    cond = Conditioning(clips["text_embeds"].float(), clips["text_mask"], control).select(index)
    uncond = negative_conditioning(cond, *data.negative_prompt_embedding())
    latent_shape = autoencoder.encode(clips["video"][:1].float()).shape[1:]
    noise = torch.stack([_example_noise(latent_shape, seed, i) for i in range(num_examples)])

    methods = [teacher_method(teacher_net, scheduler, teacher_steps, guidance, guidance_2=guidance_2)]
    if extra_reference_guidance is not None and extra_reference_guidance == guidance:
        print(f"extra_reference_guidance {extra_reference_guidance:g} is the reference's guidance: no extra row")
        extra_reference_guidance = None
    if extra_reference_guidance is not None:
        methods.append(teacher_method(teacher_net, scheduler, teacher_steps, extra_reference_guidance,
                                      key_with_guidance=True, guidance_2=guidance_2))
    references = {"teacher": methods[0].key}
    if extra_reference_guidance is not None:
        references["extra_teacher"] = methods[1].key
    methods += [teacher_method(teacher_net, scheduler, k, guidance, guidance_2=guidance_2)
                for k in few_steps if k != teacher_steps]
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
                           bootstrap_resamples=bootstrap_resamples, features=FEATURE_NETWORK,
                           given_frames=controls.given_frames)
    fidelity = ControlFidelity(controls, edge_tolerance)
    results = score_methods(
        methods, videos, timing, clips, lambda: real_training_clips(data, num_examples),
        samples_per_clip, fidelity, bootstrap_resamples, MetricCache(out_dir / "metrics.json"),
        {m.key: dict(metric_settings, videos=video_settings[m.key], reference=video_settings[methods[0].key])
         for m in methods},
        dict(metric_settings, real=settings["data"], count=num_examples),
        references, {m.key: video_settings[m.key] for m in methods}, controls.given_frames,
    )
    results["warnings"] = timing_warnings(results["methods"], batch_seconds, timing_runs, timing_spread_limit)
    report = dict(
        settings=dict(
            teacher=teacher, students=students, teacher_steps=teacher_steps, guidance=guidance,
            few_steps=few_steps, samples_per_clip=samples_per_clip, held_out_windows=windows,
            batch_size=batch_size, seed=seed, edge_tolerance_px=edge_tolerance,
            bootstrap_resamples=bootstrap_resamples, timing_spread_limit=timing_spread_limit,
            extra_reference_guidance=extra_reference_guidance, guidance_2=guidance_2,
            given_frames=controls.given_frames,
            canny_thresholds=[data.hparams.canny_low, data.hparams.canny_high],
            control_fidelity=fidelity.describe(),
            frames=list(clips["video"].shape[2:]),
        ),
        references={name: dict(key=key, name=next(m.name for m in methods if m.key == key))
                    for name, key in references.items()},
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
    fidelity: ControlFidelity,
    bootstrap_resamples: int,
    cache: MetricCache,
    method_settings: dict[str, dict],
    floor_settings: dict,
    references: dict[str, str] | None = None,
    video_settings: dict[str, dict] | None = None,
    given_frames: int = 0,
) -> dict:
    """The metrics of every method (the first is the reference) and of the real floor; the
    control fidelity of each method's videos to ``clips["control"]`` by ``fidelity`` (its
    ``key`` names the row's value).

    Quality metrics come from ``cache`` when it holds them for the same settings
    (``method_settings[key]``: what the method's videos, the reference's videos and the metrics
    depend on; ``floor_settings`` for the floor), else they are computed and stored. The
    feature network and the real clips (``real_train()``) are only loaded when needed, and
    each video set's features are computed once per call.

    Beside them, each in its own cache entry (so a new reference computes only its column):

    - ``frechet_to_<name>`` and ``frechet_to_<name>_std`` for each of ``references`` (name ->
      key of the method whose samples are the reference; default ``{"teacher": methods[0].key}``):
      the Fréchet distance of the method's frame features to a Gaussian fitted to the
      reference's, held fixed, and its bootstrap spread over the method's videos. For the
      reference itself it is set to 0 by construction (the formula on identical
      features gives 0 up to float rounding) and its spread is that of its own resampled videos;
    - ``motion_frechet_distance`` and ``motion_frechet_distance_std``: the same distance to
      the real held-out clips on the features of frame differences
      (:func:`~distill_pl.eval.features.motion_frames`); None for single-frame videos. The floor
      gets it too.

    ``video_settings[key]``: what the videos of ``key`` were made with (default
    ``method_settings``).

    ``given_frames``: leading pixel frames of every video that the conditioning gives the model
    (the image of image-to-video; 0 for text-to-video). Every metric above (PSNR, SSIM,
    diversity, each Fréchet distance, on the methods' videos and on the real clips alike) is
    computed on the frames after them, the generated frames; the agreement of the given frames
    with what was given is the control fidelity of an image control, measured apart
    (:class:`~distill_pl.eval.control_fidelity.ControlFidelity`, on the whole videos).
    """
    references = references or {"teacher": methods[0].key}
    video_settings = video_settings or method_settings
    windows, _, frames = clips["video"].shape[:3]
    if not 0 <= given_frames < frames:
        raise ValueError(f"{given_frames} given frame(s) of {frames}-frame videos: the metrics need a generated frame")

    def generated(v: Tensor) -> Tensor:
        """The generated frames [B, 3, T - given_frames, H, W] of videos ``v`` [B, 3, T, H, W]."""
        return v[:, :, given_frames:]

    reference = generated(videos[methods[0].key])
    moving = frames - given_frames >= 2
    lazy: dict = {}
    memo: dict = {}

    def network() -> FrameFeatureNet:
        if "net" not in lazy:
            lazy["net"] = FrameFeatureNet()
        return lazy["net"]

    def per_video(v: Tensor, motion: bool = False) -> Tensor:
        """Features [videos, frames (or frame differences), D]."""
        f = (video_motion_features if motion else video_frame_features)(network(), v)
        return f.reshape(v.shape[0], -1, f.shape[-1])

    def features_of(key: str, motion: bool = False) -> Tensor:
        if (key, motion) not in memo:
            memo[key, motion] = per_video(generated(videos[key]), motion)
        return memo[key, motion]

    def real_stats(motion: bool = False) -> tuple[Tensor, Tensor]:
        """The Gaussian of the real held-out clips' frame (or frame-difference) features."""
        if ("real", motion) not in lazy:
            lazy["real", motion] = metrics.gaussian_statistics(per_video(generated(clips["video"]), motion).flatten(0, 1))
        return lazy["real", motion]

    def stats_of(key: str) -> tuple[Tensor, Tensor]:
        if ("stats", key) not in lazy:
            lazy["stats", key] = metrics.gaussian_statistics(features_of(key).flatten(0, 1))
        return lazy["stats", key]

    def real_training() -> Tensor:
        if "train" not in lazy:
            lazy["train"] = generated(real_train())
        return lazy["train"]

    def spread(per_video_features: Tensor, stats: tuple[Tensor, Tensor], name: str) -> dict[str, float]:
        """The Fréchet distance of the features to ``stats`` and its bootstrap spread."""
        return {name: metrics.frechet_distance_to(per_video_features.flatten(0, 1), stats),
                f"{name}_std": metrics.bootstrap_frechet_std(per_video_features, stats, bootstrap_resamples)}

    def motion_distance(per_video_features: Tensor | None) -> dict:
        if per_video_features is None:
            return dict(motion_frechet_distance=None, motion_frechet_distance_std=None)
        return spread(per_video_features, real_stats(motion=True), "motion_frechet_distance")

    def quality(method: Method) -> dict:
        whole = videos[method.key]
        v = generated(whole)
        paired = method is not methods[0]
        control = clips["control"].repeat(samples_per_clip, 1, 1, 1, 1)  # example i shows window i % windows
        per_clip = v.reshape(samples_per_clip, windows, *v.shape[1:]).transpose(0, 1)
        return dict(
            psnr=float(metrics.psnr_per_video(v, reference).mean()) if paired else None,
            ssim=float(metrics.ssim_per_video(v, reference).mean()) if paired else None,
            **{fidelity.key: float(fidelity.measure(whole, control).mean())},
            **spread(features_of(method.key), real_stats(), "frechet_distance"),
            diversity=statistics.mean(metrics.mean_pairwise_rms(samples) for samples in per_clip),
        )

    def to_reference(key: str, name: str, reference_key: str) -> dict:
        if key == reference_key:  # 0 by construction; the spread of its own resampled videos
            own = spread(features_of(key), stats_of(key), f"frechet_to_{name}")
            return {**own, f"frechet_to_{name}": 0.0}
        return spread(features_of(key), stats_of(reference_key), f"frechet_to_{name}")

    def cached(key: str, settings: dict, compute: Callable[[], dict]) -> dict:
        values = cache.get(key, settings)
        if values is None:
            values = compute()
            cache.put(key, settings, values)
        return values

    distribution_settings = dict(features=FEATURE_NETWORK, bootstrap_resamples=bootstrap_resamples,
                                 given_frames=given_frames)
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
        values = dict(values)
        for name, reference_key in references.items():
            values.update(cached(
                f"{method.key}:frechet_to_{name}",
                dict(distribution_settings, videos=video_settings[method.key], reference=video_settings[reference_key]),
                lambda: to_reference(method.key, name, reference_key)))
        values.update(cached(
            f"{method.key}:motion", dict(distribution_settings, videos=video_settings[method.key], motion=MOTION),
            lambda: motion_distance(features_of(method.key, motion=True) if moving else None)))
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
        real = real_training()
        floor = dict(name="real clips, training part of the same videos",
                     **spread(per_video(real), real_stats(), "frechet_distance"), num_videos=int(real.shape[0]))
        cache.put("real_floor", floor_settings, floor)
    floor_motion = dict(distribution_settings, motion=MOTION,  # not the edge settings
                        floor={k: v for k, v in floor_settings.items() if k not in ("edge_tolerance", "canny")})
    floor = dict(floor, **cached("real_floor:motion", floor_motion,
                                 lambda: motion_distance(per_video(real_training(), motion=True) if moving else None)))
    progress.advance(1, "real-clip floor")
    return dict(methods=rows, real_floor=floor)


def main(argv: list[str] | None = None) -> None:
    run_with_data(evaluate, "distill-pl evaluate", __doc__, argv, check=check_evaluation_settings)
