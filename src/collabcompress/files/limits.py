"""What this machine allows: free memory and usable cores, checked before anything large is allocated.

Every command that would build matrices whose size the input decides (D x D Gram matrices,
calibration accumulators, attention scores) first asks :func:`check_memory` with its figure,
so a checkpoint that claims d_model = 10**6 is refused with exit 3 and both figures instead of
dying in the allocator or being killed by the kernel. No torch here: the CLI imports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ..errors import BadInputError

__all__ = ["available_memory", "check_memory", "usable_cores", "spectra_bytes", "forward_bytes"]

_MEMINFO = "/proc/meminfo"


def available_memory(device: str = "cpu") -> int | None:
    """Bytes of memory that can still be allocated without swapping: ``MemAvailable`` of
    /proc/meminfo, else the free pages (``os.sysconf``); on ``"cuda"`` the GPU's free memory.
    ``None`` when unknown."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        with open(_MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"


def check_memory(needed: int, what: str, device: str = "cpu") -> None:
    """Refuse (exit 3) work whose largest allocations, ``needed`` bytes, exceed the memory
    available on ``device`` (``"cpu"`` or ``"cuda"``), before they are made.

    ``what`` names them, e.g. ``"the D x D matrices of 2 layers at a time (d_model 1,000,000)"``.

    Raises:
        BadInputError: ``needed`` is more than :func:`available_memory` (no check when that is unknown).
    """
    free = available_memory(device)
    if free is not None and needed > free:
        where = " of GPU memory" if device == "cuda" else " of memory"
        raise BadInputError(f"{what} need about {_size(needed)}{where}; {_size(free)} is available")


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity mask, else ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def spectra_bytes(figures: Iterable[tuple[int, int]], d_model: int, workers: int) -> tuple[int, str]:
    """The float64 working memory of ``analyze`` and ``compress``, and what it is, for :func:`check_memory`.

    ``figures``: per layer, (bytes while its fit runs, bytes held for the whole run), as each
    layer's method gives them (:meth:`collabcompress.methods.base.LayerMethod.memory`); ``workers``
    layers run at a time.
    """
    figures = list(figures)
    if not figures:
        return 0, "nothing"
    at_once = max(1, min(workers, len(figures)))
    needed = sum(sorted((running for running, _ in figures), reverse=True)[:at_once]) + sum(h for _, h in figures)
    layers = f"{at_once} layer{'s' if at_once > 1 else ''} at a time"
    return needed, f"the D x D matrices of {layers} (d_model {d_model:,})"


def forward_bytes(layers: Iterable[Any], batch: int, seq_len: int, *, vocab: int = 0, element: int = 4) -> int:
    """The largest activations of one forward pass over ``batch`` sequences of ``seq_len``
    tokens: the attention scores (B, H, N, N), queries, keys, values and outputs of the widest
    of ``layers`` (records with ``heads``, ``head_dim`` and ``d_model``: a manifest's), the
    hidden states, and the logits (B, N, V) of a language model head of ``vocab`` tokens."""
    layers = list(layers)
    heads = max(la.heads for la in layers)
    width = max(la.heads * la.head_dim for la in layers)
    d_model = max(la.d_model for la in layers)
    return element * batch * seq_len * (heads * seq_len + 4 * width + 4 * d_model + vocab)
