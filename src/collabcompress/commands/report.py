"""What the collaborative re-parametrization saved: parameters, bytes, FLOPs, key cache.

Reads a ``compress`` output directory: its manifest, the tensor headers of its weights
and, when it is still where ``source.path`` says and unchanged (sha256 of the weight
files), the source checkpoint's headers. When the source is gone or changed, the
"before" figures come from the manifest (``totals.params_before``, ``source.files``
bytes, per-layer shapes and bias flags) and from the output's unchanged tensors, and the
report says so. No tensor data is read; headers are enough.

Counting rules: docs/method.md, as :mod:`collabcompress.maths.costs` computes them, and:

* key-cache bytes: the elements times the element size of the key tensors' dtype; value-cache
  bytes likewise (``G*d`` elements per token and layer before, ``r_v`` with shared values);
  the KV cache is their sum.
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
                 "value_rank": int | null,
                 "value_proj_flops_per_token_before": int, "value_proj_flops_per_token_after": int,
                 "value_cache_elements_per_token_before": int, "value_cache_elements_per_token_after": int,
                 "value_cache_bytes_per_token_before": int, "value_cache_bytes_per_token_after": int,
                 "kv_cache_elements_per_token_before": int, "kv_cache_elements_per_token_after": int,
                 "kv_cache_bytes_per_token_before": int, "kv_cache_bytes_per_token_after": int,
                 "at_seq_len": {"128": {"qk_score_flops_per_token_before": int,
                                        "qk_score_flops_per_token_after": int,
                                        "qk_flops_per_token_before": int, "qk_flops_per_token_after": int,
                                        "qk_flops_saved_fraction": float, "costs_more": bool}}}],
     "qk_total": {the same keys summed over the compressed layers, without the per-layer identity keys
                  and value_rank; "layers": int},
     "model": {"params_before": int, "params_after": int, "params_saved_fraction": float,
               "weights_bytes_before": int, "weights_bytes_after": int, "weights_bytes_saved_fraction": float,
               "files_bytes_before": int, "files_bytes_after": int, "files_bytes_saved_fraction": float,
               "files_before": [{"name": str, "bytes": int}], "files_after": [{"name": str, "bytes": int}],
               "attention_layers": int, "compressed_layers": int,
               "matmul_flops_per_token_before": int, "matmul_flops_per_token_after": int,
               "crossover_seq_len": float | null,
               "key_cache_elements_per_token_before": int, "key_cache_elements_per_token_after": int,
               "key_cache_bytes_per_token_before": int, "key_cache_bytes_per_token_after": int,
               "value_cache_elements_per_token_before": int, "value_cache_elements_per_token_after": int,
               "value_cache_bytes_per_token_before": int, "value_cache_bytes_per_token_after": int,
               "kv_cache_elements_per_token_before": int, "kv_cache_elements_per_token_after": int,
               "kv_cache_bytes_per_token_before": int, "kv_cache_bytes_per_token_after": int,
               "at_seq_len": {"128": {"attention_flops_per_token_before": int,
                                      "attention_flops_per_token_after": int,
                                      "flops_per_token_before": int, "flops_per_token_after": int,
                                      "flops_saved_fraction": float, "costs_more": bool}}},
     "notes": [str, ...],
     "measured": {only with ``measured=``: "file", "level", "device", "threads", "dtype",
                  "forward": [{"seq_len", "batch_size", "ratio", "ratio_q1", "ratio_q3", "flop_model_ratio"}],
                  "crossover": {"measured": {"<batch>": int | null}, "flop_model": float | null},
                  "decode": null | {"context", "tokens_per_second_ratio", "key_cache_ratio",
                                    "value_cache_ratio", "kv_cache_ratio"}}}

``matmul_flops_per_token_*`` is the part that does not depend on N (every Linear, the
key/query projections included); ``attention_flops_per_token_*`` the part that does
(scores and value mixing); ``flops_per_token_*`` their sum. ``notes`` holds the plain
sentences of the report, among them one whenever the compressed key/query side or the
compressed model costs more FLOPs at a requested length. The FLOP figures are a model
(docs/method.md), not a time: ``measured`` puts the latency ratios of a
``collabcompress bench --json`` record of the same directory (checked by its ``outputs_sha256``,
:func:`read_measured`) beside the FLOP model's ratios at the same lengths.

Reference: Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of
Concatenate", arXiv 2006.16362.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files.arch import detect, find_family, stored_qk_params
from ..maths.costs import LayerCost, linear_crossover, matmul_flops, saved_fraction
from ..defaults import DEFAULT_SEQ_LEN
from ..dtypes import ELEMENT_SIZE, dtype_name
from ..errors import BadInputError
from ..files.checkpoint import INDEX_SUFFIX, Checkpoint, open_checkpoint
from ..files.bench_record import read_measured
from ..files.manifest import MANIFEST_NAME, Manifest, check_source, open_output
from ..methods import method_for

__all__ = ["build_report", "Report", "LayerCost", "DEFAULT_SEQ_LEN", "FORMAT"]

FORMAT = "collabcompress-report/1"
FLOP_MODEL_NOTE = ("FLOPs are a model (docs/method.md), not a time: copies, element-wise work and the attention "
                   "kernel's choice are not counted; `collabcompress bench ORIGINAL DIR` measures latency, and "
                   "`report --measured BENCH.json` shows it beside the FLOP model.")



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
    measured: dict[str, Any] | None = None  # a validated bench record (report --measured), see measured_record

    # ---- functions of N --------------------------------------------------------------
    def qk_flops(self, seq_len: int, after: bool) -> int:
        return sum(la.proj_flops(after) + la.score_flops(seq_len, after) for la in self.layers)

    def attention_flops(self, seq_len: int, after: bool) -> int:
        return sum(la.score_flops(seq_len, after) + la.value_flops(seq_len, after)
                   for la in self.layers + self.other_layers)

    def model_flops(self, seq_len: int, after: bool) -> int:
        return (self.matmul_after if after else self.matmul_before) + self.attention_flops(seq_len, after)

    @property
    def qk_crossover(self) -> float | None:
        proj = [sum(la.proj_flops(a) for la in self.layers) for a in (False, True)]
        slope = [self.qk_flops(1, a) - self.qk_flops(0, a) for a in (False, True)]
        return linear_crossover(proj[0], proj[1], slope[0], slope[1])

    @property
    def model_crossover(self) -> float | None:
        slope = [self.model_flops(1, a) - self.model_flops(0, a) for a in (False, True)]
        return linear_crossover(self.matmul_before, self.matmul_after, slope[0], slope[1])

    def module_flops(self, seq_len: int, after: bool) -> int:
        """FLOPs per token of the compressed attention layers alone, as ``bench --level module`` runs them:
        key/query projections, scores, value mixing and the value projection (``2*D*G*d``; with shared
        values ``2*D*r_v + 2*H*r_v*d``, docs/method.md)."""
        return sum(la.proj_flops(after) + la.score_flops(seq_len, after) + la.value_flops(seq_len, after)
                   + la.value_proj_flops(after) for la in self.layers)

    def flop_model_ratio(self, seq_len: int, level: str = "model") -> float:
        """The FLOP model's compressed / original FLOPs per token at ``seq_len``: the whole model
        (``level="model"``) or the compressed attention layers (``"module"``)."""
        fn = self.model_flops if level == "model" else self.module_flops
        return fn(seq_len, True) / fn(seq_len, False)

    def flop_model_crossover(self, level: str = "model") -> float | None:
        """The FLOP model's N* for that level (terms equal before and after cancel, so the attention
        layers' N* is the key/query side's)."""
        return self.model_crossover if level == "model" else self.qk_crossover

    def cache_bytes(self, elements: int, after: bool) -> int:
        """Bytes of ``elements`` cache elements in the dtype before or after (key and value caches alike)."""
        return elements * ELEMENT_SIZE[self.dtype_after if after else self.dtype_before]

    def key_cache_bytes(self, elements: int, after: bool) -> int:
        return elements * ELEMENT_SIZE[self.dtype_after if after else self.dtype_before]

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
        notes.append(FLOP_MODEL_NOTE)
        notes.append(self.cache_note())
        n_star = self.qk_crossover
        if n_star is None:
            why = "the projections cost more than before"
        elif n_star <= 0:
            why = "the scores cost 2*R instead of 2*d FLOPs per head and key token (R > d) at every length"
        else:
            why = (f"beyond N* = {n_star:.1f} tokens the FLOPs saved in the projections no longer make up for the "
                   "scores, which cost 2*R instead of 2*d FLOPs per head and key token (R > d)")
        for n in self.seq_lens:
            b, a = self.qk_flops(n, False), self.qk_flops(n, True)
            if a > b:
                notes.append(f"At sequence length {n:,} the compressed key/query side costs MORE FLOPs per token "
                             f"than the original: {a:,} vs {b:,} (+{(a - b) / b:.1%}); {why}.")
            else:
                worse = [str(la.index) for la in self.layers
                         if self._layer_qk(la, n, True) > self._layer_qk(la, n, False)]
                if worse:
                    notes.append(f"At sequence length {n:,} the compressed key/query side as a whole needs fewer FLOPs, "
                                 f"but layer(s) {', '.join(worse)} need more FLOPs per token than before.")
            b, a = self.model_flops(n, False), self.model_flops(n, True)
            if a > b:
                n_model = self.model_crossover
                tail = (f"; it needs fewer FLOPs below N* = {n_model:.1f} tokens." if n_model and n_model > 0
                        else ".")
                notes.append(f"At sequence length {n:,} the compressed model as a whole costs MORE FLOPs per token "
                             f"than the original: {a:,} vs {b:,} (+{(a - b) / b:.1%}){tail}")
        return notes

    def cache_note(self) -> str:
        """One sentence: the KV cache per token, keys and values, over every attention layer."""
        c = self._cache_record(self.layers + self.other_layers)
        every = self.layers + self.other_layers
        kb, ka = sum(la.key_cache(False) for la in every), sum(la.key_cache(True) for la in every)
        shared = sum(la.value_rank is not None for la in self.layers)
        values = (f"shared values in {shared} layer(s): the value cache holds each layer's r_v-wide latent"
                  if shared else "values unchanged")
        return (f"KV cache per token over the {len(every)} attention layers: keys {kb:,} → {ka:,} and values "
                f"{c['value_cache_elements_per_token_before']:,} → {c['value_cache_elements_per_token_after']:,} "
                f"elements, {c['kv_cache_bytes_per_token_before']:,} → {c['kv_cache_bytes_per_token_after']:,} bytes "
                f"in all ({values}).")

    # ---- JSON ----------------------------------------------------------------------------
    def _cache_record(self, layers: Sequence[LayerCost]) -> dict[str, int]:
        """The value cache and the KV cache (keys + values) per token over ``layers``."""
        kb, ka = sum(la.key_cache(False) for la in layers), sum(la.key_cache(True) for la in layers)
        vb, va = sum(la.value_cache(False) for la in layers), sum(la.value_cache(True) for la in layers)
        return {
            "value_cache_elements_per_token_before": vb, "value_cache_elements_per_token_after": va,
            "value_cache_bytes_per_token_before": self.cache_bytes(vb, False),
            "value_cache_bytes_per_token_after": self.cache_bytes(va, True),
            "kv_cache_elements_per_token_before": kb + vb, "kv_cache_elements_per_token_after": ka + va,
            "kv_cache_bytes_per_token_before": self.cache_bytes(kb, False) + self.cache_bytes(vb, False),
            "kv_cache_bytes_per_token_after": self.cache_bytes(ka, True) + self.cache_bytes(va, True),
        }

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
                          "qk_flops_saved_fraction": round(saved_fraction(fb + sb, fa + sa), 6),
                          "costs_more": fa + sa > fb + sb}
        return {
            "qk_params_before": pb, "qk_params_after": pa, "qk_params_saved_fraction": round(saved_fraction(pb, pa), 6),
            "qk_proj_flops_per_token_before": fb, "qk_proj_flops_per_token_after": fa,
            "crossover_seq_len": _round(linear_crossover(fb, fa, slope_b, slope_a)),
            "key_cache_elements_per_token_before": kb, "key_cache_elements_per_token_after": ka,
            "key_cache_bytes_per_token_before": kb * ELEMENT_SIZE[dtype[0]],
            "key_cache_bytes_per_token_after": ka * ELEMENT_SIZE[dtype[1]],
            "value_proj_flops_per_token_before": sum(la.value_proj_flops(False) for la in layers),
            "value_proj_flops_per_token_after": sum(la.value_proj_flops(True) for la in layers),
            **self._cache_record(layers),
            "at_seq_len": at,
        }

    def to_dict(self) -> dict[str, Any]:
        dtypes = (self.dtype_before, self.dtype_after)
        layers = []
        for la in self.layers:
            record = {"module": la.module, "index": la.index, "heads": la.n_head, "head_dim": la.head_dim,
                      "d_model": la.d_model, "shared_dim": la.shared_dim, "relative_error": la.relative_error}
            record.update(la.record_fields())
            record["value_rank"] = la.value_rank
            record.update(self._qk_record([la], dtypes))
            layers.append(record)
        qk_total = {"layers": len(self.layers), **self._qk_record(self.layers, dtypes)}
        all_layers = self.layers + self.other_layers
        kb = sum(la.key_cache(False) for la in all_layers)
        ka = sum(la.key_cache(True) for la in all_layers)
        (wb, wa), (fb, fa) = self.weights_bytes, self.files_bytes
        model = {
            "params_before": self.params_before, "params_after": self.params_after,
            "params_saved_fraction": round(saved_fraction(self.params_before, self.params_after), 6),
            "weights_bytes_before": wb, "weights_bytes_after": wa,
            "weights_bytes_saved_fraction": round(saved_fraction(wb, wa), 6),
            "files_bytes_before": fb, "files_bytes_after": fa,
            "files_bytes_saved_fraction": round(saved_fraction(fb, fa), 6),
            "files_before": [{"name": n, "bytes": b} for n, b in self.files_before],
            "files_after": [{"name": n, "bytes": b} for n, b in self.files_after],
            "attention_layers": len(all_layers), "compressed_layers": len(self.layers),
            "matmul_flops_per_token_before": self.matmul_before, "matmul_flops_per_token_after": self.matmul_after,
            "crossover_seq_len": _round(self.model_crossover),
            "key_cache_elements_per_token_before": kb, "key_cache_elements_per_token_after": ka,
            "key_cache_bytes_per_token_before": self.key_cache_bytes(kb, False),
            "key_cache_bytes_per_token_after": self.key_cache_bytes(ka, True),
            **self._cache_record(all_layers),
            "at_seq_len": {},
        }
        for n in self.seq_lens:
            b, a = self.model_flops(n, False), self.model_flops(n, True)
            model["at_seq_len"][str(n)] = {
                "attention_flops_per_token_before": self.attention_flops(n, False),
                "attention_flops_per_token_after": self.attention_flops(n, True),
                "flops_per_token_before": b, "flops_per_token_after": a,
                "flops_saved_fraction": round(saved_fraction(b, a), 6), "costs_more": a > b}
        return {
            "format": FORMAT, "directory": self.directory,
            "source": {"path": self.source_path, "used": self.source_used, "note": self.source_note,
                       "architecture": self.architecture, "dtype_before": self.dtype_before,
                       "dtype_after": self.dtype_after},
            "seq_lens": list(self.seq_lens), "layers": layers, "qk_total": qk_total, "model": model,
            "notes": self.notes(),
            **({"measured": self.measured_record()} if self.measured is not None else {}),
        }

    def measured_record(self) -> dict[str, Any] | None:
        """The bench record's measured ratios beside this report's FLOP-model ratios (``report --measured``)."""
        b = self.measured
        if b is None:
            return None
        level = b["level"]
        forward = [{"seq_len": r["seq_len"], "batch_size": r["batch_size"], "ratio": r["ratio"]["median"],
                    "ratio_q1": r["ratio"].get("q1"), "ratio_q3": r["ratio"].get("q3"),
                    "flop_model_ratio": round(self.flop_model_ratio(r["seq_len"], level), 6)} for r in b["forward"]]
        decode = b.get("decode")
        return {"file": b["file"], "level": level, "device": b.get("device"), "threads": b.get("threads"),
                "dtype": b.get("dtype"), "forward": forward,
                "crossover": {"measured": (b.get("crossover") or {}).get("measured"),
                              "flop_model": _round(self.flop_model_crossover(level))},
                "decode": None if decode is None else {
                    k: decode.get(k) for k in ("context", "tokens_per_second_ratio", "key_cache_ratio",
                                               "value_cache_ratio", "kv_cache_ratio")}}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ---- reading the directories --------------------------------------------------------------

def _collab_names(manifest: dict[str, Any]) -> set[str]:
    """The output tensors that replace the key/query projections (counted by the cost model, not as Linears)."""
    keys = ("query", "key", "mixing", "content_bias", "key_freq", "key_bias")
    return {layer["tensors"][k] for layer in manifest["layers"] for k in keys if layer["tensors"].get(k)}


def _shared_value_names(manifest: dict[str, Any]) -> set[str]:
    """The shared-value tensors (latent and up-projection) of the output (counted by the cost model)."""
    return {name for layer in manifest["layers"] if layer.get("value_rank") is not None
            for name in ((layer.get("value") or {}).get("tensors") or {}).values() if isinstance(name, str)}


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
    family = find_family(manifest["source"]["architecture"])
    collab = _collab_names(manifest)
    names = {n: f for n, f in out.weight_map.items() if n not in collab}
    if family is None or not any(family.pattern.match(n) for n in names):
        return []
    view = dataclasses.replace(out, weight_map=names)  # the output without its collab tensors
    specs = detect(view, arch=family.name, whole_model=False, **_overrides(manifest))
    done = {layer["module"] for layer in manifest["layers"]}
    return [LayerCost(s.module, None, s.n_head, s.head_dim, s.d_model, None, None, stored_qk_params(s, view.numel))
            for s in specs if s.module not in done]


def _overrides(manifest: dict[str, Any]) -> dict[str, int | None]:
    """``--heads`` and ``--kv-heads`` as compress recorded them."""
    heads, kv = manifest["settings"].get("heads"), manifest["settings"].get("kv_heads")
    return {"heads": heads if isinstance(heads, int) else None, "kv_heads": kv if isinstance(kv, int) else None}


def _qk_before_from_source(src: Checkpoint, manifest: dict[str, Any]) -> dict[str, int]:
    specs = detect(src, arch=manifest["source"]["architecture"], **_overrides(manifest))
    return {s.module: stored_qk_params(s, src.numel) for s in specs}


def _files(root: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", INDEX_SUFFIX))


def build_report(directory: str | Path, seq_lens: Sequence[int] = (DEFAULT_SEQ_LEN,), *,
                 measured: str | Path | None = None) -> Report:
    """Account for what ``compress`` saved in ``directory`` (docs/method.md).

    Args:
        directory: an output directory of ``compress`` (holding ``collab_manifest.json``).
        seq_lens: sequence lengths N at which FLOPs per token are given.
        measured: a ``bench --json`` file of this directory (:func:`read_measured`), shown beside
            the FLOP model.

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
        bench = read_measured(measured, directory, checked) if measured is not None else None
        src, note = _source(checked)
        return dataclasses.replace(_build(directory, manifest, out, src, note, seq_lens), measured=bench)
    finally:
        out.close()
        if src is not None:
            src.close()


