"""Write output directories atomically, hash files, copy a model directory's other files.

An output directory is built in a hidden temporary directory beside it and renamed into
place only when complete; an interrupted run leaves no output, and the next run removes
the stale temporary directory of a process that no longer exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import BadInputError

__all__ = ["atomic_directory", "sha256_file", "file_record", "copy_other_files", "check_output_path",
           "write_safetensors"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")
_SKIP_NAMES = {"collab_manifest.json", "config.json"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, root: Path) -> dict[str, object]:
    """``{"name", "sha256", "bytes"}`` of a file, named relative to ``root``."""
    return {"name": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def check_output_path(out: Path, source_files: list[Path], source_dir: Path | None, *, force: bool) -> None:
    """Refuse an output that would overwrite or contain the input, or exists without ``force``."""
    try:
        _check_output_path(out, source_files, source_dir, force=force)
    except OSError as e:  # e.g. a name too long for the file system
        raise BadInputError(f"cannot create {str(out)[:200]}: {e.strerror or e}") from e


def _check_output_path(out: Path, source_files: list[Path], source_dir: Path | None, *, force: bool) -> None:
    target = out.resolve()
    sources = [f.resolve() for f in source_files]
    if source_dir is not None and target == source_dir.resolve():
        raise BadInputError(f"--out {out} is the source directory; choose a new directory")
    for f in sources:
        if target == f or target in f.parents:
            raise BadInputError(f"--out {out} would overwrite the source file {f}; choose a new directory")
    if source_dir is not None and source_dir.resolve() in target.parents:
        raise BadInputError(f"--out {out} is inside the source directory {source_dir}; nothing is written into the input")
    if out.exists() and not force:
        raise BadInputError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output {out} exists and is not a directory")
    parent = target.parent
    if not parent.is_dir():
        raise BadInputError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot create {out}: {parent} is not writable")


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` on success.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out`` is left as it was. An ``OSError`` while the directory is filled or renamed (a
    full disk, a vanished parent) becomes a :class:`BadInputError` naming ``out``.
    """
    out = out.resolve()
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=False)
    except OSError as e:
        raise BadInputError(f"cannot create a temporary directory beside {out}: {e}") from e
    try:
        yield tmp
        if out.exists():
            if not force:
                raise BadInputError(f"output {out} already exists; pass --force to replace it")
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
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
        raise BadInputError(f"cannot write the output {out}: {e.strerror or e}"
                            + (f" ({e.filename})" if e.filename else "")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_other_files(source_dir: Path, target: Path, skip: set[Path]) -> list[Path]:
    """Copy every non-weight file (and folder) of a model directory, e.g. tokenizer and pooling.

    Skips weight files of any format, the index and config.json (rewritten), hidden entries
    and the paths in ``skip``. Returns the copied files.
    """
    copied: list[Path] = []
    skip = {p.resolve() for p in skip}
    for entry in sorted(source_dir.iterdir()):
        if entry.name.startswith(".") or entry.resolve() in skip or entry.name in _SKIP_NAMES:
            continue
        if entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
            continue
        dest = target / entry.name
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, dest, symlinks=False,
                                ignore=shutil.ignore_patterns(".*", *(f"*{s}" for s in _WEIGHT_SUFFIXES)))
                copied.extend(p for p in sorted(dest.rglob("*")) if p.is_file())
            elif entry.is_file():
                shutil.copyfile(entry, dest)
                copied.append(dest)
        except OSError as e:
            raise BadInputError(f"cannot copy {entry} to the output: {e}") from e
    return copied


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _ST_NAMES[getattr(torch, _name)] = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}[_name]


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
        if dtype not in _ST_NAMES:
            raise BadInputError(f"cannot write tensor {name!r} of dtype {dtype}")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
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
