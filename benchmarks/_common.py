"""What the benchmark scripts share: where the real data is and how to run the CLI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def cache_dir() -> Path:
    """The package's data cache (:func:`collabcompress.texts.cache_dir`), imported lazily
    so that scripts which only time the CLI do not import torch themselves."""
    from collabcompress.texts import cache_dir as package_cache_dir

    return package_cache_dir()


def default_model() -> Path:
    """The real all-MiniLM-L6-v2 fetched by scripts/fetch_data.py."""
    return cache_dir() / "all-MiniLM-L6-v2"


def collabcompress_command() -> list[str]:
    """The console script beside this interpreter (as a user runs it), else ``python -m``."""
    script = Path(sys.executable).with_name("collabcompress")
    if script.is_file():
        return [str(script)]
    found = shutil.which("collabcompress")
    return [found] if found else [sys.executable, "-m", "collabcompress.cli"]
