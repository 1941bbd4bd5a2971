"""Everything collabcompress writes or deletes, under one rule.

* An output directory (``compress --out``, ``demo --out``) is built in a hidden, marked
  temporary directory beside it and renamed into place only when complete. It is created
  new, or replaced with ``--force`` only when it is itself a collabcompress output (its
  ``collab_manifest.json`` says ``collabcompress/1``; a demo directory holds ``demo.json``
  and a ``model/`` that is one). Never the working directory or a directory holding it,
  ``/``, an empty path, an input, a parent of an input or anything inside an input.
* A file target (``--json``, ``--plot``, ``calibrate --out``) is ``-`` (JSON only) or a new
  or existing regular file outside every input, checked before any work.
* JSON is written by :func:`write_json` only: a marked temporary file beside the target,
  then a rename.
* Only temporary entries that carry our marker (a random token in the name and the same
  token inside) and belong to a process that no longer exists are ever cleaned up.
* Copying a model directory's other files never follows a link out of it and never copies
  a special file; what is skipped is said in a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import ELEMENT_SIZE, st_name
from ..errors import BadInputError
from .hashing import sha256_file

if TYPE_CHECKING:
    import torch

    from .manifest import Manifest

__all__ = ["atomic_directory", "file_record", "write_manifest", "copy_other_files", "check_output_path",
           "check_output_dir", "check_output_file", "input_paths", "is_collab_output", "is_export", "Replaceable",
           "ANY_OUTPUT", "EXPORTS", "write_json",
           "write_safetensors", "TEMP_MARKER", "EXPORT_MANIFEST", "EXPORT_FORMAT"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")
_SKIP_NAMES = {"collab_manifest.json", "config.json", "export_manifest.json"}
EXPORT_MANIFEST = "export_manifest.json"  # `export` writes it (docs/export.md)
EXPORT_FORMAT = "collabcompress-export/1"
TEMP_MARKER = ".collabcompress-tmp"  # inside a temporary directory; holds the token of its name
_TEMP_NAME = re.compile(r"\.(?P<base>.+)\.tmp-(?P<pid>\d+)-(?P<token>[0-9a-f]{16})")
_MANIFEST_LIMIT = 64 << 20


def file_record(path: Path, root: Path) -> dict[str, object]:
    """``{"name", "sha256", "bytes"}`` of a file, named relative to ``root``; compared with links
    resolved when the two paths do not compare as given (a sharded checkpoint's shards are
    resolved paths, the directory a user names may be relative)."""
    try:
        name = path.relative_to(root)
    except ValueError:
        name = Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
    return {"name": name.as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------- where we may write

def _shown(path: str | Path) -> str:
    return str(path)[:300]


def input_paths(*checkpoints: str | Path | None, files: Iterable[str | Path | None] = ()) -> list[Path]:
    """The paths a command reads, for the checks below: a checkpoint directory as given; a
    checkpoint file and the directory it lives in (its config.json, an index with its
    shards); ``files`` (texts, calibration statistics) as themselves only."""
    out: list[Path] = []
    for p in checkpoints:
        if p is None or str(p) in ("", "-"):
            continue
        p = Path(p)
        out.append(p)
        if p.name.endswith(".index.json") or p.name.endswith(".safetensors"):
            out.append(p.parent)
    out.extend(Path(f) for f in files if f is not None and str(f) not in ("", "-"))
    return out


def _resolved(paths: Iterable[Path]) -> list[Path]:
    out = []
    for p in paths:
        with contextlib.suppress(OSError, RuntimeError):
            out.append(Path(os.path.realpath(p)))
    return out


def _read_format(path: Path) -> object:
    """The ``format`` field of a small regular JSON file, not following a final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MANIFEST_LIMIT:
            return None
        try:
            data = json.loads(f.read().decode("utf-8"))
        except (ValueError, RecursionError):
            return None
    return data.get("format") if isinstance(data, dict) else None


