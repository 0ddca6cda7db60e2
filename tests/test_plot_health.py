"""scripts/plot_health.py on a synthetic event file: one PNG per group present, one panel per scalar."""

from __future__ import annotations

import importlib.util
import math

from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from tests.cli_helpers import REPO

_spec = importlib.util.spec_from_file_location("plot_health", REPO / "scripts" / "plot_health.py")
plot_health = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_health)


def test_event_file_to_one_png_per_group(tmp_path, capsys):
    run = tmp_path / "run"
    writer = SummaryWriter(str(run / "version_0"))
    for step in range(20):
        writer.add_scalar("train/dmd_grad_norm", 1.0 / (step + 1), step)
        writer.add_scalar("train/teacher_fake_x0_gap", 0.1 + 0.01 * step, step)
        writer.add_scalar("train/fake_score_loss_fresh", math.nan if step == 3 else 0.5, step)
        writer.add_scalar("train/grad_norm_student", 2.0, step)
        writer.add_scalar("train/phase", float(step % 5), step)
        if step % 10 == 0:
            writer.add_scalar("collapse/diversity", 0.3, step)
    writer.close()
    plot_health.main(["--run", str(run), "--out", str(tmp_path / "png")])
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == ["collapse.png", "dmd.png", "fake_score.png", "grad_norms.png", "other.png"]
    assert capsys.readouterr().out.count(".png") == 5
    panel = plot_health.PANEL_H + 2 * plot_health.MARGIN_Y
    assert Image.open(tmp_path / "png/dmd.png").size[1] == 2 * panel  # two of the dmd group's scalars
    assert Image.open(tmp_path / "png/collapse.png").size[1] == panel
