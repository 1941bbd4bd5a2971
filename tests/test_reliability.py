"""Bad input to every command, table-driven: each case is a clean, documented failure.

Every case runs one command of the CLI (in-process) on a private workspace holding a tiny
BERT-style checkpoint (``src``), its compressed output (``comp``), a text file and a
regular file, after damaging what the case damages, and asserts:

* the documented exit code (3 bad input, 4 unsupported architecture);
* one or two plain lines on stderr, starting with ``error:`` and holding the case's words;
* no traceback and no exception other than the exit itself;
* nothing left behind and the input untouched: the sha256 of every file and the list of
  every directory of the workspace (hidden temporary directories included) are the same
  before and after.

The interruption tests at the end send SIGINT, SIGTERM or SIGKILL to a real ``compress``
process (tests/signal_child.py, forked from the test process, which imported torch already), in the
decomposition and in the writing phase, and check that it stops without waiting for its work
and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import signal_child

from collabcompress.commands.compress import CompressOptions, compress
from helpers import assert_clean_failure, split_stage_lines, write_stats

D, HEADS, LAYERS, FFN, VOCAB = 16, 4, 2, 32, 50
QUERY = "encoder.layer.0.attention.self.query.weight"
KEY = "encoder.layer.1.attention.self.key.weight"


# ---------------------------------------------------------------------------- tiny checkpoints

def bert_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2-layer BERT (D=16, 4 heads) with transformers' tensor names, seeded."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return 0.2 * torch.randn(*shape, generator=g)

    t = {"embeddings.word_embeddings.weight": rnd(VOCAB, D), "embeddings.position_embeddings.weight": rnd(32, D),
         "embeddings.LayerNorm.weight": 1 + rnd(D), "embeddings.LayerNorm.bias": rnd(D)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[f"{p}.{m}.weight"], t[f"{p}.{m}.bias"] = rnd(D, D), rnd(D)
        t[f"{p}.attention.output.LayerNorm.weight"], t[f"{p}.attention.output.LayerNorm.bias"] = 1 + rnd(D), rnd(D)
        t[f"{p}.intermediate.dense.weight"], t[f"{p}.intermediate.dense.bias"] = rnd(FFN, D), rnd(FFN)
        t[f"{p}.output.dense.weight"], t[f"{p}.output.dense.bias"] = rnd(D, FFN), rnd(D)
        t[f"{p}.output.LayerNorm.weight"], t[f"{p}.output.LayerNorm.bias"] = 1 + rnd(D), rnd(D)
    return t


BERT_CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": D, "num_attention_heads": HEADS,
               "num_hidden_layers": LAYERS, "intermediate_size": FFN, "vocab_size": VOCAB,
               "max_position_embeddings": 32}


def write_bert(directory: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted((tensors or bert_tensors()).items())), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(BERT_CONFIG, indent=2) + "\n")
    return directory


def write_llama(directory: Path) -> Path:
    """Llama naming with a Gemma config: a rotary model type outside the rotary families, refused with exit code 4."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    t = {f"layers.{i}.self_attn.{m}_proj.weight": torch.randn(D, D, generator=g)
         for i in range(LAYERS) for m in ("q", "k", "v", "o")}
    save_file(t, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "gemma", "hidden_size": D, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}))
    return directory


def shard(directory: Path) -> None:
    """Replace model.safetensors by two shards and a transformers-style index (query tensors first)."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (directory / "model.safetensors").unlink()
    first = {k: v for k, v in tensors.items() if ".query." in k}
    parts = [first, {k: v for k, v in tensors.items() if k not in first}]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def header_of(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Change the JSON header of a safetensors file, keeping its data."""
    n, raw = header_of(path)
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def replace_tensor(directory: Path, name: str, value: torch.Tensor) -> None:
    t = bert_tensors()
    t[name] = value
    write_bert(directory, t)


