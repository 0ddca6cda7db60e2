"""Checks of a parsed run's settings before any model loads: a setting that cannot work is
one line naming it (:class:`SettingsError`, a ValueError); one that works but is probably not
meant (a CFG guidance below 1) is a warning on the ``distill_pl.settings`` logger."""

from __future__ import annotations

import logging

from jsonargparse import Namespace

log = logging.getLogger("distill_pl.settings")

#: the model's CFG weights (the common form u + w (c - u))
GUIDANCE_WEIGHTS = ("guidance", "guidance_2", "teacher_1step_guidance")
#: the model's step counts (KD pair generation's teacher steps, a teacher's validation samples)
STEP_COUNTS = ("num_steps", "sample_steps")


class SettingsError(ValueError):
    """A setting that cannot work (the message names it and the value)."""


def check_step_count(name: str, value) -> None:
    """SettingsError unless ``value`` is a step count of at least 1 (None: unset, fine)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SettingsError(f"{name} must be a whole number of sampling steps, at least 1 (got {value!r})")


def guidance_warning(name: str, value) -> str | None:
    """The warning for a CFG weight ``value`` below 1 (None: fine or unset)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value >= 1:
        return None
    return (f"{name}={value} is below 1: CFG u + w (c - u) with w < 1 moves the prediction toward the "
            f"unconditional one, away from the prompt (w = 1 is no guidance; the recipes use 5 to 8)")


def warn_guidance(name: str, value) -> None:
    message = guidance_warning(name, value)
    if message:
        log.warning(message)


def check_model_settings(config: Namespace) -> None:
    """The model's settings of a parsed subcommand ``config`` that need no model to check:
    step counts below 1 raise, CFG weights below 1 warn."""
    model_args = (config.get("model") or Namespace()).get("init_args") or Namespace()
    for key in STEP_COUNTS:
        check_step_count(f"model.init_args.{key}", model_args.get(key))
    for key in GUIDANCE_WEIGHTS:
        warn_guidance(f"model.init_args.{key}", model_args.get(key))


def check_evaluation_settings(flags: dict) -> None:
    """``distill-pl evaluate``'s flags before the data and any model: ``--teacher_steps`` and
    every ``--few_steps`` at least 1, ``--samples_per_clip`` and ``--batch_size`` at least 1;
    ``--guidance`` below 1 warns."""
    check_step_count("--teacher_steps", flags.get("teacher_steps"))
    for steps in flags.get("few_steps") or []:
        check_step_count("--few_steps", steps)
    for key in ("samples_per_clip", "batch_size"):
        value = flags.get(key)
        if value is not None and value < 1:
            raise SettingsError(f"--{key} must be at least 1 (got {value!r})")
    warn_guidance("--guidance", flags.get("guidance"))
