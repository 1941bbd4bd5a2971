"""Measured latency, peak memory and decode speed: an original model against its compressed version.

What ``collabcompress bench ORIGINAL COMPRESSED`` runs (no printing here; the CLI renders
the record, :mod:`collabcompress.tables`). Two levels:

* ``module``: every compressed attention layer on its own, without the transformers extra.
  The original layer is multi-head attention built from the checkpoint's query, key and
  value tensors (rotary layers: rotated queries and keys, grouped values, causal); the
  compressed one is :class:`~collabcompress.runtime.attention.CollaborativeAttention` (or the shared
  rotary keys of :class:`~collabcompress.runtime.attention.CollaborativeRotaryAttention`) from the output's
  tensors, with the same value projection (a layer with shared values: its latent, weighted by
  the attention, then lifted per head). Inputs are seeded random tokens (B, N, D); one
  forward runs every compressed layer in turn, so its time is the sum of the layers'
  times. The output projection is the same on both sides and is left out.
* ``model``: the whole transformers model, the original loaded as ``evaluate`` loads it and
  the compressed one with :func:`collabcompress.hf.from_pretrained`, on seeded random token
  ids (the encoder's last hidden states; a causal LM's logits). Causal decoders also get a
  decode measurement: a prefill of ``context`` tokens into a ``DynamicCache`` (batch 1),
  then ``decode_steps`` one-token steps; the key and value cache bytes are summed from the
  cache tensors after the prefill (and divided by the context for the bytes per token; with
  shared values the value cache holds each layer's latent).

Timing: ``warmup`` untimed runs, then ``repeats`` timed runs of the original and the
compressed forward INTERLEAVED (original, compressed, original, ...), so a change of the
machine's load hits both alike; ``time.perf_counter`` around each run, with
``torch.cuda.synchronize()`` before and after on CUDA. Reported per side: median, quartiles,
min and max (seconds); the ratio compressed / original is the median of the per-pair
ratios (above 1: the compressed model is slower). Decode steps are interleaved the same
way, step by step, on two caches that grow alike.

Peak memory of one forward (bytes above what was allocated before it): on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the peak
of the running sum of torch's own allocations and frees, recorded by
``torch.profiler.profile(profile_memory=True)`` in one extra, untimed run. Neither counts
the process's resident memory, the weights or the inputs.

The FLOP model beside the measurements is :mod:`collabcompress.commands.report`'s (docs/method.md):
the whole model at ``model`` level, the attention layers (projections, scores, value
mixing, value projection) at ``module`` level.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..defaults import (DEFAULT_BENCH_BATCH_SIZES, DEFAULT_BENCH_CONTEXT, DEFAULT_BENCH_DECODE_STEPS,
                       DEFAULT_BENCH_LENGTHS, DEFAULT_BENCH_REPEATS, DEFAULT_BENCH_WARMUP)
from ..errors import BadInputError, MissingExtraError, UnsupportedArchitectureError
from ..files.limits import check_memory, forward_bytes, usable_cores
from ..files.bench_record import FORMAT, LEVELS, outputs_sha256
from ..methods import method_for
from ..runtime.adapters import loadable_family
from ..runtime.attention import collaborative_attention
from ..runtime.values import lift_values

__all__ = ["Spread", "spread", "interleaved", "pair_ratio", "peak_memory", "cache_bytes",
           "measured_crossover", "bench", "MEMORY_METHODS"]

MEMORY_METHODS = {
    "cpu": "peak of torch's CPU allocations minus frees during one forward (torch.profiler, profile_memory=True)",
    "cuda": "torch.cuda.max_memory_allocated during one forward, above the memory allocated before it",
}
_SEED = 0

Progress = Callable[[str, int, int], None]
Run = Callable[[], Any]


# --------------------------------------------------------------------------- timing and memory (pure helpers)

@dataclass(frozen=True)
class Spread:
    """Median, quartiles and range of a sample (seconds, or a ratio)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float

    def to_dict(self, unit: str = "") -> dict[str, float]:
        return {f"{k}{unit}": round(getattr(self, k), 9) for k in ("median", "q1", "q3", "min", "max")}


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (at least one); quartiles by linear interpolation."""
    if not values:
        raise ValueError("no values")
    data = sorted(float(v) for v in values)
    if len(data) == 1:
        return Spread(data[0], data[0], data[0], data[0], data[0])
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return Spread(statistics.median(data), q1, q3, data[0], data[-1])


def interleaved(*runs: Run, warmup: int, repeats: int,
                sync: Callable[[], None] | None = None) -> tuple[list[float], ...]:
    """Run ``runs`` (at least two) in turn: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Returns the wall times in seconds, one list per run in the order given, round by round.
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after each timed run.
    """
    if warmup < 0 or repeats < 1 or len(runs) < 2:
        raise ValueError(f"need two or more runs, warmup >= 0 and repeats >= 1, got {len(runs)}, {warmup}, {repeats}")
    sync = sync or (lambda: None)
    times: tuple[list[float], ...] = tuple([] for _ in runs)
    for i in range(warmup + repeats):
        for fn, out in zip(runs, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return times


def pair_ratio(first: Sequence[float], second: Sequence[float]) -> Spread:
    """The spread of the per-pair ratios ``second[i] / first[i]`` (its median is the reported ratio)."""
    if len(first) != len(second) or not first:
        raise ValueError("need two equally long, non-empty samples")
    return spread([b / a for a, b in zip(first, second)])


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the CPU profiler's C++ start/stop lines are not the user's business."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Run, device: torch.device | str) -> int:
    """Peak bytes allocated by torch during one call of ``fn`` (see :data:`MEMORY_METHODS`)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(key bytes, value bytes) held by a transformers cache, summed over its layers' tensors."""
    keys = values = 0
    for layer in cache.layers:
        for t, is_key in ((getattr(layer, "keys", None), True), (getattr(layer, "values", None), False)):
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                keys, values = (keys + n, values) if is_key else (keys, values + n)
    return keys, values


