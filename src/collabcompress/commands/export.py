"""Export a compressed rotary decoder as a plain transformers checkpoint (``export --format stock``).

A layer with shared rotary keys of width R and a value latent of width R is exactly a
multi-query layer of head size R (docs/export.md, :mod:`collabcompress.maths.stock`). The
export writes that layer in the family's own tensor names, a config.json with
``num_key_value_heads`` 1, ``head_dim`` R and ``longrope`` parameters holding the frequency of
each pair, every other tensor and file of the compressed directory, and
``export_manifest.json`` (the source directory's files and their sha256). The result loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` and serves with ``vllm serve OUT``,
with no collabcompress code.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..dtypes import to_torch
from ..errors import BadInputError
from ..files.checkpoint import Checkpoint
from ..files.families import Family, family_of_model_type
from ..files.manifest import MANIFEST_NAME, LayerRecord, Manifest, open_output
from ..files.output import (EXPORT_FORMAT, EXPORT_MANIFEST, EXPORTS, atomic_directory, check_output_dir,
                            copy_other_files, file_record, write_json, write_safetensors)
from ..methods import method_for

__all__ = ["FORMATS", "EXPORTABLE", "ExportedModel", "check_stock", "export", "export_source", "read_export"]

FORMATS = ("stock",)
EXPORTABLE = ("compress a rotary decoder (llama, mistral, qwen2) with `compress --stock --rank R --calibration STATS`, "
              "or with `--rank R --value-rank R` on every layer")
_REMOTE_CODE = "modeling_collabcompress.py"  # compress --remote-code's file: a plain model has no use for it


def check_stock(manifest: Manifest, out: Checkpoint,
                config: dict[str, Any] | None) -> tuple[int, torch.Tensor, Family]:
    """The shared width R, the frequency table j(r) (R/2,) and the family (:func:`output_family`)
    of an output the stock form can hold.

    Raises:
        BadInputError: (exit 3) naming what the stock form cannot hold and how to compress instead,
            or a config.json or frequency table that contradicts the manifest.
    """
    from ..runtime.adapters import check_key_freq

    def refuse(why: str) -> BadInputError:
        return BadInputError(f"{manifest.path.parent}: the stock form cannot hold {why}; {EXPORTABLE}")

    layers = manifest.layers
    if not layers or not all(method_for(la).stock for la in layers):
        raise refuse(f"the layers of a {manifest.source.architecture!r} model (only shared rotary keys become stock "
                     "multi-query attention)")
    if config is None:
        raise refuse("a directory without config.json")
    family = output_family(manifest, config)
    for key, want in (("head_dim", layers[0].head_dim), ("num_key_value_heads", layers[0].kv_heads)):
        if config.get(key) not in (None, want):  # the export rewrites both: the weights must agree first
            raise BadInputError(f"{manifest.path.parent / 'config.json'} gives {key} {str(config[key])[:40]}, but "
                                f"{layers[0].tensors.mixing} holds {want}; compress the model again")
    count = config.get("num_hidden_layers")
    if isinstance(count, int) and sorted(la.index for la in layers) != list(range(count)):
        raise refuse(f"a model with {count} layers of which {len(layers)} are compressed (every layer must be)")
    widths = sorted({la.shared_dim for la in layers})
    if len(widths) > 1:
        raise refuse(f"different key widths R per layer ({', '.join(map(str, widths))})")
    rank = widths[0]
    values = sorted({la.value_rank for la in layers}, key=lambda v: -1 if v is None else v)
    if values != [rank]:
        shown = ", ".join("none" if v is None else str(v) for v in values)
        raise refuse(f"value latents of width {shown} with keys of width {rank} (it needs r_v = R in every layer)")
    table = out.load(layers[0].tensors.key_freq).long()
    check_key_freq(table, layers[0].head_dim, layers[0].tensors.key_freq, manifest.path.parent)
    for la in layers[1:]:
        if not torch.equal(out.load(la.tensors.key_freq).long(), table):
            raise refuse(f"different frequency tables in {layers[0].module} and {la.module} (one table for all layers)")
    return rank, table, family


def output_family(manifest: Manifest, config: dict[str, Any]) -> Family:
    """The rotary family of a compressed output: config.json's ``model_type``, which its manifest
    must record for the model and every layer.

    Raises:
        BadInputError: naming the model_type and the families the manifest records.
    """
    family = family_of_model_type(config.get("model_type"))
    recorded = {manifest.source.architecture} | {la.family or manifest.source.architecture for la in manifest.layers}
    if family is None or recorded != {family.name}:  # the layers are rotary: check_stock asked their method
        raise BadInputError(f"{manifest.path.parent / 'config.json'} has model_type {config.get('model_type')!r}, but "
                            f"the manifest records the {', '.join(sorted(recorded))} family; compress the model again")
    return family


def _stock_names(layer: LayerRecord, family: Family) -> dict[str, str]:
    """The family's own q/k/v/o tensor names of ``layer`` (weight and bias)."""
    m, parent = layer.module, layer.module.rsplit(".", 1)[0]
    names = {"q": layer.tensors.query, "k": f"{m}.{family.key}.weight",
             "v": family.value.format(m=m, parent=parent), "o": family.output.format(m=m, parent=parent)}
    out = {}
    for role, weight in names.items():
        out[f"{role}.weight"] = weight
        out[f"{role}.bias"] = weight[: -len("weight")] + "bias"
    return out


