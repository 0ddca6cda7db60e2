"""DMD2Module: closed forms through the module, a toy run, counting, resume, checkpoints.

Real-backbone tests use a tiny Wan teacher folder built here (2 blocks, D = 16, text_dim 384
for the bundled MiniLM text encoder) and the clips-mode VideoDataModule at 4 frames of 16x16.
Closed-form tests replace the networks by exact Gaussian denoisers (tests/gaussian_flow.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distill_pl.data.datamodule import VideoDataModule
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.discriminator import DiscriminatorHead
from distill_pl.models.ema import EMA
from distill_pl.export.model_folders import save_teacher_folder
from distill_pl.families.registry import build_denoiser, load_denoiser
from distill_pl.training.dmd2 import DMD2Module, NonFiniteTrainingError
from tests.gaussian_flow import exact_velocity, marginal_var

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=6,
    out_channels=3, text_dim=384, freq_dim=16, ffn_dim=32, num_layers=2,
)
DATA = dict(
    num_frames=4, frame_stride=2, height=16, width=16, samples_per_epoch=16, batch_size=2,
    val_batch_size=2, max_text_length=8, negative_prompt="blurry",
)
FAST = dict(student_lr=1e-3, fake_score_lr=1e-3, discriminator_lr=1e-3, discriminator_hidden=8)


# --- fixtures -------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/training/conftest.py


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    save_teacher_folder(folder, build_denoiser("WanTransformer3DModel", TINY_WAN), "unipc", shift=2.0)
    return folder


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> VideoDataModule:
    """One datamodule for all runs: its in-memory frame cache is filled once (decoding the
    clips is most of a tiny run's time). Each fit gets fresh loaders and sets the epoch."""
    data = VideoDataModule(cache_dir=str(tmp_path_factory.mktemp("cache")), **DATA)
    data.prepare_data()
    data.setup("fit")
    return data


def trainer(max_steps: int, callbacks=(), root: Path | None = None, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=1, callbacks=list(callbacks),
        default_root_dir=str(root) if root else None,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StepRecorder(L.Callback):
    """Per step: phase, which networks changed, the step's loss; checks global_step += 1."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._step = trainer.global_step
        self._before = {n: tensors(getattr(module, n)) for n in ("student", "fake_score", "discriminator")}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        assert trainer.global_step == self._step + 1
        metrics = module.step_metrics
        phase = int(metrics["train/phase"])
        key = "train/generator_loss" if phase == module.hparams.student_update_freq - 1 else "train/critic_loss"
        changed = {n: not same(b, tensors(getattr(module, n))) for n, b in self._before.items()}
        self.rows.append(dict(step=self._step, phase=phase, loss=float(metrics[key]), changed=changed,
                              skipped=bool(metrics["train/update_skipped"])))


def adam_steps(optimizer) -> set[int]:
    return {int(state["step"]) for state in optimizer.state.values()}


# --- counting -----------------------------------------------------------------------------
def test_fifty_steps_count_forty_critic_and_ten_student_updates(teacher_dir, dm):
    module = DMD2Module(str(teacher_dir), ema_decay=0.9, **FAST)
    teacher_before = tensors(module.teacher)
    recorder = StepRecorder()
    t = trainer(50, [recorder])
    t.fit(module, datamodule=dm)

    assert t.global_step == 50
    critic, student = t.optimizers
    assert adam_steps(critic) == {40} and adam_steps(student) == {10}
    assert [r["phase"] for r in recorder.rows] == [s % 5 for s in range(50)]
    for row in recorder.rows:
        generator = row["phase"] == 4
        assert row["changed"]["student"] is generator, row
        assert row["changed"]["fake_score"] is not generator, row
        assert row["changed"]["discriminator"] is not generator, row
        assert math.isfinite(row["loss"]) and not row["skipped"]
    assert same(teacher_before, tensors(module.teacher))
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.fake_score.parameters())  # untoggled after each step
    metrics = t.callback_metrics
    for key in ("dmd_normaliser", "logits_real", "logits_fake", "discriminator_accuracy", "gan_loss",
                "grad_norm_student", "grad_norm_fake_score", "grad_norm_discriminator", "nonfinite_steps"):
        assert f"train/{key}" in metrics, key
    ema = module.student_ema.module.state_dict()
    assert not same(ema, tensors(module.student))  # averaged, not a copy


def test_checkpoint_has_no_teacher_and_loads_back(teacher_dir, dm, tmp_path):
    module = DMD2Module(str(teacher_dir), **FAST)
    t = trainer(2, root=tmp_path)
    t.fit(module, datamodule=dm)
    path = tmp_path / "dmd2.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("teacher.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"student", "fake_score", "discriminator"}
    assert ckpt["dmd2"] == {"nonfinite_total": 0, "nonfinite_streak": 0}
    loaded = DMD2Module.load_from_checkpoint(path)  # strict: only the teacher's keys are added back
    assert same(tensors(loaded.student), tensors(module.student))
    assert same(tensors(loaded.teacher), tensors(module.teacher))


# --- resume ------------------------------------------------------------------------------
class Killed(Exception):
    pass


class Kill(L.Callback):
    """Dies at the start of step ``at``, like a crashed or killed process (no final save)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise Killed


def test_kill_and_resume_matches_uninterrupted_run(teacher_dir, dm, tmp_path):
    """20 steps straight vs. killed at step 13 and resumed from the step-12 checkpoint (mid
    epoch 1 of 8-batch epochs, mid-cycle phase 2): same losses per step, same final weights,
    EMA and optimizer states."""
    full = StepRecorder()
    module_a = DMD2Module(str(teacher_dir), ema_decay=0.9, **FAST)
    t_a = trainer(20, [full])
    t_a.fit(module_a, datamodule=dm)

    ckpts = tmp_path / "ckpts"
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=6, save_top_k=-1)
    t_b = trainer(20, [saver, Kill(13)], enable_checkpointing=True, root=tmp_path)
    with pytest.raises(Killed):
        t_b.fit(DMD2Module(str(teacher_dir), ema_decay=0.9, **FAST), datamodule=dm)
    assert t_b.global_step == 13
    (ckpt,) = ckpts.glob("*step=12.ckpt")

    resumed = StepRecorder()
    module_c = DMD2Module(str(teacher_dir), ema_decay=0.9, **FAST)
    t_c = trainer(20, [resumed])
    t_c.fit(module_c, datamodule=dm, ckpt_path=ckpt)

    assert [r["step"] for r in resumed.rows] == list(range(12, 20))
    for row in resumed.rows:
        reference = full.rows[row["step"]]
        assert row["phase"] == reference["phase"]
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7), row["step"]
    for name in ("student", "fake_score", "discriminator", "student_ema"):
        a, c = tensors(getattr(module_a, name)), tensors(getattr(module_c, name))
        for key in a:
            torch.testing.assert_close(c[key], a[key], rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")
    for opt_a, opt_c in zip(t_a.optimizers, t_c.optimizers):
        assert adam_steps(opt_a) == adam_steps(opt_c)
        for p_a, p_c in zip(opt_a.state.values(), opt_c.state.values()):
            torch.testing.assert_close(p_c["exp_avg_sq"], p_a["exp_avg_sq"], rtol=1e-5, atol=1e-12)


# --- initialisation and wrong checkpoints ------------------------------------------------------
@pytest.fixture(scope="module")
def kd_checkpoint(teacher_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A KD-style Lightning checkpoint: student.* and student_ema.module.* weights that differ
    from the teacher's, KD hyperparameters, written by a Trainer."""

    class FakeKD(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"teacher": str(teacher_dir), "lr": 1e-5})
            torch.manual_seed(1)
            self.student = build_denoiser("WanTransformer3DModel", TINY_WAN)
            self.student_ema = EMA(self.student, 0.99)
            with torch.no_grad():
                for p in self.student_ema.module.parameters():
                    p.add_(0.5)

    kd = FakeKD()
    t = trainer(1)
    t.strategy.connect(kd)
    path = tmp_path_factory.mktemp("kd") / "last.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "distill_pl.training.kd.KDModule"  # as the CLI writes it
    torch.save(ckpt, path)
    return path, tensors(kd.student), tensors(kd.student_ema.module)


def test_student_initialised_from_kd_checkpoint(teacher_dir, kd_checkpoint):
    path, student, ema = kd_checkpoint
    from_ema = DMD2Module(str(teacher_dir), init_from=str(path))
    assert same(tensors(from_ema.student), ema)
    raw = DMD2Module(str(teacher_dir), init_from=str(path), init_from_ema=False)
    assert same(tensors(raw.student), student)
    assert same(tensors(raw.fake_score), tensors(raw.teacher))  # fake score starts as the teacher
    plain = DMD2Module(str(teacher_dir))
    assert same(tensors(plain.student), tensors(plain.teacher))


def test_kd_checkpoint_as_ckpt_path_fails_with_init_from_message(teacher_dir, dm, kd_checkpoint):
    path, _, _ = kd_checkpoint
    module = DMD2Module(str(teacher_dir), **FAST)
    with pytest.raises(ValueError, match=r"--model\.init_from") as error:
        trainer(2).fit(module, datamodule=dm, ckpt_path=path)
    assert "not a DMD2 checkpoint" in str(error.value) and "KDModule" in str(error.value)


# --- non-finite losses ------------------------------------------------------------------------
def poison_fake_score(module: DMD2Module, bad_steps) -> None:
    """Make the fake score return NaN velocities at the given global steps."""
    forward = module.fake_score.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if bad_steps(module.global_step):
            return (out[0] * math.nan, out[1]) if isinstance(out, tuple) else out * math.nan
        return out

    module.fake_score.forward = poisoned


def test_non_finite_steps_are_skipped_counted_and_keep_the_counters(teacher_dir, dm):
    module = DMD2Module(str(teacher_dir), **FAST)
    poison_fake_score(module, lambda step: step in (2, 4))  # a critic and a generator step
    recorder = StepRecorder()
    t = trainer(10, [recorder])
    with pytest.warns(UserWarning, match="non-finite"):
        t.fit(module, datamodule=dm)
    assert t.global_step == 10
    skipped = [r["step"] for r in recorder.rows if r["skipped"]]
    assert skipped == [2, 4]
    for row in recorder.rows:
        if row["skipped"]:
            assert not any(row["changed"].values()), row  # no weight moved, no weight decay
    critic, student = t.optimizers
    assert adam_steps(critic) == {7} and adam_steps(student) == {1}
    assert module.nonfinite_total == 2 and t.callback_metrics["train/nonfinite_steps"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_run_that_keeps_failing_stops_with_a_clear_message(teacher_dir, dm):
    module = DMD2Module(str(teacher_dir), max_nonfinite_steps=3, **FAST)
    poison_fake_score(module, lambda step: step >= 1)
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps had a non-finite"):
        trainer(10).fit(module, datamodule=dm)
    assert module.nonfinite_streak == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


# --- discriminator on the teacher, grid ---------------------------------------------------
def test_discriminator_on_teacher_trains_head_only_in_critic(teacher_dir, dm):
    module = DMD2Module(str(teacher_dir), discriminator_on="teacher", feature_block=0, **FAST)
    teacher_before = tensors(module.teacher)
    recorder = StepRecorder()
    t = trainer(5, [recorder])
    t.fit(module, datamodule=dm)
    assert [r["changed"]["discriminator"] for r in recorder.rows] == [True] * 4 + [False]
    assert recorder.rows[-1]["changed"]["student"]
    assert same(teacher_before, tensors(module.teacher))


def test_grid_rows(teacher_dir, dm):
    module = DMD2Module(str(teacher_dir))
    module.set_negative_prompt(*dm.negative_prompt_embedding())
    batch = next(iter(dm.val_dataloader()))
    rows = module.grid_rows(batch, seed=0)
    assert list(rows) == ["student 1-step", "teacher 1-step w=6", "control", "ground truth"]
    assert all(v.shape == (2, 3, 4, 16, 16) for v in rows.values())
    # the student starts as the teacher: without CFG its 1-step sample differs from the guided one
    assert not torch.allclose(rows["student 1-step"], rows["teacher 1-step w=6"])


def test_module_reads_the_teacher_shift(teacher_dir):
    assert DMD2Module(str(teacher_dir)).shift == 2.0


# --- closed forms through the module ------------------------------------------------------
class GaussianDenoiser(Denoiser):
    """Exact velocity of Gaussian data N(mu, s^2) on any [B, 1, T, H, W] tensor.

    ``mu`` is a parameter, or None to read it from the text (``text_embeds[:, 0, 0]``), which
    makes a conditional teacher whose negative prompt is another Gaussian. Features of
    ``feature_block`` are ``[x_t, x_t^2]`` stacked on channels.
    """

    latent_channels, control_channels, num_blocks, feature_dim = 1, 0, 1, 2

    def __init__(self, s: float, mu: float | None = None):
        super().__init__()
        self.mu = None if mu is None else nn.Parameter(torch.tensor(float(mu)))
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))

    def forward(self, x_t, sigma, cond: Conditioning, feature_block=None):
        mu = cond.text_embeds[:, 0, 0] if self.mu is None else self.mu.expand(x_t.shape[0])
        v = exact_velocity(x_t, sigma, mu.reshape(-1, 1, 1, 1, 1), self.log_s.exp())
        return v if feature_block is None else (v, torch.cat([x_t, x_t**2], dim=1))


