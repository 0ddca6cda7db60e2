"""Warnings about data settings that work but are probably not what was meant, given before
any model loads (``distill-pl fit/validate/test/predict``, ``sample``, ``evaluate``):

- a batch size larger than the data: the batches are smaller than asked (the warning names
  the size they have);
- captions longer than ``max_text_length`` tokens (the text encoder cuts them): the count, the
  limit and the longest;
- empty captions (those clips train as unconditional examples): the count and the files.

Each is one ``logging`` warning on the ``distill_pl.data`` logger; nothing here raises.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from distill_pl.data.manifest import ManifestEntry

log = logging.getLogger("distill_pl.data")

#: files named in a warning at most
_NAMED = 3


def _names(entries: Sequence[ManifestEntry]) -> str:
    names = [e.path.name for e in entries[:_NAMED]]
    return ", ".join(names) + (f" and {len(entries) - _NAMED} more" if len(entries) > _NAMED else "")


def batch_size_warnings(sizes: dict[str, tuple[str, int, int]]) -> list[str]:
    """``sizes``: split -> (the batch size setting, its value, the examples of the split per
    epoch): a message for each split whose batch size is larger than its examples."""
    return [f"data.{setting}={batch} is larger than the {count} {split} examples per epoch: "
            f"{split} batches hold {count} examples, not {batch}"
            for split, (setting, batch, count) in sizes.items() if 0 < count < batch]


def empty_caption_warning(entries: Sequence[ManifestEntry], manifest: Path | str) -> str | None:
    empty = [e for e in entries if not e.caption.strip()]
    if not empty:
        return None
    return (f"{len(empty)} of {len(entries)} captions in {manifest} are empty ({_names(empty)}): "
            f"those clips are trained on the empty prompt, as unconditional examples")


def long_caption_warning(entries: Sequence[ManifestEntry], manifest: Path | str, token_counts: Sequence[int],
                         max_text_length: int) -> str | None:
    long = [(n, e) for n, e in zip(token_counts, entries) if n > max_text_length]
    if not long:
        return None
    longest, entry = max(long, key=lambda item: item[0])
    return (f"{len(long)} of {len(entries)} captions in {manifest} are longer than data.max_text_length="
            f"{max_text_length} tokens (the longest: {longest} tokens, {entry.path.name}): the text encoder cuts "
            f"them to {max_text_length}; raise data.max_text_length to keep them whole")


def caption_token_counts(text_encoder: str, captions: Sequence[str]) -> list[int] | None:
    """Tokens per caption (special tokens included) by the tokenizer of ``text_encoder``'s
    folder, as :class:`~distill_pl.models.text_encoder.TextEncoder` counts them; None when
    it cannot be told without loading a model (no such tokenizer, a family's own encoder)."""
    try:
        import transformers

        from distill_pl.families.registry import text_encoder_class
        from distill_pl.models.text_encoder import TextEncoder, _model_folder, _tokenizer_folder

        if text_encoder_class(text_encoder) is not TextEncoder:  # a family's own encoder (e.g. Cosmos')
            return None
        tokenizer = transformers.AutoTokenizer.from_pretrained(_tokenizer_folder(_model_folder(text_encoder)),
                                                               local_files_only=True)
        return [len(ids) for ids in tokenizer(list(captions), add_special_tokens=True)["input_ids"]]
    except Exception as err:  # the text encoder's own loading reports a bad folder later
        log.debug("caption lengths not checked: %s", err)
        return None


def caption_warnings(entries: Sequence[ManifestEntry], manifest: Path | str, text_encoder: str,
                     max_text_length: int, refuse_long: bool = False) -> list[str]:
    """The empty and too-long caption warnings of a manifest's ``entries``; with
    ``refuse_long``, too-long captions are a ValueError instead (``data.long_captions: refuse``)."""
    warnings = [empty_caption_warning(entries, manifest)]
    counts = caption_token_counts(text_encoder, [e.caption for e in entries]) if entries else None
    if counts is not None:
        long = long_caption_warning(entries, manifest, counts, max_text_length)
        if long and refuse_long:
            raise ValueError(f"{long} (data.long_captions is 'refuse')")
        warnings.append(long)
    return [w for w in warnings if w]


def warn(messages: Sequence[str]) -> None:
    for message in messages:
        log.warning(message)
