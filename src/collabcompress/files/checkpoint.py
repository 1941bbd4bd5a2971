"""Read safetensors checkpoints lazily: one file, a sharded index, or a directory.

Only the tensors asked for are read; headers give names, shapes and dtypes without
touching the data. Every failure a user can cause becomes a :class:`BadInputError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..dtypes import ELEMENT_SIZE, to_torch
from ..errors import BadInputError

__all__ = ["Checkpoint", "open_checkpoint", "read_json", "read_texts", "regular_file", "staged"]

INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def regular_file(path: Path, root: Path | None = None, what: str = "file") -> Path:
    """``path`` with its links resolved, checked before anything opens it.

    The one reading rule of collabcompress: only a regular file is read (a FIFO, device or
    directory is refused without opening it, so nothing blocks), and a file named inside
    ``root`` must stay inside it once symbolic links are resolved.

    Raises:
        BadInputError: missing, not a regular file, outside ``root``, or an unusable name.
    """
    try:
        resolved = path.resolve()
        if root is not None:
            base = root.resolve()
            if base not in resolved.parents:
                raise BadInputError(f"{what} {str(path)[:200]} points outside {root} (through '..', an absolute "
                                    "path or a symbolic link); collabcompress reads only files inside it")
        mode = os.stat(resolved).st_mode
    except FileNotFoundError as e:
        raise BadInputError(f"{what} not found: {str(path)[:200]}") from e
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, a symlink loop
        raise BadInputError(f"cannot open {what} {str(path)[:200]}: {getattr(e, 'strerror', None) or e}") from e
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise BadInputError(f"{what} {str(path)[:200]} is {kind}, not a regular file; collabcompress reads only "
                            "regular files")
    return resolved


@contextlib.contextmanager
def staged(directory: Path, names: Iterable[str]) -> Iterator[Path]:
    """A private temporary directory holding copies of the files ``names`` of ``directory``
    (those that exist), each checked by :func:`regular_file` inside ``directory`` first.

    transformers opens config and tokenizer files itself, following symbolic links; given the
    staged copies instead, it reads only what the reading rule let through.

    Raises:
        BadInputError: a file that is not regular or points outside ``directory``.
    """
    with tempfile.TemporaryDirectory(prefix="collabcompress-") as tmp:
        for name in names:
            path = directory / name
            if not (path.exists() or path.is_symlink()):
                continue
            source = regular_file(path, directory, name)
            try:
                shutil.copyfile(source, Path(tmp) / name)
            except OSError as e:
                raise BadInputError(f"cannot read {path}: {e.strerror or e}") from e
        yield Path(tmp)


def read_json(path: Path, what: str, root: Path | None = None) -> Any:
    """Parse a JSON file read under :func:`regular_file`'s rule; every failure is a one-line
    :class:`BadInputError`."""
    file = regular_file(path, root, what)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read {what} {path}: {e}") from e
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, an integer of > 4300 digits
        raise BadInputError(f"{what} {path} is not valid JSON: {e}") from e


def read_texts(path: str | Path) -> list[str]:
    """One text per non-empty line of a UTF-8 file (a BOM is allowed).

    Raises:
        BadInputError: missing or unreadable file, not UTF-8, or no text in it.
    """
    path = Path(path)
    try:
        file = regular_file(path, what="--texts")
    except BadInputError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise BadInputError(f"cannot read --texts {path}: {e.__cause__.strerror}") from e
        raise
    try:
        data = file.read_bytes()
    except OSError as e:
        raise BadInputError(f"cannot read --texts {path}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInputError(f"--texts {path} is not UTF-8 text (invalid byte at offset {e.start}); "
                            "save it as UTF-8, one text per line") from e
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise BadInputError(f"--texts {path} holds no text; put one text per line")
    return texts


def _read_header(path: Path) -> tuple[int, Any]:
    """Read a safetensors header once: -> (its length, the parsed JSON or ``None`` when it does
    not parse, which safetensors then reports in its own words).

    Checks, with plain messages, what safetensors words poorly: a file too short for the
    8-byte length, a length beyond the file (or absurd), no JSON object, and tensors that do
    not fit the file (:func:`_check_extents`).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInputError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise BadInputError(
                    f"{path} is not a safetensors file or is truncated "
                    f"(header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {e}") from e
    if raw[:1] != b"{":
        raise BadInputError(f"{path} is not a safetensors file (no JSON header)")
    try:
        header = json.loads(raw)
        entries = [(k, e["dtype"], _ints(e["shape"]), _ints(e["data_offsets"]))
                   for k, e in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return n, None
    _check_extents(path, entries, size - 8 - n)
    return n, header


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError("not a list of integers")
    return values


def _check_extents(path: Path, entries: list[tuple[str, Any, list[int], list[int]]], data_bytes: int) -> None:
    """Refuse a header whose tensors do not fit the file, before anything is allocated for them:
    a tensor past the end of the data (truncated, or a crafted header claiming a
    [10**6, 10**6] tensor), or data offsets that do not span shape x dtype bytes."""
    beyond = [e for e in entries if len(e[3]) == 2 and e[3][1] > data_bytes]
    if beyond:
        name, dtype, shape, (start, end) = min(beyond, key=lambda e: e[3][0])
        raise BadInputError(f"{path} is truncated or its header is damaged: tensor {str(name)[:200]!r} "
                            f"({str(dtype)[:20]} {str(shape)[:100]}) claims data bytes {start:,} to {end:,}, "
                            f"the file holds {data_bytes:,}")
    for name, dtype, shape, offsets in entries:
        element = ELEMENT_SIZE.get(dtype) if isinstance(dtype, str) else None
        if element is None or len(offsets) != 2 or any(d < 0 for d in shape):
            continue  # a dtype or layout this check does not know: safetensors judges it
        span = offsets[1] - offsets[0]
        nbytes = 0 if 0 in shape else element
        for d in shape if nbytes else ():  # stops once past the file: a shape of 10**6 dimensions costs nothing
            nbytes *= d
            if nbytes > data_bytes:
                break
        if nbytes != span:
            needs = f"{nbytes:,} bytes" if nbytes <= data_bytes else f"more than the file's {data_bytes:,} bytes"
            raise BadInputError(f"{path} has a damaged header: tensor {str(name)[:200]!r} of shape "
                                f"{str(shape)[:100]} and dtype {dtype} needs {needs}, its data offsets span {span:,}")


def _data_offsets(path: Path, header_len: int, header: Any) -> dict[str, tuple[int, int]]:
    """Tensor name -> (start, end) byte positions in the file, from a header safetensors accepted."""
    try:
        base = 8 + header_len
        return {name: (base + int(entry["data_offsets"][0]), base + int(entry["data_offsets"][1]))
                for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise BadInputError(f"{path} has an unreadable safetensors header: {e}") from e


@dataclass
class Checkpoint:
    """A resolved checkpoint: where its weights live and what they are.

    Attributes:
        path: the path the user gave.
        directory: the directory that holds the weights (and ``config.json`` if any).
        files: the safetensors files, in order (one, or the shards).
        index_file: the sharded index, or ``None``.
        weight_map: tensor name -> file holding it.
        config: parsed ``config.json`` beside the weights, or ``None``.
    """

    path: Path
    directory: Path
    files: list[Path]
    index_file: Path | None
    weight_map: dict[str, Path]
    config: dict[str, Any] | None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _meta: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, repr=False)
    _offsets: dict[Path, dict[str, tuple[int, int]]] = field(default_factory=dict, repr=False)

    @property
    def sharded(self) -> bool:
        return self.index_file is not None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise BadInputError(f"{file} is not a readable safetensors file: {e}") from e
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string of a tensor (``F32``, ``F16``, ``BF16``...)."""
        return self._meta[name][1]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def load(self, name: str, dtype: torch.dtype | None = None, *, finite: bool = False) -> torch.Tensor:
        """Read one tensor (and only it) from disk, optionally cast and checked for NaN/Inf."""
        if name not in self.weight_map:
            raise BadInputError(f"tensor {name!r} not found in {self.path}")
        file = self.weight_map[name]
        try:
            t = self._read(file, name)
            if t is None:
                t = self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BadInputError(f"cannot read tensor {name!r} from {file}: {e}") from e
        if dtype is not None:
            t = t.to(dtype)
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadInputError(f"tensor {name!r} contains NaN or Inf values")
        return t

    def _read(self, file: Path, name: str) -> torch.Tensor | None:
        """The tensor read with plain file reads into fresh memory, or ``None`` where that is not possible.

        safetensors' own reader maps the whole file, and every page it touches stays resident
        while the file is open: reading a whole checkpoint (``compress`` copies every tensor)
        would hold all of it in the process's resident memory. Plain reads hold one tensor.
        """
        span = self._offsets.get(file, {}).get(name)
        shape, st_dtype = self._meta[name]
        dtype = to_torch(st_dtype)
        if span is None or dtype is None or sys.byteorder != "little":
            return None
        start, end = span
        nbytes = end - start
        if nbytes != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"its {nbytes} bytes do not hold a {st_dtype} tensor of shape {list(shape)}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        with file.open("rb", buffering=0) as f:
            f.seek(start)
            while got < nbytes and (n := f.readinto(view[got:])):  # a read stops at 2 GiB on Linux
                got += n
        if got != nbytes:
            raise ValueError(f"the file ends after {got} of its {nbytes} bytes (truncated?)")
        return buf.view(dtype).reshape(shape)

    def metadata(self, file: Path) -> dict[str, str]:
        return dict(self._handle(file).metadata() or {})

    def close(self) -> None:
        self._handles.clear()


def _index_files(index_file: Path) -> tuple[list[Path], dict[str, Path]]:
    data = read_json(index_file, "sharded index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"sharded index {index_file} has no 'weight_map' object")
    root = index_file.parent
    files: dict[str, Path] = {}
    mapping: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(name, str) or not isinstance(shard, str) or not shard:
            raise BadInputError(f"sharded index {index_file}: entry {name!r} is not a tensor name -> file name")
        if shard not in files:
            what = f"shard {shard[:80]!r} of the sharded index {index_file}"
            if PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts:
                raise BadInputError(f"sharded index {index_file} points outside its directory: {shard[:80]!r}")
            try:
                files[shard] = regular_file(root / shard, root, what)
            except BadInputError as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    raise BadInputError(f"sharded index {index_file} names a missing shard: {shard[:200]}") from e
                raise
        mapping[name] = files[shard]
    if len(set(files.values())) < len(files):  # "a.safetensors" and "./a.safetensors", or a link to a shard
        raise BadInputError(f"sharded index {index_file} names the same shard file under two names; "
                            "name each shard once")
    return sorted(files.values()), mapping


def _resolve(path: Path) -> tuple[Path, list[Path], Path | None]:
    """-> (directory, files, index_file) for a file, an index or a directory."""
    try:
        return _resolve_path(path)
    except OSError as e:  # e.g. a name too long for the file system
        raise BadInputError(f"cannot open checkpoint {str(path)[:200]}: {e.strerror or e}") from e


def _resolve_path(path: Path) -> tuple[Path, list[Path], Path | None]:
    if not path.exists() and not path.is_symlink():
        raise BadInputError(f"checkpoint not found: {path}")
    root = None
    if path.is_dir():
        root = path
        candidates = [path / "model.safetensors", path / f"model{INDEX_SUFFIX}"]
        found = [c for c in candidates if c.exists() or c.is_symlink()]
        if not found:
            indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
            singles = sorted(path.glob("*.safetensors"))
            found = indexes if len(indexes) == 1 else (singles if len(singles) == 1 else [])
            if not found:
                if indexes or singles:
                    raise BadInputError(
                        f"{path} holds several safetensors files and no model.safetensors or "
                        f"model{INDEX_SUFFIX}; pass the file or index to use"
                    )
                pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
                if pickles:
                    raise BadInputError(f"{path} holds only {', '.join(pickles[:3])} (a pickle, which collabcompress "
                                        "never loads); convert it to safetensors first (transformers: "
                                        "model.save_pretrained(dir, safe_serialization=True))")
                raise BadInputError(f"no safetensors weights in {path} (expected model.safetensors or model{INDEX_SUFFIX})")
        path = found[0]
    elif path.name.endswith(PICKLE_SUFFIXES):
        raise BadInputError(f"{path} is a pickle, which collabcompress never loads; convert it to safetensors first "
                            "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    what = "sharded index" if path.name.endswith(INDEX_SUFFIX) else "checkpoint file"
    regular_file(path, root, what)
    if path.name.endswith(INDEX_SUFFIX):
        return path.parent, [], path
    return path.parent, [path], None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Resolve ``path`` to a :class:`Checkpoint` and read its headers (not its data).

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory
            holding ``model.safetensors`` or ``model.safetensors.index.json``.

    Raises:
        BadInputError: missing, unreadable, truncated, not safetensors, a shard missing,
            an index pointing outside its directory, or an unreadable ``config.json``.
    """
    path = Path(path)
    directory, files, index_file = _resolve(path)
    if index_file is not None:
        files, weight_map = _index_files(index_file)
    else:
        weight_map = {}
    ckpt = Checkpoint(path=path, directory=directory, files=files, index_file=index_file,
                      weight_map=weight_map, config=None)
    for file in files:
        header_len, header = _read_header(file)
        handle = ckpt._handle(file)
        for name in handle.keys():
            if index_file is not None and weight_map.get(name) != file:
                continue  # a tensor the index places in another shard (or nowhere)
            sl = handle.get_slice(name)
            ckpt._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
            if index_file is None:
                weight_map[name] = file
        ckpt._offsets[file] = _data_offsets(file, header_len, header)
    for name, file in weight_map.items():
        if name not in ckpt._meta:
            raise BadInputError(f"sharded index {index_file} names tensor {name!r}, which {file.name} does not hold")
    if not weight_map:
        raise BadInputError(f"{path} holds no tensors")
    config_path = directory / "config.json"
    if config_path.exists() or config_path.is_symlink():
        config = read_json(config_path, "config", directory)
        if not isinstance(config, dict):
            raise BadInputError(f"config {config_path} is not a JSON object")
        ckpt.config = config
    return ckpt
