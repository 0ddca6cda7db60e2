"""The adapter's options (``denoiser_options``) are typed like YAML values on the command line
(``--model.init_args.denoiser_options.control_scale 0.7`` is the float 0.7, not the string
'0.7'), for every family, up to what the adapter receives; ``distill-pl sample`` loads an
exported student with the adapter options its ``student.json`` records."""

from __future__ import annotations

import pytest

from distill_pl.eval import sample
from distill_pl.export.model_folders import save_student_folder
from distill_pl.families.registry import load_denoiser
from tests.families.test_conformance import make_tiny_wan_vace
from tests.meta_configs import parse

pytestmark = pytest.mark.usefixtures("one_thread")


def parsed_pairs_module(config: str, teacher, option: str):
    """The KD pair-generation module of ``config`` with the teacher ``teacher`` and the CLI
    override ``denoiser_options.<option> 0.7`` (parsed and built, not run)."""
    return parse(config, f"--model.init_args.teacher={teacher}", f"--model.init_args.vae_path={teacher}",
                 f"--model.init_args.denoiser_options.{option}", "0.7").model


def test_cosmos_control_scale_from_the_command_line_is_a_float(cosmos_pipeline_folder):
    module = parsed_pairs_module("configs/tiny-cosmos-transfer2.5/kd_pairs.yaml", cosmos_pipeline_folder,
                                 "control_scale")
    assert module.hparams.denoiser_options == {"control_scale": 0.7}
    assert type(module.teacher.control_scale) is float and module.teacher.adapter_options["control_scale"] == 0.7


def test_wan_vace_conditioning_scale_from_the_command_line_is_a_float(tmp_path):
    teacher = make_tiny_wan_vace.write_tiny_wan_vace(tmp_path / "teacher")
    module = parsed_pairs_module("configs/tiny-wan-vace/kd_pairs.yaml", teacher, "conditioning_scale")
    assert module.hparams.denoiser_options == {"conditioning_scale": 0.7}
    assert type(module.teacher.conditioning_scale) is float and module.teacher.adapter_options["conditioning_scale"] == 0.7


def test_other_option_values_keep_their_yaml_types(cosmos_pipeline_folder):
    cli = parse("configs/tiny-cosmos-transfer2.5/kd_pairs.yaml", f"--model.init_args.teacher={cosmos_pipeline_folder}",
                f"--model.init_args.vae_path={cosmos_pipeline_folder}",
                "--model.init_args.denoiser_options.freeze_control_branch", "true",
                f"--model.init_args.denoiser_options.controlnet_path={cosmos_pipeline_folder}/controlnet")
    options = cli.model.hparams.denoiser_options
    assert options["freeze_control_branch"] is True and options["control_scale"] == 1.0  # the config's
    assert options["controlnet_path"] == f"{cosmos_pipeline_folder}/controlnet"


class Loaded(Exception):
    """Stops ``sample_teacher`` once its denoiser is loaded."""


def test_sample_loads_a_student_with_its_recorded_control_scale(cosmos_pipeline_folder, tmp_path, monkeypatch):
    student = load_denoiser(cosmos_pipeline_folder, control_scale=0.7)
    data_hparams = dict(text_encoder=str(cosmos_pipeline_folder / "text_encoder"), max_text_length=160, num_frames=5,
                        frame_stride=4, height=32, width=32, canny_low=0.2, canny_high=0.4)
    folder = save_student_folder(tmp_path / "student", student, 1.0, data_hparams, teacher=cosmos_pipeline_folder)
    loaded = []

    def load_and_stop(path, **options):
        loaded.append(load_denoiser(path, **options))
        raise Loaded

    monkeypatch.setattr(sample, "load_denoiser", load_and_stop)
    with pytest.raises(Loaded):
        sample.sample_teacher(str(folder), str(tmp_path / "out"), data=None)
    assert loaded[0].control_scale == 0.7
