"""What the collaborative re-parametrization saved: parameters, bytes, FLOPs, key cache.

Reads a ``compress`` output directory: its manifest, the tensor headers of its weights
and, when it is still where ``source.path`` says and unchanged (sha256 of the weight
files), the source checkpoint's headers. When the source is gone or changed, the
"before" figures come from the manifest (``totals.params_before``, ``source.files``
bytes, per-layer shapes and bias flags) and from the output's unchanged tensors, and the
report says so. No tensor data is read; headers are enough.

Counting rules (SPEC.md section 5; per token, sequence length N, multiply-add = 2 FLOPs):

* key/query side, per compressed layer (D = d_model, H = heads, d = head_dim, R = shared_dim):
  ``qk_params_before = 2*D*H*d`` (+ the query/key bias elements that exist),
  ``qk_params_after = 2*D*R + H*R + H*D``;
  ``proj_flops_before = 4*D*H*d``, ``proj_flops_after = 4*D*R + 2*D*H + H*R``;
  ``score_flops_before = 2*N*H*d``, ``score_flops_after = 2*N*H*R``. The content bias
  c_h . y is computed once per key token (the ``2*D*H`` term of the projection); adding
  it to the scores is an addition of a bias and, like every bias, not counted.
* crossover ``N* = (proj_before - proj_after) / (2*H*(R - d))`` for R > d: above N*
  the compressed layer costs more; for R <= d there is none (``null``).
* whole model: every 2-D weight used as a Linear / Conv1D does ``2*in*out`` FLOPs per
  token, counted from the tensor shapes; embedding and position tables (names holding
  ``embed``, ``position`` or ``relative_attention_bias``, or the modules ``wte``, ``wpe``,
  ``shared``), norms, biases and tensors of other ranks (e.g. convolutions) are not
  counted. Every attention layer (compressed or not) adds scores ``2*N*H*d`` (or
  ``2*N*H*R`` when compressed) and value mixing ``2*N*H*d``. A full, bidirectional
  attention over N tokens is assumed (a causal decoder averages about N/2). A block whose
  weights are shared across layers (ALBERT) is counted once.
* key cache per token and layer: ``H*d`` elements before, ``R + H`` after (V^T y and the
  H content-bias terms c_h . y); bytes by the dtype of the key tensors.
* bytes on disk: *weights* = the safetensors files (and sharded index); *files* = before,
  every source file that ``compress`` read or copied (weights, index, config.json and the
  other files it copied, e.g. the tokenizer); after, every file of the output directory,
  ``collab_manifest.json`` included.

JSON (``report --json``): every figure of the tables, units in the key names
(``params``: parameter count, ``bytes``, ``flops_per_token``, ``elements_per_token``,
``bytes_per_token``, ``seq_len``: tokens; ``*_saved_fraction``: (before - after) / before,
negative when the compressed model needs more)::

    {"format": "collabcompress-report/1", "directory": str,
     "source": {"path": str, "used": bool, "note": str | null, "architecture": str,
                "dtype_before": str, "dtype_after": str},
     "seq_lens": [int, ...],
     "layers": [{"module": str, "index": int, "heads": int, "head_dim": int, "d_model": int,
                 "shared_dim": int, "relative_error": float,
                 "qk_params_before": int, "qk_params_after": int, "qk_params_saved_fraction": float,
                 "qk_proj_flops_per_token_before": int, "qk_proj_flops_per_token_after": int,
                 "crossover_seq_len": float | null,
                 "key_cache_elements_per_token_before": int, "key_cache_elements_per_token_after": int,
                 "key_cache_bytes_per_token_before": int, "key_cache_bytes_per_token_after": int,
                 "at_seq_len": {"128": {"qk_score_flops_per_token_before": int,
                                        "qk_score_flops_per_token_after": int,
                                        "qk_flops_per_token_before": int, "qk_flops_per_token_after": int,
                                        "qk_flops_saved_fraction": float, "costs_more": bool}}}],
     "qk_total": {the same keys summed over the compressed layers, without the per-layer identity keys;
                  "layers": int},
     "model": {"params_before": int, "params_after": int, "params_saved_fraction": float,
               "weights_bytes_before": int, "weights_bytes_after": int, "weights_bytes_saved_fraction": float,
               "files_bytes_before": int, "files_bytes_after": int, "files_bytes_saved_fraction": float,
               "files_before": [{"name": str, "bytes": int}], "files_after": [{"name": str, "bytes": int}],
               "attention_layers": int, "compressed_layers": int,
               "matmul_flops_per_token_before": int, "matmul_flops_per_token_after": int,
               "crossover_seq_len": float | null,
               "key_cache_elements_per_token_before": int, "key_cache_elements_per_token_after": int,
               "key_cache_bytes_per_token_before": int, "key_cache_bytes_per_token_after": int,
               "at_seq_len": {"128": {"attention_flops_per_token_before": int,
                                      "attention_flops_per_token_after": int,
                                      "flops_per_token_before": int, "flops_per_token_after": int,
                                      "flops_saved_fraction": float, "costs_more": bool}}},
     "notes": [str, ...]}

``matmul_flops_per_token_*`` is the part that does not depend on N (every Linear, the
key/query projections included); ``attention_flops_per_token_*`` the part that does
(scores and value mixing); ``flops_per_token_*`` their sum. ``notes`` holds the plain
sentences of the report, among them one whenever the compressed key/query side or the
compressed model costs more FLOPs at a requested length.

Reference: Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of
Concatenate", arXiv 2006.16362.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from .arch import FAMILIES, detect
from .errors import BadInputError
from .io import INDEX_SUFFIX, Checkpoint, open_checkpoint
from .manifest import MANIFEST_NAME, Manifest, check_source, open_output

__all__ = [
    "build_report", "Report", "LayerCost", "DEFAULT_SEQ_LEN", "FORMAT",
    "qk_params", "projection_flops", "score_flops", "value_flops", "key_cache_elements", "crossover_seq_len",
    "matmul_flops", "report_tables", "plot_flops",
]

FORMAT = "collabcompress-report/1"
DEFAULT_SEQ_LEN = 128
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Tables looked up by index (gathers), not multiplied: no matmul FLOPs.
_TABLE = re.compile(r"embed|position|relative_attention_bias|(?:^|\.)(?:wte|wpe|shared)(?:\.|$)")


# ---- SPEC section 5, one attention layer; shared_dim None = the original layer -------------

def qk_params(d_model: int, n_head: int, head_dim: int, shared_dim: int | None = None, *,
              bias_elements: int = 0) -> int:
    """Key/query parameters: ``2*D*H*d`` (+ biases) before, ``2*D*R + H*R + H*D`` after."""
    if shared_dim is None:
        return 2 * d_model * n_head * head_dim + bias_elements
    return 2 * d_model * shared_dim + n_head * shared_dim + n_head * d_model


def projection_flops(d_model: int, n_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Key/query projection FLOPs per token: ``4*D*H*d`` before, ``4*D*R + 2*D*H + H*R`` after."""
    if shared_dim is None:
        return 4 * d_model * n_head * head_dim
    return 4 * d_model * shared_dim + 2 * d_model * n_head + n_head * shared_dim


