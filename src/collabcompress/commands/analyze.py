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

from ..maths.spectra import LayerSpectrum, layer_spectrum
from ..files.arch import AttentionSpec, detect, load_query_key
from ..defaults import DEFAULT_ENERGIES
from ..errors import BadInputError
from ..files.checkpoint import open_checkpoint
from ..files.limits import check_memory, spectra_bytes
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
class RotarySpectrum:
    """The analysis of a rotary layer (docs/method.md), read like a
    :class:`LayerSpectrum`: ``width`` is the original key cache G*d, a "rank" is a key cache R
    in reals per token (even), and the energy curves are the cumulative energy over the
    components ranked by squared weighted singular value across frequencies (entry i: a key
    cache of 2*(i+1)); the query and key curves are the same curve.

    Attributes:
        n_head, n_kv_head, head_dim, d_model: H, G, d, D.
        sv: ``(head_dim/2, n_kv_head)`` per-frequency singular values of diag(w_j) B_j with
            the data-free query-energy weights (:func:`collabcompress.maths.rotary.rotary_spectrum`).
        group_energy: ``(head_dim/2, n_kv_head)`` each group's own weighted key energy
            ``w_{g,j}^2 ||b_{g,j}||^2`` per frequency.
    """

    n_head: int
    n_kv_head: int
    head_dim: int
    d_model: int
    sv: torch.Tensor  # (d/2, G)
    group_energy: torch.Tensor  # (d/2, G)

    @property
    def width(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def energy_query(self) -> torch.Tensor:
        from ..maths.rotary import rotary_energy

        return rotary_energy(self.sv)  # (G*d/2,)

    energy_key = energy_query

    @property
    def sv_query(self) -> torch.Tensor:
        return self.sv.flatten().sort(descending=True).values  # (G*d/2,)

    def rank_at(self, tau: float) -> int:
        from ..maths.rotary import key_cache_at

        return key_cache_at(self.sv, tau)

    def rank_at_sides(self, tau: float) -> tuple[int, int]:
        return self.rank_at(tau), self.rank_at(tau)

    def redundancy(self, tau: float) -> float:
        return 1.0 - self.rank_at(tau) / self.width

    def head_effective_rank(self, tau: float) -> list[int]:
        """Per key/value group g: the reals per token (2 per frequency) that keep ``tau`` of its
        own weighted key energy, taking its strongest frequencies first."""
        from ..maths.rotary import key_cache_at

        return [key_cache_at(g[:, None], tau) for g in self.group_energy.sqrt().T]

    def frequency_energy(self) -> torch.Tensor:
        from ..maths.rotary import frequency_energy

        return frequency_energy(self.sv)  # (d/2, G)


def _rotary_analysis(qk: Any, spec: AttentionSpec) -> RotarySpectrum:
    from ..maths.rotary import group_weights, query_energy, rotary_pairs, rotary_spectrum

    weights = group_weights(query_energy(qk.w_query, qk.b_query, spec.n_head, spec.head_dim), spec.n_kv_head)
    sv = rotary_spectrum(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, weights)  # (d/2, G)
    rows = qk.w_key if qk.b_key is None else torch.cat([qk.w_key, qk.b_key[:, None]], dim=1)  # (G*d, D')
    keys = rotary_pairs(rows, spec.n_kv_head, spec.head_dim)  # (G, d/2, D')
    group_energy = (weights * keys.abs().square().sum(-1)).T  # (d/2, G)
    return RotarySpectrum(spec.n_head, spec.n_kv_head, spec.head_dim, spec.d_model, sv, group_energy)


@dataclass(frozen=True)
class LayerAnalysis:
    spec: AttentionSpec
    spectrum: LayerSpectrum | RotarySpectrum
    loss_curve: dict[int, float] | None = None  # with calibration: key cache R -> loss (--budget's curve)
    curve_loss: str | None = None  # what loss_curve measures (compress.curve_loss)

    def to_dict(self, energies: Sequence[float]) -> dict[str, Any]:
        sp = self.spectrum
        rotary = {}
        if isinstance(sp, RotarySpectrum):
            rotary = {"kv_heads": sp.n_kv_head, "rotary": True,
                      "frequency_energy": [[round(float(e), 8) for e in row] for row in sp.frequency_energy()]}
        return {
            "module": self.spec.module,
            "index": self.spec.index,
            "heads": sp.n_head,
            **rotary,
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
        }


@dataclass(frozen=True)
class AnalysisResult:
    checkpoint: str
    architecture: str
    layers: tuple[LayerAnalysis, ...]
    energies: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        width = sum(la.spectrum.width for la in self.layers)
        needed = {_key(t): sum(la.spectrum.rank_at(t) for la in self.layers) for t in self.energies}
        return {
            "layers": len(self.layers),
            "total_width": width,
            "total_rank_at": needed,
            "redundancy": {k: round(1.0 - v / width, 6) for k, v in needed.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "architecture": self.architecture,
            "energies": list(self.energies),
            "layers": [la.to_dict(self.energies) for la in self.layers],
            "summary": self.summary(),
        }


def analyze(checkpoint: str | Path, *, heads: int | None = None, arch: str | None = None,
            energies: Sequence[float] = DEFAULT_ENERGIES, workers: int | None = None,
            progress: Progress | None = None, kv_heads: int | None = None,
            calibration: str | Path | None = None) -> AnalysisResult:
    """Spectral redundancy of every attention layer of a checkpoint (docs/method.md).

    Reads only the query/key tensors of the layers being analysed; ``workers`` layers run
    side by side (default: the usable CPU cores). Rotary layers get a :class:`RotarySpectrum`
    (per-frequency weighted singular values, data-free weights; ranks are key caches R).
    """
    energies = tuple(check_energy(t) for t in energies)
    ckpt = open_checkpoint(checkpoint)
    specs = detect(ckpt, heads=heads, arch=arch, kv_heads=kv_heads)
    check_memory(*spectra_bytes(specs, default_workers() if workers is None else workers,
                                calibrated=calibration is not None))

    def one(spec: AttentionSpec) -> LayerAnalysis:
        qk = load_query_key(ckpt, spec)
        if spec.rotary:
            return LayerAnalysis(spec, _rotary_analysis(qk, spec))
        return LayerAnalysis(spec, layer_spectrum(qk.w_query, qk.w_key, spec.n_head))

    step = (lambda spec, done, total: progress(spec.module, done, total)) if progress else None
    layers = map_layers(one, specs, workers=workers, progress=step)
    if calibration is not None:
        from dataclasses import replace

        from .compress import loss_curves

        loss, curves = loss_curves(ckpt, specs, Path(calibration), workers=workers or 1)
        layers = [replace(la, loss_curve=c, curve_loss=loss) for la, c in zip(layers, curves)]
    return AnalysisResult(str(checkpoint), specs[0].family, tuple(layers), energies)