def _layer_entries(out: Checkpoint, layer: LayerRecord, family: Family, rank: int, scaling: float, dtype: torch.dtype,
                   biased: bool) -> tuple[list[tuple], set[str]]:
    """The stock q/k/v/o tensors of one layer as lazy write entries, and the output's names they replace.

    The score scale is the family's (``d^-1/2``, as the runtime's), times the rope's attention
    ``scaling`` squared; the tensors read besides the manifest's (o_proj, the query bias) are
    checked against the layer's heads first."""
    from ..maths.stock import stock_output, stock_query

    t, vt, names = layer.tensors, layer.value_tensors(), _stock_names(layer, family)
    h, d, dm = layer.heads, layer.head_dim, layer.d_model
    scale = family.scale(d) * scaling ** 2
    for name, shape in ((names["o.weight"], (dm, h * d)), (names["q.bias"], (h * d,))):
        got = list(out.shape(name)) if name in out else None
        if got != list(shape) and (got is not None or name == names["o.weight"]):
            raise BadInputError(f"{out.path}: {name} has shape {got}, expected {list(shape)} ({h} heads of width {d}, "
                                f"d_model {dm}); compress the model again" if got else
                                f"{out.path}: {name} is missing; compress the model again")

    def f64(name: str | None) -> torch.Tensor | None:
        return None if not name or name not in out else out.load(name, torch.float64, finite=True)

    def query() -> tuple[torch.Tensor, torch.Tensor | None]:
        return stock_query(f64(t.query), f64(names["q.bias"]), out.load(t.key_freq).long(), f64(t.mixing), h, d, scale)

    made: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor | None]]] = {
        "q.weight": ((h * rank, dm), lambda: query()[0]),
        "k.weight": ((rank, dm), lambda: f64(t.key)),
        "v.weight": ((rank, dm), lambda: f64(vt["weight"])),
        "o.weight": ((dm, h * rank), lambda: stock_output(f64(names["o.weight"]), f64(vt["up"]), h, d)),
    }
    if biased:  # the stock class has q, k and v biases together: a missing one is zero
        made["q.bias"] = ((h * rank,), lambda: query()[1])
        made["k.bias"] = ((rank,), lambda: f64(t.key_bias))
        made["v.bias"] = ((rank,), lambda: f64(vt.get("bias")))
    entries = []
    for role, (shape, make) in made.items():
        def load(make=make, shape=shape, name=names[role]) -> torch.Tensor:
            value = (torch.zeros(shape) if (v := make()) is None else v).to(dtype).contiguous()
            if not bool(torch.isfinite(value).all()):
                kind = str(dtype).removeprefix("torch.")
                raise BadInputError(f"export computed NaN or Inf in {name}; nothing was written. Likely cause: "
                                    f"extreme values in {out.path} beyond the range of {kind}")
            return value
        entries.append((names[role], shape, dtype, load))
    replaced = {names["q.weight"], names["q.bias"], names["o.weight"], t.key, t.mixing, t.key_freq,
                *([t.key_bias] if t.key_bias else []), *vt.values()}
    return entries, replaced


def _config(config: dict[str, Any], rank: int, table: torch.Tensor, head_dim: int) -> dict[str, Any]:
    from ..files.rope import stock_rope

    cfg = {k: v for k, v in config.items() if k not in ("collaborative_attention", "auto_map", "rope_scaling")}
    cfg.update(num_key_value_heads=1, head_dim=rank, rope_parameters=stock_rope(config, head_dim, table))
    return cfg


