"""What a run prints: no "Epoch 7/-2", no FLOPs of 0, no harmless warnings or cloud tips."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

from distill_pl.callbacks.console import ParameterSummary, StepProgressBar
from distill_pl.cli.harmless_messages import silence_harmless_messages


def test_step_based_runs_show_the_epoch_without_a_negative_total():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(7).strip() == "Epoch 7"
    bar._trainer = SimpleNamespace(max_epochs=10)
    assert bar._get_train_description(7).strip() == "Epoch 7/9"


def test_summary_has_no_flops(caplog):
    data = [(" ", ["0", "1"]), ("Name", ["student", "teacher"]), ("Type", ["WanDenoiser", "WanDenoiser"]),
            ("Params", ["1.3 M", "1.3 M"]), ("Mode", ["train", "eval"]), ("FLOPs", ["0", "0"])]
    with caplog.at_level(logging.INFO):
        ParameterSummary.summarize(data, 2_600_000, 1_300_000, 10.4, {"train": 133, "eval": 133}, 0)
    text = caplog.text
    assert "FLOPs" not in text and "Flops" not in text
    assert "student" in text and "teacher" in text and "133 in eval mode (frozen networks)" in text


def test_harmless_messages_are_filtered_where_emitted(caplog):
    silence_harmless_messages()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_harmless_messages()  # catch_warnings reset the filters
        warnings.warn("Found 262 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...")
        warnings.warn("a real problem")
    assert [str(w.message) for w in caught] == ["a real problem"]
    with caplog.at_level(logging.INFO, logger="lightning.fabric.utilities.rank_zero"):
        logging.getLogger("lightning.fabric.utilities.rank_zero").info("💡 Tip: For seamless cloud uploads ...")
        logging.getLogger("lightning.fabric.utilities.rank_zero").info("GPU available: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text
