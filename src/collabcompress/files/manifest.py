"""``collab_manifest.json`` (docs/method.md): typed records, validation, and trust checks.

This module alone reads and writes the manifest. :func:`write` writes a :class:`Manifest`;
:func:`read` parses one back as untrusted input: every key that is used is checked for
presence and type, names must stay inside their directory, layers must be unique and
their dimensions positive; a failure is a one-line :class:`BadInputError`. Before a
reader uses a compressed directory, :func:`check_outputs` compares its files with the
sha256 and sizes the manifest records, :func:`check_shapes` the collaborative tensors with
the recorded shapes, and :func:`check_source` the source checkpoint with its record.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from .checkpoint import INDEX_SUFFIX, read_json, regular_file
from .hashing import sha256_file

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["Manifest", "SourceRecord", "FileRecord", "Settings", "LayerRecord", "LayerTensors", "Totals", "Tool",
           "read", "load_manifest", "open_output", "check_outputs", "check_shapes", "check_source", "MANIFEST_NAME",
           "FORMAT"]

MANIFEST_NAME = "collab_manifest.json"
FORMAT = "collabcompress/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIMS = ("heads", "head_dim", "d_model", "shared_dim")


class _Where:
    """Builds the one-line messages of one manifest file."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, message: str) -> BadInputError:
        return BadInputError(f"manifest {self.path}: {message}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
        """``obj[key]`` of ``kind`` (``bool`` is never an int or float here)."""
        if not isinstance(obj, dict):
            raise self.error(f"{where} is not an object")
        if key not in obj or (optional and obj[key] is None):
            if optional:
                return None
            raise self.error(f"{where} has no {key!r}")
        value = obj[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.error(f"{where}.{key} has the wrong type ({type(value).__name__})")
        return value


def _inside_name(name: str) -> bool:
    """A relative POSIX name that cannot leave its directory."""
    p = PurePosixPath(name)
    return bool(name) and "\0" not in name and "\\" not in name and not p.is_absolute() and ".." not in p.parts \
        and len(name) <= 4096


@dataclass(frozen=True)
class FileRecord:
    """A file named relative to its directory, with its sha256 and size."""

    name: str
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_json(cls, obj: Any, where: str, w: _Where) -> FileRecord:
        name = w.get(obj, "name", str, where)
        sha = w.get(obj, "sha256", str, where)
        size = w.get(obj, "bytes", int, where)
        if not _inside_name(name):
            raise w.error(f"{where}.name {name[:80]!r} is not a file name inside its directory")
        if not _SHA256.match(sha):
            raise w.error(f"{where}.sha256 is not a sha256 (64 lower-case hex digits)")
        if size < 0:
            raise w.error(f"{where}.bytes is negative")
        return cls(name, sha, size)


def _files(obj: Any, where: str, w: _Where) -> tuple[FileRecord, ...]:
    if not isinstance(obj, list):
        raise w.error(f"{where} has the wrong type ({type(obj).__name__})")
    records = tuple(FileRecord.from_json(f, f"{where}[{i}]", w) for i, f in enumerate(obj))
    names = [r.name for r in records]
    if len(set(names)) < len(names):
        raise w.error(f"{where} lists a file twice")
    return records


@dataclass(frozen=True)
class Tool:
    name: str
    version: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class SourceRecord:
    """What was compressed: where, its files (``name`` relative to the source directory), family, dtype."""

    path: str
    files: tuple[FileRecord, ...]
    architecture: str
    dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "files": [f.to_json() for f in self.files], "architecture": self.architecture,
                "dtype": self.dtype}


@dataclass(frozen=True)
class Settings:
    """The options of the run: ``heads`` and ``arch`` are read back; ``options`` are the rest, as written."""

    options: dict[str, Any]
    heads: int | None = None
    arch: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.options, "heads": self.heads, "arch": self.arch}


