"""Activation statistics for data-aware compression (SPEC.md section 2, calibration).

``calibrate`` runs the original transformers model on real texts and records, for every
attention module that ``compress`` can touch, the second moment E[x x^T] and the mean of
the inputs of its query projection (and of its key projection where those differ:
cross-attention), over non-padding tokens. ``load_whitening`` turns a statistics file into
the Cholesky factors used by the whitened CP-ALS; ``load_moments`` gives the raw moments.

The statistics file is a safetensors file: per module ``{M}.second_moment`` (D, D) float64,
``{M}.mean`` (D,), and for cross-attention ``{M}.key_second_moment`` / ``{M}.key_mean``;
optionally ``{M}.sequences`` (N, T, D) float32 with ``{M}.lengths`` (N,) (kept inputs for
refinement; ``{M}.key_sequences`` for cross-attention), the kept windows' token ids
``input_ids`` (N, T) int64 with ``input_lengths`` (N,), and the token ids of every window
run, ``window_ids`` (W, T) with ``window_lengths`` (W,) and ``kept_windows`` (N,) (which of
them was kept; healing trains on all of them). Metadata: ``format``,
``source_sha256`` (of the weight files), ``texts_sha256``, ``tokens``, ``texts``,
``windows``, ``max_length``, ``tool_version``, ``modules`` (JSON list), ``architecture``.

Texts longer than ``max_length`` tokens are split into windows (:func:`windows`), not
truncated.

Causal language models (the rotary families: llama, mistral, qwen2) read the texts as one
stream, as :mod:`collabcompress.lm` measures perplexity: the documents joined with "\n",
tokenised without special tokens, the first ``max_tokens`` tokens cut into consecutive
windows of ``max_length`` tokens, each run from an empty context (:func:`causal_windows`).
Their statistics also hold ``{M}.query_energy`` (H, d/2) float64: E|q_{h,j}|^2, the energy
of each head's query (q_proj output, bias included) at each rotary frequency j (dimension j
paired with j + d/2, :func:`collabcompress.rotary.rotary_pairs`), before the rotation, which
keeps |q|. ``compress`` weighs the shared-key fit with them (SPEC section 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from . import __version__
from .arch import AttentionSpec, detect, find_family
from .errors import BadInputError, UnsupportedArchitectureError
from .extras import require_transformers
from .io import Checkpoint, open_checkpoint, read_texts, regular_file
from .lm import DEFAULT_WINDOW, leading_ids, padded_rows, token_windows
from .output import check_output_file, sha256_file, write_safetensors
from .texts import load_tokenizer, position_limit

__all__ = ["calibrate", "load_whitening", "load_moments", "load_sequences", "load_input_ids", "load_window_ids",
           "load_query_energies", "read_texts", "causal_windows", "STATS_FORMAT"]

STATS_FORMAT = "collabcompress-stats/1"
Progress = Callable[[str, int, int], None]


def source_sha256(ckpt: Checkpoint) -> str:
    """One digest over the weight files (and index) of a checkpoint (each file hashed once per
    version: compress reads the statistics twice and must not hash a multi-GB checkpoint twice)."""
    h = hashlib.sha256()
    for f in ckpt.files + ([ckpt.index_file] if ckpt.index_file else []):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require_transformers()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _find_modules(model: torch.nn.Module, ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The in-memory modules computing the query and the key projection of ``spec``.

    Found by weight identity, so prefixes and in-memory renames (ViT in transformers 5)
    do not matter. Candidates are picked by shape and their first numbers, and only those are
    compared in full: a full comparison with every same-shaped weight made calibrating a
    30-layer model quadratic (SmolLM2: 1,800 comparisons, 11 s).
    """
    candidates: dict[tuple, list[torch.nn.Module]] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel():
            candidates.setdefault(_fingerprint(w), []).append(module)
    found = []
    for name in (spec.query, spec.key) if not spec.fused else (spec.query,):
        target = ckpt.load(name, torch.float32)
        hit = next((m for m in candidates.get(_fingerprint(target), ())
                    if torch.equal(m.weight.detach().float(), target)), None)
        if hit is None:
            raise UnsupportedArchitectureError(f"cannot find the module computing {name} in the transformers model")
        found.append(hit)
    return (found[0], found[-1])


