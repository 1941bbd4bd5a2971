"""Compress a checkpoint: collaborative re-parametrization of every chosen attention layer.

Reads the source lazily, decomposes one layer at a time, writes the output directory of
docs/method.md atomically (weights, config.json with a ``collaborative_attention``
block, the source directory's other files, ``collab_manifest.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import time
import warnings
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..files.arch import AttentionSpec, detect, stored_qk_params
from ..defaults import DEFAULT_MULTIPLE_OF
from ..dtypes import compute_dtype, dtype_name, to_torch
from ..errors import BadInputError
from ..files.checkpoint import INDEX_SUFFIX, Checkpoint, open_checkpoint
from ..files import manifest as _mf
from ..files.manifest import FORMAT, MANIFEST_NAME
from ..files.limits import check_memory, spectra_bytes
from ..parallel import default_workers, map_layers
from ..methods import FittedLayer, method_for
from ..options import CompressOptions
from ..files.hashing import sha256_file
from ..files.output import (atomic_directory, check_output_path, copy_other_files, file_record, write_json, write_manifest,
                     write_safetensors)

__all__ = ["CompressOptions", "compress", "curve_loss", "loss_curves", "load_statistics", "parse_layers",
           "MANIFEST_NAME", "FORMAT"]

Progress = Callable[[str, int, int], None]


def parse_layers(spec: str | None, n_layers: int) -> set[int]:
    """``"0,2,4-5"`` -> {0, 2, 4, 5}; ``None`` -> every layer."""
    if spec is None:
        return set(range(n_layers))
    shown = repr(spec if len(spec) <= 40 else f"{spec[:40]}...")
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise BadInputError(f"--layers {shown}: expected indices and ranges like 0,2,4-5")
        lo_text, hi_text = (g.lstrip("0") or "0" for g in m.groups(m.group(1)))
        if max(len(lo_text), len(hi_text)) > 9:  # out of range, and int() refuses numbers of > 4,300 digits
            raise BadInputError(f"--layers {shown}: the model has attention layers 0 to {n_layers - 1}")
        lo, hi = int(lo_text), int(hi_text)
        if lo > hi or hi >= n_layers:
            raise BadInputError(f"--layers {shown}: the model has attention layers 0 to {n_layers - 1}")
        chosen.update(range(lo, hi + 1))
    return chosen


def _check_finite(layers: list[FittedLayer], options: CompressOptions) -> None:
    """Refuse to write a new tensor holding NaN or Inf (a broken model), naming the likely cause."""
    for layer in layers:
        for name, t in layer.tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                causes = [f"values beyond the range of {str(t.dtype).removeprefix('torch.')} (try --dtype float32)"] \
                    if t.dtype in (torch.float16, torch.bfloat16) else []
                causes.append(f"extreme calibration statistics in {options.calibration}" if options.calibration
                              else "extreme values in the source weights")
                raise BadInputError(f"compress computed NaN or Inf in {name}; nothing was written. "
                                    f"Likely cause: {' or '.join(causes)}")


def _write_weights(ckpt: Checkpoint, layers: list[FittedLayer], tmp: Path, options: CompressOptions) -> list[Path]:
    """Every source tensor except the removed ones, plus the new ones; same shard layout as the source.

    Tensors are streamed one at a time, so memory stays bounded by the largest tensor. New
    tensors that are not finite are refused first (:func:`_check_finite`).
    """
    _check_finite(layers, options)
    removed = {n for layer in layers for n in layer.removed}
    new_by_file: dict[Path, dict[str, torch.Tensor]] = {f: {} for f in ckpt.files}
    for layer in layers:
        new_by_file[ckpt.weight_map[layer.spec.query]].update(layer.tensors)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for file in ckpt.files:
        entries = [(n, ckpt.shape(n), to_torch(ckpt.dtype(n)) or ckpt.load(n).dtype,
                    lambda n=n: ckpt.load(n))
                   for n, f in ckpt.weight_map.items() if f == file and n not in removed]
        entries += [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in new_by_file[file].items()]
        name = file.name if ckpt.sharded else "model.safetensors"
        metadata = dict(ckpt.metadata(file))
        metadata.update({"format": "pt", "collabcompress": __version__})
        total += write_safetensors(tmp / name, entries, metadata)
        written.append(tmp / name)
        weight_map.update({e[0]: name for e in entries})
    if ckpt.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        target = tmp / f"model{INDEX_SUFFIX}"
        write_json(index, target)
        written.append(target)
    return written


def _run_layers(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, out_dtype: torch.dtype,
                stats: dict[str, Any], sequences: dict[str, Any], workers: int,
                progress: Progress | None, ranks: dict[str, int] | None = None,
                value_stats: Mapping[str, Any] | None = None,
                value_ranks: dict[str, int] | None = None) -> list[FittedLayer]:
    from ..methods.values import VALUES

    def one(spec: AttentionSpec) -> FittedLayer:
        method = method_for(spec)
        rank = (ranks or {}).get(spec.module, method.full_width(spec) if options.keys_full else None)
        layer = method.fit(ckpt, spec, options, out_dtype, stats.get(spec.module), sequences.get(spec.module), rank)
        if options.values:
            layer.add_values(VALUES.fit(ckpt, spec, options, out_dtype, (value_stats or {}).get(spec.module),
                                        (value_ranks or {}).get(spec.module)))
        return layer

    step = (lambda spec, done, total: progress(spec.module, done, total)) if progress else None
    return map_layers(one, specs, workers=1 if options.device != "cpu" else workers, progress=step)


def _loss_curves(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, stats: dict[str, Any],
                 sequences: dict[str, Any], workers: int, progress: Progress | None) -> list[dict[int, float]]:
    """Per layer: candidate key cache R -> attention KL on the kept sequences (see :mod:`collabcompress.maths.budget`)."""
    def one(spec: AttentionSpec) -> dict[int, float]:
        return method_for(spec).loss_curve(ckpt, spec, options, stats.get(spec.module), sequences[spec.module])

    step = (lambda spec, done, total: progress(f"loss curve {spec.module}", done, total)) if progress else None
    return map_layers(one, specs, workers=1 if options.device != "cpu" else workers, progress=step)


def load_statistics(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> Mapping[str, Any]:
    """module -> the statistics its method fits from (each method reads its own; a method may read
    a layer's only when the layer asks, and ChainMap copies none)."""
    methods = dict.fromkeys(method_for(s) for s in specs)
    return ChainMap(*(m.load_statistics(path, ckpt, [s for s in specs if method_for(s) is m]) for m in methods))


def curve_loss(ckpt: Checkpoint, specs: list[AttentionSpec], refine_steps: int = 0) -> str:
    """What the ``--budget`` curves measure: ``next_token_kl`` (the whole model's, with one layer
    compressed at a time) for a rotary causal LM that can be run (a model directory with
    config.json) and no refinement, else ``attention_kl`` (each layer's own attention KL).

    Measured on SmolLM2 (lee_background.cor, 8 kept windows): without refinement the
    next-token KL allocates better (half the key cache: perplexity 42.13 against 42.48 by
    attention KL, 43.38 uniform); with ``--refine-steps 100`` worse (half: 36.17 against 35.98;
    a third: 45.21 against 41.82): it gives the sensitive early layers their full key cache and
    starves the later ones, whose losses refinement would have recovered.
    """
    import importlib.util

    runnable = ckpt.config is not None and (ckpt.directory / "config.json").is_file() \
        and importlib.util.find_spec("transformers") is not None
    return "next_token_kl" if runnable and not refine_steps and all(method_for(s).causal_lm for s in specs) else "attention_kl"


def _budget_curves(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, stats: dict[str, Any],
                   sequences: dict[str, Any], workers: int, progress: Progress | None,
                   value_stats: Mapping[str, Any] | None = None) -> tuple[str, list[dict[int, float]], list | None]:
    """The loss :func:`curve_loss` names and its curves, one per layer; with ``--budget-of kv``
    also the value curves (both by the next-token KL: the only loss keys and values share)."""
    from ..files.statistics import load_input_ids
    from ..methods.rotary import CURVE_STEPS, model_curves

    kv = options.budget_of == "kv"
    loss = "next_token_kl" if kv else curve_loss(ckpt, specs, options.refine_steps)
    if loss == "next_token_kl":
        from .. import hf
        from ..extras import quiet_transformers, require_transformers

        ids, lengths = load_input_ids(Path(options.calibration), ckpt, specs)
        transformers = require_transformers("--budget on a causal LM")
        with quiet_transformers():
            model = hf.load_model(ckpt.directory, model_class=transformers.AutoModelForCausalLM).float()
        curves = model_curves(model, ckpt, specs, options, stats, ids, lengths, progress)
        values = None
        if kv:
            from ..methods.rotary import curve_tokens
            from ..methods.values import VALUES

            _, log_probs = curve_tokens(model, ids, lengths)
            with torch.inference_mode():
                values = VALUES.model_curves(model, ckpt, specs, options, value_stats, log_probs(), log_probs,
                                             progress, CURVE_STEPS)
        return loss, curves, values
    return loss, _loss_curves(ckpt, specs, options, stats, sequences, workers, progress), None


def loss_curves(ckpt: Checkpoint, specs: list[AttentionSpec], calibration: Path, *, multiple_of: int = DEFAULT_MULTIPLE_OF,
                seed: int = 0, workers: int = 1, refine_steps: int = 0) -> tuple[str, list[dict[int, float]]]:
    """The loss ``--budget`` allocates by (:func:`curve_loss`) and its curves (candidate key cache
    R -> loss on the kept calibration windows), one per layer of ``specs``; what
    ``analyze --calibration`` shows (those of ``compress --budget`` without refinement)."""
    from ..files.statistics import load_sequences

    stats = load_statistics(calibration, ckpt, specs)
    options = CompressOptions(rank=1, multiple_of=multiple_of, seed=seed, calibration=str(calibration),
                              refine_steps=refine_steps)
    attention = curve_loss(ckpt, specs, refine_steps) == "attention_kl"
    sequences = load_sequences(calibration, ckpt, specs) if attention else {}
    return _budget_curves(ckpt, specs, options, stats, sequences, workers, None)[:2]


def _allocation(specs: list[AttentionSpec], curves: list[dict[int, float]], budget: float,
                value_curves: list[dict[int, float]] | None = None) -> tuple[dict[str, int], dict[str, int] | None]:
    """The key cache R of each layer under ``budget`` (a fraction of the layers' original key
    cache); with value curves, R and r_v of each layer under ``budget`` of the key and value cache."""
    from ..maths.budget import allocate
    from ..methods.values import VALUES

    full = sum(method_for(s).full_width(s) for s in specs)
    if value_curves is not None:
        full += sum(VALUES.full_width(s) for s in specs)
    try:
        ranks = allocate(curves + (value_curves or []), int(budget * full + 1e-9))
    except ValueError as e:
        raise BadInputError(f"--budget {budget}: {e}; the smallest key cache per layer is "
                            f"{min(curves[0])} of {method_for(specs[0]).full_width(specs[0])}") from e
    keys = {s.module: r for s, r in zip(specs, ranks)}
    values = None if value_curves is None else {s.module: r for s, r in zip(specs, ranks[len(specs):])}
    return keys, values


def _value_statistics(ckpt: Checkpoint, specs: list[AttentionSpec],
                      options: CompressOptions) -> Mapping[str, Any] | None:
    """Shared values: check the layers can take them and read their statistics (``None``: data-free).

    A causal LM's data-free value fit is refused without ``--force-data-free``: measured on
    SmolLM2 at r_v = 64 of 192, its perplexity is in the tens of thousands (docs/method.md)."""
    from ..methods.values import VALUES, value_sources

    if not options.values:
        return None
    for s in specs:
        value_sources(ckpt, s)
        if options.value_rank is not None:
            VALUES.check_rank(s, options.value_rank)
    if options.calibration:
        return VALUES.load_statistics(Path(options.calibration), ckpt, specs)
    if all(method_for(s).causal_lm for s in specs) and not options.force_data_free:
        raise BadInputError("shared values of a causal LM need --calibration statistics: the data-free value fit "
                            "is useless there (SmolLM2, 64 of 192 values: perplexity 44,246 against 32); "
                            "pass --force-data-free to fit without them anyway")
    return None


def compress(checkpoint: str | Path, out: str | Path, options: CompressOptions, *, heads: int | None = None,
             arch: str | None = None, force: bool = False, workers: int | None = None,
             remote_code: bool = False, progress: Progress | None = None,
             kv_heads: int | None = None) -> dict[str, Any]:
    """Compress ``checkpoint`` into the output directory ``out``; returns the manifest.

    Args:
        checkpoint: file, sharded index or directory (see :func:`open_checkpoint`).
        out: the output directory; refused if it exists unless ``force``.
        options: rank choice and decomposition settings.
        heads, arch: overrides for the head count and the family.
        kv_heads: key/value head count of a rotary model without config.json (``--kv-heads``).
        workers: layers decomposed in parallel (default: the usable CPU cores); the output
            does not depend on it.
        remote_code: also write the modeling file that makes the output load with
            ``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)`` (hf extra).

    Raises:
        BadInputError, UnsupportedArchitectureError: see docs/method.md.
    """
    options.check()
    if options.stock:  # r_v = R
        options = dataclasses.replace(options, value_rank=options.rank)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise BadInputError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    ckpt = open_checkpoint(checkpoint)
    check_output_path(out, ckpt.files + ([ckpt.index_file] if ckpt.index_file else []), ckpt.directory
                      if Path(checkpoint).is_dir() or ckpt.sharded else None, force=force)
    specs = detect(ckpt, heads=heads, arch=arch, kv_heads=kv_heads)
    chosen = parse_layers(options.layers, len(specs))
    specs = [s for s in specs if s.index in chosen]
    if options.rank is not None:
        for s in specs:
            method_for(s).check_rank(s, options.rank)
    if options.budget_of == "kv" and curve_loss(ckpt, specs) != "next_token_kl":
        raise BadInputError("--budget-of kv allocates by the next-token KL of a causal LM: pass a rotary "
                            "decoder's model directory (with config.json) and install the hf extra")
    value_stats = _value_statistics(ckpt, specs, options)
    check_memory(*spectra_bytes([method_for(s).memory(s, options.calibration is not None) for s in specs],
                                max((s.d_model for s in specs), default=0), 1 if options.device != "cpu" else workers))
    stats, sequences = {}, {}
    if options.calibration:
        from ..files.statistics import load_input_ids, load_sequences, load_window_ids

        stats = load_statistics(Path(options.calibration), ckpt, specs)
        if options.refine_steps or options.budget is not None or options.heal_steps:
            sequences = load_sequences(Path(options.calibration), ckpt, specs)
        if options.heal_steps:  # the token ids healing trains on, checked before any work
            load_input_ids(Path(options.calibration), ckpt, specs)
            load_window_ids(Path(options.calibration), ckpt, specs)
    if options.stock:
        options = _stock_table(ckpt, specs, options, stats)
    source_dtype = ckpt.dtype(specs[0].query)
    out_dtype = to_torch(options.dtype if options.dtype != "auto" else source_dtype)
    curves, ranks, value_curves, value_ranks = None, None, None, None
    if options.budget is not None:
        curve_name, curves, value_curves = _budget_curves(ckpt, specs, options, stats, sequences, workers, progress,
                                                          value_stats)
        ranks, value_ranks = _allocation(specs, curves, options.budget, value_curves)
    layers = _run_layers(ckpt, specs, options, out_dtype, stats, sequences, workers, progress, ranks, value_stats,
                         value_ranks)
    if curves is not None:
        for layer, curve in zip(layers, curves):
            layer.curve, layer.curve_loss = curve, curve_name
    for layer, curve in zip(layers, value_curves or []):
        layer.values.curve = curve
    source_files = ckpt.files + ([ckpt.index_file] if ckpt.index_file else [])
    config_path = ckpt.directory / "config.json"
    if ckpt.config is not None:
        source_files.append(config_path)
    with atomic_directory(out, force=force) as tmp:
        outputs = _write_weights(ckpt, layers, tmp, options)
        if ckpt.config is not None:
            config = dict(ckpt.config)
            config["collaborative_attention"] = {"format": FORMAT, "version": __version__, "family": specs[0].family,
                                                 "layers": {la.spec.module: _config_entry(la) for la in layers}}
            write_json(config, tmp / "config.json")
            outputs.append(tmp / "config.json")
        if Path(checkpoint).is_dir() or ckpt.sharded or ckpt.config is not None:
            outputs.extend(copy_other_files(ckpt.directory, tmp, set(source_files)))
        manifest = _manifest(ckpt, checkpoint, specs, layers, options, source_files, outputs, tmp, heads, arch,
                             kv_heads)
        write_manifest(tmp, manifest)
        if options.heal_steps:
            healed = _heal(ckpt, Path(checkpoint), tmp, layers, options, specs, out_dtype, progress)
            _write_weights(ckpt, layers, tmp, options)
            manifest = _manifest(ckpt, checkpoint, specs, layers, options, source_files, outputs, tmp, heads, arch,
                                 kv_heads, healed)
            write_manifest(tmp, manifest)
        if remote_code:
            from ..hf import write_remote_code

            write_remote_code(tmp)
            manifest = _mf.read(tmp)
        _publishable(tmp)
    ckpt.close()
    return manifest.to_json()


def _stock_table(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions,
                 stats: Mapping[str, Any]) -> CompressOptions:
    """--stock: ``options`` with the one frequency table every layer keeps (``frequency_counts``)."""
    method = method_for(specs[0])
    if not all(method_for(s).stock and method_for(s) is method for s in specs):
        raise BadInputError(f"--stock makes an output `export --format stock` can write, which needs a rotary decoder "
                            f"(llama, mistral, qwen2); this is a {specs[0].family} model")
    model = ids = lengths = None
    if options.calibration and curve_loss(ckpt, specs) == "next_token_kl":  # weigh the layers by measured loss
        from .. import hf
        from ..extras import quiet_transformers, require_transformers
        from ..files.statistics import load_input_ids

        try:
            ids, lengths = load_input_ids(Path(options.calibration), ckpt, specs)
        except BadInputError as e:
            warnings.warn(f"--stock: the frequency table weighs every layer alike ({e})", stacklevel=2)
        if ids is not None:
            with quiet_transformers():
                model = hf.load_model(ckpt.directory, model_class=require_transformers("--stock").AutoModelForCausalLM)
            model = model.float()
    counts = method.stock_counts(ckpt, specs, options, stats, model, ids, lengths)
    return dataclasses.replace(options, frequency_counts=tuple(counts))


def _config_entry(layer: FittedLayer) -> dict[str, Any]:
    """The layer's entry in config.json's ``collaborative_attention`` block (with shared values: ``value_rank``)."""
    entry = method_for(layer.spec).config_entry(layer)
    if layer.values is not None:
        entry["value_rank"] = layer.values.rank
    return entry


def _heal(ckpt: Checkpoint, checkpoint: Path, tmp: Path, layers: list[FittedLayer], options: CompressOptions,
          specs: list[AttentionSpec], out_dtype: torch.dtype, progress: Progress | None) -> dict[str, Any]:
    """``--heal-steps``: load the written model, distil the original into its new tensors on the
    calibration windows (:func:`collabcompress.runtime.heal.heal`), and put them back into ``layers``.

    It trains on every window the statistics ran (files from before they stored them: the kept
    windows) except the last few kept ones (:func:`collabcompress.runtime.heal.held_out_count`), which
    are held out. A causal LM also trains on the training windows' sentences shuffled
    (:func:`collabcompress.runtime.lm.shuffled_sentences`) and on text the original samples from their
    sentences' starts (:func:`_own_text`), and holds out the held-out windows' sentences
    shuffled, so no sentence is on both sides."""
    from .. import hf
    from ..files.statistics import load_input_ids, load_window_ids
    from ..extras import quiet_transformers
    from ..runtime.heal import heal, held_out_count, trainable
    from ..runtime.lm import padded_rows, shuffled_sentences
    from ..files.texts import load_tokenizer

    if ckpt.config is None or not checkpoint.is_dir():
        raise BadInputError("--heal-steps runs the model: pass a model directory with config.json")
    ids, lengths = load_input_ids(Path(options.calibration), ckpt, specs)
    if ids.shape[0] < 2:
        raise BadInputError("--heal-steps holds one kept window out: run `calibrate --keep-sequences N` with N >= 2")
    held = held_out_count(ids.shape[0])
    windows = load_window_ids(Path(options.calibration), ckpt, specs)
    if windows is not None:  # every window but the held-out ones trains; those stay last
        all_ids, all_lengths, kept = windows
        held_windows = kept[-held:].tolist()
        order = [w for w in range(all_ids.shape[0]) if w not in held_windows and int(all_lengths[w]) >= 2] + held_windows
        ids, lengths = all_ids[order], all_lengths[order]
    causal = method_for(specs[0]).causal_lm
    with quiet_transformers():
        model = hf.from_pretrained(tmp).float()
        original = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
        reference = hf.load_model(checkpoint, model_class=original).float()
    shuffled = generated = 0  # windows of shuffled sentences and of the original's own text trained on
    sampling = 0.0  # seconds
    try:
        tokenizer = load_tokenizer([checkpoint]) if causal else None
    except BadInputError as e:
        warnings.warn(f"healing trains on the calibration windows only (no shuffled sentences, no sampled text): {e}",
                      stacklevel=2)
        tokenizer = None
    if tokenizer is not None:
        rows = [ids[i, : int(lengths[i])] for i in range(ids.shape[0])]
        more = [shuffled_sentences(tokenizer, part, window=ids.shape[1], seed=options.seed)
                for part in (rows[:-held], rows[-held:])]
        if all(more):  # training windows, shuffled ones, the original's text, held-out windows, shuffled ones
            if progress:
                progress("healing: sampling the original's text", 0, 1)
            start = time.perf_counter()
            own = _own_text(reference, tokenizer, rows[:-held], window=ids.shape[1], seed=options.seed)
            sampling = time.perf_counter() - start
            rows = rows[:-held] + more[0] + own + rows[-held:] + more[1]
            shuffled, generated, held = len(more[0]), len(own), held + len(more[1])
            ids, lengths = padded_rows(rows)
    step = (lambda i, n, loss: progress(f"healing (held-out loss {loss:.4f})", i, n)) if progress else None
    torch.manual_seed(options.seed)
    arithmetic = compute_dtype(options.heal_dtype)  # healing runs on the CPU
    result = heal(reference, model, ids, lengths, steps=options.heal_steps, causal=causal, seed=options.seed,
                  held_out=held, compute=to_torch(arithmetic), progress=step)
    healed = {name: p.detach() for name, p in trainable(model).items()}
    for layer in layers:
        for name in list(layer.tensors):
            match = [t for k, t in healed.items() if k == name or k.endswith("." + name) or name.endswith("." + k)]
            if len(match) == 1:
                layer.tensors[name] = match[0].to(out_dtype).contiguous()
    return {"steps": result.steps, "accepted": result.accepted, "loss": "next_token_kl" if causal else "1-cosine",
            "dtype": arithmetic, "windows": int(ids.shape[0]) - held, "shuffled_windows": shuffled,
            "generated_windows": generated, "held_out_windows": held,
            "held_out_before": round(result.held_out_before, 8), "held_out_after": round(result.held_out_after, 8),
            "seconds": round(result.seconds + sampling, 2)}


def _own_text(reference: torch.nn.Module, tokenizer: Any, windows: list[torch.Tensor], *, window: int,
              seed: int) -> list[torch.Tensor]:
    """The original's own text to heal on: :data:`collabcompress.runtime.heal.GENERATED` windows of
    ``window`` tokens sampled from it (:func:`collabcompress.runtime.lm.sampled_continuations`), each
    from the first :data:`~collabcompress.runtime.heal.PROMPT_TOKENS` tokens of a seeded choice of the
    training ``windows``' sentences; none when they have no sentence."""
    from ..runtime.heal import GENERATED, PROMPT_TOKENS, TOP_P
    from ..runtime.lm import sampled_continuations, sentences, token_ids

    found = sentences(tokenizer, windows)
    starts = [token_ids(tokenizer, s)[:PROMPT_TOKENS] for s in found]
    starts = [s for s in starts if s.numel() == PROMPT_TOKENS]
    if not starts:
        return []
    pick = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))[:GENERATED].tolist()
    return sampled_continuations(reference, torch.stack([starts[i] for i in pick]), length=window, seed=seed,
                                 top_p=TOP_P)


