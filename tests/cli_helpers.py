"""Run the real ``distill-pl`` command in a subprocess, in a scratch working directory, and
write the shortened configs such runs take."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DISTILL_PL = [sys.executable, "-m", "distill_pl.cli.main"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``distill-pl *args`` in ``cwd``; raise with its output if it fails."""
    proc = subprocess.run(
        DISTILL_PL + args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"distill-pl {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_in_process(args: list[str], cwd: Path) -> None:
    """Run ``distill-pl *args`` in this process (its ``main``, without a new interpreter's
    imports) with ``cwd`` as the working directory for the call."""
    from distill_pl.cli.main import main

    before = Path.cwd()
    os.chdir(cwd)
    try:
        main(args)
    finally:
        os.chdir(before)


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        DISTILL_PL + args, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def cli_command() -> list[str]:
    """The installed ``distill-pl`` script next to this Python, else ``python -m distill_pl.cli.main``."""
    script = Path(sys.executable).parent / "distill-pl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distill_pl.cli.main"]


def kill_at_first_shard(args: list[str], out: Path, log: Path, timeout: float = 300) -> None:
    """Run ``distill-pl *args`` (:func:`cli_command`) in the repository with one OMP thread,
    its output in ``log``, and kill it (SIGKILL) as soon as a ``shard_*.safetensors`` exists
    below ``out``; fails with the end of the log if the run ends first, and if no shard
    appears within ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in the test process (see one_thread)
    with open(log, "w+") as output:
        process = subprocess.Popen([*cli_command(), *args], cwd=REPO, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not any(out.rglob("shard_*.safetensors")):
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no shard after {timeout:g} s"
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def short_kd_trainer(trainer: dict, steps: int) -> None:
    """A KD config's ``trainer`` for a run of ``steps`` optimizer steps: one validation batch
    and the checkpoint (the configs' first callback) after the last step."""
    trainer.update(max_steps=steps, val_check_interval=steps, limit_val_batches=1)
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = steps


def short_dmd2_trainer(trainer: dict, steps: int, every: int | None = None) -> None:
    """A DMD2 config's ``trainer`` for a run of ``steps`` steps: the checkpoint and the frame
    grid (the configs' first two callbacks) every ``every`` steps (None: after the last)."""
    every = steps if every is None else every
    trainer["max_steps"] = steps
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    trainer["callbacks"][1]["init_args"]["every_n_steps"] = every


def pipeline_export_settings(export: Path, pipeline: str, transformer: str) -> dict:
    """``student.json`` of an exported student folder, after checking that the folder is a
    whole ``pipeline`` (its ``model_index.json``) with the flow-match Euler scheduler and a
    ``transformer`` denoiser."""
    from distill_pl.families.registry import folder_class_name

    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert folder_class_name(export) == transformer
    return json.loads((export / "student.json").read_text())


def edited_config(source: str | Path, dest: Path, edit) -> Path:
    """Write ``source`` (a YAML relative to the repo) to ``dest`` after ``edit(config)``."""
    config = yaml.safe_load((REPO / source).read_text())
    edit(config)
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def fit_short_run(work: Path, source: str, dest: str, edit, run: Path, steps: int, runner=run_cli) -> Path:
    """``distill-pl fit`` in ``work`` of ``source`` (a config relative to the repo) written to
    ``work / dest`` after ``edit(config)``, by ``runner`` (:func:`run_cli` or
    :func:`run_in_process`); checks that the run's last checkpoint
    (``run/checkpoints/last.ckpt``) is at step ``steps`` and returns ``run``."""
    import torch

    runner(["fit", "--config", str(edited_config(source, work / dest, edit))], cwd=work)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == steps
    return run


def scalar_events(log_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar over all event files below ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def evaluate_tiny_runs(work: Path, config: str, report: Path, denoiser_options: dict, runner=run_cli,
                       student_steps: int = 1, **data) -> dict:
    """``distill-pl evaluate`` of a tiny family config (its KD and DMD2 exports, students of
    ``student_steps`` steps, against the teacher at 2 and 1 steps; 2 samples per held-out
    window, one window per video, 2 bootstrap draws; ``data`` overrides the data settings) in
    ``work`` by ``runner``; checks the rows of ``report`` (an F1 as control fidelity) and returns it."""
    def edit(cfg):
        cfg.update(teacher_steps=2, few_steps=[1], samples_per_clip=2, bootstrap_resamples=2, batch_size=8,
                   sheet_clips=2, denoiser_options=denoiser_options)
        cfg["data"].update(val_clips_per_video=1, **data)

    runner(["evaluate", "--config", str(edited_config(config, work / "e.yaml", edit))], cwd=work)
    written = json.loads(report.read_text())
    rows = {row["key"]: row for row in written["methods"]}
    fidelity = written["settings"]["control_fidelity"]["key"]
    assert list(rows) == ["teacher_2step", "teacher_1step", "student_kd", "student_dmd2"]
    assert [rows[k]["nfe"] for k in rows] == [4, 2, student_steps, student_steps]  # CFG: two calls per step
    for row in list(rows.values())[1:]:
        assert 0 <= row[fidelity] <= 1 and row["frechet_distance"] >= 0 and row["psnr"] is not None
    return written
