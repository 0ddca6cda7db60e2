"""``distill-pl estimate-memory``: GPU memory per device of a KD or DMD2 training step.

    distill-pl estimate-memory --config configs/wan2.1-t2v-14b/kd.yaml --devices 8 --sharding fsdp

Nothing is allocated and no weight is read. The stage's method builds its networks (its
roles: :class:`~distill_pl.methods.kd.KDRoles`, :class:`~distill_pl.methods.dmd2.DMD2Roles`,
which also say which phase trains which) on the meta device from the config's settings and
the teacher folder's ``transformer/config.json`` (or, when the folder is not on disk, the
published config of the Wan or Cosmos-Transfer2.5 model it is named after), and the step's
forward passes run on meta tensors of the configured shapes. Per device, in GiB (2^30 bytes):

- parameters of each network in its training dtype: the trainable student (DMD2: also fake
  score and discriminator) in float32, the frozen teacher in ``teacher_dtype``, the EMA copy,
  the VAE; a LoRA fake score or student (``fake_score_lora_rank``, ``student_lora_rank``) is
  its frozen base in ``teacher_dtype`` plus float32 adapters, and only the adapters count as
  trainable below;
- AdamW state: two moments per trainable parameter, in its dtype (float32), plus a float32
  master copy of trainable parameters that are not float32;
- DDP gradient buckets (more than one device, no sharding): DDP all-reduces through flat
  buffers as large as all trainable gradients (``gradient_as_bucket_view=False``, the default);
- the micro-batch on the device (video and control pixels, or in ``data.mode: latents`` their
  precomputed latents and no pixels; KD latents; text): the loaded batch stays in host memory
  and the training step moves one micro-batch at a time;
- per phase (KD: one; DMD2: critic and generator): the gradients of the phase's trainable
  parameters; its activations; under bf16-mixed without sharding, autocast's bf16 copies of
  the float32 weights that backward needs (Lightning's autocast does not cache casts, so a
  copy lives as long as the op that saved it: with gradient checkpointing only outside the
  checkpointed blocks); and the AdamW step's temporary: torch's default (foreach) AdamW on a
  GPU allocates one copy of the trainable parameters (``sqrt`` of the second moments).

Activations are computed, not modelled: the phase's forward, the method's own
(``phase_losses`` of its roles; KD: the student's one-step sample and loss; DMD2: the critic
and generator losses of :class:`~distill_pl.methods.dmd2.DMD2Objective`, built as the stage
builds it, with one student step) runs on meta tensors inside ``saved_tensors_hooks`` and
the bytes of the saved tensors are summed, once per storage (:func:`saved_tensor_bytes`).
Two things make the meta pass match a GPU: SDPA on meta would fall back to the math kernel
and save the attention matrix, so :class:`FusedAttention` runs it as the flash-attention op;
and under bf16-mixed the pass runs bfloat16 copies of the float32 networks (the method's
roles built again with ``compute_dtype``: as the bf16 teacher is, diffusers' float32-kept
modules included): autocast computes Wan's matmuls in bf16 and Wan upcasts its norms and
modulation itself, so the saved tensors get autocast's dtypes, and the weights they save
stand for autocast's copies. Both are checked against real CPU forwards in the tests.

A phase's peak is parameters + AdamW state + buckets + batch + gradients + max(activations +
weight copies, AdamW temporary). Every stage's training loop
(:class:`~distill_pl.training.base.StageModule`) frees its gradients after each step and
writes them while backward frees the activations, so the sum over-counts what coexists; on
the tiny models backward's own temporaries made up for that (measured peaks within 0.5% (KD)
and 1-2% (DMD2) of the estimate).

``sharding="fsdp"`` (FSDP2, every transformer block sharded, a bf16 ``MixedPrecisionPolicy``
instead of autocast) divides parameters, AdamW state, gradients and the AdamW temporary of
every network but the VAE by the device count; activations are per device either way.

With the stage's ``context_parallel`` (``{ulysses: N, ring: M}``; FSDP2 only: it shards every
network over all processes, the data-parallel and context-parallel ranks alike, so the
division above is by all devices) each denoiser pass runs as one rank of a group of N x M
processes (:func:`~distill_pl.scale.sequence_split.simulated_sequence_split`: the tokens after
the patch embedding split N x M ways, the gathered outputs and block features at full size),
plus what the exchanges of one attention call hold while it runs
(:func:`~distill_pl.scale.sequence_split.exchange_buffer_bytes`, sized by the largest query of
the pass). Each device holds its group's micro-batch; ``devices / (N x M)`` groups are
data-parallel.

Not counted, and left to the margin: the CUDA context and NCCL buffers, allocator
fragmentation, FSDP's unsharded blocks in flight, the VAE's encoding of real clips (DMD2 critic, no grad,
before the forward) and the decoding for validation and grids, buffers (RoPE tables, < 1 MB).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from jsonargparse import ActionYesNo, ArgumentParser
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from distill_pl.cli.main import DistillCLI
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.memory import data_memory_line
from distill_pl.models.autoencoder import autoencoder_config, empty_autoencoder, latent_grid
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.context_parallel import ContextParallel, check_context_parallel
from distill_pl.models.denoiser import Denoiser
from distill_pl.families.registry import denoiser_config, published_configs, published_vae_configs
from distill_pl.methods.dmd2 import DMD2Roles
from distill_pl.methods.kd import KDRoles
from distill_pl.methods.roles import Roles, config_denoisers
from distill_pl.scale.sequence_split import exchange_buffer_bytes, simulated_sequence_split
from distill_pl.util.paths import resolve_path

GIB = 2**30

#: the configs of the published diffusers folders, written once in their family packages
#: (``configs.PUBLISHED``), used when the teacher folder is not on disk: folder name ->
#: (transformer class name, ``from_config``'s config)
PUBLISHED_TRANSFORMER_CONFIGS = published_configs()
#: folder name -> the VAE config of a published model whose VAE is not the Wan 2.1 one
PUBLISHED_VAE_CONFIGS = published_vae_configs()
#: stage class name -> the roles of its method (the networks, their dtypes, which phase trains which)
STAGE_ROLES: dict[str, type[Roles]] = {"KDModule": KDRoles, "DMD2Module": DMD2Roles}
#: Lightning precision -> the dtype the networks compute in
COMPUTE_DTYPES = {"32-true": "float32", "32": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16"}


class FusedAttention(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` as the flash-attention op, so that autograd saves
    what a GPU's fused kernel saves: q, k, v, the output and the log-sum-exp.

    On meta tensors SDPA has no fused kernel to choose from and falls back to the math
    implementation, which saves the [B, heads, N, N] attention matrices (over 1 TiB in one
    Wan2.1-1.3B forward at 81x480x832). Wan calls SDPA without mask or dropout.
    """

    def __init__(self) -> None:
        super().__init__()
        #: (elements, bytes per element) of the largest query seen: what a context-parallel
        #: exchange buffer is sized by (:func:`~distill_pl.scale.sequence_split.exchange_buffer_bytes`)
        self.largest_query = (0, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = kwargs.get("query", args[0] if args else None)
            self.largest_query = max(self.largest_query, (query.numel(), query.element_size()))
            return _flash_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or dropout_p or enable_gqa:
        raise NotImplementedError("FusedAttention covers SDPA without mask, dropout or GQA")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, scale=scale)[0]


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters, ``sum(numel * element_size)``."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def saved_tensor_bytes(
    fn: Callable[[], object], state: Iterable[Tensor] = (), copied: Iterable[Tensor] = ()
) -> tuple[int, int]:
    """Run ``fn()`` and sum the bytes of the tensors autograd saves for backward.

    Each storage counts once (views, and tensors saved by several ops, share it); all are held
    until ``fn`` returns, so a freed storage's address is never counted twice. Returns
    (activations: saved storages not in ``state``, weight copies: saved storages of
    ``copied``, parameters that stand for the bf16 copies autocast makes of float32 weights).
    Works on meta tensors (no memory) and on real ones.
    """
    state_keys = {t.untyped_storage()._cdata for t in state}
    copied_keys = {t.untyped_storage()._cdata for t in copied}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        saved[storage._cdata] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    activations = sum(s.nbytes() for k, s in saved.items() if k not in state_keys)
    return activations, sum(s.nbytes() for k, s in saved.items() if k in copied_keys)


