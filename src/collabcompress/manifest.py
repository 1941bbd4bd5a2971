"""Read and validate ``collab_manifest.json`` (SPEC.md section 4).

The manifest is untrusted input when it is read back (``verify``, ``report``, loading):
every key that is used is checked for presence and type, and failures become a
one-line :class:`BadInputError`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BadInputError
from .io import read_json

__all__ = ["load_manifest", "MANIFEST_NAME", "FORMAT", "LAYER_KEYS"]

MANIFEST_NAME = "collab_manifest.json"
FORMAT = "collabcompress/1"
TOP_KEYS = {"format": str, "tool": dict, "created_utc": str, "source": dict, "settings": dict, "layers": list,
            "totals": dict, "outputs": list}
LAYER_KEYS = {"module": str, "index": int, "heads": int, "head_dim": int, "d_model": int, "shared_dim": int,
              "scale": (int, float), "relative_error": (int, float), "energy_spectral": (int, float),
              "iterations": int, "seconds": (int, float), "tensors": dict, "removed": list}
TOTAL_KEYS = ("params_before", "params_after", "qk_params_before", "qk_params_after", "bytes_before", "bytes_after")


def _check(obj: dict[str, Any], keys: dict[str, Any], where: str, path: Path) -> None:
    for key, kind in keys.items():
        if key not in obj:
            raise BadInputError(f"manifest {path}: {where} has no {key!r}")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadInputError(f"manifest {path}: {where}.{key} has the wrong type ({type(value).__name__})")


def _optional(obj: dict[str, Any], key: str, kind: tuple[type, ...], where: str, path: Path) -> Any:
    """``obj[key]``, which may be absent or null, else must be of ``kind``."""
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise BadInputError(f"manifest {path}: {where}.{key} has the wrong type ({type(value).__name__})")
    return value


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and validate the manifest of a compressed output directory.

    Raises:
        BadInputError: no such directory, no manifest (not a compressed model), invalid JSON,
            another format, or a missing or mistyped key.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        exists, is_dir, is_file = directory.exists(), directory.is_dir(), path.is_file()
    except OSError as e:  # e.g. a name too long for the file system
        raise BadInputError(f"cannot open {str(directory)[:200]}: {e.strerror or e}") from e
    if not exists:
        raise BadInputError(f"not found: {directory}")
    if not is_dir:
        raise BadInputError(f"{directory} is not a directory; pass the output directory of `compress`")
    if not is_file:
        raise BadInputError(f"{directory} is not a model compressed by collabcompress (no {MANIFEST_NAME})")
    data = read_json(path, "manifest")
    if not isinstance(data, dict):
        raise BadInputError(f"manifest {path} is not a JSON object")
    if data.get("format") != FORMAT:
        raise BadInputError(f"manifest {path}: format {data.get('format')!r} is not {FORMAT!r}")
    _check(data, TOP_KEYS, "manifest", path)
    _check(data["source"], {"path": str, "files": list, "architecture": str}, "source", path)
    for i, f in enumerate(data["source"]["files"]):
        if not isinstance(f, dict):
            raise BadInputError(f"manifest {path}: source.files[{i}] is not an object")
        _check(f, {"name": str, "sha256": str, "bytes": int}, f"source.files[{i}]", path)
        name = PurePosixPath(f["name"])
        if not f["name"] or name.is_absolute() or ".." in name.parts:
            raise BadInputError(f"manifest {path}: source.files[{i}].name {f['name']!r} is not a file name "
                                "inside the source directory")
    _optional(data["source"], "dtype", (str,), "source", path)
    _optional(data["settings"], "arch", (str,), "settings", path)
    heads = _optional(data["settings"], "heads", (int,), "settings", path)
    if heads is not None and heads < 1:
        raise BadInputError(f"manifest {path}: settings.heads must be positive, got {heads}")
    if not data["layers"]:
        raise BadInputError(f"manifest {path} lists no compressed layers")
    for i, layer in enumerate(data["layers"]):
        if not isinstance(layer, dict):
            raise BadInputError(f"manifest {path}: layers[{i}] is not an object")
        _check(layer, LAYER_KEYS, f"layers[{i}]", path)
        for key in ("heads", "head_dim", "d_model", "shared_dim"):
            if layer[key] < 1:
                raise BadInputError(f"manifest {path}: layers[{i}].{key} must be positive")
        _check(layer["tensors"], {"query": str, "key": str, "mixing": str, "content_bias": str},
               f"layers[{i}].tensors", path)
        _optional(layer["tensors"], "value", (str,), f"layers[{i}].tensors", path)
        if not all(isinstance(n, str) for n in layer["removed"]):
            raise BadInputError(f"manifest {path}: layers[{i}].removed must be a list of tensor names")
    for key in TOTAL_KEYS:
        if not isinstance(data["totals"].get(key), int) or isinstance(data["totals"].get(key), bool):
            raise BadInputError(f"manifest {path}: totals.{key} is missing or not an integer")
    return data