def is_collab_output(directory: Path) -> bool:
    """True when ``directory`` was written by ``compress`` (its manifest names our format), by
    ``export`` (its export manifest names the export format) or
    by ``demo`` (``demo.json`` beside a ``model/`` that was written by ``compress``)."""
    from .manifest import FORMAT, MANIFEST_NAME  # the manifest reader imports torch; the light commands do not

    if _read_format(directory / MANIFEST_NAME) == FORMAT or is_export(directory):
        return True
    demo = directory / "demo.json"
    return demo.is_file() and not demo.is_symlink() and _read_format(directory / "model" / MANIFEST_NAME) == FORMAT


def is_export(directory: Path) -> bool:
    """True when ``directory`` was written by ``export`` (its export manifest names the export format)."""
    return _read_format(directory / EXPORT_MANIFEST) == EXPORT_FORMAT


@dataclasses.dataclass(frozen=True)
class Replaceable:
    """Which existing directories an output may replace with ``--force``: ``test``, and what the
    refusal calls them."""
    test: Callable[[Path], bool]
    name: str


ANY_OUTPUT = Replaceable(is_collab_output,
                         "a collabcompress output (no collab_manifest.json of format collabcompress/1)")
EXPORTS = Replaceable(is_export, f"an earlier export (no {EXPORT_MANIFEST} of format {EXPORT_FORMAT})")


def check_output_dir(out: str | Path, inputs: Iterable[Path], *, force: bool, option: str = "--out",
                     replaces: Replaceable = ANY_OUTPUT) -> None:
    """Refuse an output directory this tool must not create or replace (see the module doc):
    with ``force``, an existing non-empty directory only when ``replaces`` admits it.

    Raises:
        BadInputError: with the reason and what to do.
    """
    try:
        _check_output_dir(out, list(inputs), force=force, option=option, replaces=replaces)
    except OSError as e:  # e.g. a name too long for the file system
        raise BadInputError(f"cannot create {_shown(out)}: {e.strerror or e}") from e


def _check_output_dir(out: str | Path, inputs: list[Path], *, force: bool, option: str, replaces: Replaceable) -> None:
    if str(out).strip() == "":
        raise BadInputError(f"{option} is empty (an unset shell variable?); give the output directory")
    out = Path(out)
    target = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(Path.cwd()))
    if target == Path(target.anchor):
        raise BadInputError(f"{option} {_shown(out)} is the root directory; choose a new directory")
    if target == cwd or target in cwd.parents:
        raise BadInputError(f"{option} {_shown(out)} is the working directory or holds it; choose a new directory")
    for src in _resolved(inputs):
        if target == src:
            raise BadInputError(f"{option} {_shown(out)} is the input {_shown(src)}; choose a new directory")
        if src in target.parents:
            raise BadInputError(f"{option} {_shown(out)} is inside the input {_shown(src)}; nothing is written "
                                "into the input")
        if target in src.parents:
            raise BadInputError(f"{option} {_shown(out)} holds the input {_shown(src)}; choose a new directory")
    if out.exists() or out.is_symlink():
        if not force:
            raise BadInputError(f"output {_shown(out)} already exists; pass --force to replace it")
        if not target.is_dir():
            raise BadInputError(f"output {_shown(out)} exists and is not a directory")
        if any(target.iterdir()) and not replaces.test(target):
            raise BadInputError(f"{_shown(out)} is not {replaces.name} and will not be replaced; "
                                "choose another directory")
    parent = target.parent
    if not parent.is_dir():
        raise BadInputError(f"cannot create {_shown(out)}: {_shown(parent)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot create {_shown(out)}: {_shown(parent)} is not writable")


def check_output_path(out: Path, source_files: list[Path], source_dir: Path | None, *, force: bool) -> None:
    """:func:`check_output_dir` for an output built from these source files (and directory)."""
    check_output_dir(out, [*source_files, *(p.parent for p in source_files), *([source_dir] if source_dir else [])],
                     force=force)


