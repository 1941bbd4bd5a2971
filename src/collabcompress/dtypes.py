"""The one dtype map: safetensors dtype strings, torch dtypes, user-facing names, element sizes.

Safetensors headers name dtypes ``"F32"``, ``"BF16"``...; the CLI, the manifest and the
report use torch's names (``"float32"``, ``"bfloat16"``). Torch dtypes are looked up by
name only when asked for, so this module imports without torch (the CLI uses it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FLOATS", "OUTPUT_NAMES", "COMPUTE_NAMES", "ELEMENT_SIZE", "dtype_name", "st_name", "to_torch", "compute_dtype"]

# safetensors dtype -> (torch attribute name, bytes per element)
_TABLE = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
_ST_BY_NAME = {name: st for st, (name, _) in _TABLE.items()}

FLOATS = frozenset({"F32", "F16", "BF16", "F64"})  # safetensors dtypes of weights the tool decomposes
OUTPUT_NAMES = ("float32", "float16", "bfloat16")  # choices of ``compress --dtype`` (besides "auto")
COMPUTE_NAMES = ("float32", "bfloat16")  # choices of ``compress --heal-dtype`` (besides "auto")
# bytes per element, by safetensors dtype and by name
ELEMENT_SIZE = {**{st: size for st, (_, size) in _TABLE.items()}, **{name: size for name, size in _TABLE.values()}}


def dtype_name(st_dtype: str) -> str:
    """``"F32"`` -> ``"float32"``; a dtype string this map does not know is returned as it is."""
    entry = _TABLE.get(st_dtype)
    return entry[0] if entry else st_dtype


def st_name(dtype: Any) -> str | None:
    """The safetensors dtype string of a torch dtype (or of its name), ``None`` when it has none."""
    return _ST_BY_NAME.get(str(dtype).removeprefix("torch."))


def to_torch(dtype: str) -> Any:
    """The torch dtype of a safetensors dtype string or a name (``"F32"``, ``"float32"``), or
    ``None`` when unknown or not in this torch build."""
    name = _TABLE[dtype][0] if dtype in _TABLE else dtype if dtype in _ST_BY_NAME else None
    if name is None:
        return None
    import torch

    return getattr(torch, name, None)


def compute_dtype(name: str) -> str:
    """The arithmetic of a training loop on the CPU: ``name`` itself, or for ``"auto"``
    ``"bfloat16"`` where the CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX) and
    ``"float32"`` elsewhere (emulated bfloat16 is slower than float32)."""
    if name != "auto":
        return name
    import torch

    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bfloat16" if any(bool(probe()) for probe in probes if probe is not None) else "float32"
