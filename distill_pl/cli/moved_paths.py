"""Class paths that moved when the package was regrouped by concern: a config (or flag) that
still names an old path gets a one-line error naming the new one, before anything is parsed."""

from __future__ import annotations

import re
from pathlib import Path

#: old module -> new module of every class a config can name
MOVED_MODULES = {
    "distill_pl.stages.kd": "distill_pl.training.kd",
    "distill_pl.stages.dmd2": "distill_pl.training.dmd2",
    "distill_pl.stages.teacher": "distill_pl.training.teacher",
    "distill_pl.stages.kd_pairs": "distill_pl.training.kd_pairs",
    "distill_pl.stages.clip_latents": "distill_pl.training.clip_latents",
    "distill_pl.strategies": "distill_pl.training.strategies",
    "distill_pl.checkpoint_io": "distill_pl.training.checkpoint_io",
    "distill_pl.models.families.wan": "distill_pl.families.wan.adapter",
    "distill_pl.models.families.wan_vace": "distill_pl.families.wan.vace",
    "distill_pl.models.families.cosmos_transfer": "distill_pl.families.cosmos_transfer.adapter",
    # the family modules before each family became a package
    "distill_pl.families.wan": "distill_pl.families.wan.adapter",
    "distill_pl.families.wan_vace": "distill_pl.families.wan.vace",
    "distill_pl.families.cosmos_transfer": "distill_pl.families.cosmos_transfer.adapter",
}
#: an old module and the class it names (the last part of the path: ``...wan.WanDenoiser``
#: matches, ``...wan.adapter.WanDenoiser`` does not, though ``...wan`` is an old module)
_OLD_PATH = re.compile(r"\b(" + "|".join(re.escape(m) for m in MOVED_MODULES) + r")\.(\w+)\b(?!\.)")


class MovedClassPathError(ValueError):
    """A config names a class by the path it had before the package was regrouped."""


def check_moved_class_paths(argv: list[str]) -> None:
    """Raise :class:`MovedClassPathError` naming the file (or flag), the old and the new path
    when a ``--config`` file or a flag of ``argv`` names a class by a moved path."""
    sources = [(arg, arg) for arg in argv]
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            sources.append((value, Path(value).read_text(errors="replace")))
    for where, text in sources:
        found = _OLD_PATH.search(text)
        if found:
            old, name = found.groups()
            raise MovedClassPathError(
                f"{where}: {old}.{name} has moved to {MOVED_MODULES[old]}.{name}; update the class path"
            )


def new_class_path(class_path: str) -> str:
    """``class_path`` with a moved module replaced by its new one (others unchanged): the class
    of a checkpoint written before the move."""
    return _OLD_PATH.sub(lambda m: f"{MOVED_MODULES[m.group(1)]}.{m.group(2)}", class_path)
