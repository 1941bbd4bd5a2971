"""What every compression method provides (:class:`LayerMethod`) and what it returns (:class:`FittedLayer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..files.arch import AttentionSpec
from ..files.checkpoint import Checkpoint
from ..files.manifest import LayerRecord, LayerTensors
from ..options import CompressOptions

__all__ = ["FittedLayer", "LayerMethod", "allocation_record", "layer_record", "next_token_kl", "refine_record",
           "swapped_curve"]


@dataclass
class FittedLayer:
    """One compressed layer: its new tensors, the names it removes, and what the manifest records."""

    spec: AttentionSpec
    shared_dim: int
    relative_error: float  # of the fit, in its metric (the factors are not kept: 17 MB a Llama-3-8B layer)
    energy_spectral: float
    seconds: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    refined: Any = None  # the method's refinement result, or None
    plain_error: float = 0.0
    curve: dict[int, float] | None = None  # --budget: candidate R -> loss
    curve_loss: str = "attention_kl"  # what the curve measures (curve_loss)
    iterations: int = 0  # CP-ALS sweeps (0 for a rotary layer)
    values: Any = None  # shared values (collabcompress.methods.values.ValueFit), or None

    def add_values(self, fit: Any) -> None:
        """Take the layer's shared values: their tensors in, the value tensors out (a fused layer's
        value slice, written by the key method, is dropped)."""
        self.values = fit
        for name in fit.replaced:
            self.tensors.pop(name, None)
        self.tensors.update(fit.tensors)
        self.removed.extend(fit.removed)


class LayerMethod(Protocol):
    """One way of compressing an attention layer (a plug-in of ``compress``, ``analyze`` and the budget).

    ``compress`` asks the method of each layer (:func:`collabcompress.methods.method_for`) for its
    statistics, its fit, its loss curve and its manifest record; it never tests which method it is.
    """

    name: str
    causal_lm: bool  # its layers belong to a causal LM (the budget may measure the next-token KL)
    stock: bool  # `export --format stock` can write its layers as a stock multi-query layer
    # What its layers show in the tables (collabcompress.tables):
    width_label: str  # the original key width column ("H*d")
    needed: str  # what analyze's summary counts at each tau
    analysis_caption: str | None  # analyze's table caption
    analysis_columns: tuple[str, ...]  # analyze's columns after H (cells: analysis_cells)
    energy_plot: str  # analyze --plot: "query_key" (the cumulative energy of both sides) or "frequency"
    key_cache_text: str  # report: the key cache before and after

    def claims(self, layer: AttentionSpec | LayerRecord | dict[str, Any]) -> bool:
        """Whether ``layer`` (a spec, a manifest record, parsed or as JSON) is compressed by this method."""

    def analysis_fields(self, spectrum: Any) -> dict[str, Any]:
        """What the layer's ``analyze --json`` record adds after ``heads`` (its :meth:`spectrum`'s figures)."""

    def analysis_cells(self, spec: AttentionSpec) -> tuple[str, ...]:
        """The layer's cells of :attr:`analysis_columns`."""

    def key_width(self, rec: dict[str, Any]) -> int:
        """The original key width of a layer's manifest or report record (the :attr:`width_label` column)."""

    def sweeps(self, rec: dict[str, Any]) -> str:
        """compress's "sweeps" cell of a layer's manifest record."""

    def compress_notes(self, manifest: dict[str, Any]) -> list[str]:
        """Lines printed under the compress table."""

    def report_caption(self, key_cache: str) -> str:
        """What the report's key/query table caption adds (``key_cache``: the key cache at each N)."""

    def full_width(self, spec: AttentionSpec) -> int:
        """The layer's original key width (H*d; a rotary layer's key cache G*d): the top of its rank ladder."""

    def memory(self, spec: AttentionSpec, calibrated: bool) -> tuple[int, int]:
        """float64 bytes (while the layer's fit or analysis runs, held for the whole run)."""

    def spectrum(self, ckpt: Checkpoint, spec: AttentionSpec) -> Any:
        """The layer's redundancy analysis (``analyze``), read like a :class:`~collabcompress.maths.spectra.LayerSpectrum`."""

    def check_rank(self, spec: AttentionSpec, rank: int) -> None:
        """Refuse a ``--rank`` the layer cannot take (BadInputError naming the layer)."""

    def load_statistics(self, path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> dict[str, Any]:
        """module -> the calibration statistics its fit uses, read from the statistics file ``path``."""

    def fit(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
            stats: Any, sequences: tuple[torch.Tensor, torch.Tensor] | None,
            shared_dim: int | None = None) -> FittedLayer:
        """The compressed layer (``shared_dim`` overrides the rank options: the budget's allocation)."""

    def loss_curve(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, stats: Any,
                   sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
        """Candidate width R -> attention KL on the kept sequences (the budget allocates by it)."""

    def record(self, layer: FittedLayer) -> LayerRecord:
        """The manifest's record of the layer."""

    def config_entry(self, layer: FittedLayer) -> dict[str, Any]:
        """The layer's entry in config.json's ``collaborative_attention`` block."""

    def qk_params_after(self, layer: FittedLayer, ckpt: Checkpoint) -> int:
        """Key/query parameters of the compressed layer."""

    def scores(self, directory: Path, out: Checkpoint, layer: LayerRecord, spec: AttentionSpec, qk: Any,
               x: torch.Tensor, config: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(original, compressed) attention scores of the layer on the probe ``x`` (``verify``)."""

    def layer_cost(self, directory: Path, rec: dict[str, Any], out: Checkpoint, qk_before: dict[str, int]) -> Any:
        """The layer's costs (``report``), from a manifest record whose tensors are checked here."""

    def output_module(self, out: Checkpoint, layer: LayerRecord, spec: AttentionSpec) -> torch.nn.Module:
        """The layer's query/key side as a torch module, from the output's tensors (float32, eval)."""

    def runtime_module(self, old: torch.nn.Module, layer: LayerRecord, module_name: str, family: Any) -> torch.nn.Module:
        """The transformers attention module ``old`` running the compressed layer (``hf``)."""

    def query_statistic(self, spec: AttentionSpec) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
        """What ``calibrate`` sums over the tokens of the layer's query outputs: (zeros, the term of
        the query outputs (n, H*d)); ``None``: nothing."""

    def value_projection(self, ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The layer's value weight and bias as ``bench`` runs them (float32), or ``None`` when not stored."""

    def position_embeddings(self, config: dict[str, Any] | None, head_dim: int, seq_len: int, dtype: torch.dtype,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (cos, sin) position embeddings ``bench`` passes to the layer, or ``None``."""


def swapped_curve(module: torch.nn.Module, full: int, ladder: list[int],
                  projection: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
                  loss: Callable[[], float]) -> dict[int, float]:
    """Width -> ``loss()`` with the Linear ``module``'s weight (and bias) replaced by
    ``projection(width)``, for each width of ``ladder`` below ``full`` (``full`` is the original:
    0); the module's tensors are put back afterwards (a budget's loss curve of one layer)."""
    weight = module.weight.detach().clone()
    bias = None if module.bias is None else module.bias.detach().clone()
    curve = {full: 0.0}
    try:
        for r in ladder:
            if r == full:
                continue
            w_hat, b_hat = projection(r)
            module.weight.copy_(w_hat)
            if bias is not None:
                module.bias.copy_(b_hat)
            curve[r] = loss()
    finally:
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return dict(sorted(curve.items()))


def next_token_kl(target: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over tokens of KL(original || model) from log-probabilities (..., V)."""
    return float((target.exp() * (target - log_probs)).sum(-1).mean())


def refine_record(layer: FittedLayer) -> dict[str, Any] | None:
    r = layer.refined
    return None if r is None else {"steps": r.steps, "kl_before": round(r.kl_before, 8),
                                   "kl_after": round(r.kl_after, 8)}


def allocation_record(layer: FittedLayer) -> dict[str, Any] | None:
    """``--budget``: the measured loss curve (key cache R -> loss) and the loss at the chosen R."""
    if layer.curve is None:
        return None
    return {"loss": layer.curve_loss, "losses": {str(r): round(v, 8) for r, v in sorted(layer.curve.items())},
            "chosen_loss": round(layer.curve[layer.shared_dim], 8)}


def layer_record(layer: FittedLayer, tensors: LayerTensors, **method_fields: Any) -> LayerRecord:
    """The manifest record of ``layer``: the fields every method writes, plus ``method_fields``
    (``iterations``, ``fused``, and a rotary layer's ``kv_heads`` and ``rotary``)."""
    spec = layer.spec
    return LayerRecord(
        module=spec.module, index=spec.index, heads=spec.n_head, head_dim=spec.head_dim,
        d_model=spec.d_model, shared_dim=layer.shared_dim, scale=spec.scale,
        relative_error=round(layer.relative_error, 8), relative_error_plain=round(layer.plain_error, 8),
        energy_spectral=round(layer.energy_spectral, 8), seconds=round(layer.seconds, 4), tensors=tensors,
        removed=tuple(layer.removed), family=spec.family, query_bias=spec.query_bias is not None,
        key_bias=spec.key_bias is not None, refine=refine_record(layer), allocation=allocation_record(layer),
        value_rank=None if layer.values is None else layer.values.rank,
        value=None if layer.values is None else layer.values.record(), **method_fields)
