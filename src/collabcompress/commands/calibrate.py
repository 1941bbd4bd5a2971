"""Activation statistics for data-aware compression (docs/method.md, calibration).

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
stream, as :mod:`collabcompress.runtime.lm` measures perplexity: the documents joined with "\n",
tokenised without special tokens, the first ``max_tokens`` tokens cut into consecutive
windows of ``max_length`` tokens, each run from an empty context (:func:`causal_windows`).
Their statistics also hold ``{M}.query_energy`` (H, d/2) float64: E|q_{h,j}|^2, the energy
of each head's query (q_proj output, bias included) at each rotary frequency j (dimension j
paired with j + d/2, :func:`collabcompress.maths.rotary.rotary_pairs`), before the rotation, which
keeps |q|. ``compress`` weighs the shared-key fit with them (docs/method.md).

Every module also gets ``{M}.value_second_moment`` (D, D) and ``{M}.value_mean`` (D,): the
moments of the attention-weighted inputs z_h = sum_s p_hs y_s of its heads, summed over the
heads (the shared-value fit whitens by them, docs/method.md "Shared values"). The attention
weights p are the model's own: the model runs with eager attention, which returns them. The
z_h are never formed: sum_h Z_h^T Z_h = Y^T (sum_h P_h^T P_h) Y, an (M, M) product per window
instead of one (D, D) Gram per head (:meth:`_Accumulator.add_mixed`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..files.arch import AttentionSpec, detect, find_family
from ..errors import BadInputError, UnsupportedArchitectureError
from ..extras import require_transformers
from ..files.checkpoint import open_checkpoint, read_texts
from ..files.limits import check_memory
from ..runtime.lm import DEFAULT_WINDOW, leading_ids, padded_rows, token_windows
from ..files.hashing import sha256_file
from ..files.output import check_output_file, write_safetensors
from ..files.statistics import STATS_FORMAT, source_sha256
from ..runtime.adapters import find_modules
from ..files.texts import leading_text, load_tokenizer, position_limit
from ..methods import method_for

__all__ = ["calibrate", "causal_windows", "windows"]

Progress = Callable[[str, int, int], None]


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require_transformers()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def windows(tokenizer, texts: list[str], max_length: int, batch_size: int,
            max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of at most ``batch_size`` token windows covering every token of the texts (with
    ``max_tokens``: of the start of each text that holds its first ``max_tokens`` tokens, all a
    run that stops after ``max_tokens`` tokens can use, :func:`collabcompress.files.texts.leading_text`).

    A text longer than ``max_length`` tokens is split into consecutive windows of at most
    ``max_length`` tokens, each with the tokenizer's own special tokens, instead of being
    truncated. Yields ``(owners, input_ids, attention_mask)``: the index of the text each
    row comes from ``(B,)``, and ``(B, T)`` tensors trimmed to the longest row. A tokenizer
    that cannot return overflowing tokens truncates instead, with a warning.
    """
    split = True
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        if max_tokens is not None:
            batch = [leading_text(tokenizer, t, max_tokens) for t in batch]
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
    the texts read as one stream (:func:`collabcompress.runtime.lm.leading_ids`), for a causal LM.

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


def _accumulator_bytes(specs: list[AttentionSpec], family: Any) -> tuple[int, str]:
    """The float64 accumulators :func:`calibrate` holds for the whole run (one or, for
    cross-attention, two :class:`_Accumulator` per module), and what they are."""
    # the query (and key) input moments, and the attention-weighted inputs' (shared values)
    needed = sum(8 * (s.d_model ** 2 + s.d_model) * (3 if family.is_cross(s.module) else 2) for s in specs)
    modules = f"{len(specs)} attention module{'s' if len(specs) > 1 else ''}"
    return needed, f"the D x D calibration accumulators of {modules} (d_model {max(s.d_model for s in specs):,})"


class _Accumulator:
    def __init__(self, d_model: int) -> None:
        self.second = torch.zeros(d_model, d_model, dtype=torch.float64)
        self.total = torch.zeros(d_model, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, count: int | None = None) -> None:
        """Add the rows of ``x`` (n, D); ``count``: the tokens they stand for (default n)."""
        x = x.double()  # (n, D)
        self.second += x.T @ x
        self.total += x.sum(0)
        self.count += x.shape[0] if count is None else count

    def add_mixed(self, y: torch.Tensor, p: torch.Tensor, count: int) -> None:
        """Add the rows z = p y, never formed: y (B, M, D) inputs, p (B, R, M) the weights of
        R rows (every head's queries) over them; ``count``: the tokens they stand for."""
        y = y.double()
        self.second += (y.transpose(1, 2) @ ((p.transpose(1, 2) @ p).double() @ y)).sum(0)  # sum_b Y^T P^T P Y
        self.total += (p.sum(1).double()[:, None] @ y).sum((0, 1))  # sum_b 1^T P Y
        self.count += count


