"""Checks of a parsed run's settings before any model loads: a setting that cannot work is
one line naming it (:class:`SettingsError`, a ValueError)."""

from __future__ import annotations

from jsonargparse import Namespace

#: the model's step counts (KD pair generation's teacher steps, a teacher's validation samples)
STEP_COUNTS = ("num_steps", "sample_steps")


class SettingsError(ValueError):
    """A setting that cannot work (the message names it and the value)."""


def check_step_count(name: str, value) -> None:
    """SettingsError unless ``value`` is a step count of at least 1 (None: unset, fine)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SettingsError(f"{name} must be a whole number of sampling steps, at least 1 (got {value!r})")


def check_model_settings(config: Namespace) -> None:
    """The model's settings of a parsed subcommand ``config`` that need no model to check."""
    model_args = (config.get("model") or Namespace()).get("init_args") or Namespace()
    for key in STEP_COUNTS:
        check_step_count(f"model.init_args.{key}", model_args.get(key))
