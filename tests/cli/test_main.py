"""``distill-pl`` as a newcomer meets it: the help, short errors with suggestions, and the
video-length check that runs before any model loads."""

from __future__ import annotations

import json
import subprocess

import pytest

from distill_pl.cli.main import COMMAND_HELP, main
from distill_pl.cli.errors import condensed_parse_error
from distill_pl.data.clips import ClipDataset, minimum_video_frames
from distill_pl.data.manifest import ManifestEntry, write_manifest
from tests.cli_helpers import DISTILL_PL, REPO, cli_env
from tests.video_files import write_test_video


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "sample", "evaluate", "export", "estimate-memory"):
        assert f"  {command} " in out, command
    assert set(COMMAND_HELP) >= {"sample", "evaluate", "export", "estimate-memory"}


def test_a_typo_exits_2_with_the_key_and_a_suggestion():
    """The real command: at most 3 lines on stderr, naming the key and the nearest valid key."""
    proc = subprocess.run(DISTILL_PL + ["fit", "--config", str(REPO / "configs/tiny/kd.yaml"),
                                        "--model.init_args.lrr", "1"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) <= 3, proc.stderr
    assert "--model.init_args.lrr" in lines[0] and "did you mean --model.init_args.lr?" in lines[0]


@pytest.mark.parametrize("args, key, suggestion", [
    (["--trainer.max_stepz", "3"], "--trainer.max_stepz", "--trainer.max_steps"),
    (["--data.num_framez", "3"], "--data.num_framez", "--data.num_frames"),
    (["--model.lrr", "1"], "--model.init_args.lrr", "--model.init_args.lr"),
])
def test_unknown_keys_suggest_the_nearest(capsys, args, key, suggestion):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs/tiny/kd.yaml"), *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()[-2:]  # (in-process: Lightning may warn first)
    assert key in lines[0] and f"did you mean {suggestion}?" in lines[0] and "--debug" in lines[1], lines


def test_a_typo_in_a_config_file_and_in_evaluate(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_stepz: 2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs/tiny/kd.yaml"), "--config", str(tmp_path / "typo.yaml")])
    assert exit_.value.code == 2
    assert "did you mean --trainer.max_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--config", str(REPO / "configs/tiny/eval.yaml"), "--teacher_stepz", "3"])
    assert exit_.value.code == 2
    assert "unknown key --teacher_stepz; did you mean --teacher_steps?" in capsys.readouterr().err


def test_condensed_type_error_is_one_line():
    message = 'Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: abc'
    assert condensed_parse_error(message, [], []) == (
        "Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: abc")


def test_a_project_error_is_one_line_and_debug_gives_the_traceback(tmp_path, capsys, monkeypatch):
    args = ["fit", "--config", str(REPO / "configs/tiny/kd.yaml"), "--model.init_args.teacher", str(tmp_path / "nope"),
            "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2] == f"distill-pl fit: error: {tmp_path / 'nope'}: model folder does not exist. Only local " \
        "diffusers folders are loaded (never from the Hugging Face hub); download the model and give its local path."
    assert "--debug" in lines[-1]
    from distill_pl.models.loading import ModelFolderError

    with pytest.raises(Exception) as raised:
        main([*args, "--debug"])
    chain = [raised.value, raised.value.__cause__]
    assert any(isinstance(err, ModelFolderError) for err in chain)


def _manifest(folder, frames: list[int]):
    videos = [write_test_video(folder / f"clip{i}.mp4", n, size=64, seed=i) for i, n in enumerate(frames)]
    return write_manifest(folder / "manifest.jsonl", [ManifestEntry(v, f"clip {i}") for i, v in enumerate(videos)])


def test_minimum_video_frames_is_the_fewest_both_splits_accept(tmp_path):
    needed = minimum_video_frames(8, 4, 0.25)
    assert needed == 115  # a window spans 29 frames; round(115 / 4) = 29 held out, 86 before
    manifest = _manifest(tmp_path, [needed, needed - 1])
    val = ClipDataset(manifest, num_frames=8, frame_stride=4, height=16, width=16, split="val", val_fraction=0.25)
    assert [v.path.name for v in val.videos] == ["clip0.mp4"]  # 114 frames: round(28.5) = 28 held out
    assert val.skipped == [(str(tmp_path / "clip1.mp4"), "too short: 28 frames, needs 29")]


@pytest.mark.parametrize("command", ["fit", "evaluate"])
def test_a_too_short_manifest_is_refused_before_any_model_loads(tmp_path, capsys, command):
    """40-frame videos at the tiny settings: the error gives the minimum (115 frames). The
    teacher folder does not exist, so the error proves no model was loaded first."""
    manifest = _manifest(tmp_path, [40, 40])
    missing = str(tmp_path / "no_teacher")
    if command == "fit":
        args = ["fit", "--config", str(REPO / "configs/tiny/dmd2.yaml"), "--model.init_args.teacher", missing,
                "--trainer.default_root_dir", str(tmp_path / "run")]
    else:
        args = ["evaluate", "--config", str(REPO / "configs/tiny/eval.yaml"), "--teacher", missing,
                "--students", json.dumps({"KD": missing}), "--out", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--data.manifest", str(manifest), "--data.cache_dir", str(tmp_path / "cache")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "each video needs at least 115 frames" in err[-2] and "clip0.mp4: 40 frames" in err[-2], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


def test_a_malformed_manifest_line_is_one_line(tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"path": "a.mp4", "caption": "ok"}\n{"path": "b.mp4", caption: no quotes}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs/tiny/teacher.yaml"), "--data.manifest", str(manifest),
              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()[-2:]
    assert lines[0].startswith(f"distill-pl fit: error: manifest {manifest}, line 2: invalid JSON"), lines


def test_an_os_error_about_a_file_is_one_line_wherever_it_is_raised(tmp_path, capsys):
    """A read-only folder met inside a library (here: raised outside distill_pl) is one line
    naming the path; an OSError about no file, raised outside distill_pl, keeps its traceback."""
    from distill_pl.cli.errors import run_with_short_errors

    folder = tmp_path / "read_only"

    def refused():
        raise PermissionError(13, "Permission denied", str(folder))

    with pytest.raises(SystemExit) as exit_:
        run_with_short_errors(refused, "distill-pl sample", debug=False)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == f"distill-pl sample: error: [Errno 13] Permission denied: '{folder}'"

    def bug():
        raise OSError("something broke")

    with pytest.raises(OSError, match="something broke"):
        run_with_short_errors(bug, "distill-pl sample", debug=False)