def score_flops(seq_len: int, n_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Attention-score FLOPs per query token against ``seq_len`` keys: ``2*N*H*d`` or ``2*N*H*R``."""
    return 2 * seq_len * n_head * (head_dim if shared_dim is None else shared_dim)


def value_flops(seq_len: int, n_head: int, head_dim: int) -> int:
    """Value-mixing FLOPs per token, ``2*N*H*d`` (unchanged by the compression)."""
    return 2 * seq_len * n_head * head_dim


def key_cache_elements(n_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Key-cache elements per token: ``H*d`` before, ``R + H`` after (V^T y and c_h . y)."""
    return n_head * head_dim if shared_dim is None else shared_dim + n_head


def crossover_seq_len(d_model: int, n_head: int, head_dim: int, shared_dim: int) -> float | None:
    """``N* = (proj_before - proj_after) / (2*H*(R - d))`` for R > d, else ``None``.

    Above N* the compressed layer costs more FLOPs per token than the original; a value
    <= 0 means it costs more at every length.
    """
    if shared_dim <= head_dim:
        return None
    saved = projection_flops(d_model, n_head, head_dim) - projection_flops(d_model, n_head, head_dim, shared_dim)
    return saved / (2 * n_head * (shared_dim - head_dim))


def matmul_flops(name: str, shape: Sequence[int]) -> int:
    """FLOPs per token of a tensor used as a Linear / Conv1D weight: ``2*in*out`` for a 2-D
    weight; 0 for embedding and position tables, norms, biases and other ranks."""
    if len(shape) != 2 or _TABLE.search(name):
        return 0
    return 2 * shape[0] * shape[1]


@dataclass(frozen=True)
class LayerCost:
    """One attention layer and its SPEC section 5 figures.

    ``shared_dim`` is ``None`` for a layer that was not compressed (its figures are the
    same before and after); ``qk_params_before`` counts the bias elements that exist.
    """

    module: str
    index: int | None
    n_head: int
    head_dim: int
    d_model: int
    shared_dim: int | None
    relative_error: float | None
    qk_params_before: int

    def __post_init__(self) -> None:
        for name in ("n_head", "head_dim", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.shared_dim is not None and self.shared_dim < 1:
            raise ValueError("shared_dim must be positive")

    def _r(self, after: bool) -> int | None:
        return self.shared_dim if after else None

    def qk_params(self, after: bool) -> int:
        if not after or self.shared_dim is None:
            return self.qk_params_before
        return qk_params(self.d_model, self.n_head, self.head_dim, self.shared_dim)

    def proj_flops(self, after: bool) -> int:
        return projection_flops(self.d_model, self.n_head, self.head_dim, self._r(after))

    def score_flops(self, seq_len: int, after: bool) -> int:
        return score_flops(seq_len, self.n_head, self.head_dim, self._r(after))

    def value_flops(self, seq_len: int) -> int:
        return value_flops(seq_len, self.n_head, self.head_dim)

    def key_cache(self, after: bool) -> int:
        return key_cache_elements(self.n_head, self.head_dim, self._r(after))

    @property
    def crossover(self) -> float | None:
        if self.shared_dim is None:
            return None
        return crossover_seq_len(self.d_model, self.n_head, self.head_dim, self.shared_dim)


def _crossover(fixed_before: int, fixed_after: int, slope_before: int, slope_after: int) -> float | None:
    """Where fixed + slope*N of the two models meet, if the compressed one grows faster."""
    if slope_after <= slope_before:
        return None
    return (fixed_before - fixed_after) / (slope_after - slope_before)


def _saved(before: int, after: int) -> float:
    return (before - after) / before if before else 0.0


@dataclass(frozen=True)
class Report:
    """The accounting of one compressed directory; :meth:`to_dict` is the ``--json`` record."""

    directory: str
    source_path: str
    source_used: bool
    source_note: str | None
    architecture: str
    dtype_before: str
    dtype_after: str
    seq_lens: tuple[int, ...]
    layers: tuple[LayerCost, ...]  # the compressed layers
    other_layers: tuple[LayerCost, ...]  # attention layers left as they were
    params_before: int
    params_after: int
    files_before: tuple[tuple[str, int], ...]
    files_after: tuple[tuple[str, int], ...]
    weights_before: tuple[str, ...]  # names in files_before that are weights
    weights_after: tuple[str, ...]
    matmul_before: int  # N-independent FLOPs per token, whole model
    matmul_after: int
    notes_extra: tuple[str, ...] = ()

    # ---- functions of N --------------------------------------------------------------
    def qk_flops(self, seq_len: int, after: bool) -> int:
        return sum(la.proj_flops(after) + la.score_flops(seq_len, after) for la in self.layers)

    def attention_flops(self, seq_len: int, after: bool) -> int:
        return sum(la.score_flops(seq_len, after) + la.value_flops(seq_len) for la in self.layers + self.other_layers)

    def model_flops(self, seq_len: int, after: bool) -> int:
        return (self.matmul_after if after else self.matmul_before) + self.attention_flops(seq_len, after)

    @property
    def qk_crossover(self) -> float | None:
        proj = [sum(la.proj_flops(a) for la in self.layers) for a in (False, True)]
        slope = [self.qk_flops(1, a) - self.qk_flops(0, a) for a in (False, True)]
        return _crossover(proj[0], proj[1], slope[0], slope[1])

    @property
    def model_crossover(self) -> float | None:
        slope = [self.model_flops(1, a) - self.model_flops(0, a) for a in (False, True)]
        return _crossover(self.matmul_before, self.matmul_after, slope[0], slope[1])

    def key_cache_bytes(self, elements: int, after: bool) -> int:
        return elements * _ITEMSIZE[self.dtype_after if after else self.dtype_before]

    # ---- sizes --------------------------------------------------------------------------
    def _bytes(self, files: Iterable[tuple[str, int]], only: Iterable[str] | None = None) -> int:
        keep = set(only) if only is not None else None
        return sum(b for n, b in files if keep is None or n in keep)

    @property
    def weights_bytes(self) -> tuple[int, int]:
        return self._bytes(self.files_before, self.weights_before), self._bytes(self.files_after, self.weights_after)

    @property
    def files_bytes(self) -> tuple[int, int]:
        return self._bytes(self.files_before), self._bytes(self.files_after)

    # ---- plain sentences ------------------------------------------------------------------
    def _layer_qk(self, la: LayerCost, seq_len: int, after: bool) -> int:
        return la.proj_flops(after) + la.score_flops(seq_len, after)

    def notes(self) -> list[str]:
        """Plain sentences: the source fallback, caveats, and every "costs more" finding."""
        notes = [self.source_note] if self.source_note else []
        notes.extend(self.notes_extra)
        n_star = self.qk_crossover
        if n_star is None:
            why = "the projections cost more than before"
        elif n_star <= 0:
            why = "the scores cost 2*R instead of 2*d FLOPs per head and key token (R > d) at every length"
        else:
            why = (f"beyond N* = {n_star:.1f} tokens the cheaper projections no longer make up for the scores, "
                   "which cost 2*R instead of 2*d FLOPs per head and key token (R > d)")
        for n in self.seq_lens:
            b, a = self.qk_flops(n, False), self.qk_flops(n, True)
            if a > b:
                notes.append(f"At sequence length {n:,} the compressed key/query side costs MORE FLOPs per token "
                             f"than the original: {a:,} vs {b:,} (+{(a - b) / b:.1%}); {why}.")
            else:
                worse = [str(la.index) for la in self.layers
                         if self._layer_qk(la, n, True) > self._layer_qk(la, n, False)]
                if worse:
                    notes.append(f"At sequence length {n:,} the compressed key/query side as a whole is cheaper, but "
                                 f"layer(s) {', '.join(worse)} cost more FLOPs per token than before.")
            b, a = self.model_flops(n, False), self.model_flops(n, True)
            if a > b:
                n_model = self.model_crossover
                tail = f"; it is cheaper below N* = {n_model:.1f} tokens." if n_model and n_model > 0 else "."
                notes.append(f"At sequence length {n:,} the compressed model as a whole costs MORE FLOPs per token "
                             f"than the original: {a:,} vs {b:,} (+{(a - b) / b:.1%}){tail}")
        return notes

    # ---- JSON ----------------------------------------------------------------------------
    def _qk_record(self, layers: Sequence[LayerCost], dtype: tuple[str, str]) -> dict[str, Any]:
        pb, pa = sum(la.qk_params(False) for la in layers), sum(la.qk_params(True) for la in layers)
        fb, fa = sum(la.proj_flops(False) for la in layers), sum(la.proj_flops(True) for la in layers)
        kb, ka = sum(la.key_cache(False) for la in layers), sum(la.key_cache(True) for la in layers)
        slope_b = sum(la.score_flops(1, False) for la in layers)
        slope_a = sum(la.score_flops(1, True) for la in layers)
        at = {}
        for n in self.seq_lens:
            sb, sa = n * slope_b, n * slope_a
            at[str(n)] = {"qk_score_flops_per_token_before": sb, "qk_score_flops_per_token_after": sa,
                          "qk_flops_per_token_before": fb + sb, "qk_flops_per_token_after": fa + sa,
                          "qk_flops_saved_fraction": round(_saved(fb + sb, fa + sa), 6),
                          "costs_more": fa + sa > fb + sb}
        return {
            "qk_params_before": pb, "qk_params_after": pa, "qk_params_saved_fraction": round(_saved(pb, pa), 6),
            "qk_proj_flops_per_token_before": fb, "qk_proj_flops_per_token_after": fa,
            "crossover_seq_len": _round(_crossover(fb, fa, slope_b, slope_a)),
            "key_cache_elements_per_token_before": kb, "key_cache_elements_per_token_after": ka,
            "key_cache_bytes_per_token_before": kb * _ITEMSIZE[dtype[0]],
            "key_cache_bytes_per_token_after": ka * _ITEMSIZE[dtype[1]],
            "at_seq_len": at,
        }

    def to_dict(self) -> dict[str, Any]:
        dtypes = (self.dtype_before, self.dtype_after)
        layers = []
        for la in self.layers:
            record = {"module": la.module, "index": la.index, "heads": la.n_head, "head_dim": la.head_dim,
                      "d_model": la.d_model, "shared_dim": la.shared_dim, "relative_error": la.relative_error}
            record.update(self._qk_record([la], dtypes))
            layers.append(record)
        qk_total = {"layers": len(self.layers), **self._qk_record(self.layers, dtypes)}
        all_layers = self.layers + self.other_layers
        kb = sum(la.key_cache(False) for la in all_layers)
        ka = sum(la.key_cache(True) for la in all_layers)
        (wb, wa), (fb, fa) = self.weights_bytes, self.files_bytes
        model = {
            "params_before": self.params_before, "params_after": self.params_after,
            "params_saved_fraction": round(_saved(self.params_before, self.params_after), 6),
            "weights_bytes_before": wb, "weights_bytes_after": wa,
            "weights_bytes_saved_fraction": round(_saved(wb, wa), 6),
            "files_bytes_before": fb, "files_bytes_after": fa,
            "files_bytes_saved_fraction": round(_saved(fb, fa), 6),
            "files_before": [{"name": n, "bytes": b} for n, b in self.files_before],
            "files_after": [{"name": n, "bytes": b} for n, b in self.files_after],
            "attention_layers": len(all_layers), "compressed_layers": len(self.layers),
            "matmul_flops_per_token_before": self.matmul_before, "matmul_flops_per_token_after": self.matmul_after,
            "crossover_seq_len": _round(self.model_crossover),
            "key_cache_elements_per_token_before": kb, "key_cache_elements_per_token_after": ka,
            "key_cache_bytes_per_token_before": self.key_cache_bytes(kb, False),
            "key_cache_bytes_per_token_after": self.key_cache_bytes(ka, True),
            "at_seq_len": {},
        }
        for n in self.seq_lens:
            b, a = self.model_flops(n, False), self.model_flops(n, True)
            model["at_seq_len"][str(n)] = {
                "attention_flops_per_token_before": self.attention_flops(n, False),
                "attention_flops_per_token_after": self.attention_flops(n, True),
                "flops_per_token_before": b, "flops_per_token_after": a,
                "flops_saved_fraction": round(_saved(b, a), 6), "costs_more": a > b}
        return {
            "format": FORMAT, "directory": self.directory,
            "source": {"path": self.source_path, "used": self.source_used, "note": self.source_note,
                       "architecture": self.architecture, "dtype_before": self.dtype_before,
                       "dtype_after": self.dtype_after},
            "seq_lens": list(self.seq_lens), "layers": layers, "qk_total": qk_total, "model": model,
            "notes": self.notes(),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ---- reading the directories --------------------------------------------------------------

def _collab_names(manifest: dict[str, Any]) -> set[str]:
    """The output tensors that replace the key/query projections (counted by SPEC 5, not as Linears)."""
    return {layer["tensors"][k] for layer in manifest["layers"] for k in ("query", "key", "mixing", "content_bias")}


def _matmul_total(ckpt: Checkpoint, skip: set[str] = frozenset()) -> int:
    return sum(matmul_flops(n, ckpt.shape(n)) for n in ckpt.names() if n not in skip)


def _source(manifest: Manifest) -> tuple[Checkpoint | None, str | None]:
    """The source checkpoint if it is where the manifest says and unchanged, else (None, why)."""
    path = Path(manifest.source.path)
    fallback = "the before-figures come from the manifest and the output's unchanged tensors"
    if not path.exists():
        return None, f"The source checkpoint {path} is not there any more; {fallback}."
    try:
        ckpt = open_checkpoint(path)
    except BadInputError as e:
        return None, f"The source checkpoint {path} cannot be read ({e}); {fallback}."
    try:
        check_source(manifest, ckpt)
    except BadInputError as e:
        ckpt.close()
        return None, f"The source checkpoint {path} cannot be used ({e}); {fallback}."
    return ckpt, None


def _uncompressed_layers(out: Checkpoint, manifest: dict[str, Any]) -> list[LayerCost]:
    """Attention layers still in their original form in the output (``compress --layers``)."""
    family = {f.name: f for f in FAMILIES}.get(manifest["source"]["architecture"])
    collab = _collab_names(manifest)
    names = {n: f for n, f in out.weight_map.items() if n not in collab}
    if family is None or not any(family.pattern.match(n) for n in names):
        return []
    view = dataclasses.replace(out, weight_map=names)  # the output without its collab tensors
    heads = manifest["settings"].get("heads")
    specs = detect(view, heads=heads if isinstance(heads, int) else None, arch=family.name)
    done = {layer["module"] for layer in manifest["layers"]}
    return [LayerCost(s.module, None, s.n_head, s.head_dim, s.d_model, None, None,
                      sum(view.numel(n) for n in (s.query, s.key, s.query_bias, s.key_bias) if n)
                      if not s.fused else qk_params(s.d_model, s.n_head, s.head_dim,
                                                    bias_elements=2 * s.width if s.query_bias else 0))
            for s in specs if s.module not in done]


def _qk_before_from_source(src: Checkpoint, manifest: dict[str, Any]) -> dict[str, int]:
    heads = manifest["settings"].get("heads")
    specs = detect(src, heads=heads if isinstance(heads, int) else None, arch=manifest["source"]["architecture"])
    result = {}
    for s in specs:
        if s.fused:
            result[s.module] = 2 * s.width * s.d_model + (2 * s.width if s.query_bias else 0)
        else:
            result[s.module] = sum(src.numel(n) for n in (s.query, s.key, s.query_bias, s.key_bias) if n)
    return result


def _files(root: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", INDEX_SUFFIX))


def build_report(directory: str | Path, seq_lens: Sequence[int] = (DEFAULT_SEQ_LEN,)) -> Report:
    """Account for what ``compress`` saved in ``directory`` (SPEC.md section 5).

    Args:
        directory: an output directory of ``compress`` (holding ``collab_manifest.json``).
        seq_lens: sequence lengths N at which FLOPs per token are given.

    Returns:
        A :class:`Report`; ``report.to_dict()`` is the JSON record described in the module
        docstring.

    Raises:
        BadInputError: not a compressed directory, an invalid manifest, a tensor named in the
            manifest missing from the weights, or a sequence length below 1.
    """
    seq_lens = tuple(dict.fromkeys(int(n) for n in seq_lens)) or (DEFAULT_SEQ_LEN,)
    for n in seq_lens:
        if n < 1:
            raise BadInputError(f"--seq-len must be at least 1, got {n}")
    directory = Path(directory)
    checked, out = open_output(directory)
    manifest, src = checked.to_json(), None
    try:
        src, note = _source(checked)
        return _build(directory, manifest, out, src, note, seq_lens)
    finally:
        out.close()
        if src is not None:
            src.close()


def _build(directory: Path, manifest: dict[str, Any], out: Checkpoint, src: Checkpoint | None, note: str | None,
           seq_lens: tuple[int, ...]) -> Report:
    qk_before = _qk_before_from_source(src, manifest) if src is not None else {}
    layers = []
    for i, rec in enumerate(manifest["layers"]):
        t = rec["tensors"]
        for key in ("query", "key", "mixing", "content_bias"):
            if t[key] not in out:
                raise BadInputError(f"{directory} is missing tensor {t[key]!r} named in its manifest")
        n_head, head_dim, d_model, r = rec["heads"], rec["head_dim"], rec["d_model"], rec["shared_dim"]
        if out.shape(t["query"]) != (r, d_model) or out.shape(t["mixing"]) != (n_head, r):
            raise BadInputError(f"{directory}: the collab tensors of {rec['module']} have shapes that do not match "
                                "the manifest")
        if rec["module"] in qk_before:
            before = qk_before[rec["module"]]
        else:
            bias = n_head * head_dim * (bool(rec.get("query_bias")) + bool(rec.get("key_bias")))
            before = qk_params(d_model, n_head, head_dim, bias_elements=bias)
        layers.append(LayerCost(rec["module"], rec["index"], n_head, head_dim, d_model, r,
                                float(rec["relative_error"]), before))
        actual = sum(out.numel(t[k]) for k in ("query", "key", "mixing", "content_bias"))
        if actual != layers[-1].qk_params(True):
            raise BadInputError(f"{directory}: the collab tensors of {rec['module']} hold {actual} parameters, "
                                f"not the {layers[-1].qk_params(True)} of their shapes in the manifest")
    other = _uncompressed_layers(out, manifest)
    collab = _collab_names(manifest)
    matmul_after = _matmul_total(out, collab) + sum(la.proj_flops(True) for la in layers)
    if src is not None:
        matmul_before = _matmul_total(src)
        params_before = sum(src.numel(n) for n in src.names())
    else:
        # Every other tensor is copied unchanged, so the output holds the rest of the model.
        matmul_before = _matmul_total(out, collab) + sum(la.proj_flops(False) for la in layers)
        params_before = manifest["totals"]["params_before"]
    params_after = sum(out.numel(n) for n in out.names())

    files_after = _files(directory)
    copied = [(n, b) for n, b in files_after
              if n != MANIFEST_NAME and n != "config.json" and not _is_weights(n)]
    source_root = src.directory if src is not None else None
    files_before = []
    for f in manifest["source"]["files"]:
        p = source_root / f["name"] if source_root is not None else None
        files_before.append((f["name"], p.stat().st_size if p is not None and p.is_file() else f["bytes"]))
    known = {n for n, _ in files_before}
    for n, b in copied:  # byte-identical copies of source files
        if n not in known:
            p = source_root / n if source_root is not None else None
            files_before.append((n, p.stat().st_size if p is not None and p.is_file() else b))

    key_name = manifest["layers"][0]["tensors"]["key"]
    dtype_after = _DTYPE_NAME.get(out.dtype(key_name), out.dtype(key_name))
    dtype_before = manifest["source"].get("dtype")
    if src is not None:
        first = next(iter(_qk_names(src, manifest)), None)
        if first is not None:
            dtype_before = _DTYPE_NAME.get(src.dtype(first), src.dtype(first))
    if dtype_before not in _ITEMSIZE:
        dtype_before = dtype_after
    extra = []
    if manifest["source"]["architecture"] == "albert":
        extra.append("ALBERT applies one stored block at every layer; the FLOPs count each stored block once, so "
                     "multiply by the number of layers that share it for the real cost.")
    return Report(
        directory=str(directory), source_path=manifest["source"]["path"], source_used=src is not None,
        source_note=note, architecture=manifest["source"]["architecture"],
        dtype_before=dtype_before, dtype_after=dtype_after, seq_lens=seq_lens,
        layers=tuple(layers), other_layers=tuple(other), params_before=params_before, params_after=params_after,
        files_before=tuple(files_before), files_after=tuple(files_after),
        weights_before=tuple(n for n, _ in files_before if _is_weights(n)),
        weights_after=tuple(n for n, _ in files_after if _is_weights(n)),
        matmul_before=matmul_before, matmul_after=matmul_after, notes_extra=tuple(extra),
    )


def _qk_names(src: Checkpoint, manifest: dict[str, Any]) -> list[str]:
    removed = [n for layer in manifest["layers"] for n in layer["removed"] if n.endswith("weight")]
    return [n for n in removed if n in src]


# ---- presentation -------------------------------------------------------------------------

def _change(before: int, after: int) -> str:
    if before == 0:
        return ""
    c = (after - before) / before
    return f"{c:+.1%}".replace("-", "−")


def _nstar(x: float | None) -> str:
    if x is None:
        return "none"
    return "always" if x <= 0 else f"{x:,.1f}"


def _table(title: str, headers: Sequence[str], sections: Sequence[Sequence[Sequence[str]]], caption: str) -> Table:
    """A right-aligned table whose columns are never narrower than their widest cell (headers wrap)."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD)
    rows = [r for section in sections for r in section]
    for i, header in enumerate(headers):
        widest = max((len(r[i]) for r in rows), default=1)
        table.add_column(header, justify="left" if i == 0 else "right", min_width=widest)
    for k, section in enumerate(sections):
        if k:
            table.add_section()
        for r in section:
            table.add_row(*r)
    return table


def report_tables(report: Report) -> list[Table]:
    """The rich tables of ``collabcompress report``: the key/query side per layer, its FLOPs per
    token per layer, and the whole model."""
    d = report.to_dict()
    q, m = d["qk_total"], d["model"]

    def params_row(label: str, shape: tuple[str, str, str], rec: dict[str, Any]) -> list[str]:
        return [label, *shape, f"{rec['qk_params_before']:,}", f"{rec['qk_params_after']:,}",
                f"{rec['qk_params_saved_fraction']:.1%}", f"{rec['key_cache_elements_per_token_before']:,}",
                f"{rec['key_cache_elements_per_token_after']:,}"]

    t1 = _table(
        f"Key/query side per layer: {report.directory}",
        ("layer", "H×d", "R", "rel. error", "params before", "params after", "saved", "K-cache before",
         "K-cache after"),
        [[params_row(str(la["index"]), (str(la["heads"] * la["head_dim"]), str(la["shared_dim"]),
                                        f"{la['relative_error']:.4f}"), la) for la in d["layers"]],
         [params_row("all", ("", "", ""), q)]],
        f"K-cache: key-cache elements per token (H*d before, R + H after); "
        f"{q['key_cache_bytes_per_token_before']:,} → {q['key_cache_bytes_per_token_after']:,} bytes per token "
        f"over these layers ({report.dtype_before} → {report.dtype_after}).")

    def flops_rows(label: str, rec: dict[str, Any]) -> list[list[str]]:
        rows = []
        for k, n in enumerate(report.seq_lens):
            a = rec["at_seq_len"][str(n)]
            b, f = a["qk_flops_per_token_before"], a["qk_flops_per_token_after"]
            head = ([label, f"{rec['qk_proj_flops_per_token_before']:,}", f"{rec['qk_proj_flops_per_token_after']:,}",
                     _nstar(rec["crossover_seq_len"])] if k == 0 else ["", "", "", ""])
            rows.append(head + [f"{n:,}", f"{b:,}", f"{f:,}", _change(b, f)])
        return rows

    t2 = _table("Key/query FLOPs per token (projections + scores at sequence length N)",
                ("layer", "proj before", "proj after", "N*", "N", "total before", "total after", "change"),
                [[r for la in d["layers"] for r in flops_rows(str(la["index"]), la)], flops_rows("all", q)],
                "N*: above it the compressed layer costs more FLOPs per token; none: never.")

    def row(label: str, before: int, after: int) -> list[str]:
        return [label, f"{before:,}", f"{after:,}", _change(before, after)]

    rows = [row("parameters", m["params_before"], m["params_after"]),
            row(f"bytes, weights ({len(report.weights_before)} → {len(report.weights_after)} files)",
                m["weights_bytes_before"], m["weights_bytes_after"]),
            row(f"bytes, all files ({len(report.files_before)} → {len(report.files_after)})",
                m["files_bytes_before"], m["files_bytes_after"])]
    for n in report.seq_lens:
        a = m["at_seq_len"][str(n)]
        rows.append(row(f"FLOPs per token, N={n:,}", a["flops_per_token_before"], a["flops_per_token_after"]))
    rows.append(["costs more FLOPs above N*", "", _nstar(m["crossover_seq_len"]), ""])
    rows.append(row("key cache per token, elements", m["key_cache_elements_per_token_before"],
                    m["key_cache_elements_per_token_after"]))
    rows.append(row("key cache per token, bytes", m["key_cache_bytes_per_token_before"],
                    m["key_cache_bytes_per_token_after"]))
    where = "on disk" if report.source_used else "as recorded in the manifest"
    t3 = _table(f"Whole model ({m['compressed_layers']} of {m['attention_layers']} attention layers compressed)",
                ("", "before", "after", "change"), [rows],
                f"bytes before: the source files compress read or copied ({where}); after: every file "
                f"of the output, {MANIFEST_NAME} included.")
    return [t1, t2, t3]


def plot_flops(report: Report, path: str | Path) -> None:
    """FLOPs per token against sequence length, before and after, for the key/query side and
    the whole model, with the crossover N* marked and the requested lengths as dots."""
    from .tables import require_matplotlib, save_figure

    plt = require_matplotlib()
    marks = [x for x in (report.qk_crossover, report.model_crossover) if x is not None and x > 0]
    top = max([*report.seq_lens, *(2 * x for x in marks), 64])
    grid = sorted({int(round(top * 1.15 * i / 200)) for i in range(201)})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "key/query side (projections + scores)", report.qk_flops, report.qk_crossover),
              (axes[1], "whole model", report.model_flops, report.model_crossover))
    for ax, title, fn, n_star in panels:
        for after, label, style in ((False, "original", "-"), (True, "collaborative", "--")):
            ax.plot(grid, [fn(n, after) for n in grid], style, lw=1.6, label=label)
            ax.plot(report.seq_lens, [fn(n, after) for n in report.seq_lens], "o", ms=4,
                    color=ax.lines[-1].get_color())
        if n_star is not None and n_star > 0:
            ax.axvline(n_star, color="grey", lw=0.8, ls=":")
            ax.annotate(f"N* = {n_star:.1f}", (n_star, ax.get_ylim()[0]), xytext=(4, 8),
                        textcoords="offset points", fontsize=8, color="dimgrey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sequence length N (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FLOPs per token")
    axes[0].legend(fontsize=8, loc="upper left")
    save_figure(plt, fig, f"{report.directory} ({report.architecture})", path)
