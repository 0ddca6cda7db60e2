"""Text embeddings of prompts, computed once and kept in one safetensors file.

Layout of the file: for every prompt, ``<sha1(prompt)>.embeds`` [L, D] float32 (zero at
padding for the generic encoder; a family's own encoder may keep them, see
:func:`distill_pl.families.registry.text_encoders`) and
``<sha1(prompt)>.mask`` [L] bool; metadata ``encoder`` (the encoder path as given), ``max_length`` and ``prompts`` (JSON object sha1 -> prompt). A file written for
another encoder path or max_length, or one that cannot be read, is rebuilt from scratch.
The encoder is loaded only when a requested prompt is missing. A cache folder that cannot be
written (read-only, full) is warned about once, naming it, and the embeddings are kept in
memory only: training goes on without caching them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file
from torch import Tensor

from distill_pl.util.media import atomic_write
from distill_pl.families.registry import load_text_encoder

log = logging.getLogger("distill_pl.data")


def prompt_key(prompt: str) -> str:
    """Cache key of a prompt: the sha1 hex digest of its UTF-8 bytes."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


class PromptEmbeddingCache:
    """Embeddings of prompts by ``encoder_path`` (the encoder its config names, see
    :func:`~distill_pl.families.registry.load_text_encoder`), cached in ``cache_file``.

    Args:
        encoder_path: local transformers folder or ``pkg://`` path of the text encoder.
        cache_file: the safetensors file (created, with its folder, on first write).
        max_length: L, the padded token length.
    """

    def __init__(self, encoder_path: str, cache_file: str | Path, max_length: int = 64):
        self.encoder_path = encoder_path
        self.cache_file = Path(cache_file)
        self.max_length = max_length
        self._encoder = None
        self._prompts: dict[str, str] = {}
        self._tensors: dict[str, Tensor] = {}
        self._writable = True
        if self.cache_file.exists():
            self._read()

    def _metadata(self) -> dict[str, str]:
        return {
            "encoder": self.encoder_path,
            "max_length": str(self.max_length),
            "prompts": json.dumps(self._prompts, ensure_ascii=False),
        }

    def _read(self) -> None:
        try:
            with safe_open(self.cache_file, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            prompts = json.loads(metadata["prompts"])
            missing = [k for k in prompts if f"{k}.embeds" not in tensors or f"{k}.mask" not in tensors]
            if missing:
                raise ValueError(f"{len(missing)} prompts listed without tensors")
        except Exception as err:  # any unreadable file is rebuilt, whatever the cause
            log.warning("prompt cache %s is corrupt (%s); rebuilding it", self.cache_file, err)
            return
        wanted = (self.encoder_path, str(self.max_length))
        found = (metadata.get("encoder"), metadata.get("max_length"))
        if found != wanted:
            log.warning(
                "prompt cache %s was built for encoder=%s max_length=%s, not %s %s; rebuilding it",
                self.cache_file, *found, *wanted,
            )
            return
        self._prompts, self._tensors = prompts, tensors

    def _write(self) -> None:
        """Write the whole cache atomically (temp file in the same folder, then rename); a
        folder that cannot be written is warned about (once) and left as it is."""
        if not self._writable:
            return
        try:
            with atomic_write(self.cache_file) as tmp:
                save_file(self._tensors, str(tmp), metadata=self._metadata())
        except OSError as err:
            self._writable = False
            log.warning("prompt cache folder %s is not writable (%s): continuing without caching the prompt "
                        "embeddings (they are computed again by every run)",
                        self.cache_file.parent, err.strerror or err)

    def _load_encoder(self):
        return load_text_encoder(self.encoder_path, self.max_length)

    def get(self, prompts: list[str], chunk_size: int = 64) -> tuple[Tensor, Tensor]:
        """Embeddings of ``prompts``: embeds [N, L, D] float32 and mask [N, L] bool (CPU).

        Missing prompts are encoded ``chunk_size`` at a time and the file is rewritten once.
        """
        if not prompts:
            raise ValueError("PromptEmbeddingCache.get needs at least one prompt")
        missing = list(dict.fromkeys(p for p in prompts if prompt_key(p) not in self._prompts))
        if missing:
            if self._encoder is None:
                self._encoder = self._load_encoder()
            for i in range(0, len(missing), chunk_size):
                chunk = missing[i : i + chunk_size]
                embeds, mask = self._encoder.encode(chunk)
                for prompt, e, m in zip(chunk, embeds, mask):
                    key = prompt_key(prompt)
                    self._tensors[f"{key}.embeds"] = e.contiguous()
                    self._tensors[f"{key}.mask"] = m.contiguous()
                    self._prompts[key] = prompt
            self._write()
        keys = [prompt_key(p) for p in prompts]
        embeds = torch.stack([self._tensors[f"{k}.embeds"] for k in keys])
        mask = torch.stack([self._tensors[f"{k}.mask"] for k in keys])
        return embeds, mask
