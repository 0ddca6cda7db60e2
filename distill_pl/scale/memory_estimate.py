"""``distill-pl estimate-memory``: GPU memory per device of a KD or DMD2 training step.

    distill-pl estimate-memory --config configs/wan2.1-t2v-14b/kd.yaml --devices 8 --sharding fsdp

Nothing is allocated and no weight is read. Every network of the stage is built on the meta
device from the teacher folder's ``transformer/config.json`` (or, when the folder is not on
disk, the published config of the Wan or Cosmos-Transfer2.5 model it is named after), and
the step's forward passes run on meta tensors of the configured shapes. Per device, in GiB (2^30 bytes):

- parameters of each network in its training dtype: the trainable student (DMD2: also fake
  score and discriminator) in float32, the frozen teacher in ``teacher_dtype``, the EMA copy,
  the VAE; a LoRA fake score (``fake_score_lora_rank``) is its frozen base in ``teacher_dtype``
  plus float32 adapters, and only the adapters count as trainable below;
- AdamW state: two moments per trainable parameter, in its dtype (float32), plus a float32
  master copy of trainable parameters that are not float32;
- DDP gradient buckets (more than one device, no sharding): DDP all-reduces through flat
  buffers as large as all trainable gradients (``gradient_as_bucket_view=False``, the default);
- the batch as the data module delivers it (video and control pixels, KD latents, text);
- per phase (KD: one; DMD2: critic and generator): the gradients of the phase's trainable
  parameters; its activations; under bf16-mixed without sharding, autocast's bf16 copies of
  the float32 weights that backward needs (Lightning's autocast does not cache casts, so a
  copy lives as long as the op that saved it: with gradient checkpointing only outside the
  checkpointed blocks); and the AdamW step's temporary: torch's default (foreach) AdamW on a
  GPU allocates one copy of the trainable parameters (``sqrt`` of the second moments).

Activations are computed, not modelled: the phase's forward (KD: the student's one-step
sample and loss; DMD2: ``DMD2Module.critic_loss`` / ``generator_loss`` themselves) runs on
meta tensors inside ``saved_tensors_hooks`` and the bytes of the saved tensors are summed,
once per storage (:func:`saved_tensor_bytes`). Two things make the meta pass match a GPU:
SDPA on meta would fall back to the math kernel and save the attention matrix, so
:class:`FusedAttention` runs it as the flash-attention op; and under bf16-mixed the pass
runs bfloat16 copies of the float32 networks (built as the bf16 teacher is, diffusers'
float32-kept modules included): autocast computes Wan's matmuls in bf16 and Wan upcasts its
norms and modulation itself, so the saved tensors get autocast's dtypes, and the weights
they save stand for autocast's copies. Both are checked against real CPU forwards in the tests.

A phase's peak is parameters + AdamW state + buckets + batch + gradients + max(activations +
weight copies, AdamW temporary). Every stage's training loop
(:class:`~distill_pl.training.base.StageModule`) frees its gradients after each step and
writes them while backward frees the activations, so the sum over-counts what coexists; on
the tiny models backward's own temporaries made up for that (measured peaks within 0.5% (KD)
and 1-2% (DMD2) of the estimate).

``sharding="fsdp"`` (FSDP2, every transformer block sharded, a bf16 ``MixedPrecisionPolicy``
instead of autocast) divides parameters, AdamW state, gradients and the AdamW temporary of
every network but the VAE by the device count; activations are per device either way. Not
counted, and left to the margin: the CUDA context and NCCL buffers, allocator fragmentation,
FSDP's unsharded blocks in flight, the VAE's encoding of real clips (DMD2 critic, no grad,
before the forward) and the decoding for validation and grids, buffers (RoPE tables, < 1 MB).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from jsonargparse import ActionYesNo, ArgumentParser
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from distill_pl.cli.main import DistillCLI
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.memory import data_memory_line
from distill_pl.models.autoencoder import latent_grid
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.discriminator import DiscriminatorHead
from distill_pl.models.denoiser import Denoiser
from distill_pl.families.registry import build_denoiser, denoiser_config, published_configs
from distill_pl.models.lora import add_lora
from distill_pl.methods.dmd2 import DMD2Objective
from distill_pl.methods.kd import KDObjective
from distill_pl.util.paths import resolve_path

GIB = 2**30

#: the configs of the published diffusers folders, written once in their family packages
#: (``configs.PUBLISHED``), used when the teacher folder is not on disk: folder name ->
#: (transformer class name, ``from_config``'s config)
PUBLISHED_TRANSFORMER_CONFIGS = published_configs()
#: Lightning precision -> the dtype the networks compute in
COMPUTE_DTYPES = {"32-true": "float32", "32": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16"}


class FusedAttention(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` as the flash-attention op, so that autograd saves
    what a GPU's fused kernel saves: q, k, v, the output and the log-sum-exp.

    On meta tensors SDPA has no fused kernel to choose from and falls back to the math
    implementation, which saves the [B, heads, N, N] attention matrices (over 1 TiB in one
    Wan2.1-1.3B forward at 81x480x832). Wan calls SDPA without mask or dropout.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
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
class Network:
    """A network of a stage: ``build(dtype)`` makes it on the meta device; ``dtype`` is its
    parameter dtype in training."""

    build: Callable[[str], nn.Module]
    dtype: str
    trainable: bool
    sharded: bool = True


@dataclass
class Phase:
    """Memory of one kind of training step on top of the static part, bytes per device."""

    gradients: int
    activations: int
    weight_copies: int

    @property
    def adamw_temporary(self) -> int:
        """foreach AdamW's ``sqrt`` of the second moments: the size of the gradients."""
        return self.gradients

    @property
    def extra(self) -> int:
        return self.gradients + max(self.activations + self.weight_copies, self.adamw_temporary)


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
        devices: data-parallel devices in all (None: ``trainer.num_nodes x trainer.devices``;
            "auto" devices count as 1).
        micro_batch: samples per forward (None: ``data.batch_size`` divided by
            ``accumulate_micro_batches``).
        gradient_checkpointing: None: the config's setting.
        sharding: ``"fsdp"`` shards parameters, gradients and optimizer state over ``devices``.
        margin: fraction of ``gpu_gb`` kept free for what is not counted (see the module docstring).
    """
    cfg = _parse(config)
    stage = cfg.model.class_path.rsplit(".", 1)[-1]
    if stage not in ("KDModule", "DMD2Module"):
        raise ValueError(f"estimate-memory handles KDModule and DMD2Module configs, {config} trains {stage}")
    args, data, precision = dict(cfg.model.init_args), cfg.data, str(cfg.trainer.precision)
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision {precision!r}: estimate-memory knows {', '.join(COMPUTE_DTYPES)}")
    if devices is None:
        devices = cfg.trainer.num_nodes * (cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
    if micro_batch is None:
        micro_batch = math.ceil(data.batch_size / args.get("accumulate_micro_batches", 1))
    if gradient_checkpointing is None:
        gradient_checkpointing = args["gradient_checkpointing"]
    class_name, transformer, source = _transformer_config(args["teacher"])
    vae = _vae_config(args["vae_path"]) if args["vae_path"] else None
    networks = _networks(stage, args, class_name, transformer, vae, gradient_checkpointing)
    built = {name: net.build(net.dtype) for name, net in networks.items()}
    static, trainable = _state_bytes(networks, built, devices, sharding)
    student = built["student"]
    latent = (student.latent_channels, *_latent_sizes(data, vae))
    text = (data.max_text_length, student.text_dim)
    loaded = max(micro_batch, data.batch_size)  # the loaded batch, split into micro-batches
    static[f"batch of {loaded} (pixels, latents, text)"] = _batch_bytes(stage, loaded, data, latent, text)

    # the forwards run in the compute dtype; float32 weights saved there stand for autocast's copies
    compute = COMPUTE_DTYPES[precision]
    passes = {name: net.build(compute if net.dtype == "float32" else net.dtype)
              for name, net in networks.items() if name in ("student", "teacher", "fake_score", "discriminator")}
    state = [t for module in passes.values() for t in (*module.parameters(), *module.buffers())]
    copied = [p for name, module in passes.items() for p in module.parameters()
              if sharding == "none" and networks[name].dtype != compute]
    learnable = {id(p) for module in passes.values() for p in module.parameters() if p.requires_grad}
    phases = {}
    for phase, (names, forward) in _phase_forwards(stage, args, passes, micro_batch, latent, text).items():
        for name, module in passes.items():
            for p in module.parameters():  # the phase's networks; a LoRA fake score's base stays frozen
                p.requires_grad_(name in names and id(p) in learnable)
        with FusedAttention():
            activations, weight_copies = saved_tensor_bytes(forward, state, copied)
        phases[phase] = Phase(sum(trainable[n] for n in names), activations, weight_copies)

    p_t, p_h, p_w = student.patch_size
    tokens = latent[1] // p_t * (latent[2] // p_h) * (latent[3] // p_w)
    num_params = sum(p.numel() for p in built["student"].parameters())
    header = [
        f"{config}: {stage}; transformer: {source}, {num_params:,} parameters",
        f"{data.num_frames} frames {data.height}x{data.width} -> latents {'x'.join(map(str, latent))}, "
        f"{tokens:,} tokens per video; micro-batch {micro_batch}; {precision}; gradient checkpointing "
        f"{'on' if gradient_checkpointing else 'off'}; {devices} device(s), sharding {sharding}",
    ]
    if data.mode == "clips":  # KD reads pair shards, DMD2 decodes clips
        header.append(data_memory_line(data))
    return MemoryEstimate(header, static, phases, gpu_gb, margin)


def _state_bytes(networks: dict[str, Network], built: dict[str, nn.Module], devices: int, sharding: str):
    """(rows of parameters, AdamW state and DDP buckets; bytes of each trainable network), per device."""
    shard = devices if sharding == "fsdp" else 1
    rows, trainable = {}, {}
    for name, net in networks.items():
        divide = shard if net.sharded else 1
        params = [p for p in built[name].parameters() if p.requires_grad] if net.trainable else []
        size = parameter_bytes(built[name]) // divide
        if net.trainable and len(params) < len(list(built[name].parameters())):  # LoRA: frozen base + adapters
            adapters = sum(p.numel() * p.element_size() for p in params) // divide
            rows[f"{name}: {net.dtype} frozen base"] = size - adapters
            rows[f"{name}: LoRA adapters, trainable"] = size = adapters
        else:
            rows[f"{name}: {net.dtype}{', trainable' if net.trainable else ''}"] = size
        if net.trainable:
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


def _vae_config(vae_path: str) -> dict:
    """The VAE folder's config, or diffusers' ``AutoencoderKLWan`` defaults (the Wan 2.1 VAE)."""
    config = _folder_config(vae_path, "vae")
    if config is None:
        with torch.device("meta"):
            config = {k: v for k, v in AutoencoderKLWan().config.items() if not k.startswith("_")}
    return config


def _latent_sizes(data, vae: dict | None) -> tuple[int, int, int]:
    temporal, spatial = (vae["scale_factor_temporal"], vae["scale_factor_spatial"]) if vae else (1, 1)
    return latent_grid(data.num_frames, data.height, data.width, temporal, spatial)


def _batch_bytes(stage: str, b: int, data, latent: tuple[int, ...], text: tuple[int, int]) -> int:
    """float32 video + control pixels (both data modes), KD's noise + teacher output, text + mask."""
    pixels = 2 * 3 * data.num_frames * data.height * data.width
    latents = 2 * math.prod(latent) if stage == "KDModule" else 0
    return b * (4 * (pixels + latents + math.prod(text)) + text[0])


