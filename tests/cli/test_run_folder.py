"""One folder per run: every output of a run lies in its ``trainer.default_root_dir``."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonargparse import Namespace

from distill_pl.cli.main import main
from distill_pl.cli.run_folder import CHECKPOINT_CALLBACK, TENSORBOARD_LOGGER, check_export_free, derive_run_paths
from tests.training.test_teacher_cli import fast_teacher_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**trainer) -> Namespace:
    checkpoint = Namespace(class_path=CHECKPOINT_CALLBACK, init_args=Namespace(dirpath=None, save_last=True))
    return Namespace(trainer=Namespace(**{"callbacks": [checkpoint], "logger": True, **trainer}),
                     model=Namespace(class_path="x.KD", init_args=Namespace(export_dir=None)),
                     data=Namespace(mode="pairs", pairs_dir=None))


def test_unset_paths_derive_from_the_run_folder():
    config = _config(default_root_dir="runs/mine")
    derive_run_paths(config, "fit")
    assert config.trainer.callbacks[0].init_args.dirpath == str(Path("runs/mine/checkpoints"))
    assert config.trainer.logger == Namespace(class_path=TENSORBOARD_LOGGER,
                                              init_args=Namespace(save_dir="runs/mine", name=""))
    assert config.model.init_args.export_dir == str(Path("runs/mine/export"))
    assert config.data.pairs_dir is None  # a fit reads its pairs from where the config says

    predict = _config(default_root_dir="runs/pairs", logger=False)
    derive_run_paths(predict, "predict")
    assert predict.data.pairs_dir == "runs/pairs" and predict.trainer.logger is False
    assert predict.model.init_args.export_dir is None

    latents = _config(default_root_dir="runs/latents", logger=False)
    latents.data = Namespace(mode="latents", latents_dir=None)
    derive_run_paths(latents, "predict")
    assert latents.data.latents_dir == "runs/latents"
    fit_on_latents = _config(default_root_dir="runs/mine")
    fit_on_latents.data = Namespace(mode="latents", latents_dir=None)
    derive_run_paths(fit_on_latents, "fit")
    assert fit_on_latents.data.latents_dir is None  # a fit reads its latents from where the config says

    explicit = _config(default_root_dir="runs/mine")
    explicit.trainer.callbacks[0].init_args.dirpath = "elsewhere"
    explicit.model.init_args.export_dir = "students/s"
    derive_run_paths(explicit, "fit")
    assert explicit.trainer.callbacks[0].init_args.dirpath == "elsewhere"
    assert explicit.model.init_args.export_dir == "students/s"


def test_an_export_is_not_overwritten_unless_asked(tmp_path):
    config = _config()
    config.model.init_args.export_dir = str(tmp_path / "export")
    check_export_free(config, overwrite=False)  # absent
    (tmp_path / "export").mkdir()
    check_export_free(config, overwrite=False)  # empty
    (tmp_path / "export" / "student.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds an exported model.*--overwrite_export true"):
        check_export_free(config, overwrite=False)
    check_export_free(config, overwrite=True)


def test_a_resume_of_the_same_run_may_write_its_export_again(tmp_path):
    """The export inside the run folder is this run's when --ckpt_path resumes a checkpoint of
    that folder; a fresh fit there, a checkpoint of another folder or an export folder
    outside the run folder is still refused."""
    run, other = tmp_path / "a", tmp_path / "b"
    (run / "export").mkdir(parents=True)
    (run / "export" / "student.json").write_text("{}")
    config = _config(default_root_dir=str(run))
    config.model.init_args.export_dir = str(run / "export")
    config.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    check_export_free(config, overwrite=False)  # resumes this run
    config.ckpt_path = None
    with pytest.raises(FileExistsError, match="already holds an exported model"):
        check_export_free(config, overwrite=False)  # a fresh fit in the same folder
    config.ckpt_path = str(other / "checkpoints" / "last.ckpt")
    with pytest.raises(FileExistsError, match="already holds an exported model"):
        check_export_free(config, overwrite=False)  # another run's checkpoint
    elsewhere = _config(default_root_dir=str(other))
    elsewhere.model.init_args.export_dir = str(run / "export")
    elsewhere.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    with pytest.raises(FileExistsError, match="already holds an exported model"):
        check_export_free(elsewhere, overwrite=False)  # another run folder onto this run's export


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def test_two_runs_with_different_run_folders_share_no_file(tmp_path, monkeypatch, capsys):
    """Two teacher fits of the same config, one --trainer.default_root_dir each: every file
    (checkpoints, TensorBoard events, config, grids, export) is under its own run folder;
    a third fit into the first folder is refused before training (its export is there)."""
    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    shared = ["--data.cache_dir", "cache"]  # the prompt-embedding cache is shared on purpose
    before = _files(tmp_path)
    main(["fit", "--config", config, "--trainer.default_root_dir", "a", *shared])
    after_a = _files(tmp_path)
    main(["fit", "--config", config, "--trainer.default_root_dir", "b", *shared])
    after_b = _files(tmp_path)
    run_a = {p for p in after_a - before if p.parts[0] != "cache"}
    run_b = {p for p in after_b - after_a if p.parts[0] != "cache"}
    assert run_a and all(p.parts[0] == "a" for p in run_a), run_a
    assert run_b and all(p.parts[0] == "b" for p in run_b), run_b
    for run in (run_a, run_b):
        names = {p.relative_to(p.parts[0]).as_posix() for p in run}
        assert {"checkpoints/last.ckpt", "export/transformer/diffusion_pytorch_model.safetensors",
                "version_0/config.yaml", "version_0/grids/step000002_0.png"} <= names, names
    assert not (tmp_path / "runs").exists()  # nothing in the config's own folder

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--trainer.default_root_dir", "a", *shared])
    assert exit_.value.code == 1
    assert "a/export already holds an exported model" in capsys.readouterr().err
    assert _files(tmp_path) == after_b


@pytest.mark.slow  # CLI fits (10-30 s): keeps the default suite under 10 minutes
def test_resuming_a_run_in_its_own_folder_exports_again_but_another_run_may_not(tmp_path, monkeypatch, capsys):
    """A fit, then ``--ckpt_path last`` in the same run folder with more steps: accepted, and the
    export is written again; a fit into another run folder whose export_dir is the first run's
    export is refused before training, fresh or resumed from the first run's checkpoint."""
    import torch

    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    shared = ["--data.cache_dir", "cache"]
    main(["fit", "--config", config, "--trainer.default_root_dir", "a", *shared])
    weights = tmp_path / "a/export/transformer/diffusion_pytorch_model.safetensors"
    first = weights.read_bytes()
    main(["fit", "--config", config, "--trainer.default_root_dir", "a", "--trainer.max_steps", "3",
          "--ckpt_path", "last", *shared])
    assert torch.load(tmp_path / "a/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    assert weights.read_bytes() != first  # the export of step 3 replaced the one of step 2
    capsys.readouterr()

    after = _files(tmp_path)
    for resume in ([], ["--ckpt_path", "a/checkpoints/last.ckpt"]):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", config, "--trainer.default_root_dir", "b",
                  "--model.init_args.export_dir", "a/export", *resume, *shared])
        assert exit_.value.code == 1
        assert "a/export already holds an exported model" in capsys.readouterr().err
    assert _files(tmp_path) == after


