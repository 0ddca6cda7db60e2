#!/usr/bin/env python
"""What KD pair shards (format version 2, distill_pl/data/pairs.py) cost on disk and in time.

Writes pair shards for real into a temporary folder, with synthetic teacher outputs and
embeddings of the stated shapes and a bundled video as the referenced clip, and prints one
JSON object:

- ``bytes_per_example``: shard bytes / examples, for the tiny shape (the tiny configs:
  pixels [3, 8, 32, 32], MiniLM embeddings 16 x 384) and for Wan2.1 at 81x480x832 (latents
  [16, 21, 60, 104], umT5 embeddings 512 x 4096; every prompt distinct, the worst case for
  the per-shard embedding table), against the 12 MB target;
- ``write_examples_per_s`` / ``read_examples_per_s``: examples written (noise drawn and
  hashed, shard built and written atomically) and read (one row, the noise regenerated and
  checked, the clip and its canny control re-derived from the video: decoded per item, or
  sliced from the whole video decoded once, ``cache_frames``) per second, one process, one
  torch thread;
- ``peak_rss_mb``: peak resident memory of a fresh process that opens a split of N tiny
  examples and reads ``--rss-reads`` of them, for N in ``--rss-sizes`` (flat in N: reading
  is lazy);
- ``streaming``: the tiny split converted to a LitData folder (``litdata.optimize``,
  examples/s) and read through ``litdata.StreamingDataLoader`` against the local DataLoader
  over the shards (examples/s, batch 8, no workers, video decoded once); null without litdata.

    .venv/bin/python scripts/benchmark_data.py                      # a few minutes on 2 cores
    .venv/bin/python scripts/benchmark_data.py --tiny-examples 64 --full-examples 2 \\
        --full-reads 0 --rss-sizes 32 64                           # seconds (the test)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET_BYTES = 12 * 2**20
TINY = dict(latent=(3, 8, 32, 32), text=(16, 384), frames=8, stride=4, height=32, width=32)
WAN = dict(latent=(16, 21, 60, 104), text=(512, 4096), frames=81, stride=1, height=480, width=832)


def reference_video() -> Path:
    from distill_pl.data.bundled import BUNDLED_CLIPS
    from distill_pl.util.paths import resolve_path

    return resolve_path(BUNDLED_CLIPS) / "carphone_pristine.mp4"  # 120 frames


def write_split(folder: Path, shape: dict, num_examples: int, shard_size: int, distinct_prompts: int) -> float:
    """Write a split of synthetic pairs; returns the seconds it took."""
    from distill_pl.data.pairs import ShardLayout, build_pair_shard, example_noise, noise_fingerprint, write_shard

    layout = ShardLayout(folder, num_examples, shard_size)
    length, dim = shape["text"]
    common = {
        "split": "train", "num_examples": num_examples, "shard_size": shard_size, "teacher": "/benchmark",
        "teacher_sha256": "0" * 64, "num_steps": 36, "guidance": 8.0, "scheduler": "UniPCMultistepScheduler",
        "seed": 0, "video_shape": [3, shape["frames"], shape["height"], shape["width"]],
        "num_frames": shape["frames"], "frame_stride": shape["stride"], "height": shape["height"],
        "width": shape["width"], "canny_low": 0.2, "canny_high": 0.4, "storage_dtype": "bfloat16",
        "trajectory_sigmas": [],
    }
    negative = (torch.zeros(1, length, dim), torch.zeros(1, length, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    video = str(reference_video())
    start = time.perf_counter()
    for k in range(layout.num_shards):
        rows = []
        for i in layout.examples(k):
            prompt = i % distinct_prompts
            rows.append({
                "teacher_output": torch.randn(shape["latent"], generator=g),
                "text_embeds": torch.full((length, dim), float(prompt)), "text_mask": torch.ones(length, dtype=torch.bool),
                "seed": torch.tensor(i), "index": torch.tensor(i), "start": torch.tensor(0),
                "noise_sha256": noise_fingerprint(example_noise(i, shape["latent"])),
                "caption": f"prompt {prompt}", "path": video,
            })
        tensors, metadata = build_pair_shard(rows, common, negative)
        metadata.update(shard_index=k, count=len(rows), first_index=layout.examples(k).start)
        write_shard(layout.path(k), tensors, metadata)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard_*.safetensors"))


def read_rate(folder: Path, reads: int, cache_frames: bool = False) -> float:
    from distill_pl.data.pairs import PairShardDataset

    dataset = PairShardDataset(folder, cache_frames=cache_frames)
    dataset[0]  # the video's sha256 check, once per process
    step = max(1, len(dataset) // reads)
    start = time.perf_counter()
    for i in range(reads):
        dataset[(i * step) % len(dataset)]
    return reads / (time.perf_counter() - start)


def loader_rate(dataset, batch_size: int = 8) -> float:
    """Examples per second of one pass of a loader (``batch_size``, no workers) over ``dataset``."""
    from distill_pl.data.streaming import streaming_loader
    from torch.utils.data import DataLoader, default_collate

    is_streaming = hasattr(dataset, "bfloat16_keys")
    loader = (streaming_loader(dataset, batch_size, 0) if is_streaming
              else DataLoader(dataset, batch_size=batch_size, collate_fn=default_collate))
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["index"])
    return count / (time.perf_counter() - start)


def streaming_rates(folder: Path, streaming: Path) -> dict | None:
    """The tiny split converted with ``litdata.optimize`` and read by LitData's loader vs the
    local loader over the shards (both batch 8, no workers, the video decoded once,
    ``cache_frames``); None without litdata."""
    try:
        from distill_pl.data.streaming import StreamingShardDataset, optimize_split
    except ImportError:
        return None
    from distill_pl.data.pairs import PairShardDataset

    start = time.perf_counter()
    optimize_split(folder, streaming / "train", chunk_size=32)
    optimize_s = time.perf_counter() - start
    local = PairShardDataset(folder, cache_frames=True)
    streamed = StreamingShardDataset(str(streaming / "train"), cache_frames=True)
    local[0], streamed[0]  # decode the video once in each
    return {
        "engine": "litdata", "examples": len(local), "optimize_examples_per_s": len(local) / optimize_s,
        "local_loader_examples_per_s": loader_rate(local),
        "streaming_loader_examples_per_s": loader_rate(streamed),
    }


def rss_child(folder: str, reads: int) -> None:
    """(In a fresh process) open the split, read ``reads`` items, print the peak RSS in MB."""
    from distill_pl.data.pairs import PairShardDataset

    read_rate(Path(folder), reads)
    print(len(PairShardDataset(folder)), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-examples", type=int, default=1024)
    parser.add_argument("--full-examples", type=int, default=8, help="Wan-size examples written (one shard of 8)")
    parser.add_argument("--full-reads", type=int, default=0,
                        help="Wan-size items read (default 0: the canny of 81 frames at 480x832 takes minutes on a CPU)")
    parser.add_argument("--shard-size", type=int, default=32, help="tiny shards; Wan shards hold 8")
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rss-reads", type=int, default=50)
    parser.add_argument("--rss-child", nargs=2, metavar=("FOLDER", "READS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return {}
    torch.set_num_threads(1)  # stable figures on a shared CPU (two threads oversubscribe 2 cores)
    report: dict = {"format_version": 2, "storage_dtype": "bfloat16", "target_bytes_per_example": TARGET_BYTES}
    with tempfile.TemporaryDirectory(prefix="benchmark_data_") as tmp:
        root = Path(tmp)
        tiny_s = write_split(root / "tiny", TINY, args.tiny_examples, args.shard_size, distinct_prompts=4)
        report["tiny"] = {
            "examples": args.tiny_examples, "shape": TINY,
            "bytes_per_example": folder_bytes(root / "tiny") / args.tiny_examples,
            "write_examples_per_s": args.tiny_examples / tiny_s,
            "read_examples_per_s": read_rate(root / "tiny", min(100, args.tiny_examples)),
            "read_cached_examples_per_s": read_rate(root / "tiny", min(100, args.tiny_examples), cache_frames=True),
        }
        full_s = write_split(root / "wan", WAN, args.full_examples, 8, distinct_prompts=args.full_examples)
        full_bytes = folder_bytes(root / "wan") / args.full_examples
        report["wan2.1_81x480x832"] = {
            "examples": args.full_examples, "shape": WAN, "bytes_per_example": full_bytes,
            "mb_per_example": full_bytes / 2**20, "within_target": full_bytes <= TARGET_BYTES,
            "write_examples_per_s": args.full_examples / full_s,
            "read_examples_per_s": read_rate(root / "wan", args.full_reads) if args.full_reads else None,
        }
        shutil.rmtree(root / "wan")
        rss = {}
        for n in args.rss_sizes:
            folder = root / f"rss_{n}"
            write_split(folder, TINY, n, args.shard_size, distinct_prompts=4)
            child = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(folder), str(min(args.rss_reads, n))],
                check=True, capture_output=True, text=True,
            )
            examples, mb = child.stdout.split()[-2:]
            assert int(examples) == n, child.stdout
            rss[str(n)] = float(mb)
            shutil.rmtree(folder)
        report["peak_rss_mb"] = {"reads": args.rss_reads, "by_examples": rss}
        report["streaming"] = streaming_rates(root / "tiny", root / "tiny_streaming")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
