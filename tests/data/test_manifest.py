import json
from pathlib import Path

import pytest

from distill_pl.data.manifest import ManifestEntry, read_manifest, write_manifest


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_relative_paths_resolve_against_manifest_folder(tmp_path, monkeypatch):
    manifest = write_lines(
        tmp_path / "sets" / "manifest.jsonl",
        [
            json.dumps({"path": "clips/a.mp4", "caption": "a dog"}),
            "",
            json.dumps({"path": "../b.mp4", "caption": "ünïcode"}),
            json.dumps({"path": "/abs/c.mp4", "caption": "abs"}),
        ],
    )
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    entries = read_manifest(manifest)
    assert entries == [
        ManifestEntry(tmp_path / "sets" / "clips" / "a.mp4", "a dog"),
        ManifestEntry(tmp_path / "b.mp4", "ünïcode"),
        ManifestEntry(Path("/abs/c.mp4"), "abs"),
    ]


def test_write_then_read_round_trip_with_relative_paths(tmp_path):
    entries = [
        ManifestEntry(tmp_path / "clips" / "a.mp4", "first"),
        ManifestEntry(tmp_path / "other" / "b.mp4", 'quote " and newline\n'),
    ]
    manifest = write_manifest(tmp_path / "out" / "manifest.jsonl", entries)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["path"] for r in records] == ["../clips/a.mp4", "../other/b.mp4"]
    assert read_manifest(manifest) == entries
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["manifest.jsonl"]  # no temp left


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        (['{"path": "a.mp4", "caption": "x"}', "", "{not json"], 3, "invalid JSON"),
        (['{"path": "a.mp4", "caption": "x"}', '{"path": "b.mp4"}'], 2, "'caption'"),
        (['{"caption": "x"}'], 1, "'path'"),
        (['["a.mp4", "x"]'], 1, "JSON object"),
        (['{"path": "", "caption": "x"}'], 1, "empty 'path'"),
    ],
)
def test_errors_name_file_and_line(tmp_path, lines, line_no, message):
    manifest = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)
    assert f"line {line_no}:" in str(err.value)


def test_empty_and_missing_manifest(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no entries") as err:
        read_manifest(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")