def _tree(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow  # CLI fits (10-30 s): keeps the default suite under 10 minutes
def test_a_copied_or_moved_run_folder_resumes_and_exports_inside_itself(tmp_path, monkeypatch):
    """Fit in a; copy a to b without its export, resume b from its own last.ckpt with more
    steps: b/export is written, a is untouched. Then move b to c: the same in c, and nothing
    reappears at b. The checkpoint stores export_dir relative to its run folder."""
    import shutil

    import torch

    from distill_pl.cli.run_folder import RUN_RELATIVE_KEY
    from distill_pl.training.resume import checkpoint_step, resume_checkpoint

    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    shared = ["--data.cache_dir", str(tmp_path / "cache")]
    main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "a"), *shared])
    saved = torch.load(tmp_path / "a/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["export_dir"] == "export" and saved[RUN_RELATIVE_KEY] == ["export_dir"]
    original = _tree(tmp_path / "a")

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/export")
    main(["fit", "--config", config, "--trainer.default_root_dir", "b", "--trainer.max_steps", "4",
          "--ckpt_path", "b/checkpoints/last.ckpt", *shared])
    assert (tmp_path / "b/export/transformer/diffusion_pytorch_model.safetensors").is_file()
    assert checkpoint_step(Path(resume_checkpoint([tmp_path / "b/checkpoints"])))[0] == 4  # last-v1.ckpt
    assert _tree(tmp_path / "a") == original

    shutil.move(tmp_path / "b", tmp_path / "c")
    shutil.rmtree(tmp_path / "c/export")
    main(["fit", "--config", config, "--trainer.default_root_dir", "c", "--trainer.max_steps", "6",
          "--ckpt_path", "last", *shared])
    assert (tmp_path / "c/export/transformer/diffusion_pytorch_model.safetensors").is_file()
    assert checkpoint_step(Path(resume_checkpoint([tmp_path / "c/checkpoints"])))[0] == 6
    assert not (tmp_path / "b").exists()
    assert _tree(tmp_path / "a") == original


def test_a_checkpoint_gives_no_output_path_to_the_resume():
    from distill_pl.cli.run_folder import without_run_outputs

    assert without_run_outputs({"export_dir": "export", "lr": 1.0}) == {"lr": 1.0}
    assert without_run_outputs({"export_dir": "/old/a/export", "lr": 1.0}) == {"lr": 1.0}


@pytest.mark.slow  # CLI fits (10-30 s): keeps the default suite under 10 minutes
def test_a_fit_whose_export_fails_midway_leaves_no_half_export_and_reruns(tmp_path, monkeypatch, capsys):
    """ENOSPC while the teacher's export is written: one line naming the export folder, exit
    1, nothing at a/export (nor a temp folder beside it); the rerun is not refused."""
    import errno

    import distill_pl.export.model_folders as model_folders

    class FullDisk:
        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    args = ["fit", "--config", config, "--trainer.default_root_dir", "a", "--data.cache_dir", "cache"]
    real = model_folders.build_flow_scheduler
    monkeypatch.setattr(model_folders, "build_flow_scheduler", lambda *a: FullDisk())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) <= 3 and "cannot write the model folder a/export: No space left on device" in err[0], err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoints", "version_0"]

    monkeypatch.setattr(model_folders, "build_flow_scheduler", real)
    main(args)
    assert (tmp_path / "a/export/scheduler/scheduler_config.json").is_file()


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: creating a file in ``folder`` (or below it) fails with EACCES,
    as in a read-only folder (the tests run as root, whom permissions do not stop)."""
    import errno
    import os

    real_open, real_mkdir = os.open, os.mkdir
    folders: list[Path] = []

    def check(path):
        target = Path(os.path.abspath(path))
        if any(f == target.parent or f in target.parents for f in folders):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            check(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        check(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    return lambda folder: folders.append(Path(os.path.abspath(folder)))


def test_a_read_only_run_folder_is_one_line_naming_it(tmp_path, monkeypatch, capsys, read_only):
    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    for root in ("ro", "ro/new/run"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", config, "--trainer.default_root_dir", root, "--data.cache_dir", "cache"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 1 and len(err) <= 3, err
        assert f"the run folder {root} is not writable" in err[0] and "Permission denied" in err[0], err
    assert not any((tmp_path / "ro").iterdir())


def test_a_read_only_prompt_cache_warns_and_training_goes_on(tmp_path, monkeypatch, caplog, read_only):
    """A read-only (empty) cache folder: one warning naming it for the prompt cache (and one
    for the bundled manifest, written to a temp folder instead); the fit runs and exports."""
    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    (tmp_path / "cache").mkdir()
    read_only(tmp_path / "cache")
    main(["fit", "--config", config, "--trainer.default_root_dir", "a", "--data.cache_dir", "cache"])
    assert (tmp_path / "a/export/scheduler/scheduler_config.json").is_file()
    assert not any((tmp_path / "cache").iterdir())
    warnings = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert sum("prompt cache folder cache is not writable (Permission denied): continuing without caching"
               in w for w in warnings) == 1, warnings


def test_the_tiny_latents_config_writes_into_its_run_folder():
    """configs/tiny/clip_latents.yaml: --trainer.default_root_dir moves the latent shards too."""
    import yaml

    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "tiny" / "clip_latents.yaml").read_text())
    assert config["data"]["latents_dir"] is None
    parsed = Namespace(trainer=Namespace(default_root_dir="runs/other", logger=False, callbacks=[]),
                       model=Namespace(class_path="x.Latents", init_args=Namespace()),
                       data=Namespace(mode=config["data"]["mode"], latents_dir=None))
    derive_run_paths(parsed, "predict")
    assert parsed.data.latents_dir == "runs/other"


def test_the_shard_writer_names_what_it_writes(capsys):
    from types import SimpleNamespace

    from distill_pl.callbacks.shard_writer import PairShardWriter

    for mode, what in (("latents", "clip latents"), ("pairs", "KD pairs")):
        trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams=SimpleNamespace(mode=mode)),
                                  predict_dataloaders=[], global_rank=0, world_size=1)
        writer = PairShardWriter()
        writer.on_predict_start(trainer, None)
        assert writer._progress.what == what
