"""LitData streaming copies of the shard data sets (KD pairs, precomputed clip latents).

``python -m distill_pl.data.streaming optimize SRC DST`` converts a shard folder ``SRC``
(a ``pairs_dir`` or ``latents_dir`` with ``train/`` and ``val/``) into LitData-optimized
folders ``DST/<split>`` with ``litdata.optimize`` (one worker by default, rows in index order,
``--chunk-size`` rows per chunk). Each row is the shard's *stored* row (see
:meth:`~distill_pl.data.pairs.PairShardDataset.stored_row`: storage dtypes, KD pairs of format
version 2 hold the clip by reference and no noise); the reader turns it into the item with
the same code as the shard reader, so streamed items equal the shard reader's bit for bit.
LitData cannot serialise bfloat16: those tensors are stored as their int16 bit patterns and
viewed back. ``DST/<split>.header`` is a one-row LitData folder with the split's common
metadata (JSON, plus ``kind``: ``kd_pairs`` or ``clip_latents``) and the negative-prompt
embedding, so a reader needs nothing but ``DST``, which may be a local folder or an
object-storage URL (``s3://...``, ``gs://...``, as LitData reads them). Version 2 KD pairs
still reference their videos by absolute path: those must be readable where training runs.

Reading (:class:`StreamingShardDataset`, a ``litdata.StreamingDataset``): LitData splits the
chunks over nodes, ranks and DataLoader workers. Order: with ``shuffle`` LitData permutes the
chunks and the rows within them from ``(seed, epoch)`` (its own permutation, not the one of
:class:`~distill_pl.data.resumable.EpochShuffleSampler`); without, each rank reads a contiguous
range of rows in index order, which the local loader reproduces on any number of ranks and
workers with ``data.rank_split: litdata`` (see
:class:`~distill_pl.data.resumable.EpochShuffleSampler`; one process with at most one
worker: index order, whatever the split). ``litdata`` is optional (``scripts/setup.sh``
installs it); the data module imports this module only when it reads a streaming folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import default_collate

try:
    import litdata
    from litdata.streaming.writer import BinaryWriter
except ImportError:
    raise ImportError("the streaming data path needs litdata: run scripts/setup.sh (it installs "
                      "litdata==0.2.76 without its torchvision requirement)") from None

from distill_pl.data.clip_latents import ClipLatentDataset, decode_latent_row
from distill_pl.data.pairs import SPLITS, PairRowDecoder, PairShardDataset, ShardError

KINDS = ("kd_pairs", "clip_latents")
HEADER_SUFFIX = ".header"


def open_shards(folder: Path) -> tuple[str, PairShardDataset | ClipLatentDataset]:
    """(kind, reader) of a shard split folder: KD pairs or clip latents, told by its headers."""
    try:
        return "kd_pairs", PairShardDataset(folder)
    except ShardError as pairs_error:
        try:
            return "clip_latents", ClipLatentDataset(folder)
        except ShardError:
            raise pairs_error from None


#: the row entry holding the row's strings as one JSON object
STRINGS_KEY = "strings_json"


def encode_row(row: dict) -> dict:
    """A stored row as LitData stores it: bfloat16 tensors as their int16 bit patterns
    (LitData has no bfloat16), the strings (caption, video path, digests) in one JSON string
    (LitData would serialise a string naming a video file as the video itself)."""
    tensors = {key: value.view(torch.int16) if value.dtype == torch.bfloat16 else value
               for key, value in row.items() if isinstance(value, Tensor)}
    strings = {key: value for key, value in row.items() if not isinstance(value, Tensor)}
    return {**tensors, STRINGS_KEY: json.dumps(strings, sort_keys=True)}


def decode_row(row: dict, bfloat16_keys: list[str]) -> dict:
    """The stored row of :func:`encode_row`'s output."""
    strings = json.loads(row.pop(STRINGS_KEY))
    return {**row, **{key: row[key].view(torch.bfloat16) for key in bfloat16_keys}, **strings}


class StoredRows:
    """``litdata.optimize`` function: example index -> the shard's stored row (picklable)."""

    def __init__(self, dataset: PairShardDataset | ClipLatentDataset):
        self.dataset = dataset

    def __call__(self, index: int) -> dict:
        return encode_row(self.dataset.stored_row(index))