def check_output_file(path: str | Path, inputs: Iterable[Path], *, option: str, stdout: bool = False,
                      force: bool = True) -> None:
    """Refuse a file target that is not ``-`` (with ``stdout``) or a new or existing regular
    file outside every input, or that exists without ``force``; checked before any work.

    Raises:
        BadInputError: with the reason.
    """
    if stdout and str(path) == "-":
        return
    try:
        _check_output_file(str(path), list(inputs), option=option, force=force)
    except OSError as e:
        raise BadInputError(f"cannot write {option} {_shown(path)}: {e.strerror or e}") from e


def _check_output_file(path: str, inputs: list[Path], *, option: str, force: bool) -> None:
    if path.strip() == "":
        raise BadInputError(f"{option} is empty (an unset shell variable?); give a file name")
    target = Path(os.path.realpath(path))
    if os.path.lexists(path):
        if not force:
            raise BadInputError(f"{_shown(path)} already exists; pass --force to replace it")
        st = os.stat(target) if target.exists() else None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise BadInputError(f"{option} {_shown(path)} is not a regular file (a directory, device, FIFO or "
                                "broken link); give a file name")
    for src in _resolved(inputs):
        if target == src or src in target.parents:
            raise BadInputError(f"{option} {_shown(path)} would write into the input {_shown(src)}; "
                                "choose a file outside it")
    parent = target.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "JSON to" if option == "--json" else option
        raise BadInputError(f"cannot write {what} {_shown(path)}: {_shown(parent)} is not a writable directory")


# ---------------------------------------------------------------------------- writing

def _marked_temp(target: Path, kind: str) -> tuple[Path, str]:
    token = secrets.token_hex(8)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{token}", token


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON atomically (a temporary file beside ``path``, then a
    rename); ``-`` writes to stdout. A symlink to a regular file is written through.

    Raises:
        BadInputError: the file cannot be written (the message names it).
    """
    import sys

    text = json.dumps(data, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(os.path.realpath(path))
    tmp, _ = _marked_temp(target, "tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BadInputError(f"cannot write JSON to {_shown(path)}: {e.strerror or e}") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove the temporary directories of dead runs for ``out``: only those whose name has
    our pattern and whose marker file holds the token of that name."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        m = _TEMP_NAME.fullmatch(stale.name)
        if m is None or m["base"] != out.name or stale.is_symlink() or not stale.is_dir():
            continue
        try:
            token = (stale / TEMP_MARKER).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if token == m["token"] and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool, replaces: Replaceable = ANY_OUTPUT) -> Iterator[Path]:
    """Yield a marked temporary directory beside ``out``; rename it to ``out`` on success (an
    existing ``out`` only with ``force`` and when ``replaces`` admits it).

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out`` is left as it was. An ``OSError`` while the directory is filled or renamed (a
    full disk, a vanished parent) becomes a :class:`BadInputError` naming ``out``. The
    marker file is removed just before the rename.
    """
    out = Path(os.path.realpath(out))
    _clean_stale(out)
    tmp, token = _marked_temp(out, "tmp")
    try:
        tmp.mkdir(parents=False)
        (tmp / TEMP_MARKER).write_text(token + "\n", encoding="ascii")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInputError(f"cannot create a temporary directory beside {_shown(out)}: {e.strerror or e}") from e
    try:
        yield tmp
        (tmp / TEMP_MARKER).unlink()
        if out.exists() or out.is_symlink():
            if not force:
                raise BadInputError(f"output {_shown(out)} already exists; pass --force to replace it")
            if any(out.iterdir()) and not replaces.test(out):
                raise BadInputError(f"{_shown(out)} is not {replaces.name} and will not be replaced")
            trash, _ = _marked_temp(out, "old")
            os.replace(out, trash)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash, out)  # put the old output back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInputError(f"cannot write the output {_shown(out)}: {e.strerror or e}"
                            + (f" ({_shown(e.filename)})" if e.filename else "")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- copying other files

def _copy_regular(src: Path, dest: Path) -> None:
    """Copy a regular file opened without following a final symlink (checked after opening)."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        with dest.open("xb") as g:
            shutil.copyfileobj(f, g, 1 << 22)