def _attention_weights(output: Any, heads: int, n_query: int, n_key: int) -> torch.Tensor | None:
    """The attention weights (B, H, N, M) in an attention module's output, or ``None``: the 4-D
    tensor of that shape whose rows sum to one (T5 also returns its position bias)."""
    for t in output if isinstance(output, tuple) else ():
        if isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape[1:]) == (heads, n_query, n_key) \
                and t.shape[0] and bool(torch.allclose(t[0, 0, :1].sum(-1), t.new_ones(1), atol=1e-3)):
            return t
    return None


def _parents(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """id(module) -> its parent module."""
    return {id(child): parent for parent in model.modules() for child in parent.children()}


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
    check_memory(*_accumulator_bytes(specs, family))
    if max_length is None:
        max_length = DEFAULT_WINDOW if family.causal_lm else 128
    _transformers()

    tokenizer = load_tokenizer([Path(model_dir)])
    from .. import hf

    # every weight from the file or a documented tie (a tied head stored as lm_head.weight alone
    # is the embedding), or a refusal naming the missing ones: never a random initialisation
    # eager attention returns the attention weights the shared-value statistics need
    model = hf.load_model(model_dir, attn_implementation="eager")
    run = model.base_model  # the body: hidden states, not a head's logits over the vocabulary
    max_length = min(max_length, position_limit(model.config, tokenizer))
    special = 0 if family.causal_lm else tokenizer.num_special_tokens_to_add()
    if max_length <= special:
        raise BadInputError(f"--max-length {max_length} leaves no room for text next to the tokenizer's "
                            f"{special} special tokens")
    causal_used = 0
    if family.causal_lm:
        batches, causal_used = causal_windows(tokenizer, texts, max_tokens, max_length, batch_size)
    else:
        batches = windows(tokenizer, texts, max_length, batch_size, max_tokens)
    acc: dict[str, tuple[_Accumulator, _Accumulator | None]] = {}
    values: dict[str, _Accumulator] = {}  # module -> moments of sum over heads of z_h (shared values)
    inputs_seen: dict[str, torch.Tensor] = {}  # module -> its key-side input of the current forward
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
            if side == "key" or k_acc is None:
                inputs_seen[spec.module] = x
            for b, slot in state["keep"]:
                (kept if side == "query" else kept_keys).setdefault(spec.module, {})[slot] = \
                    x[b, : int(mask[b].sum())].detach().float().clone()
        return fn

    def energy_hook(spec: AttentionSpec, statistic: Callable[[torch.Tensor], torch.Tensor]):
        def fn(_module, _args, q):
            mask = state["mask"]  # (B, T)
            if q.dim() != 3 or mask is None or q.shape[:2] != mask.shape:
                return
            energy[spec.module] += statistic(q[mask.bool()])  # (H, d/2)
        return fn

    def value_hook(spec: AttentionSpec):
        def fn(_module, _args, _kwargs, output):
            y, mask = inputs_seen.pop(spec.module, None), state["mask"]  # (B, M, D), (B, N)
            if y is None or mask is None:
                return
            probs = _attention_weights(output, spec.n_head, mask.shape[1], y.shape[1])
            if probs is None:
                return
            p = probs.float()  # (B, H, N, M)
            if not bool(mask.all()):  # no padding query (a new 150 MB tensor for SmolLM2, so only when needed)
                p = p * mask[:, None, :, None].to(p.dtype)
            # every head's rows z_h = P_h y, counted once per token
            values[spec.module].add_mixed(y.float(), p.reshape(p.shape[0], -1, p.shape[-1]), int(mask.sum()))
        return fn

    def ask_for_weights(_module, args, kwargs):
        return args, {**kwargs, "output_attentions": True}  # (MPNet returns the weights only when asked)

    parents = _parents(model)
    for spec in specs:
        q_mod, k_mod = find_modules(model, ckpt, spec)
        attention = parents[id(q_mod)]
        values[spec.module] = _Accumulator(spec.d_model)
        handles.append(attention.register_forward_hook(value_hook(spec), with_kwargs=True))
        if "output_attentions" in inspect.signature(attention.forward).parameters:
            handles.append(attention.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        # the layer's method may sum a statistic of its query outputs (rotary: the query energies)
        if (statistic := method_for(spec).query_statistic(spec)) is not None:
            energy[spec.module] = statistic[0]
            handles.append(q_mod.register_forward_hook(energy_hook(spec, statistic[1])))
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
        if values[module].count:
            tensors[f"{module}.value_second_moment"] = values[module].second / values[module].count
            tensors[f"{module}.value_mean"] = values[module].total / values[module].count
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
