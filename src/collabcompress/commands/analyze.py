"""The ``analyze`` pipeline: read a checkpoint, find its attention layers, measure their spectra.

Each command's pipeline lives in the module named for it (``compress.py``, ``verify.py``,
``calibration.py``, ``evaluate.py``, ``report.py``); this one is ``analyze``'s, kept under
the name ``pipeline`` that Python users and tests import. It returns a plain record
(``to_dict`` gives the JSON of docs/json.md) and never prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..maths.spectra import LayerSpectrum
from ..files.arch import AttentionSpec, detect
from ..defaults import DEFAULT_ENERGIES
from ..errors import BadInputError, UnsupportedArchitectureError
from ..files.checkpoint import open_checkpoint
from ..files.limits import check_memory, spectra_bytes
from ..methods import method_for
from ..methods.rotary import RotarySpectrum
from ..methods.values import VALUES
from ..parallel import default_workers, map_layers

__all__ = ["AnalysisResult", "LayerAnalysis", "RotarySpectrum", "analyze", "DEFAULT_ENERGIES", "check_energy"]

Progress = Callable[[str, int, int], None]  # (module, done, total)


def check_energy(tau: float, option: str = "--energy") -> float:
    if not (0.0 < tau <= 1.0):
        raise BadInputError(f"{option} must be in (0, 1], got {tau}")
    return tau


def _key(tau: float) -> str:
    """JSON key of a threshold: "0.95", and no two different thresholds share one."""
    short = f"{tau:g}"
    return short if float(short) == tau else repr(float(tau))


@dataclass(frozen=True)
class LayerAnalysis:
    spec: AttentionSpec
    spectrum: LayerSpectrum | RotarySpectrum
    loss_curve: dict[int, float] | None = None  # with calibration: key cache R -> loss (--budget's curve)
    curve_loss: str | None = None  # what loss_curve measures (compress.curve_loss)
    value_sv: torch.Tensor | None = None  # the data-free value spectrum (shared values), None: no separate values

    @property
    def value_width(self) -> int:
        """G*d, the layer's value cache per token (0 without a value spectrum)."""
        return VALUES.full_width(self.spec) if self.value_sv is not None else 0

    def value_rank_at(self, tau: float) -> int:
        """The value latent width r_v that keeps ``tau`` of the value energy."""
        from ..maths.values import value_rank_at

        return value_rank_at(self.value_sv, tau)

    def to_dict(self, energies: Sequence[float]) -> dict[str, Any]:
        sp = self.spectrum
        method_fields = method_for(self.spec).analysis_fields(sp)
        return {
            "module": self.spec.module,
            "index": self.spec.index,
            "heads": sp.n_head,
            **method_fields,
            "head_dim": sp.head_dim,
            "d_model": sp.d_model,
            "energy_query": [round(float(e), 8) for e in sp.energy_query],
            "energy_key": [round(float(e), 8) for e in sp.energy_key],
            "rank_at": {_key(t): sp.rank_at(t) for t in energies},
            "rank_at_query": {_key(t): sp.rank_at_sides(t)[0] for t in energies},
            "rank_at_key": {_key(t): sp.rank_at_sides(t)[1] for t in energies},
            "redundancy": {_key(t): round(sp.redundancy(t), 6) for t in energies},
            "head_effective_rank": {_key(t): sp.head_effective_rank(t) for t in energies},
            **({"loss_curve": {str(r): round(v, 8) for r, v in sorted(self.loss_curve.items())},
                "curve_loss": self.curve_loss} if self.loss_curve is not None else {}),
            **(self._value_fields(energies) if self.value_sv is not None else {}),
        }

    def _value_fields(self, energies: Sequence[float]) -> dict[str, Any]:
        from ..maths.spectra import cumulative_energy

        return {"value_energy": [round(float(e), 8) for e in cumulative_energy(self.value_sv)],
                "value_rank_at": {_key(t): self.value_rank_at(t) for t in energies}}


@dataclass(frozen=True)
class AnalysisResult:
    checkpoint: str
    architecture: str
    layers: tuple[LayerAnalysis, ...]
    energies: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        width = sum(la.spectrum.width for la in self.layers)
        needed = {_key(t): sum(la.spectrum.rank_at(t) for la in self.layers) for t in self.energies}
        valued = [la for la in self.layers if la.value_sv is not None]
        values = {}
        if valued:
            values = {"value_layers": len(valued), "total_value_width": sum(la.value_width for la in valued),
                      "total_value_rank_at": {_key(t): sum(la.value_rank_at(t) for la in valued)
                                              for t in self.energies}}
        return {
            "layers": len(self.layers),
            "total_width": width,
            "total_rank_at": needed,
            "redundancy": {k: round(1.0 - v / width, 6) for k, v in needed.items()},
            **values,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "architecture": self.architecture,
            "energies": list(self.energies),
            "layers": [la.to_dict(self.energies) for la in self.layers],
            "summary": self.summary(),
        }


def _value_spectrum(ckpt, spec: AttentionSpec) -> torch.Tensor | None:
    """The layer's data-free value spectrum, or ``None`` when its values share a fused tensor with
    queries and keys, or the checkpoint lacks a value or output tensor that fits (the key
    analysis does not need them)."""
    try:
        return VALUES.spectrum(ckpt, spec)
    except (UnsupportedArchitectureError, BadInputError):
        return None


def analyze(checkpoint: str | Path, *, heads: int | None = None, arch: str | None = None,
            energies: Sequence[float] = DEFAULT_ENERGIES, workers: int | None = None,
            progress: Progress | None = None, kv_heads: int | None = None,
            calibration: str | Path | None = None) -> AnalysisResult:
    """Spectral redundancy of every attention layer of a checkpoint (docs/method.md).

    Reads only the query/key tensors of the layers being analysed; ``workers`` layers run
    side by side (default: the usable CPU cores). Rotary layers get a :class:`RotarySpectrum`
    (per-frequency weighted singular values, data-free weights; ranks are key caches R).
    A layer whose values have their own tensor also gets the data-free value spectrum (of the
    concatenated W_O,h W_V,h, what ``--value-rank`` truncates; its value and output tensors are read).
    """
    energies = tuple(check_energy(t) for t in energies)
    ckpt = open_checkpoint(checkpoint)
    specs = detect(ckpt, heads=heads, arch=arch, kv_heads=kv_heads)
    check_memory(*spectra_bytes([method_for(s).memory(s, calibration is not None) for s in specs],
                                max((s.d_model for s in specs), default=0),
                                default_workers() if workers is None else workers))

    def one(spec: AttentionSpec) -> LayerAnalysis:
        return LayerAnalysis(spec, method_for(spec).spectrum(ckpt, spec), value_sv=_value_spectrum(ckpt, spec))

    step = (lambda spec, done, total: progress(spec.module, done, total)) if progress else None
    layers = map_layers(one, specs, workers=workers, progress=step)
    if calibration is not None:
        from dataclasses import replace

        from .compress import loss_curves

        loss, curves = loss_curves(ckpt, specs, Path(calibration), workers=workers or 1)
        layers = [replace(la, loss_curve=c, curve_loss=loss) for la, c in zip(layers, curves)]
    return AnalysisResult(str(checkpoint), specs[0].family, tuple(layers), energies)