def _networks(stage: str, args: dict, class_name: str, transformer: dict, vae: dict | None,
              checkpointing: bool) -> dict[str, Network]:
    """The stage's networks as its module builds them (student, teacher, ...; see stages/)."""
    def denoiser(gradient_checkpointing: bool) -> Callable[[str], nn.Module]:
        def build(dtype: str) -> Denoiser:
            return build_denoiser(class_name, transformer, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                                  on_meta=True, **(args.get("denoiser_options") or {}))
        return build

    def lora_denoiser(dtype: str) -> Denoiser:
        with torch.device("meta"):
            return add_lora(denoiser(checkpointing)(dtype), args["fake_score_lora_rank"],
                            args["fake_score_lora_alpha"], args["fake_score_lora_targets"])

    def head(dtype: str) -> DiscriminatorHead:
        feature_dim = denoiser(False)("float32").feature_dim
        with torch.device("meta"):
            return DiscriminatorHead(feature_dim, args["discriminator_hidden"]).to(getattr(torch, dtype))

    def autoencoder(dtype: str) -> nn.Module:
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(vae)
        return model if dtype == "float32" else model.to(getattr(torch, dtype))

    nets = {"student": Network(denoiser(checkpointing), "float32", True),
            "teacher": Network(denoiser(False), args["teacher_dtype"], False)}
    if stage == "DMD2Module":
        if args["fake_score_lora_rank"] is None:
            nets["fake_score"] = Network(denoiser(checkpointing), "float32", True)
        else:  # frozen base in the teacher's dtype, float32 adapters (as DMD2Module builds it)
            nets["fake_score"] = Network(lora_denoiser, args["teacher_dtype"], True)
        nets["discriminator"] = Network(head, "float32", True)
    if args["ema_decay"] is not None:
        nets["student_ema"] = Network(denoiser(False), "float32", False)
    if vae is not None:
        nets["vae"] = Network(autoencoder, args.get("vae_dtype", "float32"), False, sharded=False)
    return nets


