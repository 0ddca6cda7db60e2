"""The callbacks' declared needs of their module: each refuses, in one line naming both, a
module that cannot serve it, and accepts the stages that can."""

from __future__ import annotations

import pytest

from distill_pl.callbacks.collapse import CollapseMonitor
from distill_pl.callbacks.frame_grid import FrameGridLogger
from distill_pl.callbacks.module_protocols import GridRows, ShardBuilder, StudentSamples
from distill_pl.callbacks.shard_writer import PairShardWriter
from distill_pl.training.clip_latents import ClipLatentModule
from distill_pl.training.dmd2 import DMD2Module
from distill_pl.training.kd import KDModule
from distill_pl.training.kd_pairs import KDPairGenerationModule
from distill_pl.training.teacher import TeacherTrainingModule


def test_the_stages_serve_the_callbacks_they_are_configured_with():
    for stage in (KDModule, DMD2Module, TeacherTrainingModule):
        assert issubclass(stage, GridRows)
    assert issubclass(DMD2Module, StudentSamples)
    assert issubclass(KDPairGenerationModule, ShardBuilder) and issubclass(ClipLatentModule, ShardBuilder)


class Bare:
    """A module with none of the callbacks' methods."""


@pytest.mark.parametrize("callback, stage, message", [
    (FrameGridLogger(), "fit", r"FrameGridLogger needs a model with grid_rows \(GridRows\); Bare has not"),
    (CollapseMonitor(), "fit", r"CollapseMonitor needs a model with student_samples \(StudentSamples\); Bare has not"),
])
def test_a_module_without_the_callbacks_method_is_refused_in_one_line(callback, stage, message):
    with pytest.raises(TypeError, match=message) as error:
        callback.setup(None, Bare(), stage)
    assert "\n" not in str(error.value)


def test_the_shard_writer_names_both_methods():
    with pytest.raises(TypeError, match=r"needs a model with pair_generation_metadata, build_shard \(ShardBuilder\)"):
        PairShardWriter().setup(None, Bare(), "predict")