@dataclass(frozen=True)
class LayerTensors:
    """Names of a layer's collaborative tensors in the output (``value``: the value slice of a fused
    query/key/value tensor (GPT-2, timm), ``None`` when shared values replace it: their names are the
    record's ``value["tensors"]``).

    A rotary layer names its unchanged q_proj weight as ``query``, adds ``key_freq`` and
    ``key_bias`` (``None`` without a source key bias) and has no ``content_bias``.
    """

    query: str
    key: str
    mixing: str
    content_bias: str | None
    value: str | None = None
    key_freq: str | None = None
    key_bias: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"query": self.query, "key": self.key, "mixing": self.mixing, "content_bias": self.content_bias,
               "value": self.value}
        if self.key_freq is not None:
            out.update(key_freq=self.key_freq, key_bias=self.key_bias)
        return out

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.query, self.key, self.mixing, self.content_bias, self.key_freq,
                                 self.key_bias) if n is not None)


@dataclass(frozen=True)
class LayerRecord:
    """One compressed attention layer (docs/method.md ``layers``)."""

    module: str
    index: int
    heads: int
    head_dim: int
    d_model: int
    shared_dim: int
    scale: float
    relative_error: float
    relative_error_plain: float | None
    energy_spectral: float
    iterations: int
    seconds: float
    tensors: LayerTensors
    removed: tuple[str, ...]
    family: str | None = None
    fused: str | None = None
    query_bias: bool = False
    key_bias: bool = False
    refine: dict[str, Any] | None = None
    kv_heads: int | None = None
    rotary: bool = False
    allocation: dict[str, Any] | None = None  # --budget: the loss curve and the loss at the chosen width
    value_rank: int | None = None  # shared values: r_v, the value latent's width (None: values unchanged)
    value: dict[str, Any] | None = None  # shared values: their fit and tensors {"weight", "bias", "up"}

    @property
    def value_heads(self) -> int:
        """G, the layer's value heads (H without grouped-query attention)."""
        return self.kv_heads or self.heads

    def value_tensors(self) -> dict[str, str]:
        """Shared values: role (``weight``, ``bias``, ``up``) -> tensor name, for those that exist."""
        named = (self.value or {}).get("tensors") or {}
        return {k: named[k] for k in ("weight", "bias", "up") if isinstance(named.get(k), str)}

    def shapes(self, path: Path) -> dict[str, tuple[int, ...]]:
        """The shape of each collaborative tensor (query and key (R, D), mixing (H, R), content_bias
        (H, D); a rotary layer: q_proj (H*d, D), key (R, D), mixing (G, R/2, 2), key_freq (R/2,),
        key_bias (R,)); an odd R of a rotary layer is refused, naming the manifest ``path``."""
        t, r, h, d = self.tensors, self.shared_dim, self.heads, self.d_model
        values = {}
        if self.value_rank is not None:  # shared values: weight (r_v, D), bias (r_v,), up (G*d, r_v)
            rv = self.value_rank
            want = {"weight": (rv, d), "bias": (rv,), "up": (self.value_heads * self.head_dim, rv)}
            values = {name: want[role] for role, name in self.value_tensors().items()}
        if self.rotary:
            if r % 2:
                raise BadInputError(f"{path}: {self.module} is rotary with an odd shared_dim {r}")
            return {t.query: (h * self.head_dim, d), t.key: (r, d), t.mixing: (self.kv_heads, r // 2, 2),
                    t.key_freq: (r // 2,), **({t.key_bias: (r,)} if t.key_bias else {}), **values}
        return {t.query: (r, d), t.key: (r, d), t.mixing: (h, r), t.content_bias: (h, d), **values}

    def to_json(self) -> dict[str, Any]:
        # a rotary layer's fields, written when set (docs/method.md "Rotary layers")
        grouped = {k: v for k, v in (("kv_heads", self.kv_heads), ("rotary", self.rotary)) if v}
        allocation = {"allocation": self.allocation} if self.allocation is not None else {}
        if self.value_rank is not None:
            allocation.update(value_rank=self.value_rank, value=self.value)
        return {"module": self.module, "index": self.index, "heads": self.heads, **grouped, "head_dim": self.head_dim,
                "d_model": self.d_model, "shared_dim": self.shared_dim, "scale": self.scale,
                "relative_error": self.relative_error, "relative_error_plain": self.relative_error_plain,
                "energy_spectral": self.energy_spectral, "iterations": self.iterations, "seconds": self.seconds,
                "tensors": self.tensors.to_json(), "removed": list(self.removed), "family": self.family,
                "fused": self.fused, "query_bias": self.query_bias, "key_bias": self.key_bias, "refine": self.refine,
                **allocation}

    @classmethod
    def from_json(cls, obj: Any, where: str, w: _Where) -> LayerRecord:
        num = (int, float)
        g = functools.partial(w.get, obj)
        values = {"module": g("module", str, where), "index": g("index", int, where)}
        for key in _DIMS:
            values[key] = g(key, int, where)
            if values[key] < 1:
                raise w.error(f"{where}.{key} must be positive")
        if values["index"] < 0:
            raise w.error(f"{where}.index must not be negative")
        for key in ("scale", "relative_error", "energy_spectral", "seconds"):
            values[key] = g(key, num, where)
            if not math.isfinite(values[key]):
                raise w.error(f"{where}.{key} is not a finite number")
        values["relative_error_plain"] = g("relative_error_plain", num, where, optional=True)
        values["iterations"] = g("iterations", int, where)
        rotary = bool(g("rotary", bool, where, optional=True))
        values["rotary"] = rotary
        if rotary:
            values["kv_heads"] = g("kv_heads", int, where)
            if values["kv_heads"] < 1:
                raise w.error(f"{where}.kv_heads must be positive")
        t = g("tensors", dict, where)
        tw = f"{where}.tensors"
        values["tensors"] = LayerTensors(w.get(t, "query", str, tw), w.get(t, "key", str, tw),
                                         w.get(t, "mixing", str, tw),
                                         w.get(t, "content_bias", str, tw, optional=rotary),
                                         w.get(t, "value", str, tw, optional=True),
                                         w.get(t, "key_freq", str, tw) if rotary else None,
                                         w.get(t, "key_bias", str, tw, optional=True) if rotary else None)
        removed = g("removed", list, where)
        if not all(isinstance(n, str) for n in removed):
            raise w.error(f"{where}.removed must be a list of tensor names")
        values["removed"] = tuple(removed)
        values["family"] = g("family", str, where, optional=True)
        values["fused"] = g("fused", str, where, optional=True)
        values["query_bias"] = bool(g("query_bias", bool, where, optional=True))
        values["key_bias"] = bool(g("key_bias", bool, where, optional=True))
        values["refine"] = g("refine", dict, where, optional=True)
        values["allocation"] = g("allocation", dict, where, optional=True)
        values["value_rank"] = g("value_rank", int, where, optional=True)
        if values["value_rank"] is not None:
            if values["value_rank"] < 1:
                raise w.error(f"{where}.value_rank must be positive")
            value = values["value"] = g("value", dict, where)
            vt = w.get(value, "tensors", dict, f"{where}.value")
            for role in ("weight", "up"):
                w.get(vt, role, str, f"{where}.value.tensors")
            w.get(vt, "bias", str, f"{where}.value.tensors", optional=True)
            if values["tensors"].value is not None:
                raise w.error(f"{where}.tensors.value names a fused value slice, but the layer has shared values "
                              "(value_rank), which replace it")
        return cls(**values)


@dataclass(frozen=True)
class Totals:
    params_before: int
    params_after: int
    qk_params_before: int
    qk_params_after: int
    bytes_before: int
    bytes_after: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Manifest:
    """The whole manifest; :meth:`to_json` gives the JSON object in the order ``compress`` writes it."""

    tool: Tool
    created_utc: str
    source: SourceRecord
    settings: Settings
    layers: tuple[LayerRecord, ...]
    totals: Totals
    outputs: tuple[FileRecord, ...]
    format: str = FORMAT
    path: Path | None = field(default=None, compare=False)  # where it was read from
    heal: dict[str, Any] | None = None  # --heal-steps: steps, accepted, held-out loss before and after

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "tool": self.tool.to_json(), "created_utc": self.created_utc,
                "source": self.source.to_json(), "settings": self.settings.to_json(),
                "layers": [la.to_json() for la in self.layers], "totals": self.totals.to_json(),
                "outputs": [o.to_json() for o in self.outputs], **({"heal": self.heal} if self.heal else {})}

    @classmethod
    def from_json(cls, data: Any, path: Path = Path(MANIFEST_NAME)) -> Manifest:
        """Validate a parsed manifest. Raises :class:`BadInputError` naming ``path`` and the field."""
        w = _Where(path)
        if not isinstance(data, dict):
            raise w.error("not a JSON object")
        if data.get("format") != FORMAT:
            raise w.error(f"format {str(data.get('format'))[:80]!r} is not {FORMAT!r}")
        tool = w.get(data, "tool", dict, "manifest")
        created = w.get(data, "created_utc", str, "manifest")
        src = w.get(data, "source", dict, "manifest")
        source = SourceRecord(w.get(src, "path", str, "source"), _files(w.get(src, "files", list, "source"),
                                                                        "source.files", w),
                              w.get(src, "architecture", str, "source"), w.get(src, "dtype", str, "source",
                                                                              optional=True))
        settings = w.get(data, "settings", dict, "manifest")
        heads = w.get(settings, "heads", int, "settings", optional=True)
        if heads is not None and heads < 1:
            raise w.error(f"settings.heads must be positive, got {heads}")
        arch = w.get(settings, "arch", str, "settings", optional=True)
        options = {k: v for k, v in settings.items() if k not in ("heads", "arch")}
        raw_layers = w.get(data, "layers", list, "manifest")
        if not raw_layers:
            raise w.error("lists no compressed layers")
        layers = tuple(LayerRecord.from_json(la, f"layers[{i}]", w) for i, la in enumerate(raw_layers))
        for key in ("module", "index"):
            seen: set[Any] = set()
            for la in layers:
                value = getattr(la, key)
                if value in seen:
                    raise w.error(f"layer {key} {str(value)[:80]!r} is listed twice")
                seen.add(value)
        t = w.get(data, "totals", dict, "manifest")
        totals = Totals(*(w.get(t, f.name, int, "totals") for f in dataclasses.fields(Totals)))
        outputs = _files(w.get(data, "outputs", list, "manifest"), "outputs", w)
        return cls(Tool(str(tool.get("name")), str(tool.get("version"))), created, source,
                   Settings(options, heads, arch), layers, totals, outputs, path=path,
                   heal=w.get(data, "heal", dict, "manifest", optional=True))

    def output(self, name: str) -> FileRecord | None:
        return next((o for o in self.outputs if o.name == name), None)


def read(directory: str | Path) -> Manifest:
    """Read and validate the manifest of a compressed output directory.

    Raises:
        BadInputError: no such directory, no manifest (not a compressed model), invalid JSON,
            another format, a missing or mistyped key, a name outside its directory, a layer
            listed twice or a dimension that is not positive.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        exists, is_dir, present = directory.exists(), directory.is_dir(), path.exists() or path.is_symlink()
    except OSError as e:  # e.g. a name too long for the file system
        raise BadInputError(f"cannot open {str(directory)[:200]}: {e.strerror or e}") from e
    if not exists:
        raise BadInputError(f"not found: {directory}")
    if not is_dir:
        raise BadInputError(f"{directory} is not a directory; pass the output directory of `compress`")
    if not present:
        raise BadInputError(f"{directory} is not a model compressed by collabcompress (no {MANIFEST_NAME})")
    return Manifest.from_json(read_json(path, "manifest", directory), path)


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The validated manifest as its JSON object (for readers that pass it on as data)."""
    return read(directory).to_json()


def _matches(file: Path, record: FileRecord) -> bool:
    return file.stat().st_size == record.bytes and sha256_file(file) == record.sha256


def check_outputs(directory: str | Path, manifest: Manifest) -> None:
    """Every output the manifest lists is in ``directory``, a regular file inside it, with its
    recorded size and sha256.

    Raises:
        BadInputError: naming the first file that is missing or changed.
    """
    directory = Path(directory)
    for record in manifest.outputs:
        file = regular_file(directory / record.name, directory, f"output file {record.name!r}")
        if not _matches(file, record):
            raise BadInputError(f"{directory}: {record.name} is not the file compress wrote (its sha256 or size "
                                "differs from the manifest); compress the model again")


def check_shapes(manifest: Manifest, out: Checkpoint) -> None:
    """The collaborative tensors of every layer have the shapes the manifest records
    (:meth:`LayerRecord.shapes`)."""
    for la in manifest.layers:
        t, r, h, d = la.tensors, la.shared_dim, la.heads, la.d_model
        for name, shape in la.shapes(manifest.path).items():
            if name not in out:
                raise BadInputError(f"{out.path} is missing tensor {name!r} named in its manifest")
            if tuple(out.shape(name)) != shape:
                raise BadInputError(f"{out.path}: the collab tensors of {la.module} do not match the manifest "
                                    f"(shared_dim {r}, {h} heads, d_model {d}): {name} has shape "
                                    f"{list(out.shape(name))}, expected {list(shape)}")
        if la.value_rank is None and t.value is not None and t.value in out and out.shape(t.value)[-1] != la.heads * la.head_dim:
            raise BadInputError(f"{out.path}: tensor {t.value} does not fit {la.heads} heads of width {la.head_dim}")


def check_source(manifest: Manifest, ckpt: Checkpoint) -> None:
    """``ckpt`` holds exactly the source files the manifest records (size and sha256).

    Raises:
        BadInputError: no weight file recorded, a recorded file missing or changed, or a
            weight file of ``ckpt`` the manifest does not record; the message names the file.
    """
    records = {f.name: f for f in manifest.source.files}
    if not any(n.endswith((".safetensors", INDEX_SUFFIX)) for n in records):
        raise BadInputError(f"{manifest.path}: source.files records no weight file, so the source cannot be "
                            "checked; compress the model again")
    root = ckpt.directory
    for f in ckpt.files + ([ckpt.index_file] if ckpt.index_file else []):
        try:
            name = f.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            name = f.name
        if name not in records:
            raise BadInputError(f"{ckpt.path} changed since it was compressed or is another checkpoint: its file "
                                f"{name} is not among the source files the manifest records")
    for record in manifest.source.files:
        file = regular_file(root / record.name, root, f"source file {record.name!r}")
        if not _matches(file, record):
            raise BadInputError(f"{ckpt.path} changed since it was compressed or is another checkpoint "
                                f"({record.name} differs from the sha256 the manifest records)")


def open_output(directory: str | Path) -> tuple[Manifest, Checkpoint]:
    """Read a compressed directory the way every reader must: the manifest validated, every
    output file checked against its record (:func:`check_outputs`), the weights opened
    with :func:`~collabcompress.files.checkpoint.open_checkpoint` and every file read recorded in the
    manifest, the collaborative tensors' shapes equal to the recorded ones (:func:`check_shapes`).

    Returns:
        The manifest and the opened output checkpoint (the caller closes it).

    Raises:
        BadInputError: see :func:`read`, :func:`check_outputs` and :func:`check_shapes`.
    """
    from .checkpoint import open_checkpoint

    directory = Path(directory)
    manifest = read(directory)
    check_outputs(directory, manifest)
    out = open_checkpoint(directory)
    try:
        read_files = out.files + ([out.index_file] if out.index_file else [])
        if out.config is not None:
            read_files.append(directory / "config.json")
        root = directory.resolve()
        for name in (f.resolve().relative_to(root).as_posix() for f in read_files):
            if manifest.output(name) is None:
                raise BadInputError(f"{directory}: {name} is not among the outputs its manifest records; "
                                    "compress the model again")
        check_shapes(manifest, out)
    except BaseException:
        out.close()
        raise
    return manifest, out