class AffineGenerator(Denoiser):
    """One-step student with ``x_g = a eps + b``: velocity ``(x - a x - b) / sigma``."""

    latent_channels, control_channels, num_blocks, feature_dim = 1, 0, 1, 2

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x_t, sigma, cond, feature_block=None):
        return (x_t - self.a * x_t - self.b) / sigma.reshape(-1, 1, 1, 1, 1)


def toy_module(teacher_dir, student, fake_score, s_real, guidance, **hparams) -> DMD2Module:
    """A DMD2Module whose four networks are replaced by the Gaussian toy's."""
    module = DMD2Module(str(teacher_dir), guidance=guidance, **hparams)
    module.teacher = GaussianDenoiser(s_real).eval().requires_grad_(False)
    module.fake_score = fake_score
    module.student = student
    module.discriminator = DiscriminatorHead(2, hidden_dim=8, kernel_size=(1, 1, 4), stride=(1, 1, 2))
    module.student_ema = None
    module.feature_block = 0
    module.shift = 1.0
    return module


def text(mu: float, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((batch, 1, 1), mu), torch.ones(batch, 1, dtype=torch.bool)


def test_module_dmd_gradient_is_kl_gradient_of_common_form_cfg_target(teacher_dir):
    """Teacher = CFG (w = 3) of cond N(0.25, s^2) and negative-prompt N(-0.5, s^2): the target is
    N(-0.5 + 3 * 0.75 = 1.75, s^2), not Cosmos' c + w(c - u) = 2.5. With the fake score exact for
    the generator N(b, a^2), the module's generator loss has the gradient
    sigma^2/(1-sigma)^2 / k * dKL/d(b, a) of the noised KL."""
    mu_c, mu_u, s, w, sigma = 0.25, -0.5, 0.6, 3.0, 0.5
    a, b = 1.2, 0.4
    module = toy_module(teacher_dir, AffineGenerator(a, b), GaussianDenoiser(a, mu=b), s, w, gan_weight=0.0)
    batch, dim = 64, 4096
    embeds, mask = text(mu_c, batch)
    cond = Conditioning(embeds, mask)
    uncond = Conditioning(*text(mu_u, batch))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(batch, 1, 1, 1, dim, generator=g)
    noise = torch.randn(batch, 1, 1, 1, dim, generator=g)
    sg = torch.full((batch,), sigma)
    objective = module.objective
    x_g = objective.generate(eps, cond)
    loss, logs = objective.generator_loss(x_g, sg, noise, cond, uncond)
    loss.backward()
    got = torch.stack([module.student.b.grad, module.student.a.grad]).double()

    def kl_grad(target_mean):
        v_f, v_r = marginal_var(sigma, a), marginal_var(sigma, s)
        d_mu = (1 - sigma) ** 2 * (b - target_mean) / v_r
        d_s = (1 - sigma) ** 2 * a * (1 / v_r - 1 / v_f)
        return sigma**2 / (1 - sigma) ** 2 * torch.tensor([d_mu, d_s], dtype=torch.float64)

    k = float(logs["dmd_normaliser"])
    torch.testing.assert_close(got * k, kl_grad(mu_u + w * (mu_c - mu_u)), rtol=3e-2, atol=2e-3)
    cosmos = kl_grad(mu_c + w * (mu_c - mu_u))
    assert (got * k - cosmos).abs().max() > 0.05


class ToyClips(Dataset):
    """'Clips' [1, 1, 1, D] from the conditional data N(mu_c, s^2), with the cond text."""

    def __init__(self, mu_c: float, s: float, dim: int, size: int = 10_000):
        self.mu_c, self.s, self.dim, self.size = mu_c, s, dim, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        video = self.mu_c + self.s * torch.randn(1, 1, 1, self.dim, generator=g)
        embeds, mask = text(self.mu_c, 1)
        return {"video": video, "control": torch.zeros_like(video), "text_embeds": embeds[0], "text_mask": mask[0]}


def test_toy_dmd2_run_moves_student_mean_and_spread_to_cfg_teacher(teacher_dir):
    """Full module, 4:1 alternation through a Trainer: student x_g = a eps + b starts at
    N(-0.5, 2^2); a learned Gaussian fake score; CFG teacher (w = 2) of N(0.25, 0.5^2) and
    N(-0.5, 0.5^2), i.e. N(1.0, 0.5^2). 500 steps (100 generator updates)."""
    mu_c, mu_u, s, w = 0.25, -0.5, 0.5, 2.0
    target = mu_u + w * (mu_c - mu_u)
    module = toy_module(
        teacher_dir, AffineGenerator(2.0, -0.5), GaussianDenoiser(2.0, mu=-0.5), s, w,
        student_lr=0.03, fake_score_lr=0.05, discriminator_lr=1e-3, weight_decay=0.0,
    )
    module.set_negative_prompt(*text(mu_u, 1))
    loader = DataLoader(ToyClips(mu_c, s, dim=64), batch_size=16)
    t = trainer(500)
    t.fit(module, train_dataloaders=loader)
    a, b = module.student.a.item(), module.student.b.item()
    assert b == pytest.approx(target, abs=0.1), (a, b)
    assert abs(a) == pytest.approx(s, abs=0.1), (a, b)


# --- configs through the real CLI -------------------------------------------------------------
def tiny_config(dest: Path, teacher_dir: Path, max_steps: int, source: str = "configs/tiny/dmd2.yaml") -> Path:
    """``source`` (a tiny DMD2 config) written to ``dest`` for a short CPU run on ``teacher_dir``:
    ``max_steps`` steps, a checkpoint, a grid and a collapse check every 5, 4 frames of 16x16, batches of 2."""
    from tests.cli_helpers import edited_config, short_dmd2_trainer

    def edit(cfg):
        short_dmd2_trainer(cfg["trainer"], max_steps, every=5)
        cfg["trainer"]["callbacks"][3]["init_args"]["every_n_steps"] = 5  # the collapse monitor
        cfg["model"]["init_args"].update(teacher=str(teacher_dir), discriminator_hidden=8, feature_block=1)
        cfg["data"].update(num_frames=4, frame_stride=2, height=16, width=16, batch_size=2, val_batch_size=2,
                           samples_per_epoch=8, max_text_length=8)

    return edited_config(source, dest, edit)


def test_tiny_config_fits_from_kd_checkpoint(teacher_dir, kd_checkpoint, tmp_path):
    from tests.cli_helpers import run_cli, scalar_events

    kd_path, _, kd_ema = kd_checkpoint
    config = tiny_config(tmp_path / "dmd2.yaml", teacher_dir, max_steps=10)
    run_cli(["fit", "--config", str(config), "--model.init_from", str(kd_path)], cwd=tmp_path)
    run_dir = tmp_path / "runs/tiny/dmd2"
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert scalar_events(run_dir, "train/phase") == {s: float(s % 5) for s in range(10)}
    assert sorted(scalar_events(run_dir, "train/generator_loss")) == [4, 9]
    assert len(scalar_events(run_dir, "train/critic_loss")) == 8
    # training health: the generator's scalars at its steps, the collapse monitor's (on in the
    # config) from its checks. This test's teacher has random weights: its student's pixels all
    # saturate (measured 2026-12-07: saturation 1.0, diversity 0.79, fresh fake-score loss ~2.2e4),
    # which 2 checks (< patience 3) do not stop
    health = {tag: scalar_events(run_dir, f"train/{tag}")
              for tag in ("dmd_grad_norm", "teacher_fake_x0_gap", "fake_score_loss_fresh")}
    collapse = {tag: scalar_events(run_dir, f"collapse/{tag}") for tag in ("diversity", "saturation")}
    assert all(sorted(values) == [4, 9] and all(v > 0 for v in values.values()) for values in health.values())
    assert collapse["diversity"] and all(0 < v for v in collapse["diversity"].values())
    assert collapse["saturation"] and all(0 <= v <= 1 for v in collapse["saturation"].values())
    assert list(run_dir.rglob("grids/step000005_0.png")) and list(run_dir.rglob("grids/step000010_1.png"))
    assert ckpt["hyper_parameters"]["init_from"] == str(kd_path)
    # the export is the EMA student of the last checkpoint, loadable as a diffusers folder
    export = run_dir / "export"
    assert json.loads((export / "scheduler/scheduler_config.json").read_text())["_class_name"] == (
        "FlowMatchEulerDiscreteScheduler"
    )
    exported = load_denoiser(str(export)).state_dict()
    ema = {k[len("student_ema.module."):]: v for k, v in ckpt["state_dict"].items()
           if k.startswith("student_ema.module.")}
    assert ema and ema.keys() == exported.keys()
    assert all(torch.equal(ema[k], exported[k]) for k in ema)


def test_kd_checkpoint_as_ckpt_path_through_cli_says_init_from(teacher_dir, kd_checkpoint, tmp_path):
    """The documented mistake: `distill-pl fit --config dmd2.yaml --ckpt_path <kd ckpt>`.
    LightningCLI reads the checkpoint's hyperparameters (`_class_path` = KDModule) before any
    module exists, so the refusal has to happen in the CLI, not only in on_load_checkpoint."""
    import subprocess

    from tests.cli_helpers import DISTILL_PL, cli_env

    kd_path, _, _ = kd_checkpoint
    config = tiny_config(tmp_path / "dmd2.yaml", teacher_dir, max_steps=10)
    proc = subprocess.run(DISTILL_PL + ["fit", "--config", str(config), "--ckpt_path", str(kd_path)],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--model.init_from" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs/tiny/dmd2/checkpoints").exists()  # nothing trained