def _build(directory: Path, manifest: dict[str, Any], out: Checkpoint, src: Checkpoint | None, note: str | None,
           seq_lens: tuple[int, ...]) -> Report:
    qk_before = _qk_before_from_source(src, manifest) if src is not None else {}
    layers = []
    for rec in manifest["layers"]:
        cost = method_for(rec).layer_cost(directory, rec, out, qk_before)
        if rec.get("value_rank") is not None:  # shared values: their shapes were checked by open_output
            cost = dataclasses.replace(cost, value_rank=rec["value_rank"])
        layers.append(cost)
    other = _uncompressed_layers(out, manifest)
    collab = _collab_names(manifest)
    # Shared values run per head (the lift), not as one Linear of their shapes: the cost model counts them.
    shared = [la for la in layers if la.value_rank is not None]
    skip = collab | _shared_value_names(manifest)
    matmul_after = (_matmul_total(out, skip) + sum(la.proj_flops(True) for la in layers)
                    + sum(la.value_proj_flops(True) for la in shared))
    if src is not None:
        matmul_before = _matmul_total(src)
        params_before = sum(src.numel(n) for n in src.names())
    else:
        # Every other tensor is copied unchanged, so the output holds the rest of the model.
        matmul_before = (_matmul_total(out, skip) + sum(la.proj_flops(False) for la in layers)
                         + sum(la.value_proj_flops(False) for la in shared))
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
    dtype_after = dtype_name(out.dtype(key_name))
    dtype_before = manifest["source"].get("dtype")
    if src is not None:
        first = next(iter(_qk_names(src, manifest)), None)
        if first is not None:
            dtype_before = dtype_name(src.dtype(first))
    if dtype_before not in ELEMENT_SIZE:
        dtype_before = dtype_after
    extra = []
    family = find_family(manifest["source"]["architecture"])
    if family is not None and family.shared_layers:
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
