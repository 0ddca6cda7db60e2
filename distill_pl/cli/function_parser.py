"""Command lines for plain functions that take a ``VideoDataModule`` as ``data``
(``distill-pl sample``, ``distill-pl evaluate``): every other argument is a flag, the data
settings are ``--data.*``, and ``--config`` reads a YAML file of both. Errors are one line
(:mod:`distill_pl.cli.errors`), and the videos of the data are checked before the function
loads any model."""

from __future__ import annotations

from typing import Callable

from jsonargparse import ActionConfigFile, ArgumentParser

from distill_pl.cli.errors import ShortErrors
from distill_pl.data.datamodule import VideoDataModule


class FunctionParser(ShortErrors, ArgumentParser):
    """jsonargparse's parser with one-line errors."""


def run_with_data(function: Callable, prog: str, description: str, argv: list[str] | None = None,
                  check: Callable[[dict], None] | None = None):
    """Parse ``argv`` for ``function(data=VideoDataModule(...), **flags)`` and call it;
    ``check(flags)`` first, before the data is looked at (settings that cannot work)."""
    parser = FunctionParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(function, skip={"data"})
    parser.add_class_arguments(VideoDataModule, "data")
    cfg = parser.instantiate(parser.parse_args(argv))
    if check is not None:
        check({k: v for k, v in cfg.items() if k not in ("config", "data")})
    if cfg["data"].reads_clips("validate"):
        cfg["data"].check_video_lengths()
    cfg["data"].check_settings("validate")  # warnings: batch size, captions
    return function(**{k: v for k, v in cfg.items() if k != "config"})