def _publishable(tmp: Path) -> None:
    """Give written files the usual permissions (safetensors creates them owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    os.chmod(tmp, 0o777 & ~umask)



def _manifest(ckpt: Checkpoint, checkpoint: str | Path, specs: list[AttentionSpec], layers: list[FittedLayer],
              options: CompressOptions, source_files: list[Path], outputs: list[Path], tmp: Path,
              heads: int | None, arch: str | None, kv_heads: int | None = None,
              healed: dict[str, Any] | None = None) -> _mf.Manifest:
    params_before = sum(ckpt.numel(n) for n in ckpt.names())
    removed = sum(ckpt.numel(n) for layer in layers for n in layer.removed)
    added = sum(t.numel() for layer in layers for t in layer.tensors.values())
    qk_after = sum(method_for(layer.spec).qk_params_after(layer, ckpt) for layer in layers)
    weights_out = [p for p in outputs if p.name.endswith((".safetensors", INDEX_SUFFIX))]
    calibration = None
    if options.calibration:
        calibration = {"file": str(Path(options.calibration).resolve()), "sha256": sha256_file(Path(options.calibration))}
    settings = asdict(options)
    settings["calibration"] = calibration
    healing = options.heal_steps > 0  # recorded only when used: older manifests stay as they were
    values = options.values
    for key, used in (("budget", options.budget is not None), ("heal_steps", healing), ("heal_dtype", healing),
                      ("value_rank", values), ("value_energy", values), ("budget_of", values),
                      ("force_data_free", values), ("stock", options.stock), ("frequency_counts", options.frequency_counts is not None)):
        if not used:
            del settings[key]
    if kv_heads is not None:
        settings["kv_heads"] = kv_heads
    return _mf.Manifest(
        tool=_mf.Tool("collabcompress", __version__),
        created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source=_mf.SourceRecord(
            path=str(Path(checkpoint).resolve()),
            files=tuple(_mf.FileRecord(**file_record(f, ckpt.directory)) for f in source_files),
            architecture=specs[0].family,
            dtype=dtype_name(ckpt.dtype(specs[0].query)),
        ),
        settings=_mf.Settings(settings, heads=heads, arch=arch),
        layers=tuple(method_for(layer.spec).record(layer) for layer in layers),
        totals=_mf.Totals(
            params_before=params_before,
            params_after=params_before - removed + added,
            qk_params_before=sum(stored_qk_params(layer.spec, ckpt.numel) for layer in layers),
            qk_params_after=qk_after,
            bytes_before=sum(f.stat().st_size for f in ckpt.files + ([ckpt.index_file] if ckpt.index_file else [])),
            bytes_after=sum(p.stat().st_size for p in weights_out),
        ),
        outputs=tuple(_mf.FileRecord(**file_record(p, tmp)) for p in outputs),
        heal=healed,
    )
