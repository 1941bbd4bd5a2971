"""sha256_file remembers a file's hash per version, never across a change of its content."""

from __future__ import annotations

import hashlib
import os
import time

from collabcompress.files import hashing
from collabcompress.files.hashing import sha256_file


def _remembered(path) -> bool:
    return any(key[0] == str(path) for key in hashing._HASHES)


def test_a_rewritten_file_is_hashed_again_even_with_its_old_size_and_mtime(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert not _remembered(path)  # written just now: racy, not remembered
    time.sleep(0.2)
    assert sha256_file(path) == hashlib.sha256(b"a" * 1000).hexdigest() and _remembered(path)
    st = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; mtime set back as `cp -p` or `touch -r` would
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_file_replaced_by_rename_is_hashed_again(tmp_path):
    path, other = tmp_path / "w.bin", tmp_path / "other.bin"
    path.write_bytes(b"x" * 10)
    other.write_bytes(b"y" * 10)
    time.sleep(0.2)
    assert sha256_file(path) == hashlib.sha256(b"x" * 10).hexdigest() and _remembered(path)
    os.replace(other, path)
    assert sha256_file(path) == hashlib.sha256(b"y" * 10).hexdigest()
