"""Memory and start-up of the clips loader at scale (CPU).

    .venv/bin/python scripts/benchmark_clips.py [--videos 5000] [--probe eager|lazy] [--max_open_videos 8]

Each measurement runs in its own process and prints its peak resident set (ru_maxrss):

1. reading one 81-frame 480x832 clip window (frame stride 1, no cache) of a bundled clip,
   with its canny control: the peak RSS of that process;
2. constructing the train ClipDataset of a 4-entry manifest and of a manifest of ``--videos``
   symlinks to the bundled clips (construction time, peak RSS, open files), then reading 64
   items of it with at most ``--max_open_videos`` decord readers open (the 4-entry manifest
   can open only 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(task: dict) -> None:
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    from distill_pl.data.clips import ClipDataset

    start = time.perf_counter()
    if task["kind"] == "window":
        ds = ClipDataset(task["manifest"], num_frames=81, frame_stride=1, height=480, width=832,
                         val_fraction=0.01, samples_per_epoch=1, cache_frames=False)
        item = ds[0]
        result = {"shape": list(item["video"].shape)}
    else:
        ds = ClipDataset(task["manifest"], num_frames=8, frame_stride=4, height=32, width=32, samples_per_epoch=64,
                         cache_frames=False, probe=task["probe"], max_open_videos=task["max_open_videos"])
        built = time.perf_counter() - start
        fds = len(os.listdir("/proc/self/fd"))
        built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for i in range(64):
            ds[i]
        result = {"videos": len(ds.videos), "construction_s": built, "open_files_after_construction": fds,
                  "construction_rss_mib": built_rss,
                  "open_files_after_reads": len(os.listdir("/proc/self/fd"))}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def run(task: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=5000)
    parser.add_argument("--probe", choices=("eager", "lazy"), default="eager")
    parser.add_argument("--max_open_videos", type=int, default=8, help="ClipDataset's reader bound (its default: 8)")
    parser.add_argument("--no_window", action="store_true", help="skip measurement 1 (canny at 480x832 is slow on a CPU)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(json.loads(args.child))

    from distill_pl.data.bundled import BUNDLED_CLIPS, write_bundled_manifest
    from distill_pl.data.manifest import ManifestEntry, read_manifest, write_manifest
    from distill_pl.util.paths import resolve_path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        four = write_bundled_manifest(tmp / "four")
        bikes = write_manifest(tmp / "bikes.jsonl", [ManifestEntry(resolve_path(BUNDLED_CLIPS) / "bikes.mp4", "bikes")])
        if not args.no_window:
            window = run({"kind": "window", "manifest": str(bikes)})
            print(f"one 81x480x832 window (bikes.mp4, 640x272 source) with control: peak RSS "
                  f"{window['peak_rss_mib']:.0f} MiB ({window['seconds']:.1f} s)")
        entries = read_manifest(four)
        links = []
        for k in range(args.videos):
            link = tmp / "links" / f"video{k:05d}.mp4"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(entries[k % len(entries)].path)
            links.append(ManifestEntry(link, entries[k % len(entries)].caption))
        many = write_manifest(tmp / "many.jsonl", links)
        settings = {"kind": "manifest", "probe": args.probe, "max_open_videos": args.max_open_videos}
        small = run({**settings, "manifest": str(four)})
        large = run({**settings, "manifest": str(many)})
        for name, r in ((f"{len(entries)}-entry manifest", small), (f"{args.videos}-line manifest", large)):
            print(f"{name} ({args.probe} probing, max_open_videos {args.max_open_videos}): construction {r['construction_s']:.2f} s, peak RSS "
                  f"{r['construction_rss_mib']:.0f} MiB after construction, {r['peak_rss_mib']:.0f} MiB after "
                  f"reading 64 items; open files {r['open_files_after_construction']} after construction, "
                  f"{r['open_files_after_reads']} after the items")
        print(f"RSS ratio (5,000 / 4): {large['construction_rss_mib'] / small['construction_rss_mib']:.2f}x after "
              f"construction, {large['peak_rss_mib'] / small['peak_rss_mib']:.2f}x after the reads")


if __name__ == "__main__":
    main()