def measured_crossover(rows: Sequence[dict[str, Any]], batch_size: int) -> int | None:
    """The first sequence length (ascending) at which the compressed forward is no slower
    (median pair ratio <= 1) at this batch size, or ``None`` when it is slower at every one."""
    for row in sorted((r for r in rows if r["batch_size"] == batch_size), key=lambda r: r["seq_len"]):
        if row["ratio"]["median"] <= 1.0:
            return row["seq_len"]
    return None


# --------------------------------------------------------------------------- module level

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclass
class _Layer:
    """One compressed layer's tensors on both sides, ready to run."""

    spec: Any  # the original's AttentionSpec
    method: Any  # its LayerMethod
    w_query: torch.Tensor
    b_query: torch.Tensor | None
    w_key: torch.Tensor
    b_key: torch.Tensor | None
    w_value: torch.Tensor
    b_value: torch.Tensor | None
    collab: torch.nn.Module
    latent: torch.Tensor | None = None  # shared values: A (r_v, D), the compressed side's value projection
    latent_bias: torch.Tensor | None = None  # a (r_v,)
    value_up: torch.Tensor | None = None  # B (G*d, r_v)


def _value_projection(method, ckpt, spec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The value weight (G*d or H*d, D) and its bias, from the original checkpoint (``method``: the layer's)."""
    if (value := method.value_projection(ckpt, spec)) is not None:
        return value
    raise BadInputError(f"the original checkpoint holds no value projection of {spec.module} that fits it; the "
                        "module-level bench needs the query, key and value tensors of every compressed layer")


def _module_layers(source, out, manifest) -> list[_Layer]:
    from ..files.arch import load_query_key

    layers = []
    for layer in manifest.layers:
        spec = source.specs.get(layer.module)
        if spec is None:
            raise BadInputError(f"module {layer.module} of the manifest is not in the original checkpoint")
        method = method_for(layer)
        qk = load_query_key(source.ckpt, spec, torch.float32)
        w_value, b_value = _value_projection(method, source.ckpt, spec)
        names = layer.value_tensors()  # shared values: {"weight", "bias", "up"}, empty without
        shared = {role: out.load(name, torch.float32, finite=True) for role, name in names.items()}
        layers.append(_Layer(spec, method, qk.w_query, qk.b_query, qk.w_key, qk.b_key, w_value, b_value,
                             method.output_module(out, layer, spec), shared.get("weight"), shared.get("bias"),
                             shared.get("up")))
    return layers


def _to(layers: list[_Layer], dtype: torch.dtype, device: torch.device) -> None:
    for la in layers:
        for name in ("w_query", "b_query", "w_key", "b_key", "w_value", "b_value", "latent", "latent_bias", "value_up"):
            t = getattr(la, name)
            if t is not None:
                setattr(la, name, t.to(dtype=dtype, device=device))
        la.collab.to(device=device, dtype=dtype)
        if hasattr(la.collab, "collab_key_freq"):
            la.collab.collab_key_freq = la.collab.collab_key_freq.long()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, N, n*d) -> (B, n, N, d)


def _original_layer(la: _Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    s = la.spec
    q = _heads(F.linear(x, la.w_query, la.b_query), s.head_dim)  # (B, H, N, d)
    k = _heads(F.linear(x, la.w_key, la.b_key), s.head_dim)  # (B, G, N, d)
    v = _heads(F.linear(x, la.w_value, la.b_value), s.head_dim)  # (B, G, N, d)
    if rope is None:
        return F.scaled_dot_product_attention(q, k, v, scale=s.scale)  # (B, H, N, d)
    cos, sin = rope[0][:, None], rope[1][:, None]  # (1, 1, N, d)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    group = s.n_head // s.n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, N, d), as repeat_kv
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s.scale)


def _compressed_layer(la: _Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    s = la.spec
    if la.latent is not None:  # shared values: one latent value head for all heads
        v = F.linear(x, la.latent, la.latent_bias)[:, None]  # (B, 1, N, r_v)
    else:
        v = _heads(F.linear(x, la.w_value, la.b_value), s.head_dim)  # (B, G, N, d)
    if rope is None:
        out = la.collab(x, v)[0]  # (B, H, N, d or r_v)
    else:
        cos, sin = rope
        query = _heads(F.linear(x, la.w_query, la.b_query), s.head_dim)  # (B, H, N, d)
        q = la.collab.query_states(query, cos, sin, s.scale)  # (B, H, N, R), scale included
        k = la.collab.key_states(x, cos, sin)  # (B, 1, N, R), one key head for all
        # the runtime's kernel, as the transformers adapter runs it (grouped values, no repeat)
        out = collaborative_attention(q, k, v, is_causal=True, need_weights=False)[0]  # (B, H, N, d or r_v)
    if la.value_up is None:
        return out
    return lift_values(out.transpose(1, 2), la.value_up, s.head_dim).transpose(1, 2)  # (B, H, N, d)


class _ModulePair:
    """Runs every compressed layer, original or compressed, on seeded inputs of a given shape."""

    level = "module"
    causal = False

    def __init__(self, layers: list[_Layer], config: dict[str, Any] | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        from ..files.texts import position_limit

        self.layers, self.config, self.dtype, self.device = layers, config, dtype, device
        self.position_limit = position_limit(config)  # the source's config.json: the model's positions

    def runs(self, seq_len: int, batch: int) -> tuple[Run, Run]:
        g = torch.Generator().manual_seed(_SEED + seq_len * 131 + batch)
        inputs, ropes = {}, {}
        for la in self.layers:
            d_model, head_dim = la.spec.d_model, la.spec.head_dim
            if d_model not in inputs:
                inputs[d_model] = torch.randn(batch, seq_len, d_model, generator=g).to(self.device, self.dtype)
            if (la.method.name, head_dim) not in ropes:
                ropes[la.method.name, head_dim] = la.method.position_embeddings(self.config, head_dim, seq_len,
                                                                                self.dtype, self.device)

        def run(layer_fn) -> Run:
            @torch.inference_mode()
            def forward() -> None:
                for la in self.layers:
                    layer_fn(la, inputs[la.spec.d_model], ropes[la.method.name, la.spec.head_dim])
            return forward

        return run(_original_layer), run(_compressed_layer)


# --------------------------------------------------------------------------- model level

class _ModelPair:
    """The original and the compressed transformers model, run on the same seeded token ids."""

    level = "model"

    def __init__(self, reference, model, family, dtype: torch.dtype, device: torch.device) -> None:
        from .evaluate import encoder_of
        from ..files.texts import position_limit

        self.reference, self.model, self.dtype, self.device = reference, model, dtype, device
        self.causal = bool(family.causal_lm or model.can_generate())
        # an encoder's hidden states (the encoder of an encoder-decoder model); a causal LM whole
        self.runners = (reference, model) if self.causal else (encoder_of(reference), encoder_of(model))
        self.vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if self.vocab < 1:
            raise UnsupportedArchitectureError("the model-level bench feeds token ids, but the model's config "
                                               "gives no vocab_size; use --level module")
        self.position_limit = position_limit(model.config)

    def _ids(self, batch: int, seq_len: int, salt: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(_SEED + seq_len * 131 + batch + salt)
        return torch.randint(self.vocab, (batch, seq_len), generator=g).to(self.device)  # (B, N)

    def runs(self, seq_len: int, batch: int) -> tuple[Run, Run]:
        ids = self._ids(batch, seq_len)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.causal:
            kwargs["use_cache"] = False

        def run(m) -> Run:
            @torch.inference_mode()
            def forward() -> None:
                m(**kwargs)
            return forward

        return run(self.runners[0]), run(self.runners[1])

    @torch.inference_mode()
    def decode(self, context: int, steps: int, warmup: int, sync: Callable[[], None] | None) -> dict[str, Any]:
        """Prefill ``context`` tokens (batch 1) into a DynamicCache for each model, measure the cache
        bytes, then time ``warmup + steps`` one-token steps of both models interleaved."""
        from transformers import DynamicCache

        from ..runtime.adapters import cache_keyword

        ids = self._ids(1, context + warmup + steps, salt=7)  # (1, context + warmup + steps)
        caches, sizes = [], []
        for m in (self.reference, self.model):
            cache = DynamicCache(config=m.config)  # its layers made up front, as generate() does
            m(input_ids=ids[:, :context], **{cache_keyword(m): cache}, use_cache=True)
            caches.append(cache)
            sizes.append(cache_bytes(cache))
            if not sum(sizes[-1]):
                raise UnsupportedArchitectureError(f"{type(m).__name__} left its key/value cache empty after a "
                                                   f"{context}-token prefill: decoding cannot be measured")
        position = [context]  # the token both models take next
        keys = cache_keyword(self.reference), cache_keyword(self.model)  # looked up once, not per timed step

        def original_step() -> None:
            i = position[0]
            self.reference(input_ids=ids[:, i:i + 1], **{keys[0]: caches[0]}, use_cache=True)

        def compressed_step() -> None:
            i = position[0]
            self.model(input_ids=ids[:, i:i + 1], **{keys[1]: caches[1]}, use_cache=True)
            position[0] += 1

        times_o, times_c = interleaved(original_step, compressed_step, warmup=warmup, repeats=steps, sync=sync)
        so, sc = spread(times_o), spread(times_c)
        ratio = pair_ratio(times_o, times_c)
        (ko, vo), (kc, vc) = sizes
        per_token = {f"{what}_cache_bytes_per_token_{side}": round(n / context, 3)
                     for what, (o, c) in (("key", (ko, kc)), ("value", (vo, vc)), ("kv", (ko + vo, kc + vc)))
                     for side, n in (("original", o), ("compressed", c))}
        return {
            "context": context, "steps": steps, "batch_size": 1,
            "original": {"tokens_per_second": round(1.0 / so.median, 3), **so.to_dict("_s")},
            "compressed": {"tokens_per_second": round(1.0 / sc.median, 3), **sc.to_dict("_s")},
            "ratio": ratio.to_dict(),
            "tokens_per_second_ratio": round(so.median / sc.median, 6),
            "key_cache_bytes_original": ko, "key_cache_bytes_compressed": kc,
            "value_cache_bytes_original": vo, "value_cache_bytes_compressed": vc,
            "key_cache_ratio": round(kc / ko, 6) if ko else None,
            "kv_cache_bytes_original": ko + vo, "kv_cache_bytes_compressed": kc + vc,
            **per_token,
            "value_cache_ratio": round(vc / vo, 6) if vo else None,
            "kv_cache_ratio": round((kc + vc) / (ko + vo), 6) if ko + vo else None,
        }


def _load_models(original: Path, compressed: Path, device: torch.device):
    """(original model, compressed model): evaluate's loaders, one model type."""
    from .. import hf
    from ..extras import quiet_transformers

    with quiet_transformers():
        model = hf.load_model(compressed, device=device)  # an export loads as a plain model
        reference = hf.load_model(original, model_class=type(model), device=device)
    if reference.config.model_type != model.config.model_type:
        raise BadInputError(f"{original} is a {reference.config.model_type!r} model but {compressed} was compressed "
                            f"from a {model.config.model_type!r} model")
    return reference, model


# --------------------------------------------------------------------------- the command's library function

def _check_settings(lengths: Sequence[int], batch_sizes: Sequence[int], warmup: int, repeats: int, context: int,
                    decode_steps: int, threads: int | None) -> None:
    for name, values in (("--lengths", lengths), ("--batch-sizes", batch_sizes)):
        if not values or any(v < 1 for v in values):
            raise BadInputError(f"{name} must list positive integers, got {', '.join(map(str, values)) or 'none'}")
    for name, value, low in (("--warmup", warmup, 0), ("--repeats", repeats, 1), ("--context", context, 1),
                             ("--decode-steps", decode_steps, 1), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise BadInputError(f"{name} must be at least {low}, got {value}")
    if threads is not None and threads > (cores := usable_cores()):
        raise BadInputError(f"--threads {threads:,} is more than the {cores} CPU cores this process may use; "
                            f"give at most {cores}")


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise BadInputError(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device cuda: CUDA is not available to this torch {torch.__version__} "
                            "(no GPU, or a CPU-only build); use --device cpu")
    return torch.device(name)


def _work_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The stored dtype, except half precision on the CPU, which runs in float32 (what a CPU user runs)."""
    return torch.float32 if device.type == "cpu" and stored in (torch.float16, torch.bfloat16) else stored


def bench(original: str | os.PathLike, compressed: str | os.PathLike, *, level: str | None = None,
          lengths: Sequence[int] = DEFAULT_BENCH_LENGTHS, batch_sizes: Sequence[int] = DEFAULT_BENCH_BATCH_SIZES,
          threads: int | None = None, warmup: int = DEFAULT_BENCH_WARMUP, repeats: int = DEFAULT_BENCH_REPEATS,
          context: int = DEFAULT_BENCH_CONTEXT, decode_steps: int = DEFAULT_BENCH_DECODE_STEPS,
          device: str = "cpu", memory: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    """Measure the forward latency (and for causal decoders the decode speed) of ``compressed``
    against ``original``, with the FLOP model's ratios beside them (see the module docstring).

    Args:
        original: the source checkpoint or model directory the manifest records (sha256-checked).
        compressed: the ``compress`` output directory.
        level: ``"module"``, ``"model"`` or ``None`` (model when transformers is installed and both
            load as transformers models, else module; the reason is in ``notes``).
        lengths, batch_sizes: forward sequence lengths N and batch sizes B (every pair is run).
        threads: torch intra-op threads while measuring (default: torch's current setting).
        warmup, repeats: untimed and timed interleaved pairs per setting (decode: steps).
        context, decode_steps: decode prefill length (capped at the model's positions) and timed steps.
        device: ``"cpu"`` or ``"cuda"``.
        memory: also measure the peak memory of one forward per setting and side.
        progress: called as ``(stage, done, total)`` after each setting.

    Returns:
        The JSON-ready record whose keys the README lists (``format`` ``collabcompress-bench/1``).

    Raises:
        BadInputError: bad settings (a length beyond the model's positions, more threads than usable
            cores, a batch and length whose activations exceed the memory available), unreadable or
            mismatched directories, CUDA unavailable.
        UnsupportedArchitectureError: a family the requested level cannot run.
        MissingExtraError: ``level="model"`` without transformers.
    """
    from ..files.manifest import open_output
    from .report import build_report
    from .export import export_source, read_export
    from .verify import resolve_original

    lengths, batch_sizes = sorted(set(int(n) for n in lengths)), sorted(set(int(b) for b in batch_sizes))
    _check_settings(lengths, batch_sizes, warmup, repeats, context, decode_steps, threads)
    if level is not None and level not in LEVELS:
        raise BadInputError(f"--level must be module or model, got {level!r}")
    dev = _device(device)
    original, compressed = Path(original), Path(compressed)
    if not original.exists():
        raise BadInputError(f"original checkpoint not found: {original}")
    model_dir, exported, notes = compressed, read_export(compressed), []
    if exported is not None:  # a plain model: timed whole, beside the FLOP model of the output it came from
        if level == "module":
            raise BadInputError(f"{compressed} is an export (a plain model): bench it with --level model")
        level, compressed = "model", export_source(exported)
        notes.append(f"exported model; the FLOP model is that of {compressed}, the output it was exported from")
    manifest, out = open_output(compressed)
    try:
        source, _ = resolve_original(manifest, original)  # verify --original's check: the recorded sha256
        try:
            pair = None
            if level in (None, "model"):
                pair = _model_pair(original, model_dir, manifest, out, dev, level, notes)
            if pair is None:
                layers = _module_layers(source, out, manifest)
                dtype = _work_dtype(_stored_dtype(out, manifest), dev)
                _to(layers, dtype, dev)
                pair = _ModulePair(layers, source.ckpt.config, dtype, dev)
        finally:
            source.ckpt.close()
    finally:
        out.close()

    if lengths[-1] > pair.position_limit:
        raise BadInputError(f"--lengths {lengths[-1]:,} is more than the model's {pair.position_limit:,} positions; "
                            f"give lengths of at most {pair.position_limit:,}")
    check_memory(forward_bytes(manifest.layers, batch_sizes[-1], lengths[-1], vocab=pair.vocab if pair.causal else 0,
                               element=pair.dtype.itemsize),
                 f"the attention scores{', activations and logits' if pair.causal else ' and activations'} of a "
                 f"forward pass of --batch-sizes {batch_sizes[-1]:,} at --lengths {lengths[-1]:,}", dev.type)
    report = build_report(compressed, lengths)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    total = len(lengths) * len(batch_sizes) + (1 if pair.causal else 0)
    rows, done = [], 0
    try:
        for batch in batch_sizes:
            for n in lengths:
                first, second = pair.runs(n, batch)
                times_o, times_c = interleaved(first, second, warmup=warmup, repeats=repeats, sync=sync)
                row = {"seq_len": n, "batch_size": batch,
                       "original": spread(times_o).to_dict("_s"), "compressed": spread(times_c).to_dict("_s"),
                       "ratio": pair_ratio(times_o, times_c).to_dict(),
                       "flop_model_ratio": round(report.flop_model_ratio(n, pair.level), 6),
                       "peak_memory_bytes_original": peak_memory(first, dev) if memory else None,
                       "peak_memory_bytes_compressed": peak_memory(second, dev) if memory else None}
                rows.append(row)
                done += 1
                if progress:
                    progress(f"N={n} B={batch}", done, total)
        decode = None
        if pair.causal:
            ctx = min(context, pair.position_limit - warmup - decode_steps)
            if ctx < 1:
                raise BadInputError(f"--warmup {warmup} + --decode-steps {decode_steps} leave no context within the "
                                    f"model's {pair.position_limit:,} positions")
            if ctx < context:
                notes.append(f"decode context capped at {ctx:,} tokens (the model's {pair.position_limit:,} "
                             f"positions less {warmup + decode_steps} decode steps)")
            decode = pair.decode(ctx, decode_steps, warmup, sync)
            if progress:
                progress("decode", total, total)
        elif pair.level == "module":
            notes.append("decode speed and cache bytes are measured at --level model (causal decoders only)")
    finally:
        torch.set_num_threads(threads_before)

    return {
        "format": FORMAT,
        "original": str(original), "compressed": str(model_dir), "outputs_sha256": outputs_sha256(exported or manifest),
        "family": manifest.source.architecture, "level": pair.level, "device": dev.type,
        "dtype": str(pair.dtype).removeprefix("torch."), "threads": threads if threads is not None else threads_before,
        "torch": torch.__version__, "warmup": warmup, "repeats": repeats,
        "compressed_layers": len(manifest.layers), "causal": pair.causal,
        "memory_method": MEMORY_METHODS[dev.type] if memory else None,
        "forward": rows,
        "crossover": {"measured": {str(b): measured_crossover(rows, b) for b in batch_sizes},
                      "flop_model": _round(report.flop_model_crossover(pair.level))},
        "decode": decode,
        "notes": notes,
    }


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 4)


def _stored_dtype(out, manifest) -> torch.dtype:
    from ..dtypes import to_torch

    return to_torch(out.dtype(manifest.layers[0].tensors.key))


def _model_pair(original: Path, compressed: Path, manifest, out, device: torch.device, level: str | None,
                notes: list[str]) -> _ModelPair | None:
    """The model-level pair, or ``None`` (with the reason in ``notes``) when ``level`` is automatic and
    transformers is missing or the directories do not load as transformers models."""

    try:
        family = loadable_family(manifest.source.architecture, compressed)
        if not family.text:
            raise UnsupportedArchitectureError(f"{compressed}: the model-level bench feeds token ids; family "
                                               f"{family.name!r} is not a text model (use --level module)")
        if not original.is_dir() or not (original / "config.json").is_file():
            raise BadInputError(f"the model-level bench needs the original model directory with its config.json, "
                                f"got {original}")
        reference, model = _load_models(original, compressed, device)
    except (MissingExtraError, BadInputError, UnsupportedArchitectureError) as e:
        if level == "model":
            raise
        notes.append(f"measured at module level: the whole model cannot be run ({e})")
        return None
    dtype = _work_dtype(next(model.parameters()).dtype, device)
    return _ModelPair(reference.to(dtype), model.to(dtype), family, dtype, device)
