"""The record ``collabcompress bench --json`` writes, and the check ``report --measured`` makes of it."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from .checkpoint import read_json
from .manifest import Manifest

__all__ = ["FORMAT", "LEVELS", "outputs_sha256", "read_measured"]

FORMAT = "collabcompress-bench/1"
LEVELS = ("module", "model")


def outputs_sha256(manifest: Any) -> str:
    """What names a compressed directory in a bench record: sha256 over the ``name sha256`` lines of
    every output file its manifest records (weights, config, ...), which ``open_output`` checks
    against the files themselves."""
    lines = sorted(f"{o.name} {o.sha256}\n" for o in manifest.outputs)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_measured(path: str | Path, directory: str | Path, manifest: Manifest) -> dict[str, Any]:
    """A ``bench --json`` record of ``directory``, validated (the fields ``report --measured`` reads).

    Raises:
        BadInputError: unreadable or not JSON, another format, another directory (its
            ``outputs_sha256`` differs from that of ``manifest``, the directory's), or a field of the
            wrong kind; one line naming the file.
    """
    data = read_json(Path(path), "bench record")
    where = f"--measured {path}"

    def fail(why: str) -> BadInputError:
        return BadInputError(f"{where}: {why}; give the --json file of `collabcompress bench ORIGINAL {directory}`")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f"not a bench record (format {FORMAT!r} expected)")
    if data.get("outputs_sha256") != outputs_sha256(manifest):
        raise fail(f"it measured another compressed directory (its outputs_sha256 is not {directory}'s)")
    if data.get("level") not in LEVELS:
        raise fail(f"level must be one of {', '.join(LEVELS)}")
    forward = data.get("forward")
    if not isinstance(forward, list) or not forward:
        raise fail("no forward measurements")
    for i, row in enumerate(forward):
        ratio = row.get("ratio") if isinstance(row, dict) else None
        if (not isinstance(ratio, dict) or not _positive_int(row.get("seq_len"))
                or not _positive_int(row.get("batch_size")) or not _number(ratio.get("median"))
                or not all(_number(ratio[k]) for k in ("q1", "q3") if k in ratio)):
            raise fail(f"forward[{i}] needs seq_len, batch_size (positive integers) and ratio.median (a number)")
    decode = data.get("decode")
    if decode is not None and (not isinstance(decode, dict)
                               or not all(_number(decode.get(k)) or decode.get(k) is None
                                          for k in ("context", "tokens_per_second_ratio", "key_cache_ratio",
                                                    "value_cache_ratio", "kv_cache_ratio"))):
        raise fail("decode must be null or hold numbers")
    if data.get("crossover") is not None and not isinstance(data["crossover"], dict):
        raise fail("crossover must be an object")
    return {**data, "file": str(path)}