# ---------------------------------------------------------------------------- the workspace

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """src (tiny BERT), comp (its compress output, rank 4), llama (refused family)."""
    root = tmp_path_factory.mktemp("reliability")
    write_bert(root / "src")
    compress(root / "src", root / "comp", CompressOptions(rank=4, max_iter=2), workers=1)
    write_llama(root / "llama")
    return root


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A private copy of the base workspace that a case may damage."""
    w = tmp_path / "ws"
    for name in ("src", "comp", "llama"):
        shutil.copytree(base / name, w / name)
    manifest = w / "comp" / "collab_manifest.json"
    data = json.loads(manifest.read_text())
    data["source"]["path"] = str((w / "src").resolve())
    manifest.write_text(json.dumps(data, indent=2))
    (w / "texts.txt").write_text("The first text.\nA second, longer text about attention heads.\n")
    (w / "afile").write_text("a regular file, not a directory\n")
    return w


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included): sha256 for files, "dir" for directories,
    the target of a symbolic link, "special" for a FIFO or device (never opened: it would block)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p) or not stat.S_ISREG(os.lstat(p).st_mode):
                out[os.path.relpath(p, root)] = f"link {os.readlink(p)}" if os.path.islink(p) else "special"
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ---------------------------------------------------------------------------- damage

def _damage_weights(transform: Callable[[bytes, int], bytes]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / "src" / "model.safetensors"
        n, raw = header_of(path)
        path.write_bytes(transform(raw, n))
    return setup


def _set_config(**changes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / "src" / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
    return setup


def _sharded(edit: Callable[[dict, Path], None] | None = None) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        shard(ws / "src")
        if edit is not None:
            path = ws / "src" / "model.safetensors.index.json"
            index = json.loads(path.read_text())
            edit(index, ws)
            path.write_text(json.dumps(index))
    return setup


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit comp/collab_manifest.json; ``edit`` may return bytes to write instead."""
    def setup(ws: Path) -> None:
        path = ws / "comp" / "collab_manifest.json"
        data = json.loads(path.read_text())
        raw = edit(data)
        path.write_bytes(raw if isinstance(raw, bytes) else json.dumps(data).encode())
    return setup


def _stats_file(ws: Path, **meta_changes) -> Path:
    """A calibration statistics file for ws/src (valid unless ``meta_changes`` break it)."""
    return write_stats(ws / "src", ws / "stats.safetensors", 400, **meta_changes)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _mounted(options: str, fill: int = 0) -> Callable[[Path], None]:
    """Mount a tmpfs at ws/mnt (skip the case where that is not allowed), optionally filled."""
    def setup(ws: Path) -> None:
        if not _mount_tmpfs(ws / "mnt", options):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        if fill:
            with contextlib.suppress(OSError):
                (ws / "mnt" / "filler").write_bytes(b"\0" * fill)
    return setup


