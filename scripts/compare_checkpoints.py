"""Print how far apart two Lightning checkpoints' weights are (the same keys, max abs
difference, bit-equal or not): e.g. the same tiny run trained by two versions of the code.

    python scripts/compare_checkpoints.py runs/a/checkpoints/last.ckpt runs/b/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    a, b = (torch.load(p, weights_only=True, map_location="cpu") for p in (args.a, args.b))
    sa, sb = a["state_dict"], b["state_dict"]
    common = sorted(sa.keys() & sb.keys())
    diff = max(((sa[k].float() - sb[k].float()).abs().max().item() for k in common), default=0.0)
    print(f"global_step {a['global_step']} vs {b['global_step']}; {len(common)} common tensors "
          f"({len(sa) - len(common)} only in a, {len(sb) - len(common)} only in b); "
          f"max abs difference {diff:g}; bit-equal: {all(torch.equal(sa[k], sb[k]) for k in common)}")


if __name__ == "__main__":
    main()