def _phase_forwards(stage: str, args: dict, nets: dict[str, nn.Module], b: int, latent: tuple, text: tuple):
    """phase -> (its trainable networks, its forward on meta inputs, returning the loss)."""
    def meta(*shape, dtype=torch.float32) -> Tensor:
        return torch.zeros(*shape, dtype=dtype, device="meta")

    control = nets["student"].control_channels
    cond = Conditioning(meta(b, *text), meta(b, text[0], dtype=torch.bool),
                        meta(b, control, *latent[1:]) if control else None)
    sigma, noise, x = meta(b), meta(b, *latent), meta(b, *latent)
    if stage == "KDModule":
        objective = KDObjective(nets["student"])

        def kd_step() -> Tensor:
            return objective.loss(noise, x, cond)

        return {"KD step": (["student"], kd_step)}
    # DMD2's own phase losses: the objective over the meta networks
    feature_block = nets["teacher"].num_blocks // 2 if args["feature_block"] is None else args["feature_block"]
    objective = DMD2Objective(
        nets["student"], nets["teacher"], nets["fake_score"], nets["discriminator"], feature_block,
        guidance=args["guidance"], gan_weight=args["gan_weight"], critic_gan_weight=args["critic_gan_weight"],
        discriminator_on=args["discriminator_on"],
    )
    return {
        "critic": (["fake_score", "discriminator"],
                   lambda: objective.critic_loss(x, meta(b, *latent), sigma, noise, meta(b, *latent), cond)),
        "generator": (["student"],
                      lambda: objective.generator_loss(objective.generate(noise, cond), sigma, meta(b, *latent),
                                                       cond, cond)),
    }


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
