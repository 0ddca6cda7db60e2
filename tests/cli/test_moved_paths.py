"""Class paths from before the package was regrouped: a config gets a one-line error naming
the new path; a checkpoint that names its class by the old path still resumes."""

from __future__ import annotations

import pytest
import torch

from distill_pl.cli.main import main
from distill_pl.cli.moved_paths import MOVED_MODULES, new_class_path
from tests.training.test_teacher_cli import fast_teacher_config, last_saved_step

pytestmark = pytest.mark.usefixtures("one_thread")
OLD_TEACHER = "distill_pl.stages.teacher.TeacherTrainingModule"
NEW_TEACHER = "distill_pl.training.teacher.TeacherTrainingModule"


def test_every_new_module_exists_and_old_paths_map_to_it():
    import importlib

    for new in MOVED_MODULES.values():
        importlib.import_module(new)
    assert new_class_path(OLD_TEACHER) == NEW_TEACHER
    assert new_class_path(NEW_TEACHER) == NEW_TEACHER


def test_a_family_module_that_became_a_package_maps_to_its_new_module():
    """``distill_pl.families.wan`` is an old module and the package of the new one: its
    classes map, the new path (one part longer) stays as it is."""
    new = "distill_pl.families.wan.adapter.WanDenoiser"
    assert new_class_path("distill_pl.families.wan.WanDenoiser") == new
    assert new_class_path("distill_pl.models.families.wan.WanDenoiser") == new
    assert new_class_path(new) == new
    assert new_class_path("distill_pl.families.wan_vace.WanVACEDenoiser") == "distill_pl.families.wan.vace.WanVACEDenoiser"
    cosmos = "distill_pl.families.cosmos_transfer.adapter.CosmosTransferDenoiser"
    assert new_class_path("distill_pl.families.cosmos_transfer.CosmosTransferDenoiser") == cosmos
    assert new_class_path(cosmos) == cosmos


def test_a_config_with_an_old_class_path_is_one_line_naming_the_new_one(tmp_path, capsys):
    config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2)
    old = tmp_path / "old.yaml"
    old.write_text(config.read_text().replace(NEW_TEACHER, OLD_TEACHER))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(old)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2
    assert f"{old}: {OLD_TEACHER} has moved to {NEW_TEACHER}" in err[0]


@pytest.mark.slow  # CLI fits (10-30 s): keeps the default suite under 10 minutes
def test_a_checkpoint_naming_the_old_class_path_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2))
    main(["fit", "--config", config, "--trainer.default_root_dir", "run"])
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["_class_path"] == NEW_TEACHER
    saved["hyper_parameters"]["_class_path"] = OLD_TEACHER  # as written before the move
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    main(["fit", "--config", config, "--trainer.default_root_dir", "run", "--trainer.max_steps", "4",
          "--ckpt_path", str(old), "--overwrite_export", "true"])
    assert last_saved_step(ckpt) == 4
