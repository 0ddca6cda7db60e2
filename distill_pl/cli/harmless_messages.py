"""Lightning and torch messages that look like problems in a distill_pl run but are not;
``silence_harmless_messages()`` (called by ``distill-pl``) filters each one where it is emitted.

- "Found N module(s) in eval mode at the start of training": the frozen teacher (and VAE)
  are kept in eval mode on purpose; the networks being trained are in train mode.
- "`isinstance(treespec, LeafSpec)` is deprecated": Lightning's own use of a torch API.
- "Using ModelCheckpoint with manual optimization": DMD2 takes exactly one optimizer step
  per training step, so a checkpoint after a step holds the state the next step starts from
  (exact resume is tested).
- "You have overridden `transfer_batch_to_device` in `LightningModule` ...": the stages keep a
  training batch in host memory and move it one micro-batch at a time on purpose.
- "Tip: For seamless cloud ...": Lightning's advertisements for its cloud services.
"""

from __future__ import annotations

import logging
import warnings

IGNORED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Using ModelCheckpoint with manual optimization",
    r"You have overridden `transfer_batch_to_device` in `LightningModule`",
)
LIGHTNING_INFO_LOGGERS = ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")


class DropCloudTips(logging.Filter):
    """Drops Lightning's "💡 Tip: For seamless cloud ..." info messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in str(record.msg)


def silence_harmless_messages() -> None:
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropCloudTips) for f in logger.filters):
            logger.addFilter(DropCloudTips())