def export(directory: str | Path, out_dir: str | Path, *, fmt: str = "stock", force: bool = False) -> dict[str, Any]:
    """Write the compressed ``directory`` as a plain transformers checkpoint in ``out_dir``.

    Args:
        directory: an output of ``compress`` whose layers the stock form holds (:func:`check_stock`).
        out_dir: the new directory (created atomically; with ``force`` it may replace an earlier
            export, nothing else).
        fmt: ``"stock"``: multi-query attention with one key/value head of size R.

    Returns:
        The export manifest (``export_manifest.json``).

    Raises:
        BadInputError: a format other than stock, an output the stock form cannot hold, unreadable
            or changed files, an output directory that may not be written.
    """
    from ..files.rope import check_rope_settings, rope_frequencies

    if fmt not in FORMATS:
        raise BadInputError(f"unknown --format {fmt!r}; available: {', '.join(FORMATS)}")
    check_output_dir(out_dir, [Path(directory)], force=force, replaces=EXPORTS)
    directory, out_dir = Path(directory), Path(out_dir)
    manifest, out = open_output(directory)
    try:
        rank, table, family = check_stock(manifest, out, out.config)
        check_rope_settings(out.config)
        first = manifest.layers[0]
        _, scaling = rope_frequencies(out.config, first.head_dim)
        config = _config(out.config, rank, table, first.head_dim)
        dtype = to_torch(out.dtype(first.tensors.query))
        entries, replaced = [], set()
        for layer in manifest.layers:
            biased = any(n in out for n in (_stock_names(layer, family)["q.bias"], layer.tensors.key_bias or "",
                                            layer.value_tensors().get("bias", "")) if n)
            made, gone = _layer_entries(out, layer, family, rank, scaling, dtype, biased)
            entries += made
            replaced |= gone
        names = {e[0] for e in entries}
        entries += [(n, out.shape(n), to_torch(out.dtype(n)), lambda n=n: out.load(n, finite=True))
                    for n in out.names() if n not in replaced and n not in names]
        _check_loads(directory / "config.json", config, entries)
        with atomic_directory(out_dir, force=force, replaces=EXPORTS) as tmp:
            write_safetensors(tmp / "model.safetensors", entries, {"format": "pt"})
            write_json(config, tmp / "config.json")
            outputs = [tmp / "model.safetensors", tmp / "config.json"]
            outputs += copy_other_files(directory, tmp, {directory / _REMOTE_CODE})
            record = _record(directory, manifest, rank, table, outputs, tmp)
            write_json(record, tmp / EXPORT_MANIFEST)
    finally:
        out.close()
    return record


def _transformers_config(where: Path, config: dict[str, Any]) -> Any:
    """``config`` as transformers reads it (its field types checked).

    Raises:
        BadInputError: naming ``where`` and transformers' reason.
        MissingExtraError: transformers is not installed (the export is a transformers model).
    """
    from ..extras import quiet_transformers, require_transformers, unreadable_model_errors

    transformers = require_transformers("export")
    try:
        with quiet_transformers():
            return transformers.AutoConfig.for_model(**config)
    except (*unreadable_model_errors(), TypeError) as e:
        raise BadInputError(f"{where} is not a config transformers reads ({' '.join(str(e).split())[:200]}); "
                            "compress the model again") from e


def _check_loads(where: Path, config: dict[str, Any], entries: list[tuple]) -> None:
    """The tensors to write are exactly the weights of the model transformers builds from the
    export's ``config`` (built on the meta device: no memory), by name and shape (tied weights
    under either name), and ``architectures`` names its class: a config.json that contradicts
    the weights is refused (naming ``where``) before anything is written.

    Raises:
        BadInputError: the config does not build a model, or names, shapes or class differ.
        MissingExtraError: transformers is not installed.
    """
    from ..extras import quiet_transformers, require_transformers, unreadable_model_errors

    def refuse(why: str) -> BadInputError:
        return BadInputError(f"{where} contradicts the weights: {why}; compress the model again")

    hf_config = _transformers_config(where, config)
    try:
        with quiet_transformers(), torch.device("meta"):
            model = require_transformers("export").AutoModelForCausalLM.from_config(hf_config)
    except (*unreadable_model_errors(), TypeError) as e:
        raise refuse(f"it builds no transformers model ({str(e).splitlines()[0][:200]})") from e
    if config.get("architectures") not in (None, [type(model).__name__]):
        raise refuse(f"architectures {str(config['architectures'])[:60]}, but model_type {config.get('model_type')!r} "
                     f"with these weights is {type(model).__name__}")
    groups: dict[int, list[str]] = {}  # tied weights: one tensor under several names
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}
    written = {name: tuple(shape) for name, shape, *_ in entries}
    unexpected = sorted(set(written) - set(expected))
    missing = [names[0] for names in groups.values() if not set(names) & set(written)]
    wrong = [f"{n} {list(s)} (the config gives {list(expected[n])})" for n, s in written.items()
             if n in expected and s != expected[n]]
    for what, names in (("tensors the model does not take", unexpected), ("model weights missing", missing),
                        ("shapes", wrong)):
        if names:
            raise refuse(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")


def _record(directory: Path, manifest: Manifest, rank: int, table: torch.Tensor, outputs: list[Path],
            tmp: Path) -> dict[str, Any]:
    """``export_manifest.json``: what was exported from what (the source files as its manifest
    records them, checked on reading, and the manifest itself)."""
    files = [o.to_json() for o in manifest.outputs] + [file_record(directory / MANIFEST_NAME, directory)]
    return {"format": EXPORT_FORMAT, "export_format": "stock",
            "tool": {"name": "collabcompress", "version": __version__},
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": {"path": str(directory.resolve()), "architecture": manifest.source.architecture,
                       "files": sorted(files, key=lambda f: f["name"])},
            "stock": {"layers": len(manifest.layers), "head_dim": rank, "num_key_value_heads": 1,
                      "kv_cache_per_token_and_layer": 2 * rank,
                      "kv_cache_before": 2 * manifest.layers[0].value_heads * manifest.layers[0].head_dim,
                      "key_freq": table.tolist()},
            "outputs": [file_record(p, tmp) for p in sorted(outputs)]}