def _fingerprint(weight: torch.Tensor) -> tuple:
    """Shape and first 16 numbers (as float32) of a weight: equal weights have equal fingerprints."""
    return tuple(weight.shape), tuple(weight.detach().reshape(-1)[:16].float().tolist())


def windows(tokenizer, texts: list[str], max_length: int,
            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of at most ``batch_size`` token windows covering every token of the texts.

    A text longer than ``max_length`` tokens is split into consecutive windows of at most
    ``max_length`` tokens, each with the tokenizer's own special tokens, instead of being
    truncated. Yields ``(owners, input_ids, attention_mask)``: the index of the text each
    row comes from ``(B,)``, and ``(B, T)`` tensors trimmed to the longest row. A tokenizer
    that cannot return overflowing tokens truncates instead, with a warning.
    """
    split = True
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        try:
            enc = tokenizer(batch, truncation=True, max_length=max_length, return_overflowing_tokens=split,
                            padding=True, return_tensors="pt")
        except (NotImplementedError, ValueError, TypeError, KeyError) as e:
            if not split:
                raise
            warnings.warn(f"this tokenizer cannot split long texts into windows ({type(e).__name__}); "
                          f"texts longer than {max_length} tokens are truncated", stacklevel=2)
            split = False
            enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        owners = enc["overflow_to_sample_mapping"] + start if "overflow_to_sample_mapping" in enc else \
            torch.arange(start, start + enc["input_ids"].shape[0])
        for s in range(0, owners.shape[0], batch_size):
            mask = enc["attention_mask"][s:s + batch_size]
            cols = mask.bool().any(0)  # drop columns that are padding in every row (either padding side)
            yield owners[s:s + batch_size], enc["input_ids"][s:s + batch_size][:, cols], mask[:, cols]


def causal_windows(tokenizer, texts: list[str], max_tokens: int, max_length: int,
                   batch_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Batches of consecutive ``max_length``-token windows of the first ``max_tokens`` tokens of
    the texts read as one stream (:func:`collabcompress.lm.leading_ids`), for a causal LM.

    Returns the batches as :func:`windows` yields them, ``(owners, input_ids, attention_mask)``
    with ``owners`` the window indices and a mask of ones, and the number of texts used.
    """
    ids, used = leading_ids(tokenizer, texts, max_tokens)  # (N,)
    try:
        chunks = token_windows(ids, max_tokens=max_tokens, window=max_length)
    except ValueError as e:
        raise BadInputError(f"--texts: {e}") from e
    batches, start = [], 0
    while start < len(chunks):  # rows of one batch have one length: only the last window is shorter
        n = 1
        while n < batch_size and start + n < len(chunks) and chunks[start + n].numel() == chunks[start].numel():
            n += 1
        ids_batch = torch.stack(chunks[start:start + n])  # (B, T)
        batches.append((torch.arange(start, start + n), ids_batch, torch.ones_like(ids_batch)))
        start += n
    return batches, used


def _reservoir(start: int, size: int, capacity: int, g: torch.Generator) -> list[tuple[int, int]]:
    """Seeded reservoir sampling over the windows actually used: which of the batch's rows
    (windows ``start`` .. ``start + size - 1``) to keep, and in which slot (< ``capacity``)."""
    keep = []
    for b in range(size):
        i = start + b
        slot = i if i < capacity else int(torch.randint(0, i + 1, (1,), generator=g))
        if slot < capacity:
            keep.append((b, slot))
    return keep


class _Accumulator:
    def __init__(self, d_model: int) -> None:
        self.second = torch.zeros(d_model, d_model, dtype=torch.float64)
        self.total = torch.zeros(d_model, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()  # (n, D)
        self.second += x.T @ x
        self.total += x.sum(0)
        self.count += x.shape[0]


def calibrate(model_dir: str | Path, texts_file: str | Path, out: str | Path, *, max_tokens: int = 100_000,
              max_length: int | None = None, batch_size: int = 16, keep_sequences: int = 0, seed: int = 0,
              heads: int | None = None, arch: str | None = None, force: bool = False,
              progress: Progress | None = None) -> dict[str, Any]:
    """Run the original model on texts and save activation statistics (see the module doc).

    Args:
        model_dir: directory of a transformers model (config.json, weights, tokenizer).
        texts_file: UTF-8, one text per line.
        out: the statistics file to write (``.safetensors``).
        max_tokens: stop after this many non-padding tokens.
        max_length: split longer texts into windows of at most this many tokens (see
            :func:`windows`); every token of a text is used, and the statistics weigh special
            tokens and early positions as sentence-length inputs do. Default 128, and for a
            causal LM 512 (``lm.DEFAULT_WINDOW``, the window its perplexity is measured in).
        batch_size: windows per forward pass.
        keep_sequences: also keep the inputs of this many (seeded) windows per module.

    Returns:
        A summary: ``tokens``, ``texts`` (texts used), ``windows``, ``max_length`` (capped at
        the model's position table), ``modules``, ``file``,
        ``kept_sequences``.
    """
    if max_tokens < 1 or (max_length is not None and max_length < 2) or batch_size < 1 or keep_sequences < 0:
        raise BadInputError("--max-tokens, --max-length and --batch-size must be positive, --keep-sequences >= 0")
    out = Path(out)
    texts = read_texts(texts_file)
    ckpt = open_checkpoint(model_dir)
    if not Path(model_dir).is_dir():
        raise BadInputError(f"calibrate needs a model directory (config.json, weights, tokenizer), got {model_dir}")
    # not into the model directory, onto the texts, over a special file, or over a file without --force
    check_output_file(out, [ckpt.directory, Path(texts_file)], option="--out", force=force)
    specs = detect(ckpt, heads=heads, arch=arch)
    family = find_family(specs[0].family)
    if not family.text:
        raise UnsupportedArchitectureError(f"calibrate runs on text; the {specs[0].family} family takes images")
    if max_length is None:
        max_length = DEFAULT_WINDOW if family.rotary else 128
    _transformers()

    tokenizer = load_tokenizer([Path(model_dir)])
    from . import hf

    # every weight from the file or a documented tie (a tied head stored as lm_head.weight alone
    # is the embedding), or a refusal naming the missing ones: never a random initialisation
    model = hf.load_model(model_dir)
    run = model.base_model  # the body: hidden states, not a head's logits over the vocabulary
    max_length = min(max_length, position_limit(model.config, tokenizer))
    special = 0 if family.rotary else tokenizer.num_special_tokens_to_add()
    if max_length <= special:
        raise BadInputError(f"--max-length {max_length} leaves no room for text next to the tokenizer's "
                            f"{special} special tokens")
    causal_used = 0
    if family.rotary:
        batches, causal_used = causal_windows(tokenizer, texts, max_tokens, max_length, batch_size)
    else:
        batches = windows(tokenizer, texts, max_length, batch_size)
    acc: dict[str, tuple[_Accumulator, _Accumulator | None]] = {}
    state: dict[str, Any] = {"mask": None, "keep": None}
    kept: dict[str, dict[int, torch.Tensor]] = {}  # module -> reservoir slot -> (T, D)
    kept_keys: dict[str, dict[int, torch.Tensor]] = {}
    energy: dict[str, torch.Tensor] = {}  # rotary module -> sum over tokens of |q_{h,j}|^2, (H, d/2)
    kept_ids: dict[int, torch.Tensor] = {}  # reservoir slot -> the kept window's token ids, for --heal-steps
    kept_index: dict[int, int] = {}  # reservoir slot -> the kept window's index among all windows run
    window_ids: list[torch.Tensor] = []  # every window's token ids (when windows are kept): healing trains on them
    handles = []

    def hook(spec: AttentionSpec, side: str):
        def fn(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            mask = state["mask"]  # (B, T)
            if x.dim() != 3 or mask is None or x.shape[:2] != mask.shape:
                return
            q_acc, k_acc = acc[spec.module]
            (q_acc if side == "query" else k_acc).add(x[mask.bool()])
            for b, slot in state["keep"]:
                (kept if side == "query" else kept_keys).setdefault(spec.module, {})[slot] = \
                    x[b, : int(mask[b].sum())].detach().float().clone()
        return fn

    def energy_hook(spec: AttentionSpec):
        from .rotary import rotary_pairs

        def fn(_module, _args, q):
            mask = state["mask"]  # (B, T)
            if q.dim() != 3 or mask is None or q.shape[:2] != mask.shape:
                return
            pairs = rotary_pairs(q[mask.bool()].T, spec.n_head, spec.head_dim)  # (H, d/2, n) complex
            energy[spec.module] += pairs.abs().square().sum(-1)  # (H, d/2)
        return fn

    for spec in specs:
        q_mod, k_mod = _find_modules(model, ckpt, spec)
        if spec.rotary:
            energy[spec.module] = torch.zeros(spec.n_head, spec.head_dim // 2, dtype=torch.float64)
            handles.append(q_mod.register_forward_hook(energy_hook(spec)))
        cross = family.is_cross(spec.module)
        acc[spec.module] = (_Accumulator(spec.d_model), _Accumulator(spec.d_model) if cross else None)
        handles.append(q_mod.register_forward_pre_hook(hook(spec, "query"), with_kwargs=True))
        if cross:
            handles.append(k_mod.register_forward_pre_hook(hook(spec, "key"), with_kwargs=True))
    g = torch.Generator().manual_seed(seed)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    tokens = used = seen = 0
    try:
        with torch.inference_mode():
            for owners, ids, mask in batches:
                state["mask"] = mask
                state["keep"] = _reservoir(seen, ids.shape[0], keep_sequences, g)
                for b, slot in state["keep"]:
                    kept_ids[slot], kept_index[slot] = ids[b, : int(mask[b].sum())].clone(), seen + b
                if keep_sequences:
                    window_ids.extend(ids[b, : int(mask[b].sum())].clone() for b in range(ids.shape[0]))
                inputs = {"input_ids": ids, "attention_mask": mask}
                if encoder_decoder:
                    inputs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
                run(**inputs)
                tokens += int(mask.sum())
                seen += ids.shape[0]
                used = causal_used or int(owners[-1]) + 1
                if progress:
                    progress("texts", min(tokens, max_tokens), max_tokens)
                if tokens >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    if progress:  # the bar ends at 100 %: the total is the tokens there were, not --max-tokens
        progress("texts", min(tokens, max_tokens), min(tokens, max_tokens))
    smallest = min(a.count for a, _ in acc.values())
    if smallest < 1:
        raise BadInputError("no tokens reached the attention modules; check the texts and the model")
    tensors: dict[str, torch.Tensor] = {}
    for module, (q_acc, k_acc) in acc.items():
        tensors[f"{module}.second_moment"] = q_acc.second / q_acc.count
        tensors[f"{module}.mean"] = q_acc.total / q_acc.count
        if module in energy:
            tensors[f"{module}.query_energy"] = energy[module] / q_acc.count
        if k_acc is not None:
            tensors[f"{module}.key_second_moment"] = k_acc.second / max(k_acc.count, 1)
            tensors[f"{module}.key_mean"] = k_acc.total / max(k_acc.count, 1)
        for key, store in (("sequences", kept), ("key_sequences", kept_keys)):
            if store.get(module):
                seqs = [store[module][slot] for slot in sorted(store[module])]
                lengths = torch.tensor([s.shape[0] for s in seqs])
                padded = torch.zeros(len(seqs), int(lengths.max()), seqs[0].shape[1])  # (N, T, D)
                for i, s in enumerate(seqs):
                    padded[i, : s.shape[0]] = s
                tensors[f"{module}.{key}"] = padded
                tensors[f"{module}.lengths"] = lengths
    if kept_ids:
        slots = sorted(kept_ids)
        tensors["input_ids"], tensors["input_lengths"] = padded_rows([kept_ids[slot] for slot in slots])
        tensors["window_ids"], tensors["window_lengths"] = padded_rows(window_ids)
        tensors["kept_windows"] = torch.tensor([kept_index[slot] for slot in slots], dtype=torch.int64)
    metadata = {
        "format": STATS_FORMAT, "tool_version": __version__, "source_sha256": source_sha256(ckpt),
        "texts_sha256": sha256_file(Path(texts_file)), "tokens": str(tokens), "texts": str(used),
        "windows": str(seen), "max_length": str(max_length),
        "modules": json.dumps([s.module for s in specs]), "architecture": specs[0].family,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_safetensors(tmp, [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()], metadata)
        os.replace(tmp, out)
    except OSError as e:
        raise BadInputError(f"cannot write {out}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return {"file": str(out), "tokens": tokens, "texts": used, "windows": seen, "max_length": max_length,
            "modules": [s.module for s in specs], "kept_sequences": min(keep_sequences, seen)}


def _open_stats(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]):
    regular_file(path, what="calibration statistics")
    try:
        f = safe_open(str(path), framework="pt")
        meta = f.metadata() or {}
        names = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"{path} is not a calibration statistics file: {e}") from e
    if meta.get("format") != STATS_FORMAT:
        raise BadInputError(f"{path} is not a calibration statistics file (format {meta.get('format')!r})")
    if meta.get("source_sha256") != source_sha256(ckpt):
        raise BadInputError(f"calibration statistics {path} were made from another model "
                            "(source sha256 differs); run `calibrate` on this checkpoint")
    for spec in specs:
        name = f"{spec.module}.second_moment"
        if name not in names:
            raise BadInputError(f"calibration statistics {path} have no entry for {spec.module}")
        for key in (name, f"{spec.module}.mean"):
            shape = tuple(f.get_slice(key).get_shape()) if key in names else None
            want = (spec.d_model, spec.d_model) if key == name else (spec.d_model,)
            if shape != want:
                raise BadInputError(f"calibration statistics {path}: {key} has shape {list(shape or [])}, "
                                    f"expected {list(want)}")
    return f, names, meta


# Statistics of real activations stay far inside these bounds: inputs to attention come from a
# normalisation and are O(1) to O(1e3), so their moments are at most about 1e6. A value beyond
# STATS_LIMIT (activations of 1e6) is a damaged file; bounded so, squares and sums over any width
# stay finite in float64 (and in float32 for the kept sequences). A mean square input below
# STATS_FLOOR would make the whitening's inverse overflow.
STATS_LIMIT = 1e12
STATS_FLOOR = 1e-12


def _checked(t: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """``t`` as float64, refused unless every value is finite and at most STATS_LIMIT in magnitude."""
    t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise BadInputError(f"calibration statistics {path}: {name} contains NaN or Inf")
    if t.numel() and float(t.abs().max()) > STATS_LIMIT:
        raise BadInputError(f"calibration statistics {path}: {name} holds values up to {float(t.abs().max()):.3g}, "
                            f"beyond {STATS_LIMIT:.0e}: not statistics of real activations; run `calibrate` again")
    return t


def _second_moment(f, name: str, path: Path) -> torch.Tensor:
    """A second moment E[x x^T] (D, D), checked: finite, bounded, a non-negative diagonal whose mean
    (the mean square input) is at least STATS_FLOOR."""
    second = _checked(f.get_tensor(name), name, path)
    diagonal = second.diagonal()
    if bool((diagonal < 0).any()) or float(diagonal.mean()) < STATS_FLOOR:
        raise BadInputError(f"calibration statistics {path}: {name} has a negative diagonal or a mean square "
                            f"input below {STATS_FLOOR:.0e}: not statistics of real activations; run `calibrate` again")
    return second


def _vocabulary(ckpt: Checkpoint) -> int | None:
    """config.json's ``vocab_size`` (of the text tower of a composite config), if it gives one."""
    cfg = ckpt.config or {}
    for where in (cfg, cfg.get("text_config")):
        value = where.get("vocab_size") if isinstance(where, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_ids(ids: torch.Tensor, what: str, path: Path, ckpt: Checkpoint) -> None:
    """Refuse token ids the model cannot embed (beyond config.json's ``vocab_size``)."""
    vocab = _vocabulary(ckpt)
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise BadInputError(f"calibration statistics {path}: {what} holds token id {int(ids.max())}, beyond the "
                            f"model's vocabulary (config.json vocab_size {vocab}); run `calibrate` on this model")


def load_moments(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (mean (D,), second moment (D, D)) of the query-side inputs."""
    f, _, _ = _open_stats(path, ckpt, specs)
    return {s.module: (_checked(f.get_tensor(f"{s.module}.mean"), f"{s.module}.mean", path),
                       _second_moment(f, f"{s.module}.second_moment", path))
            for s in specs}


def load_whitening(path: Path, ckpt: Checkpoint,
                   specs: list[AttentionSpec]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module the lower Cholesky factors (L_q, L_k) of the shrunk query second moment and
    key covariance (the softmax ignores per-query constants, so the key mean drops out)."""
    from .decompose import whitening_factor

    f, names, meta = _open_stats(path, ckpt, specs)
    try:
        tokens = int(meta.get("tokens", "0") or 0)
    except ValueError as e:
        raise BadInputError(f"calibration statistics {path}: metadata 'tokens' is not an integer") from e
    d_model = max(s.d_model for s in specs)
    if tokens < 10 * d_model:
        warnings.warn(f"calibration statistics from only {tokens} tokens for width {d_model}: the moments are noisy; "
                      "more text (e.g. >= 10 x width tokens) gives a better whitening", stacklevel=2)
    out = {}
    for s in specs:
        m = s.module
        second = _second_moment(f, f"{m}.second_moment", path)
        if f"{m}.key_second_moment" in names:
            key_second = _second_moment(f, f"{m}.key_second_moment", path)
            key_mean = _checked(f.get_tensor(f"{m}.key_mean"), f"{m}.key_mean", path)
        else:
            key_second, key_mean = second, _checked(f.get_tensor(f"{m}.mean"), f"{m}.mean", path)
        key_cov = key_second - torch.outer(key_mean, key_mean)
        try:
            if not bool(torch.isfinite(key_cov).all()):
                raise ValueError("the key covariance overflows")
            out[m] = (whitening_factor(second), whitening_factor(key_cov))
        except ValueError as e:
            raise BadInputError(f"calibration statistics {path}: the moments of {m} are unusable ({e})") from e
    return out


def load_sequences(path: Path, ckpt: Checkpoint,
                   specs: list[AttentionSpec]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Kept calibration inputs per module: (N, T, D) float32 and lengths (N,).

    Raises:
        BadInputError: the file holds no kept sequences (``calibrate --keep-sequences N``).
    """
    f, names, _ = _open_stats(path, ckpt, specs)
    out = {}
    for spec in specs:
        if f"{spec.module}.sequences" not in names or f"{spec.module}.lengths" not in names:
            raise BadInputError(f"calibration statistics {path} keep no input sequences for {spec.module}; "
                                "run `calibrate --keep-sequences N` (needed by --refine-steps, --budget and --heal-steps)")
        seqs, lengths = f.get_tensor(f"{spec.module}.sequences"), f.get_tensor(f"{spec.module}.lengths")
        if seqs.dim() != 3 or seqs.shape[2] != spec.d_model or lengths.shape != (seqs.shape[0],) \
                or bool((lengths < 1).any()) or bool((lengths > seqs.shape[1]).any()):
            raise BadInputError(f"calibration statistics {path}: the kept sequences of {spec.module} are malformed")
        out[spec.module] = (_checked(seqs, f"{spec.module}.sequences", path).float(), lengths.long())
    return out


def load_input_ids(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of the kept windows, (N, T) int64 zero-padded, and their lengths (N,).

    Raises:
        BadInputError: the file keeps no windows (``calibrate --keep-sequences N``).
    """
    f, names, _ = _open_stats(path, ckpt, specs)
    if "input_ids" not in names or "input_lengths" not in names:
        raise BadInputError(f"calibration statistics {path} keep no token ids; run `calibrate --keep-sequences N` "
                            "again with this version for --heal-steps (and --budget on a causal LM)")
    ids, lengths = f.get_tensor("input_ids"), f.get_tensor("input_lengths")
    if ids.dim() != 2 or ids.dtype != torch.int64 or lengths.shape != (ids.shape[0],) or bool((lengths < 2).any()) \
            or bool((lengths > ids.shape[1]).any()) or bool((ids < 0).any()):
        raise BadInputError(f"calibration statistics {path}: the kept token ids are malformed")
    _check_ids(ids, "input_ids", path, ckpt)
    return ids, lengths.long()


def load_window_ids(path: Path, ckpt: Checkpoint,
                    specs: list[AttentionSpec]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The token ids of every calibration window run, (W, T) int64 zero-padded, their lengths
    (W,), and the index among them of each kept window (N,, in the order of
    :func:`load_input_ids`); ``None`` for a file from before they were stored.

    Raises:
        BadInputError: the tensors are malformed or disagree with the kept windows' ids.
    """
    f, names, _ = _open_stats(path, ckpt, specs)
    if not {"window_ids", "window_lengths", "kept_windows"} <= names:
        return None
    kept_ids, kept_lengths = load_input_ids(path, ckpt, specs)
    ids, lengths, kept = f.get_tensor("window_ids"), f.get_tensor("window_lengths"), f.get_tensor("kept_windows")
    bad = ids.dim() != 2 or ids.dtype != torch.int64 or lengths.shape != (ids.shape[0],) or lengths.dtype != torch.int64 \
        or bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any()) or bool((ids < 0).any()) \
        or kept.shape != (kept_ids.shape[0],) or kept.dtype != torch.int64 or bool((kept < 0).any()) \
        or bool((kept >= ids.shape[0]).any()) or kept.unique().numel() != kept.numel()
    if not bad:
        bad = any(int(lengths[w]) != int(n) or not torch.equal(ids[w, :n], kept_ids[i, :n])
                  for i, (w, n) in enumerate(zip(kept.tolist(), kept_lengths.tolist())))
    if bad:
        raise BadInputError(f"calibration statistics {path}: the windows' token ids are malformed")
    _check_ids(ids, "window_ids", path, ckpt)
    return ids, lengths, kept


def load_query_energies(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> dict[str, torch.Tensor]:
    """Measured query energies ``E|q_{h,j}|^2`` (H, d/2) per rotary module, where the statistics
    file holds them (``<module>.query_energy``); modules without them are left out."""
    f, names, _ = _open_stats(path, ckpt, specs)
    out = {}
    for s in specs:
        name = f"{s.module}.query_energy"
        if name not in names:
            continue
        energy = _checked(f.get_tensor(name), name, path)
        if tuple(energy.shape) != (s.n_head, s.head_dim // 2) or bool((energy < 0).any()):
            raise BadInputError(f"calibration statistics {path}: {name} has shape {list(energy.shape)} or negative "
                                f"entries; expected non-negative ({s.n_head}, {s.head_dim // 2})")
        out[s.module] = energy
    return out