class _FullDiskFile:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, f, path: Path, room: int) -> None:
        self._f, self._path, self._room = f, path, room

    def write(self, data) -> int:
        size = len(data)
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._path))
        self._room -= size
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def _full_disk(root: Path, *, binary: bool, room: int = 64) -> Iterator[None]:
    """Path.open (and so write_text / write_bytes) for writing under ``root`` runs out of space."""
    real_open = pathlib.Path.open
    root = root.resolve()

    def fake_open(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax")
        if writing and ("b" in mode) == binary and root in Path(os.path.abspath(self)).parents:
            return _FullDiskFile(f, self, room)
        return f

    mp = pytest.MonkeyPatch()
    mp.setattr(pathlib.Path, "open", fake_open)
    try:
        yield
    finally:
        mp.undo()


# ---------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path], list]
    code: int
    needles: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    full_disk: str | None = None  # "weights" (binary writes) or "text" (text writes) fail with ENOSPC


def C(id, argv, code, needles, setup=None, **kw) -> Case:
    return Case(id, argv, code, (needles,) if isinstance(needles, str) else tuple(needles), setup, **kw)


def compress_(*extra):
    return lambda ws: ["compress", ws / "src", "--out", ws / "out", *extra]


RANK = ("--rank", "4", "--max-iter", "2")
LONG = "n" * 300  # longer than NAME_MAX (255)
CASES = [
    # -- missing, empty, truncated, corrupted, wrong magic, huge header, non-UTF-8 ------------
    C("analyze-missing", lambda ws: ["analyze", ws / "nope"], 3, "not found"),
    C("compress-missing", lambda ws: ["compress", ws / "nope", "--out", ws / "out", *RANK], 3, "not found"),
    C("analyze-no-weights", lambda ws: ["analyze", ws / "empty"], 3, "no safetensors",
      setup=lambda ws: (ws / "empty").mkdir()),
    C("analyze-empty-file", lambda ws: ["analyze", ws / "src"], 3, "not a safetensors file",
      setup=_damage_weights(lambda raw, n: b"")),
    C("compress-truncated-data", compress_(*RANK), 3, "truncated",
      setup=_damage_weights(lambda raw, n: raw[: len(raw) - 100])),
    C("analyze-truncated-header", lambda ws: ["analyze", ws / "src"], 3, "truncated",
      setup=_damage_weights(lambda raw, n: raw[: 8 + n // 2])),
    C("compress-corrupted-header", compress_(*RANK), 3, "safetensors",
      setup=_damage_weights(lambda raw, n: raw[:8] + b"{" + b"#" * (n - 1) + raw[8 + n:])),
    C("analyze-wrong-magic-zip", lambda ws: ["analyze", ws / "src"], 3, "not a safetensors file",
      setup=_damage_weights(lambda raw, n: b"PK\x03\x04" + raw[4:])),
    C("analyze-huge-header-2**60", lambda ws: ["analyze", ws / "src"], 3, "header claims",
      setup=_damage_weights(lambda raw, n: struct.pack("<Q", 2 ** 60) + raw[8:])),
    C("compress-huge-header-2**64-1", compress_(*RANK), 3, "header claims",
      setup=_damage_weights(lambda raw, n: b"\xff" * 8 + raw[8:])),
    C("analyze-non-utf8-header", lambda ws: ["analyze", ws / "src"], 3, "utf-8",
      setup=_damage_weights(lambda raw, n: raw.replace(b'"format"', b'"\xff\xfermat"', 1))),
    C("compress-offsets-beyond-file", compress_(*RANK), 3, "safetensors",
      setup=lambda ws: rewrite_header(ws / "src" / "model.safetensors",
                                      lambda h: h[QUERY]["data_offsets"].__setitem__(1, 10 ** 12))),
    C("analyze-non-utf8-config", lambda ws: ["analyze", ws / "src"], 3, "config",
      setup=lambda ws: (ws / "src" / "config.json").write_bytes(b"\xff\xfe{\x00}")),
    C("compress-config-not-json", compress_(*RANK), 3, "not valid JSON",
      setup=lambda ws: (ws / "src" / "config.json").write_text("{'heads': 4,")),
    C("analyze-config-heads-zero", lambda ws: ["analyze", ws / "src"], 3, "num_attention_heads",
      setup=_set_config(num_attention_heads=0)),
    C("compress-config-heads-string", compress_(*RANK), 3, "num_attention_heads",
      setup=_set_config(num_attention_heads="4")),
    C("analyze-config-model-type-list", lambda ws: ["analyze", ws / "src"], 3, "pass --heads",
      setup=_set_config(model_type=["bert"], num_attention_heads=None)),
    # -- shards and indexes ---------------------------------------------------------------------
    C("analyze-index-outside-directory", lambda ws: ["analyze", ws / "src"], 3, "outside its directory",
      setup=_sharded(lambda index, ws: index["weight_map"].update({QUERY: "../comp/model.safetensors"}))),
    C("compress-index-missing-shard", compress_(*RANK), 3, "missing shard",
      setup=_sharded(lambda index, ws: index["weight_map"].update({KEY: "model-00009-of-00009.safetensors"}))),
    C("analyze-index-nul-byte", lambda ws: ["analyze", ws / "src"], 3, "shard",
      setup=_sharded(lambda index, ws: index["weight_map"].update({KEY: "a\x00b.safetensors"}))),
    C("compress-index-not-json", compress_(*RANK), 3, "not valid JSON",
      setup=lambda ws: (shard(ws / "src"), (ws / "src" / "model.safetensors.index.json").write_text("{"))),
    C("analyze-index-tensor-not-in-shard", lambda ws: ["analyze", ws / "src"], 3, "does not hold",
      setup=_sharded(lambda index, ws: index["weight_map"].update({"ghost.weight": "model-00001-of-00002.safetensors"}))),
    # -- tensors: shapes, dtypes, NaN/Inf --------------------------------------------------------
    C("compress-key-wrong-shape", compress_(*RANK), 3, "has shape",
      setup=lambda ws: replace_tensor(ws / "src", KEY, torch.randn(D, D // 2))),
    C("analyze-query-3d", lambda ws: ["analyze", ws / "src"], 3, "2-D",
      setup=lambda ws: replace_tensor(ws / "src", QUERY, torch.randn(D, D, 1))),
    C("analyze-query-empty", lambda ws: ["analyze", ws / "src"], 3, "non-empty",
      setup=lambda ws: replace_tensor(ws / "src", QUERY, torch.randn(0, D))),
    C("analyze-query-int64", lambda ws: ["analyze", ws / "src"], 3, "dtype",
      setup=lambda ws: replace_tensor(ws / "src", QUERY, torch.ones(D, D, dtype=torch.int64))),
    C("compress-query-nan", compress_(*RANK), 3, "NaN or Inf",
      setup=lambda ws: replace_tensor(ws / "src", QUERY, torch.full((D, D), math.nan))),
    C("analyze-key-inf", lambda ws: ["analyze", ws / "src"], 3, "NaN or Inf",
      setup=lambda ws: replace_tensor(ws / "src", KEY, torch.full((D, D), -math.inf))),
    # -- unsupported architectures (exit 4) ------------------------------------------------------
    C("analyze-rotary-llama", lambda ws: ["analyze", ws / "llama"], 4, "rotary"),
    C("compress-rotary-llama", lambda ws: ["compress", ws / "llama", "--out", ws / "out", *RANK], 4, "rotary"),
    C("calibrate-rotary-llama", lambda ws: ["calibrate", ws / "llama", "--texts", ws / "texts.txt",
                                            "--out", ws / "stats.safetensors"], 4, "rotary"),
    C("demo-rotary-llama", lambda ws: ["demo", "--sample", ws / "llama", "--out", ws / "demo"], 4, "rotary"),
    # -- unwritable output locations, full disk -----------------------------------------------------
    C("compress-out-under-a-file", lambda ws: ["compress", ws / "src", "--out", ws / "afile" / "out", *RANK],
      3, "not a directory"),
    C("compress-out-in-proc", lambda ws: ["compress", ws / "src", "--out", "/proc/collabcompress-test-out", *RANK],
      3, "/proc"),
    C("compress-out-read-only-fs", lambda ws: ["compress", ws / "src", "--out", ws / "mnt" / "out", *RANK],
      3, "not writable", setup=_mounted("size=1m,ro")),
    C("compress-out-full-tmpfs", lambda ws: ["compress", ws / "src", "--out", ws / "mnt" / "out", *RANK],
      3, "no space left", setup=_mounted("size=64k", fill=56_000)),
    C("compress-enospc-weights", compress_(*RANK), 3, "no space left", full_disk="weights"),
    C("compress-enospc-manifest", compress_(*RANK), 3, "no space left", full_disk="text"),
    C("demo-enospc", lambda ws: ["demo", "--out", ws / "demo"], 3, "no space left", full_disk="text"),
    C("demo-out-under-a-file", lambda ws: ["demo", "--out", ws / "afile" / "demo"], 3, "not a directory"),
    C("demo-corrupted-sample", lambda ws: ["demo", "--sample", ws / "src", "--out", ws / "demo"], 3, "header claims",
      setup=_damage_weights(lambda raw, n: struct.pack("<Q", 2 ** 60) + raw[8:])),
    C("analyze-json-under-a-file", lambda ws: ["analyze", ws / "src", "--json", ws / "afile" / "a.json"], 3,
      "cannot write JSON"),
    C("compress-json-under-a-file", compress_(*RANK, "--json", "{afile}/m.json"), 3, "json"),
    C("analyze-json-enospc", lambda ws: ["analyze", ws / "src", "--json", ws / "a.json"], 3, "no space left",
      full_disk="text"),
    C("calibrate-out-under-a-file", lambda ws: ["calibrate", ws / "src", "--texts", ws / "texts.txt", "--out",
                                                ws / "afile" / "stats.safetensors", "--max-tokens", "8"], 3, ()),
    C("calibrate-out-overwrites-source", lambda ws: ["calibrate", ws / "src", "--texts", ws / "texts.txt",
                                                     "--out", ws / "src" / "model.safetensors", "--force",
                                                     "--max-tokens", "8"], 3, ()),
    # -- option values out of range ---------------------------------------------------------------
    C("compress-rank-0", compress_("--rank", "0"), 3, "--rank must be at least 1"),
    C("compress-rank-above-width", compress_("--rank", "999"), 3, "above H*d"),
    C("compress-energy-2", compress_("--energy", "2"), 3, "--energy must be in (0, 1]"),
    C("compress-energy-nan", compress_("--energy", "nan"), 3, "--energy must be in (0, 1]"),
    C("compress-max-iter-0", compress_("--rank", "4", "--max-iter", "0"), 3, "--max-iter must be at least 1"),
    C("compress-multiple-of-0", compress_("--energy", "0.9", "--multiple-of", "0"), 3, "--multiple-of"),
    C("compress-min-rank-0", compress_("--energy", "0.9", "--min-rank", "0"), 3, "--min-rank"),
    C("compress-max-rank-below-min", compress_("--energy", "0.9", "--min-rank", "8", "--max-rank", "4"), 3,
      "--max-rank"),
    C("compress-workers-0", compress_(*RANK, "--workers", "0"), 3, "--workers must be at least 1"),
    C("compress-tol-negative", compress_(*RANK, "--tol", "-1"), 3, "--tol"),
    C("compress-device-tpu", compress_(*RANK, "--device", "tpu"), 3, "--device"),
    C("compress-layers-out-of-range", compress_(*RANK, "--layers", "0,7"), 3, "--layers"),
    C("compress-heads-0", compress_(*RANK, "--heads", "0"), 3, "--heads"),
    C("compress-heads-not-dividing", compress_(*RANK, "--heads", "3"), 3, "does not divide"),
    C("compress-arch-unknown", compress_(*RANK, "--arch", "nope"), 3, "--arch"),
    C("compress-calibration-missing", compress_(*RANK, "--calibration", "{afile}x"), 3, "not found"),
    C("compress-calibration-not-stats", compress_(*RANK, "--calibration", "{src}/model.safetensors"), 3,
      "not a calibration statistics file"),
    C("compress-calibration-bad-token-count", compress_(*RANK, "--calibration", "{stats:tokens=abc}"), 3,
      ()),
    C("compress-tol-inf", compress_(*RANK, "--tol", "inf"), 3, "--tol"),
    C("compress-seed-2**64", compress_(*RANK, "--seed", str(2 ** 64)), 3, "--seed"),
    C("verify-seed-2**64", lambda ws: ["verify", ws / "comp", "--seed", str(2 ** 64)], 3, "--seed"),
    # -- names too long for the file system (ENAMETOOLONG) ----------------------------------------------
    C("analyze-name-too-long", lambda ws: ["analyze", ws / LONG], 3, "too long"),
    C("report-name-too-long", lambda ws: ["report", ws / LONG], 3, "too long"),
    C("compress-out-name-too-long", lambda ws: ["compress", ws / "src", "--out", ws / LONG, *RANK], 3, "too long"),
    C("compress-calibration-name-too-long", compress_(*RANK, "--calibration", f"{{afile}}{LONG}"), 3, ()),
    C("evaluate-original-name-too-long", lambda ws: ["evaluate", ws / LONG, ws / "comp"], 3, ()),
    C("demo-sample-name-too-long", lambda ws: ["demo", "--sample", ws / LONG, "--out", ws / "demo"], 3, ()),
    C("analyze-energy-2", lambda ws: ["analyze", ws / "src", "--energy", "2"], 3, "--energy"),
    C("analyze-heads-negative", lambda ws: ["analyze", ws / "src", "--heads", "-4"], 3, "--heads"),
    C("report-seq-len-0", lambda ws: ["report", ws / "comp", "--seq-len", "0"], 3, "--seq-len"),
    C("verify-max-kl-negative", lambda ws: ["verify", ws / "comp", "--max-kl", "-1"], 3, "--max-kl"),
    C("verify-max-kl-nan", lambda ws: ["verify", ws / "comp", "--max-kl", "nan"], 3, "--max-kl"),
    C("calibrate-max-tokens-0", lambda ws: ["calibrate", ws / "src", "--texts", ws / "texts.txt", "--out",
                                            ws / "stats.safetensors", "--max-tokens", "0"], 3, "--max-tokens"),
    C("calibrate-batch-size-0", lambda ws: ["calibrate", ws / "src", "--texts", ws / "texts.txt", "--out",
                                            ws / "stats.safetensors", "--batch-size", "0"], 3, "--batch-size"),
    C("calibrate-texts-non-utf8", lambda ws: ["calibrate", ws / "src", "--texts", ws / "src" / "model.safetensors",
                                              "--out", ws / "stats.safetensors"], 3, "not UTF-8"),
    C("calibrate-texts-missing", lambda ws: ["calibrate", ws / "src", "--texts", ws / "nope.txt",
                                             "--out", ws / "stats.safetensors"], 3, "nope.txt"),
    C("calibrate-corrupted-model", lambda ws: ["calibrate", ws / "src", "--texts", ws / "texts.txt",
                                               "--out", ws / "stats.safetensors"], 3, "truncated",
      setup=_damage_weights(lambda raw, n: raw[: len(raw) // 2])),
    C("evaluate-max-length-1", lambda ws: ["evaluate", ws / "src", ws / "comp", "--max-length", "1"], 3,
      "max_length"),
    C("evaluate-batch-size-0", lambda ws: ["evaluate", ws / "src", ws / "comp", "--batch-size", "0"], 3,
      "batch_size"),
    C("evaluate-original-missing", lambda ws: ["evaluate", ws / "nope", ws / "comp"], 3, "not found"),
    C("evaluate-texts-non-utf8", lambda ws: ["evaluate", ws / "src", ws / "comp", "--texts",
                                             ws / "src" / "model.safetensors"], 3, "UTF-8"),
    # -- corrupted manifests -------------------------------------------------------------------------
    C("verify-manifest-not-json", lambda ws: ["verify", ws / "comp"], 3, "not valid JSON",
      setup=_manifest(lambda m: b'{"format": "collabcompress/1",')),
    C("report-manifest-empty", lambda ws: ["report", ws / "comp"], 3, "not valid JSON",
      setup=_manifest(lambda m: b"")),
    C("report-manifest-non-utf8", lambda ws: ["report", ws / "comp"], 3, "manifest",
      setup=_manifest(lambda m: b"\xff\xfe{\x00}\x00")),
    C("verify-manifest-array", lambda ws: ["verify", ws / "comp"], 3, "not a JSON object",
      setup=_manifest(lambda m: b"[1, 2, 3]")),
    C("report-manifest-deeply-nested", lambda ws: ["report", ws / "comp"], 3, "manifest",
      setup=_manifest(lambda m: b"[" * 100_000 + b"]" * 100_000)),
    C("verify-manifest-other-format", lambda ws: ["verify", ws / "comp"], 3, "format",
      setup=_manifest(lambda m: m.update(format="collabcompress/99"))),
    C("report-manifest-no-layers-key", lambda ws: ["report", ws / "comp"], 3, "'layers'",
      setup=_manifest(lambda m: m.pop("layers"))),
    C("verify-manifest-heads-string", lambda ws: ["verify", ws / "comp"], 3, "heads has the wrong type",
      setup=_manifest(lambda m: m["layers"][0].update(heads="4"))),
    C("report-manifest-removed-not-names", lambda ws: ["report", ws / "comp"], 3, "removed",
      setup=_manifest(lambda m: m["layers"][0].update(removed=[1, None]))),
    C("report-manifest-source-file-escapes", lambda ws: ["report", ws / "comp"], 3, "source.files",
      setup=_manifest(lambda m: m["source"]["files"].append({"name": "../../x.safetensors", "sha256": "0",
                                                             "bytes": 1}))),
    C("verify-manifest-heads-disagree", lambda ws: ["verify", ws / "comp"], 3, "heads",
      setup=_manifest(lambda m: m["layers"][0].update(heads=2, head_dim=8))),
    C("verify-manifest-missing-tensor", lambda ws: ["verify", ws / "comp"], 3, "missing tensor",
      setup=_manifest(lambda m: m["layers"][1]["tensors"].update(query="nope.weight"))),
    C("report-manifest-shared-dim-mismatch", lambda ws: ["report", ws / "comp"], 3, "do not match",
      setup=_manifest(lambda m: m["layers"][0].update(shared_dim=5))),
    C("report-manifest-totals-float", lambda ws: ["report", ws / "comp"], 3, "totals",
      setup=_manifest(lambda m: m["totals"].update(params_before=1.5))),
    C("verify-manifest-settings-heads-0", lambda ws: ["verify", ws / "comp"], 3, "settings.heads",
      setup=_manifest(lambda m: m["settings"].update(heads=0))),
    C("evaluate-manifest-not-json", lambda ws: ["evaluate", ws / "src", ws / "comp"], 3, "not valid JSON",
      setup=_manifest(lambda m: b"nope")),
    C("verify-not-compressed", lambda ws: ["verify", ws / "src"], 3, "not a model compressed by collabcompress"),
    C("report-a-file", lambda ws: ["report", ws / "afile"], 3, "not a directory"),
    C("verify-original-corrupted", lambda ws: ["verify", ws / "comp", "--original", ws / "afile"], 3,
      "not a safetensors file"),
    C("verify-calibration-not-stats", lambda ws: ["verify", ws / "comp", "--calibration", ws / "texts.txt"], 3,
      "calibration statistics"),
    # -- issue 11: writing and deleting
    C("compress-out-empty", lambda ws: ["compress", ws / "src", "--out", "",
                                          *RANK, "--force"], 3, "empty"),
    C("compress-out-is-root", lambda ws: ["compress", ws / "src", "--out", "/", *RANK, "--force"], 3, "root"),
    C("compress-out-holds-the-input", lambda ws: ["compress", ws / "src", "--out", ws, *RANK, "--force"], 3,
      "holds the input"),
    C("compress-force-not-ours", lambda ws: ["compress", ws / "src", "--out", ws / "llama", *RANK, "--force"], 3,
      "not a collabcompress output"),
    C("compress-file-input-out-inside", lambda ws: ["compress", ws / "src" / "model.safetensors", "--out",
                                                    ws / "src" / "out", *RANK], 3, "inside the input"),
    C("demo-force-not-ours", lambda ws: ["demo", "--out", ws / "src", "--force"], 3, ()),
    C("analyze-json-onto-input", lambda ws: ["analyze", ws / "src", "--json", ws / "src" / "model.safetensors"], 3,
      "input"),
    C("verify-json-onto-manifest", lambda ws: ["verify", ws / "comp", "--json", ws / "comp" / "collab_manifest.json"],
      3, "input"),
    C("report-json-dev-null", lambda ws: ["report", ws / "comp", "--json", "/dev/null"], 3, "not a regular file"),
    C("report-json-a-directory", lambda ws: ["report", ws / "comp", "--json", ws / "src"], 3, "not a regular file"),
    C("report-plot-unknown-type", lambda ws: ["report", ws / "comp", "--plot", ws / "f.xyz"], 3, ".png"),
    C("analyze-plot-onto-input", lambda ws: ["analyze", ws / "src", "--plot", ws / "src" / "x.png"], 3, "input"),
    C("calibrate-out-onto-texts", lambda ws: ["calibrate", ws / "src", "--texts", ws / "texts.txt", "--out",
                                              ws / "texts.txt", "--force"], 3, "input"),
    C("compress-rank-29-digits", compress_("--rank", "9" * 29), 3, "--rank"),
    C("compress-max-iter-5000-digits", compress_("--rank", "4", "--max-iter", "9" * 5000), 3, "--max-iter"),
    C("report-seq-len-29-digits", lambda ws: ["report", ws / "comp", "--seq-len", "9" * 29], 3, "--seq-len"),
    # -- issue 11: reading and manifests -------------------------------------------------------------
    C("analyze-index-shard-dotdot", lambda ws: ["analyze", ws / "src"], 3, "outside",
      setup=_sharded(lambda index, ws: index["weight_map"].update(
          {k: "../comp/model.safetensors" for k in list(index["weight_map"])[:1]}))),
    C("analyze-index-shard-absolute", lambda ws: ["analyze", ws / "src"], 3, "outside",
      setup=_sharded(lambda index, ws: index["weight_map"].update(
          {k: str(ws / "comp" / "model.safetensors") for k in list(index["weight_map"])[:1]}))),
    C("analyze-index-shard-symlink-out", lambda ws: ["analyze", ws / "src"], 3, "outside",
      setup=_sharded(lambda index, ws: (ws / "src" / "out.safetensors").symlink_to(ws / "comp" / "model.safetensors")
                     or index["weight_map"].update({k: "out.safetensors" for k in list(index["weight_map"])[:1]}))),
    C("analyze-index-shard-fifo", lambda ws: ["analyze", ws / "src"], 3, "not a regular file",
      setup=_sharded(lambda index, ws: os.mkfifo(ws / "src" / "fifo.safetensors")
                     or index["weight_map"].update({k: "fifo.safetensors" for k in list(index["weight_map"])[:1]}))),
    C("compress-index-same-shard-twice", compress_(*RANK), 3, "same shard",
      setup=_sharded(lambda index, ws: index["weight_map"].update(
          {k: "./" + v for k, v in list(index["weight_map"].items())[:1]}))),
    C("analyze-config-fifo", lambda ws: ["analyze", ws / "src"], 3, "not a regular file",
      setup=lambda ws: (ws / "src" / "config.json").unlink() or os.mkfifo(ws / "src" / "config.json")),
    C("analyze-only-pickle", lambda ws: ["analyze", ws / "src"], 3, ("pytorch_model.bin", "never loads"),
      setup=lambda ws: (ws / "src" / "model.safetensors").rename(ws / "src" / "pytorch_model.bin")),
    C("compress-a-pickle-file", lambda ws: ["compress", ws / "src" / "model.pt", "--out", ws / "out", *RANK], 3,
      "never loads", setup=lambda ws: (ws / "src" / "model.pt").write_bytes(b"\x80\x04not loaded")),
    C("analyze-llama-without-config", lambda ws: ["analyze", ws / "llama", "--heads", "4", "--arch", "bart"], 4,
      "rotary",
      setup=lambda ws: (ws / "llama" / "config.json").unlink()),
    C("verify-output-changed", lambda ws: ["verify", ws / "comp"], 3, ("model.safetensors", "sha256"),
      setup=lambda ws: _flip_last_byte(ws / "comp" / "model.safetensors")),
    C("report-output-changed", lambda ws: ["report", ws / "comp"], 3, ("model.safetensors", "sha256"),
      setup=lambda ws: _flip_last_byte(ws / "comp" / "model.safetensors")),
    C("report-output-config-symlink-out", lambda ws: ["report", ws / "comp"], 3, "outside",
      setup=lambda ws: (ws / "comp" / "config.json").unlink()
      or (ws / "comp" / "config.json").symlink_to(ws / "src" / "config.json")),
    C("verify-output-not-recorded", lambda ws: ["verify", ws / "comp"], 3, "not among the outputs",
      setup=_manifest(lambda m: m.update(outputs=[o for o in m["outputs"] if o["name"] != "model.safetensors"]))),
    C("report-manifest-output-name-escapes", lambda ws: ["report", ws / "comp"], 3, "outputs",
      setup=_manifest(lambda m: m["outputs"].append({"name": "../src/config.json", "sha256": "0" * 64,
                                                     "bytes": 1}))),
    C("verify-source-files-empty", lambda ws: ["verify", ws / "comp", "--max-kl", "1"], 3, "no weight file",
      setup=_manifest(lambda m: m["source"].update(files=[]))),
    C("verify-original-another-model", lambda ws: ["verify", ws / "comp", "--original", ws / "src"], 3,
      ("model.safetensors", "differs"), setup=lambda ws: _flip_last_byte(ws / "src" / "model.safetensors")),
    C("verify-layer-listed-twice", lambda ws: ["verify", ws / "comp"], 3, "listed twice",
      setup=_manifest(lambda m: m["layers"].append(m["layers"][0]))),
    C("report-layer-index-twice", lambda ws: ["report", ws / "comp"], 3, "listed twice",
      setup=_manifest(lambda m: m["layers"][1].update(index=m["layers"][0]["index"]))),
]


def _flip_last_byte(path: Path) -> None:
    """Change one byte of tensor data: the header stays valid, the sha256 does not."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def _argv(case: Case, ws: Path) -> list[str]:
    out = []
    for a in case.argv(ws):
        a = str(a)
        if a.startswith("{stats:"):
            key, value = a[len("{stats:"):-1].split("=")
            a = str(_stats_file(ws, **{key: value}))
        out.append(a.replace("{afile}", str(ws / "afile")).replace("{src}", str(ws / "src")))
    return out


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrongly writes to the current directory is seen too
    try:
        if case.setup is not None:
            case.setup(ws)
        argv = _argv(case, ws)
        before = snapshot(tmp_path)
        with _full_disk(ws, binary=case.full_disk == "weights") if case.full_disk else contextlib.nullcontext():
            result = cli(*argv)
        assert_clean_failure(result, case.code, *case.needles)
        assert snapshot(tmp_path) == before, "the command left something behind or changed its input"
    finally:
        if (ws / "mnt").is_mount():
            subprocess.run(["umount", str(ws / "mnt")], check=False)


def test_case_table_is_large_and_covers_every_command():
    commands = {c.argv(Path("/w"))[0] for c in CASES}
    assert commands >= {"analyze", "compress", "verify", "report", "calibrate", "evaluate", "demo"}
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------- interruption

# The CLI runs in a forked child of the test process (tests/signal_child.py): a real process
# with its own signal dispositions, without paying the import of torch again. Each test joins
# its child, so the child's CPU time counts in the suite's (``/usr/bin/time``).
GUARD_S = 60  # only a guard against a hang: a run that waits for its layer never exits


def _start(ws: Path, phase: str, *extra: str) -> tuple[multiprocessing.process.BaseProcess, Path]:
    """``compress`` of the workspace's source with ``phase`` made slow, once that phase started."""
    marker = ws / "started"
    argv = ["compress", str(ws / "src"), "--out", str(ws / "out"), "--rank", "4", "--max-iter", "2", *extra]
    return signal_child.start(argv, marker, phase, _stderr_file(ws)), marker


def _stderr_file(ws: Path) -> Path:
    return ws.parent / "child-stderr.txt"  # outside the workspace, whose listing the tests check


def _interrupt(ws: Path, proc: multiprocessing.process.BaseProcess, sig: int = signal.SIGINT) -> tuple[int, str]:
    """Send ``sig``; -> (exit code, stderr). A process still running after the guard is killed
    and fails the test."""
    os.kill(proc.pid, sig)
    proc.join(GUARD_S)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"still running {GUARD_S} s after the signal: it waited for work it should abandon")
    return proc.exitcode, _stderr_file(ws).read_text(errors="replace")


def _temp_dirs(ws: Path) -> list[Path]:
    return sorted(ws.glob(".out.tmp-*")) + sorted(ws.glob(".out.old-*"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigint_abandons_a_layer_in_decomposition(ws, workers):
    """The layer being decomposed never finishes: the run must stop without waiting for it."""
    proc, _ = _start(ws, "decompose", "--workers", workers)
    code, stderr = _interrupt(ws, proc)
    assert code == 130, stderr
    assert split_stage_lines(stderr)[1] == ["interrupted"] and "Traceback" not in stderr
    assert not (ws / "out").exists() and not _temp_dirs(ws)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_while_writing_removes_the_temporary_directory(ws, sig, code, word):
    proc, _ = _start(ws, "write")
    assert len(list(ws.glob(".out.tmp-*"))) == 1, "the signal should land while the output is being written"
    got, stderr = _interrupt(ws, proc, sig)
    assert got == code, stderr
    stages, rest = split_stage_lines(stderr)  # the fitting is done: its stage line comes first
    assert stages == ["compress: fitting 2 layers"] and rest == [word] and "Traceback" not in stderr
    assert not (ws / "out").exists() and not _temp_dirs(ws)
    assert sorted(p.name for p in ws.iterdir()) == ["afile", "comp", "llama", "src", "started", "texts.txt"]


def test_sigkill_while_writing_leaves_no_output_and_the_next_run_cleans_up(ws):
    before = snapshot(ws / "src")
    proc, _ = _start(ws, "write")
    proc.kill()
    proc.join()
    stale = list(ws.glob(".out.tmp-*"))
    assert len(stale) == 1 and not (ws / "out").exists()
    compress(ws / "src", ws / "out", CompressOptions(rank=4, max_iter=2), workers=1)
    assert (ws / "out" / "collab_manifest.json").is_file()
    assert not _temp_dirs(ws), "the stale temporary directory of the killed run is still there"
    assert snapshot(ws / "src") == before