@dataclass(frozen=True)
class StockLayer:
    """One attention layer of an exported model, read like a manifest's layer record."""

    heads: int
    head_dim: int
    d_model: int
    shared_dim: int


@dataclass(frozen=True)
class ExportSource:
    architecture: str
    path: str


@dataclass(frozen=True)
class ExportedModel:
    """An ``export`` output, read like a manifest where ``evaluate`` and ``bench`` need one: its
    family, its layers (from its config.json) and the compress output it came from."""

    path: Path
    source: ExportSource
    layers: tuple[StockLayer, ...]
    outputs: tuple[Any, ...]


def read_export(directory: str | Path) -> ExportedModel | None:
    """The export in ``directory`` with every output file checked against its recorded sha256, or
    ``None`` when ``directory`` holds no export manifest (:data:`EXPORT_MANIFEST`).

    Raises:
        BadInputError: an unreadable export manifest or config.json, or an output file missing or changed.
    """
    from ..files.checkpoint import read_json, regular_file
    from ..files.hashing import sha256_file
    from ..files.manifest import FileRecord

    directory = Path(directory)
    path = directory / EXPORT_MANIFEST
    if not path.is_file() or (directory / MANIFEST_NAME).exists():
        return None
    data = read_json(path, "export manifest", directory)  # the one reader: no link out, no FIFO
    config = read_json(directory / "config.json", "config.json", directory)
    try:
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format {str(data.get('format'))[:40]!r}, not {EXPORT_FORMAT}")
        outputs = tuple(FileRecord(str(o["name"]), str(o["sha256"]), int(o["bytes"])) for o in data["outputs"])
        source = ExportSource(str(data["source"]["architecture"]), str(data["source"]["path"]))
        head_dim = int(config["head_dim"])
        layer = StockLayer(int(config["num_attention_heads"]), head_dim, int(config["hidden_size"]), head_dim)
        layers = (layer,) * int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInputError(f"{directory}: the export is unreadable ({e}); export the model again") from e
    for record in outputs:
        file = regular_file(directory / record.name, directory, f"output file {record.name!r}")
        if file.stat().st_size != record.bytes or sha256_file(file) != record.sha256:
            raise BadInputError(f"{directory}: {record.name} is not the file export wrote (its sha256 or size differs "
                                f"from {EXPORT_MANIFEST}); export the model again")
    return ExportedModel(directory, source, layers, outputs)


def export_source(exported: ExportedModel) -> Path:
    """The compress output ``exported`` came from, checked to be unchanged (its manifest's sha256).

    Raises:
        BadInputError: it is gone or changed.
    """
    from ..files.checkpoint import read_json
    from ..files.hashing import sha256_file

    source = Path(exported.source.path)
    manifest = source / MANIFEST_NAME
    data = read_json(exported.path / EXPORT_MANIFEST, "export manifest", exported.path)
    want = next((f["sha256"] for f in data["source"]["files"] if f["name"] == MANIFEST_NAME), None)
    if not manifest.is_file() or sha256_file(manifest) != want:
        raise BadInputError(f"{exported.path}: the compress output it was exported from, {source}, is gone or changed; "
                            "bench needs it for the FLOP model")
    return source
