"""File and folder fingerprints equal hashlib's digest of the bytes they are defined on."""

from __future__ import annotations

import hashlib

from distill_pl.util import hashing
from distill_pl.util.hashing import file_sha256, named_files_sha256


def test_fingerprints_are_the_digest_of_names_and_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "CHUNK", 3)  # several chunks per file
    a, b = tmp_path / "a.json", tmp_path / "b.safetensors"
    a.write_bytes(b"{\"x\": 1}")
    b.write_bytes(bytes(range(11)))
    assert file_sha256(b) == hashlib.sha256(bytes(range(11))).hexdigest()
    expected = hashlib.sha256(b"a.json\0{\"x\": 1}" + b"sub/b\0" + bytes(range(11))).hexdigest()
    assert named_files_sha256([("a.json", a), ("sub/b", b)]) == expected
    assert named_files_sha256([("sub/b", b), ("a.json", a)]) != expected  # the order counts