def optimize_split(src: Path, dst: Path, chunk_size: int = 64, num_workers: int = 1) -> None:
    """Write the LitData copy of one shard split folder ``src`` to ``dst`` (replaced if present)
    and its header to ``dst.header``. Deterministic for a given ``num_workers``."""
    kind, dataset = open_shards(src)
    sample = dataset.stored_row(0)
    header = dst.parent / (dst.name + HEADER_SUFFIX)
    for folder in (dst, header):
        if folder.exists():
            shutil.rmtree(folder)
    negative_embeds, negative_mask = dataset.negative_prompt_embedding()
    bfloat16_keys = sorted(k for k, v in sample.items() if isinstance(v, Tensor) and v.dtype == torch.bfloat16)
    metadata = {**dataset.metadata, "kind": kind, "bfloat16_keys": bfloat16_keys}
    header.mkdir(parents=True)
    writer = BinaryWriter(str(header), chunk_size=1)
    writer[0] = {"metadata": json.dumps(metadata, sort_keys=True),
                 "negative_text_embeds": negative_embeds, "negative_text_mask": negative_mask}
    writer.done()
    writer.merge()
    litdata.optimize(fn=StoredRows(dataset), inputs=list(range(len(dataset))), output_dir=str(dst),
                     chunk_size=chunk_size, num_workers=num_workers, keep_data_ordered=True,
                     start_method="fork", verbose=True)


def optimize(src: str | Path, dst: str | Path, chunk_size: int = 64, num_workers: int = 1) -> None:
    """Convert every split (``train``, ``val``) of a shard folder ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    splits = [s for s in SPLITS if (src / s).is_dir()]
    if not splits:
        raise ShardError(f"{src}: no train/ or val/ shard folder to optimize")
    for split in splits:
        optimize_split(src / split, dst / split, chunk_size, num_workers)


def read_header(url: str) -> dict:
    """The header row of a streaming split: ``metadata`` (dict), ``negative_text_embeds``, ``negative_text_mask``."""
    header = litdata.StreamingDataset(url + HEADER_SUFFIX)
    row = header[0]
    return {**row, "metadata": json.loads(row["metadata"])}


class StreamingShardDataset(litdata.StreamingDataset):
    """One streaming split ``url`` (``DST/<split>``), items equal to the shard reader's.

    Attributes like the shard readers': ``metadata`` (the split's common metadata),
    ``files`` ([url], for messages); ``negative_prompt_embedding()``.
    """

    def __init__(self, url: str, shuffle: bool = False, seed: int = 0, drop_last: bool = True,
                 cache_frames: bool = False, cache_dir: str | None = None):
        url = str(url).rstrip("/")
        header = read_header(url)
        self.metadata = {k: v for k, v in header["metadata"].items() if k not in ("kind", "bfloat16_keys")}
        self.kind, self.bfloat16_keys = header["metadata"]["kind"], header["metadata"]["bfloat16_keys"]
        if self.kind not in KINDS:
            raise ShardError(f"{url}{HEADER_SUFFIX}: unknown kind {self.kind!r}, expected one of {KINDS}")
        self._negative = header["negative_text_embeds"], header["negative_text_mask"]
        self.files = [url]
        self.decoder = PairRowDecoder(self.metadata, cache_frames) if self.kind == "kd_pairs" else None
        super().__init__(url, cache_dir=cache_dir, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def negative_prompt_embedding(self) -> tuple[Tensor, Tensor]:
        return self._negative[0].clone(), self._negative[1].clone()

    def __getitem__(self, index):
        stored = decode_row(super().__getitem__(index), self.bfloat16_keys)
        if self.decoder is None:
            return decode_latent_row(stored)
        return self.decoder(stored, where=self.files[0])


class StreamingLoader(litdata.StreamingDataLoader):
    """``litdata.StreamingDataLoader`` that resumes one epoch only.

    Lightning saves the loader's ``state_dict`` (epoch, samples yielded) in checkpoints and
    calls ``load_state_dict`` on resume, so the resumed epoch continues at the next batch. It
    ends an epoch after ``len(loader)`` batches without exhausting the iterator, and LitData
    then keeps its restore flag and would replay the restored position in the next epoch
    too: the flag is cleared here at every epoch but the first one after ``load_state_dict``.
    """

    _resuming = False

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._resuming = True

    def __iter__(self):
        if not self._resuming:
            self.restore = False
        self._resuming = False
        yield from super().__iter__()


def streaming_loader(dataset: StreamingShardDataset, batch_size: int, num_workers: int) -> StreamingLoader:
    """A :class:`StreamingLoader` of ``dataset``, collated as the local loaders are."""
    return StreamingLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=default_collate)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_pl.data.streaming",
                                     description="LitData streaming copies of KD pair / clip latent shards")
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="convert SRC/{train,val} shards into LitData folders DST/{train,val}")
    opt.add_argument("src", help="pairs_dir or latents_dir (with train/ and val/ shard folders)")
    opt.add_argument("dst", help="output folder (local; upload it to object storage to stream from there)")
    opt.add_argument("--chunk-size", type=int, default=64, help="rows per LitData chunk")
    opt.add_argument("--num-workers", type=int, default=1, help="optimize workers (the bytes depend on it)")
    args = parser.parse_args(argv)
    optimize(args.src, args.dst, args.chunk_size, args.num_workers)


if __name__ == "__main__":
    main()