@dataclass
class Phase:
    """Memory of one kind of training step on top of the static part, bytes per device."""

    gradients: int
    activations: int
    weight_copies: int
    #: context parallel: what the exchanges of one attention call hold while it runs
    exchange_buffers: int = 0

    @property
    def adamw_temporary(self) -> int:
        """foreach AdamW's ``sqrt`` of the second moments: the size of the gradients."""
        return self.gradients

    @property
    def extra(self) -> int:
        return self.gradients + max(self.activations + self.weight_copies + self.exchange_buffers,
                                    self.adamw_temporary)


@dataclass
class MemoryEstimate:
    """Bytes per device: ``static`` rows (every phase) and one :class:`Phase` per phase."""

    header: list[str]
    static: dict[str, int]
    phases: dict[str, Phase]
    gpu_gb: float
    margin: float

    def peak(self, phase: str) -> int:
        return sum(self.static.values()) + self.phases[phase].extra

    @property
    def total(self) -> int:
        return max(self.peak(name) for name in self.phases)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gb * (1 - self.margin) * GIB

    def table(self) -> str:
        """The header, a markdown table (rows x phases, GiB or MiB per GPU) and the verdict."""
        names = list(self.phases)
        rows = [(k, [v] * len(names)) for k, v in self.static.items()]
        for label, attr in (("gradients", "gradients"), ("activations (saved for backward)", "activations"),
                            ("autocast bf16 weight copies", "weight_copies"),
                            ("context-parallel exchange buffers (one attention call)", "exchange_buffers"),
                            ("AdamW step temporary (after backward)", "adamw_temporary")):
            values = [getattr(self.phases[n], attr) for n in names]
            if any(values):
                rows.append((label, values))
        rows.append(("**peak**", [self.peak(n) for n in names]))
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        lines = [*self.header, "", f"| {unit} per GPU | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
        lines += [f"| {label} | {' | '.join(f'{v / scale:.2f}' for v in values)} |" for label, values in rows]
        usable = self.gpu_gb * (1 - self.margin)
        lines += ["", f"peak {self.total / GIB:.2f} GiB per GPU: {'fits' if self.fits else 'does NOT fit'} in "
                      f"{self.gpu_gb:g} GiB with a {self.margin:.0%} margin ({usable:.1f} GiB usable)"]
        return "\n".join(lines)


def estimate_memory(
    config: str,
    gpu_gb: float = 80.0,
    devices: int | None = None,
    micro_batch: int | None = None,
    gradient_checkpointing: bool | None = None,
    sharding: Literal["none", "fsdp"] = "none",
    margin: float = 0.1,
) -> MemoryEstimate:
    """Memory per GPU of one training step of a KD or DMD2 ``config``.

    Args:
        config: a ``distill-pl fit`` config (KDModule or DMD2Module).
        gpu_gb: GPU memory in GiB (an "80 GB" H100 shows 79.6 GiB).
        devices: processes (GPUs) in all (None: ``trainer.num_nodes x trainer.devices``;
            "auto" devices count as 1); with the stage's ``context_parallel`` of ``P`` processes
            per group, ``devices / P`` of them are data-parallel.
        micro_batch: samples per forward on each device (None: ``data.batch_size`` divided by
            ``accumulate_micro_batches``); the ranks of a context-parallel group all load the
            same samples.
        gradient_checkpointing: None: the config's setting.
        sharding: ``"fsdp"`` shards parameters, gradients and optimizer state over ``devices``.
        margin: fraction of ``gpu_gb`` kept free for what is not counted (see the module docstring).
    """
    cfg = _parse(config)
    stage = cfg.model.class_path.rsplit(".", 1)[-1]
    if stage not in STAGE_ROLES:
        raise ValueError(f"estimate-memory handles {' and '.join(STAGE_ROLES)} configs, {config} trains {stage}")
    args, data, precision = dict(cfg.model.init_args), cfg.data, str(cfg.trainer.precision)
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision {precision!r}: estimate-memory knows {', '.join(COMPUTE_DTYPES)}")
    if devices is None:
        devices = cfg.trainer.num_nodes * (cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
    if micro_batch is None:
        micro_batch = math.ceil(data.batch_size / args.get("accumulate_micro_batches", 1))
    if gradient_checkpointing is None:
        gradient_checkpointing = args["gradient_checkpointing"]
    cp = ContextParallel.from_setting(args.get("context_parallel"))
    if cp is not None and devices % cp.size:
        raise ValueError(f"{config}: context_parallel ulysses={cp.ulysses} x ring={cp.ring} needs a multiple of "
                         f"{cp.size} devices, got {devices}")
    if cp is not None and sharding != "fsdp":
        raise ValueError(f"{config}: context_parallel runs under FSDP2 only: pass --sharding fsdp (got {sharding})")
    class_name, transformer, source = _transformer_config(args["teacher"])
    vae = _vae_config(args["vae_path"]) if args["vae_path"] else None
    method = STAGE_ROLES[stage]
    settings = {**args, "gradient_checkpointing": gradient_checkpointing}
    make = config_denoisers(class_name, transformer, args.get("denoiser_options"), on_meta=True)
    with torch.device("meta"):  # the method's networks in their training dtypes
        roles = method.from_settings(settings, make)
    built, dtypes = roles.networks(), dict(roles.dtypes)
    if vae is not None:
        dtypes["vae"] = args.get("vae_dtype", "float32")
        built["vae"] = empty_autoencoder(vae, dtypes["vae"])
    static, trainable = _state_bytes(built, dtypes, roles.trained, devices, sharding)
    student = built["student"]
    if cp is not None:
        check_context_parallel(student, cp)  # a plan, and ulysses divides the heads
    latent = (student.latent_channels, *_latent_sizes(data, vae))
    text = (data.max_text_length, student.text_dim)
    # the loaded batch stays in host memory; the training step moves one micro-batch at a time
    batch_row = f"micro-batch of {micro_batch} (pixels, latents, text)"
    static[batch_row] = _batch_bytes(method, micro_batch, data, latent, text)

    # the forwards run in the compute dtype; float32 weights saved there stand for autocast's copies
    compute = COMPUTE_DTYPES[precision]
    with torch.device("meta"):
        compute_roles = method.from_settings(settings, make, compute_dtype=compute)
    passes = compute_roles.networks()
    state = [t for module in passes.values() for t in (*module.parameters(), *module.buffers())]
    copied = [p for name, module in passes.items() for p in module.parameters()
              if sharding == "none" and dtypes[name] != compute]
    learnable = {id(p) for module in passes.values() for p in module.parameters() if p.requires_grad}
    phases = {}
    denoisers = [module for module in passes.values() if isinstance(module, Denoiser)]
    with simulated_sequence_split(denoisers, cp) if cp is not None else contextlib.nullcontext():
        for phase, forward in _phase_losses(compute_roles, settings, micro_batch, latent, text).items():
            names = compute_roles.phases[phase]
            for name, module in passes.items():
                for p in module.parameters():  # the phase's networks; a LoRA fake score's base stays frozen
                    p.requires_grad_(name in names and id(p) in learnable)
            with FusedAttention() as attention:
                activations, weight_copies = saved_tensor_bytes(forward, state, copied)
            exchange = exchange_buffer_bytes(cp, *attention.largest_query) if cp is not None else 0
            phases[phase] = Phase(sum(trainable[n] for n in names), activations, weight_copies, exchange)

    p_t, p_h, p_w = student.patch_size
    tokens = latent[1] // p_t * (latent[2] // p_h) * (latent[3] // p_w)
    num_params = sum(p.numel() for p in built["teacher"].parameters())  # the architecture's, no adapters
    header = [
        f"{config}: {stage}; transformer: {source}, {num_params:,} parameters",
        f"{data.num_frames} frames {data.height}x{data.width} -> latents {'x'.join(map(str, latent))}, "
        f"{tokens:,} tokens per video; micro-batch {micro_batch}; {precision}; gradient checkpointing "
        f"{'on' if gradient_checkpointing else 'off'}; {devices} device(s), sharding {sharding}",
    ]
    if cp is not None:
        header.append(f"context parallel: ulysses {cp.ulysses} x ring {cp.ring} = {cp.size} processes per pass "
                      f"({tokens // cp.size:,} tokens each); {devices // cp.size} data-parallel group(s) of "
                      f"micro-batch {micro_batch}; parameters, gradients and AdamW state sharded over all {devices}")
    if data.mode == "clips":  # KD reads pair shards, DMD2 decodes clips
        header.append(data_memory_line(data))
    return MemoryEstimate(header, static, phases, gpu_gb, margin)


def _state_bytes(built: dict[str, nn.Module], dtypes: dict[str, str], trained: tuple[str, ...], devices: int,
                 sharding: str):
    """(rows of parameters, AdamW state and DDP buckets; bytes of each trained network), per
    device. Every network but the VAE is sharded under FSDP."""
    shard = devices if sharding == "fsdp" else 1
    rows, trainable = {}, {}
    for name, module in built.items():
        divide = 1 if name == "vae" else shard
        is_trained = name in trained
        params = [p for p in module.parameters() if p.requires_grad] if is_trained else []
        size = parameter_bytes(module) // divide
        if is_trained and len(params) < len(list(module.parameters())):  # LoRA: frozen base + adapters
            adapters = sum(p.numel() * p.element_size() for p in params) // divide
            rows[f"{name}: {dtypes[name]} frozen base"] = size - adapters
            rows[f"{name}: LoRA adapters, trainable"] = size = adapters
        else:
            rows[f"{name}: {dtypes[name]}{', trainable' if is_trained else ''}"] = size
        if is_trained:
            trainable[name] = size
            master = 4 * sum(p.numel() for p in params if p.dtype != torch.float32) // divide
            rows[f"{name}: AdamW moments{' + float32 master' if master else ''}"] = 2 * size + master
    if devices > 1 and sharding == "none":
        rows["DDP gradient buckets"] = sum(trainable.values())
    return rows, trainable


def _parse(config: str):
    """The config as ``distill-pl fit`` parses it (defaults filled in), nothing instantiated."""

    class Parsed(DistillCLI):
        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():  # LightningCLI warns when sys.argv holds our own arguments
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return Parsed(model_class=None, datamodule_class=VideoDataModule, subclass_mode_model=True, run=False,
                      args=["--config", config, "--seed_everything=false"]).config


def _folder_config(path: str, subfolder: str) -> dict | None:
    """``config.json`` of ``path/subfolder`` or of ``path`` itself (weights are not read)."""
    root = resolve_path(path)
    for file in (root / subfolder / "config.json", root / "config.json"):
        if file.is_file():
            return {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}
    return None


def _transformer_config(teacher: str) -> tuple[str, dict, str]:
    """(class name, config, where they came from) of the teacher's denoiser."""
    if _folder_config(teacher, "transformer") is not None:
        return (*denoiser_config(teacher), f"{teacher} (its config.json)")
    name = resolve_path(teacher).name
    if name in PUBLISHED_TRANSFORMER_CONFIGS:
        class_name, config = PUBLISHED_TRANSFORMER_CONFIGS[name]
        return class_name, config, f"published {name} config ({teacher} is not on disk)"
    raise FileNotFoundError(
        f"{teacher}: no transformer/config.json there, and not one of the published configs "
        f"({', '.join(PUBLISHED_TRANSFORMER_CONFIGS)}); only the config file is needed, not the weights"
    )


def _vae_config(path: str) -> dict:
    """The VAE config of ``path``: its own when on disk, else the published one of that folder
    name (``configs.PUBLISHED_VAES``), else diffusers' ``AutoencoderKLWan`` defaults."""
    name = resolve_path(path).name
    if _folder_config(path, "vae") is None and name in PUBLISHED_VAE_CONFIGS:
        return PUBLISHED_VAE_CONFIGS[name]
    return autoencoder_config(path)


def _latent_sizes(data, vae: dict | None) -> tuple[int, int, int]:
    temporal, spatial = (vae["scale_factor_temporal"], vae["scale_factor_spatial"]) if vae else (1, 1)
    return latent_grid(data.num_frames, data.height, data.width, temporal, spatial)


def _batch_bytes(method: type[Roles], b: int, data, latent: tuple[int, ...], text: tuple[int, int]) -> int:
    """float32 video + control pixels (clips and pairs mode) or their precomputed latents
    (``data.mode: latents``, no pixels), the method's latents of each sample (KD: noise +
    teacher output), text + mask."""
    precomputed = data.mode == "latents"
    pixels = 0 if precomputed else 2 * 3 * data.num_frames * data.height * data.width
    latents = (method.batch_latents + (2 if precomputed else 0)) * math.prod(latent)
    return b * (4 * (pixels + latents + math.prod(text)) + text[0])


def _phase_losses(roles: Roles, settings: dict, b: int, latent: tuple, text: tuple) -> dict[str, Callable[[], Tensor]]:
    """phase -> the method's forward of that phase on meta inputs, returning the loss:
    latents [b, *latent] (a new tensor each), sigma [b], text [b, *text] + mask and the
    student's control (``Denoiser.control_shape``: its channels on the latent grid, or e.g. an
    image's one latent frame)."""
    def meta(*shape, dtype=torch.float32) -> Tensor:
        return torch.zeros(*shape, dtype=dtype, device="meta")

    control = roles.student.control_shape((b, *latent))
    cond = Conditioning(meta(b, *text), meta(b, text[0], dtype=torch.bool),
                        None if control is None else meta(*control))
    return roles.phase_losses(settings, lambda: meta(b, *latent), meta(b), cond)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="distill-pl estimate-memory", description=__doc__)
    parser.add_function_arguments(estimate_memory, skip={"gradient_checkpointing"})
    parser.add_argument("--gradient_checkpointing", action=ActionYesNo, default=None,
                        help="--gradient_checkpointing / --no_gradient_checkpointing (default: the config's)")
    args = parser.parse_args(argv).as_dict()
    cfg = _parse(args["config"])
    if cfg.model.class_path.endswith("KDPairGenerationModule"):  # no training step: the data side only
        print(f"{args['config']}: KDPairGenerationModule\n{data_memory_line(cfg.data)}")
        return
    print(estimate_memory(**args).table())
