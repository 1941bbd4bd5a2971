"""Calibration statistics files (written by ``collabcompress calibrate``), read and checked.

A statistics file is a safetensors file: per module ``{M}.second_moment`` (D, D) float64,
``{M}.mean`` (D,), and for cross-attention ``{M}.key_second_moment`` / ``{M}.key_mean``;
optionally ``{M}.sequences`` (N, T, D) float32 with ``{M}.lengths`` (N,) (kept inputs for
refinement; ``{M}.key_sequences`` for cross-attention), the kept windows' token ids
``input_ids`` (N, T) int64 with ``input_lengths`` (N,), and the token ids of every window
run, ``window_ids`` (W, T) with ``window_lengths`` (W,) and ``kept_windows`` (N,); rotary
modules also ``{M}.query_energy`` (H, d/2). Metadata: ``format``, ``source_sha256`` (of the
weight files), ``texts_sha256``, ``tokens``, ``texts``, ``windows``, ``max_length``,
``tool_version``, ``modules`` (JSON list), ``architecture``. Every loader checks the file
belongs to the checkpoint and its values are usable before anything is fitted.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import BadInputError
from .arch import AttentionSpec
from .checkpoint import Checkpoint, regular_file
from .hashing import sha256_file

__all__ = ["STATS_FORMAT", "source_sha256", "per_module", "load_whitening", "load_moments", "load_sequences", "load_input_ids",
           "load_window_ids", "load_query_energies", "load_value_moments"]

STATS_FORMAT = "collabcompress-stats/1"


def source_sha256(ckpt: Checkpoint) -> str:
    """One digest over the weight files (and index) of a checkpoint (each file hashed once per
    version: compress reads the statistics twice and must not hash a multi-GB checkpoint twice)."""
    h = hashlib.sha256()
    for f in ckpt.files + ([ckpt.index_file] if ckpt.index_file else []):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


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


class _PerModule(Mapping[str, Any]):
    """module -> a value read from the statistics file each time it is asked for, and not kept."""

    def __init__(self, modules: list[str], read: Callable[[str], Any]) -> None:
        self._modules, self._known, self._read = modules, set(modules), read

    def __getitem__(self, module: str) -> Any:
        if module not in self._known:
            raise KeyError(module)
        return self._read(module)

    def __contains__(self, module: object) -> bool:  # without reading (Mapping's own would read)
        return module in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def per_module(modules: list[str], read: Callable[[str], Any]) -> Mapping[str, Any]:
    """A read-only mapping module -> ``read(module)``, computed at each lookup and never kept."""
    return _PerModule(modules, read)


def _read_moments(path: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (mean, second moment), checked. They are mapped from the file (safetensors
    reads without copying), and the mapping goes when they do: a handle kept open would keep
    every page it has read in this process's resident memory."""
    try:
        with safe_open(str(path), framework="pt") as f:
            mean = _checked(f.get_tensor(f"{module}.mean"), f"{module}.mean", path)
            return mean, _second_moment(f, f"{module}.second_moment", path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"cannot read the moments of {module} from the calibration statistics {path}: {e}") from e


def load_moments(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (mean (D,), second moment (D, D)) of the query-side inputs.

    Every module's moments are read and checked here, one at a time, but the mapping returned
    holds none of them: each lookup reads that module's again. A Llama-3-8B-sized file holds
    32 second moments of 134 MB; holding them all made ``compress`` peak at 7.5 GB.
    """
    _open_stats(path, ckpt, specs)
    for s in specs:
        _read_moments(path, s.module)
    return per_module([s.module for s in specs], lambda module: _read_moments(path, module))


def load_whitening(path: Path, ckpt: Checkpoint,
                   specs: list[AttentionSpec]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module the lower Cholesky factors (L_q, L_k) of the shrunk query second moment and
    key covariance (the softmax ignores per-query constants, so the key mean drops out)."""
    from ..maths.cp import whitening_factor

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


def _read_value_moments(path: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            mean = _checked(f.get_tensor(f"{module}.value_mean"), f"{module}.value_mean", path)
            return mean, _second_moment(f, f"{module}.value_second_moment", path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"cannot read the value moments of {module} from the calibration statistics {path}: "
                            f"{e}") from e


def load_value_moments(path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (mean (D,), second moment (D, D)) of the attention-weighted inputs summed over
    the heads (``{M}.value_mean``, ``{M}.value_second_moment``), read and checked here, then
    read again at each lookup (as :func:`load_moments`).

    Raises:
        BadInputError: a module without them (statistics made before shared values existed:
            run ``calibrate`` again), or malformed ones.
    """
    f, names, _ = _open_stats(path, ckpt, specs)
    for s in specs:
        for key, want in (("value_second_moment", (s.d_model, s.d_model)), ("value_mean", (s.d_model,))):
            name = f"{s.module}.{key}"
            if name not in names:
                raise BadInputError(f"calibration statistics {path} hold no value moments for {s.module}; run "
                                    "`calibrate` again with this version for shared values")
            if tuple(f.get_slice(name).get_shape()) != want:
                raise BadInputError(f"calibration statistics {path}: {name} has shape "
                                    f"{list(f.get_slice(name).get_shape())}, expected {list(want)}")
        _read_value_moments(path, s.module)
    return per_module([s.module for s in specs], lambda module: _read_value_moments(path, module))
