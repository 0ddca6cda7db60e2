"""Plot a run's TensorBoard scalars as PNG line plots, one PNG per group of scalars.

    python scripts/plot_health.py --run runs/tiny/dmd2 --out runs/tiny/dmd2/health

Reads every ``events.out.tfevents.*`` below ``--run`` (all versions: a resumed run's later
values win at equal steps) and writes ``<group>.png`` into ``--out``: one panel per scalar of
the group (its own y range; steps on x; the first, last, min and max values written beside
it). The groups hold the training-health scalars of docs/failure-handling.md (``dmd``,
``fake_score``, ``collapse``, ``losses``, ``discriminator``, ``grad_norms``); scalars in no
group go to ``other.png``. Plots are drawn with Pillow (no plotting library needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: group name -> the tags it plots, in order (absent tags are left out)
GROUPS = {
    "dmd": ["train/dmd_grad_norm", "train/dmd_dm_norm", "train/dmd_ca_norm", "train/teacher_fake_x0_gap",
            "train/dmd_normaliser", "train/dmd_loss"],
    "fake_score": ["train/fake_score_loss", "train/fake_score_loss_fresh"],
    "collapse": ["collapse/diversity", "collapse/saturation"],
    "losses": ["train/critic_loss", "train/generator_loss", "train/gan_loss", "train/discriminator_loss"],
    "discriminator": ["train/logits_real", "train/logits_fake", "train/generator_logits_fake",
                      "train/discriminator_accuracy"],
}
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_Y = 640, 150, 70, 230, 18


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files below ``run``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in sorted(run.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, str(p))):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def group_tags(tags: list[str]) -> dict[str, list[str]]:
    """The groups with at least one of ``tags``: GROUPS, ``grad_norms`` (``train/grad_norm_*``)
    and ``other`` (the rest)."""
    groups = {name: [t for t in members if t in tags] for name, members in GROUPS.items()}
    groups["grad_norms"] = sorted(t for t in tags if t.startswith("train/grad_norm_"))
    placed = {t for members in groups.values() for t in members}
    groups["other"] = sorted(t for t in tags if t not in placed)
    return {name: members for name, members in groups.items() if members}


def plot_group(series: dict[str, dict[int, float]], path: Path) -> None:
    """One PNG: a panel per tag of ``series`` ({tag: {step: value}}), stacked."""
    from PIL import Image, ImageDraw

    width = MARGIN_L + PANEL_W + MARGIN_R
    image = Image.new("RGB", (width, len(series) * (PANEL_H + 2 * MARGIN_Y)), "white")
    draw = ImageDraw.Draw(image)
    for i, (tag, values) in enumerate(series.items()):
        top = i * (PANEL_H + 2 * MARGIN_Y) + MARGIN_Y
        steps = sorted(values)
        ys = [values[s] for s in steps]
        finite = [y for y in ys if y == y and abs(y) != float("inf")]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(step: int, y: float) -> tuple[float, float]:
            return (MARGIN_L + (step - s0) / (s1 - s0) * PANEL_W, top + (hi - y) / (hi - lo) * PANEL_H)

        draw.rectangle([MARGIN_L, top, MARGIN_L + PANEL_W, top + PANEL_H], outline="gray")
        draw.text((MARGIN_L, top - MARGIN_Y + 3), tag, fill="black")
        draw.text((4, top), f"{hi:.4g}", fill="gray")
        draw.text((4, top + PANEL_H - 10), f"{lo:.4g}", fill="gray")
        draw.text((MARGIN_L, top + PANEL_H + 2), str(steps[0]), fill="gray")
        draw.text((MARGIN_L + PANEL_W - 40, top + PANEL_H + 2), str(steps[-1]), fill="gray")
        points = [xy(s, y) for s, y in zip(steps, ys) if y == y and abs(y) != float("inf")]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        for x, y in points if len(points) < 50 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
        text = (f"first {ys[0]:.4g}\nlast  {ys[-1]:.4g}\nmin   {lo if finite else float('nan'):.4g}\n"
                f"max   {hi if finite else float('nan'):.4g}\npoints {len(ys)}"
                + (f" ({len(ys) - len(finite)} non-finite)" if len(finite) < len(ys) else ""))
        draw.multiline_text((MARGIN_L + PANEL_W + 10, top + 5), text, fill="black")
    image.save(path)


def plot_run(run: Path, out: Path) -> list[Path]:
    """Write one PNG per group of ``run``'s scalars into ``out``; returns their paths."""
    scalars = read_scalars(run)
    if not scalars:
        raise SystemExit(f"no TensorBoard scalars below {run}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, tags in group_tags(sorted(scalars)).items():
        path = out / f"{name}.png"
        plot_group({tag: scalars[tag] for tag in tags}, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (event files anywhere below it)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    for path in plot_run(args.run, args.out):
        print(path)


if __name__ == "__main__":
    main()