def _copy_entry(entry: Path, dest_dir: Path, root: Path, skipped: list[str], copied: list[Path]) -> None:
    """Copy a regular file or a folder (recursively); a symlink is copied as its target's
    content only when the target is a regular file inside ``root``."""
    name = entry.relative_to(root).as_posix() if root in entry.parents else entry.name
    real = Path(os.path.realpath(entry))
    if entry.is_symlink() and root not in real.parents:
        skipped.append(f"{name} (a link out of the model directory)")
        return
    try:
        st = os.stat(real)
    except OSError:
        skipped.append(f"{name} (a broken link)")
        return
    if stat.S_ISDIR(st.st_mode):
        if entry.is_symlink():
            skipped.append(f"{name} (a link to a folder)")
            return
        (dest_dir / entry.name).mkdir()
        for child in sorted(entry.iterdir()):
            if not child.name.startswith(".") and not child.name.endswith(_WEIGHT_SUFFIXES):
                _copy_entry(child, dest_dir / entry.name, root, skipped, copied)
    elif stat.S_ISREG(st.st_mode):
        _copy_regular(real, dest_dir / entry.name)
        copied.append(dest_dir / entry.name)
    else:
        skipped.append(f"{name} (not a regular file: a FIFO, device or socket)")


def copy_other_files(source_dir: Path, target: Path, skip: set[Path]) -> list[Path]:
    """Copy every non-weight file (and folder) of a model directory, e.g. tokenizer and pooling.

    Skips weight files of any format, the index and config.json (rewritten), hidden entries
    and the paths in ``skip``. Never follows a symlink out of the model directory and never
    copies a FIFO, device or socket; a link to a file inside it is copied as that file's
    content. Each skipped entry is named in one warning. Returns the copied files.
    """
    copied: list[Path] = []
    skipped: list[str] = []
    root = Path(os.path.realpath(source_dir))
    skip = {p.resolve() for p in skip}
    for entry in sorted(source_dir.iterdir()):
        if entry.name.startswith(".") or entry.resolve() in skip or entry.name in _SKIP_NAMES:
            continue
        if entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
            continue
        try:
            _copy_entry(root / entry.name, target, root, skipped, copied)
        except OSError as e:
            raise BadInputError(f"cannot copy {_shown(entry)} to the output: {e.strerror or e}") from e
    if skipped:
        warnings.warn(f"not copied from {_shown(source_dir)}: " + "; ".join(skipped), stacklevel=2)
    return copied


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str]) -> int:
    """Write a safetensors file tensor by tensor, with a canonical (sorted) header.

    ``entries`` are ``(name, shape, dtype, load)``; each tensor is loaded, written and
    dropped in turn, so memory stays at one tensor. The header's keys are sorted, so the
    same tensors and metadata always give the same bytes (``safetensors.save_file`` orders
    the metadata of a hash map). Returns the number of data bytes.
    """
    entries = sorted(entries, key=lambda e: e[0])
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in entries:
        st_dtype = st_name(dtype)
        if st_dtype is None:
            raise BadInputError(f"cannot write tensor {name!r} of dtype {dtype}")
        size = math.prod(shape) * ELEMENT_SIZE[st_dtype]
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    import torch  # only here: the CLI imports this module to check its outputs before any work

    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    try:
        with path.open("wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype, load in entries:
                t = load()
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise RuntimeError(f"tensor {name!r} changed shape or dtype while writing")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no extra copy
    except OSError as e:
        raise BadInputError(f"cannot write {path}: {e}") from e
    return offset


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``directory/collab_manifest.json`` (atomically: a temporary file renamed into place)."""
    from .manifest import MANIFEST_NAME

    write_json(manifest.to_json(), Path(directory) / MANIFEST_NAME)
