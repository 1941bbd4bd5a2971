"""sha256 of files, remembered per file version (imports no torch: the CLI's light commands use it)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: Path) -> str:
    """The file's sha256, hex.

    Remembered per file version, so checking a model's weights several times in one process
    reads them once: the key is the file's device, inode, size, mtime and ctime, and any write
    sets ctime (which no user can set back). As git does for racily clean files, a hash is only
    remembered when the file's ctime lies well before the hashing began, so a write in the
    same clock tick as an earlier one still changes the key.
    """
    st = path.stat()
    version = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _HASHES.get(version)
    if digest is None:
        began = time.time_ns()
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        digest = h.hexdigest()
        if st.st_ctime_ns < began - _RACY_NS:
            if len(_HASHES) >= 256:
                _HASHES.pop(next(iter(_HASHES)))
            _HASHES[version] = digest
    return digest


_HASHES: dict[tuple, str] = {}  # file version -> sha256 (sha256_file)
_RACY_NS = 100_000_000  # 0.1 s, many file-system clock ticks
