"""Settings checked before any model loads: one line naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_pl.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_predict_pairs_with_no_teacher_steps_is_one_line_before_the_teacher_loads(tmp_path, monkeypatch, capsys,
                                                                                   steps):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", str(REPO / "configs/tiny/kd_pairs.yaml"), "--model.init_args.num_steps", steps,
              "--model.init_args.teacher", str(tmp_path / "no_teacher"), "--data.cache_dir", "cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) <= 3, err
    assert f"model.init_args.num_steps must be a whole number of sampling steps, at least 1 (got {steps})" in err[0]
    assert not (tmp_path / "runs").exists()
