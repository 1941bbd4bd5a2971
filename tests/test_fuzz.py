"""Fuzzing every reader of untrusted bytes with hypothesis.

Readers: safetensors files (``io.open_checkpoint`` and the tensor reads behind it),
sharded indexes, ``config.json`` (head counts, refusal keys) through ``arch.detect``,
``collab_manifest.json`` (``manifest.load_manifest``, then ``report`` and ``verify``),
and calibration statistics (``calibration.load_whitening`` / ``load_moments``).

Property: the only exceptions are :class:`collabcompress.errors.CollabError` subclasses
(exit codes 3/4 at the CLI), never another exception (exit 1), and nothing hangs (each
example runs under an alarm); where an example is known to be valid (an index or manifest
left as written, harmless manifest fields) it must be accepted, and an input that an independent check finds plainly valid is
accepted (so a reader that refused every file would fail). Path fields (shard names,
``outputs[].name``, ``source.files[].name``) are drawn from hostile names: ``..``, absolute
paths, NUL, very long names, a link out of the directory, a FIFO. Bounded: fixed example counts, no deadline, no example
database, the whole file in well under 90 s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from collabcompress.files.arch import detect, load_query_key
from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.errors import CollabError
from collabcompress.files.checkpoint import open_checkpoint
from collabcompress.files.manifest import MANIFEST_NAME, load_manifest
from collabcompress.commands.analyze import analyze
from collabcompress.commands.report import build_report
from collabcompress.tables import report_tables
from collabcompress.commands.verify import verify
from helpers import write_stats

D, HEADS = 8, 2
Q0, K0 = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"

# Examples per property: 50 in the suite (a few seconds in all); set COLLABCOMPRESS_FUZZ_EXAMPLES=1000
# for a deeper hunt. Derandomized, so every run of the suite tries the same inputs.
EXAMPLES = int(os.environ.get("COLLABCOMPRESS_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])


@contextlib.contextmanager
def no_hang(seconds: float = 20.0) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM after ``seconds``."""
    def alarm(signum, frame):
        raise TimeoutError(f"no answer after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def only_collab_errors(fn, *args, valid: bool, **kwargs):
    """Run ``fn``; a CollabError is a fine answer for an input that is not ``valid``; for a
    ``valid`` one it fails the property, and so does any other exception."""
    with no_hang(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if valid:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except CollabError as e:
            if valid:
                pytest.fail(f"a valid input was refused: {e}")
            return None


_ATTENTION = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")


def plainly_valid(path: Path, heads: int) -> bool:
    """An independent judge of a BERT-named safetensors file for ``_exercise``: safetensors
    itself reads it, every float tensor is finite, every attention tensor is a float
    query/key/value weight (w, w) or bias (w,) of one width w that ``heads`` divides, and each
    layer has both a query and a key weight. Files it does not pass may be valid too."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception:  # safetensors itself refuses it
        return False
    layers: dict[str, set[str]] = {}
    widths = set()
    for name, t in tensors.items():
        if not name or (t.is_floating_point() and not bool(torch.isfinite(t).all())):
            return False
        if ".attention." not in name:
            continue
        match = _ATTENTION.fullmatch(name)
        if match is None or not t.is_floating_point() or t.dtype not in (torch.float32, torch.float64,
                                                                            torch.float16, torch.bfloat16):
            return False
        layer, side, kind = match.groups()
        if kind == "weight" and (t.ndim != 2 or t.shape[0] != t.shape[1]) or kind == "bias" and t.ndim != 1:
            return False
        widths.add(t.shape[0])
        layers.setdefault(layer, set()).add(f"{side}.{kind}")
    return (len(widths) == 1 and min(widths) > 0 and min(widths) % heads == 0 and bool(layers)
            and all({"query.weight", "key.weight"} <= names
                    and all(n.replace(".bias", ".weight") in names for n in names) for names in layers.values()))


# ---------------------------------------------------------------------------- fixtures

def _bert_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(2):
        p = f"encoder.layer.{i}.attention.self"
        for m in ("query", "key", "value"):
            t[f"{p}.{m}.weight"] = torch.randn(D, D, generator=g)
            t[f"{p}.{m}.bias"] = torch.randn(D, generator=g)
        t[f"encoder.layer.{i}.output.LayerNorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    t["embeddings.LayerNorm.weight"] = torch.ones(D)
    t["embeddings.position_ids"] = torch.arange(4, dtype=torch.int64)
    t["pooler.dense.weight"] = torch.randn(D, D, generator=g).to(torch.bfloat16)
    return t


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("fuzz")
    src = r / "src"
    src.mkdir()
    save_file(_bert_tensors(), str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "num_attention_heads": HEADS}))
    compress(src, r / "comp", CompressOptions(rank=3, max_iter=2), workers=1)
    return r


def _exercise(path: Path, heads: int | None = None) -> None:
    """Everything a command does with a checkpoint's bytes: headers, every tensor, detection, maths."""
    ckpt = open_checkpoint(path)
    for name in ckpt.names():
        ckpt.shape(name), ckpt.dtype(name), ckpt.numel(name)
        ckpt.load(name, finite=True)
    for spec in detect(ckpt, heads=heads):
        load_query_key(ckpt, spec)
    analyze(path, heads=heads, workers=1)
    ckpt.close()


def _write(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- safetensors bytes

def _base_bytes(root: Path) -> tuple[bytes, int]:
    raw = (root / "src" / "model.safetensors").read_bytes()
    return raw, struct.unpack("<Q", raw[:8])[0]


@FUZZ
@given(data=st.data())
def test_flipped_bytes_of_a_valid_file(root, data):
    raw, n = _base_bytes(root)
    buf = bytearray(raw)
    flips = data.draw(st.lists(st.tuples(st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(raw) - 1)),
                                         st.integers(0, 255)), min_size=0, max_size=8))
    for pos, value in flips:
        buf[pos] = value
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    blob = bytes(buf[:cut] if cut is not None else buf)
    path = _write(root / "flip", "model.safetensors", blob)
    (root / "flip" / "config.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    only_collab_errors(_exercise, path.parent, valid=plainly_valid(path, HEADS))


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U64",
           "C64", "F4", "nope", ""]
_NAMES = [Q0, K0, "encoder.layer.0.attention.self.query.bias", "__metadata__", "x", ""]
_json_atoms = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                        st.text(max_size=12), st.sampled_from(_DTYPES))
_json = st.recursive(_json_atoms, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_shape = st.lists(st.integers(-1, 12), max_size=3)
_offsets = st.one_of(st.tuples(st.integers(0, 600), st.integers(0, 600)).map(list),
                     st.lists(st.integers(-2 ** 65, 2 ** 65), max_size=3), _json)
_entry = st.one_of(st.fixed_dictionaries({"dtype": st.sampled_from(_DTYPES), "shape": _shape,
                                          "data_offsets": _offsets}), _json)


_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1}


@st.composite
def _consistent_header(draw) -> tuple[dict, int]:
    """A header whose offsets tile the data (so safetensors accepts it), with odd names, dtypes and shapes."""
    header, offset = {}, 0
    names = draw(st.lists(st.sampled_from([Q0, K0, "encoder.layer.0.attention.self.query.bias",
                                           "encoder.layer.0.attention.self.key.bias", "encoder.layer.1.attention."
                                           "self.query.weight", "embeddings.LayerNorm.weight"]),
                          min_size=1, max_size=6, unique=True))
    for name in names:
        dtype = draw(st.sampled_from(list(_SIZES)))
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 6, 8]), min_size=0, max_size=3))
        size = math.prod(shape) * _SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    return header, offset


@FUZZ
@given(built=_consistent_header(), fill=st.sampled_from([0.0, 1.0, math.nan, math.inf, 1e38]))
@example(built=({Q0: {"dtype": "F32", "shape": [D, D], "data_offsets": [0, 256]},
                 K0: {"dtype": "F32", "shape": [D, D], "data_offsets": [256, 512]}}, 512), fill=0.0)
def test_consistent_headers_with_odd_tensors(root, built, fill):
    header, size = built
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    data = torch.randn(size // 4 + 1, generator=torch.Generator().manual_seed(size)).numpy().tobytes()[:size]
    if fill != 1.0 and size >= 8:
        data = struct.pack("<d", fill) + data[8:]
    path = _write(root / "odd", "model.safetensors", struct.pack("<Q", len(blob)) + blob + data)
    only_collab_errors(_exercise, path, heads=HEADS, valid=plainly_valid(path, HEADS))
    only_collab_errors(_exercise, path, heads=None, valid=False)  # no config.json: no head count


@FUZZ
@given(header=st.dictionaries(st.sampled_from(_NAMES), _entry, max_size=5), data_len=st.integers(0, 700),
       pad=st.integers(0, 9), length_delta=st.sampled_from([0, 0, 0, 1, -1, 8, 2 ** 63]))
@example(header={Q0: {"dtype": "F32", "shape": [D, D], "data_offsets": [0, 256]},
                 K0: {"dtype": "F32", "shape": [D, D], "data_offsets": [256, 512]}}, data_len=512, pad=0,
         length_delta=0)
@example(header={Q0: {"dtype": "F32", "shape": [0, D], "data_offsets": [0, 0]},
                 K0: {"dtype": "F32", "shape": [0, D], "data_offsets": [0, 0]}}, data_len=0, pad=0, length_delta=0)
def test_random_headers(root, header, data_len, pad, length_delta):
    try:
        blob = json.dumps(header).encode()
    except ValueError:
        assume(False)
    blob += b" " * pad
    length = (len(blob) + length_delta) % 2 ** 64
    data = torch.randn(data_len // 4 + 1, generator=torch.Generator().manual_seed(data_len)).numpy().tobytes()
    path = _write(root / "hdr", "model.safetensors", struct.pack("<Q", length) + blob + data[:data_len])
    only_collab_errors(_exercise, path, heads=HEADS, valid=plainly_valid(path, HEADS))


_SMALL_FILE = save({Q0: torch.randn(4, 4, generator=torch.Generator().manual_seed(0)),
                    K0: torch.randn(4, 4, generator=torch.Generator().manual_seed(1))})  # a valid file


@FUZZ
@given(blob=st.binary(max_size=300), length=st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(0, 400)))
@example(blob=_SMALL_FILE[8:], length=struct.unpack("<Q", _SMALL_FILE[:8])[0])
def test_random_lengths_and_bytes(root, blob, length):
    path = _write(root / "rnd", "model.safetensors", struct.pack("<Q", length) + blob)
    only_collab_errors(_exercise, path, heads=HEADS, valid=plainly_valid(path, HEADS))


# ---------------------------------------------------------------------------- sharded index

_SHARDS = ["a.safetensors", "sub/b.safetensors", "../outside.safetensors", "/etc/passwd", "", ".", "sub",
           "missing.safetensors", "sub/../a.safetensors", "a\x00b", "x" * 300, "a.safetensors/", "~/a.safetensors",
           "link-out.safetensors", "fifo.safetensors", "./a.safetensors", "sub/../../sharded/a.safetensors",
           "/dev/zero", "a" * 5000 + ".safetensors", "sub/" * 2000 + "b.safetensors"]


@pytest.fixture(scope="module")
def sharded(root) -> Path:
    d = root / "sharded"
    (d / "sub").mkdir(parents=True)
    t = _bert_tensors()
    save_file({k: v for k, v in t.items() if ".query." in k}, str(d / "a.safetensors"))
    save_file({k: v for k, v in t.items() if ".query." not in k}, str(d / "sub" / "b.safetensors"))
    save_file({"w": torch.zeros(2)}, str(root / "outside.safetensors"))
    (d / "link-out.safetensors").symlink_to(root / "outside.safetensors")
    os.mkfifo(d / "fifo.safetensors")  # read, it would block: the reader must refuse it unopened
    (d / "config.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    return d


_VALID_WEIGHT_MAP = {k: ("a.safetensors" if ".query." in k else "sub/b.safetensors") for k in _bert_tensors()}


@st.composite
def _mostly_valid_index(draw) -> dict:
    weight_map = dict(_VALID_WEIGHT_MAP)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([*weight_map, "ghost"]))
        weight_map[key] = draw(st.one_of(st.sampled_from(_SHARDS), _json_atoms))
    if draw(st.booleans()):
        weight_map.pop(draw(st.sampled_from(sorted(weight_map))))
    return {"metadata": {"total_size": draw(_json_atoms)}, "weight_map": weight_map}


@FUZZ
@given(index=st.one_of(
    _mostly_valid_index(),
    _mostly_valid_index(),
    _json,
    st.fixed_dictionaries({"weight_map": _json, "metadata": _json}),
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from([*_bert_tensors(), "ghost", ""]),
                                                         st.one_of(st.sampled_from(_SHARDS), _json_atoms),
                                                         max_size=20)})),
    raw_tail=st.sampled_from([b"", b"", b"\xff", b"1" * 5000, b"[" * 5000]))
@example(index={"metadata": {"total_size": None}, "weight_map": _VALID_WEIGHT_MAP}, raw_tail=b"")
def test_random_index(sharded, index, raw_tail):
    try:
        text = json.dumps(index).encode()
    except ValueError:
        assume(False)
    if raw_tail:
        text = raw_tail if raw_tail != b"\xff" else text + raw_tail
    (sharded / "model.safetensors.index.json").write_bytes(text)
    valid = not raw_tail and isinstance(index, dict) and index.get("weight_map") == _VALID_WEIGHT_MAP
    only_collab_errors(_exercise, sharded, valid=valid)


# ---------------------------------------------------------------------------- config.json

_HEAD_KEYS = ["num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
              "decoder_attention_heads", "num_key_value_heads", "model_type", "multi_query", "rope_theta",
              "position_embedding_type", "text_config", "vision_config", "model_args"]
_head_values = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 4, 8, 2 ** 64, True, False, None, "2", 2.0, [2], {},
                                          "llama", "rotary", {"num_heads": 2}, {"num_attention_heads": 0}]),
                         _json)


@pytest.fixture(scope="module")
def families(root) -> dict[str, Path]:
    """Tiny checkpoints with bert, bart (encoder/decoder) and timm-vit (fused) naming, no config."""
    g = torch.Generator().manual_seed(3)
    out = {}
    layouts = {
        "bert": {Q0: (D, D), K0: (D, D)},
        "bart": {"encoder.layers.0.self_attn.q_proj.weight": (D, D), "encoder.layers.0.self_attn.k_proj.weight": (D, D),
                 "decoder.layers.0.encoder_attn.q_proj.weight": (D, D),
                 "decoder.layers.0.encoder_attn.k_proj.weight": (D, D)},
        "timm-vit": {"blocks.0.attn.qkv.weight": (3 * D, D), "blocks.0.attn.qkv.bias": (3 * D,)},
    }
    for name, shapes in layouts.items():
        d = root / f"family-{name}"
        d.mkdir()
        save_file({k: torch.randn(*s, generator=g) for k, s in shapes.items()}, str(d / "model.safetensors"))
        out[name] = d
    return out


@FUZZ
@given(family=st.sampled_from(["bert", "bart", "timm-vit"]),
       config=st.one_of(st.dictionaries(st.sampled_from(_HEAD_KEYS), _head_values, max_size=5), _json),
       heads=st.one_of(st.none(), st.integers(-2, 5)))
@example(family="bert", config={}, heads=2)
@example(family="bart", config={"note": 1}, heads=4)
@example(family="timm-vit", config={}, heads=1)
def test_random_config(families, family, config, heads):
    d = families[family]
    try:
        (d / "config.json").write_text(json.dumps(config))
    except ValueError:
        assume(False)
    # valid: a head count that divides D = 8 given, and a config saying nothing about heads or family
    valid = heads in (1, 2, 4, 8) and isinstance(config, dict) and not set(config) & set(_HEAD_KEYS)
    only_collab_errors(_exercise, d, heads=heads, valid=valid)


# ---------------------------------------------------------------------------- manifest

def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


_DELETE = object()
_manifest_values = st.one_of(
    st.just(_DELETE),
    st.sampled_from([None, True, 0, -1, 1, 3, 4, 8, 2 ** 70, 1.5, math.nan, math.inf, "", "x", "bert", "gpt2",
                     "../x.safetensors", "/etc/passwd", [], [1], ["a"], {}, {"a": 1},
                     "encoder.layer.0.attention.self.collab_query.weight"]),
    _json)


def _mutated(base: dict, data) -> dict:
    m = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(m) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        value = data.draw(_manifest_values)
        value = value if value is _DELETE else copy.deepcopy(value)  # sampled lists and dicts are shared
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if value is _DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return m


def _report_and_verify(directory: Path) -> None:
    report_tables(build_report(directory, [1, 128]))
    verify(directory, n_seq=1, n_tokens=4)


@pytest.fixture(scope="module")
def comp(root) -> tuple[Path, dict]:
    return root / "comp", json.loads((root / "comp" / MANIFEST_NAME).read_text())


def _write_mutated(directory: Path, base: dict, data) -> dict:
    """Write a mutated copy of the manifest ``base`` (examples that are not JSON are skipped)."""
    try:
        text = json.dumps(_mutated(base, data))
    except ValueError:
        assume(False)
    (directory / MANIFEST_NAME).write_text(text)
    return json.loads(text)


@FUZZ
@given(data=st.data())
def test_mutated_manifest(comp, data):
    directory, base = comp
    mutated = _write_mutated(directory, base, data)
    only_collab_errors(_report_and_verify, directory, valid=_same(mutated, base))
    (directory / MANIFEST_NAME).write_text(json.dumps(base))


_HOSTILE_NAMES = st.one_of(
    st.sampled_from(["..", "../src/model.safetensors", "/etc/passwd", "/dev/zero", "a\x00b", "x" * 5000,
                     "sub/" * 2000 + "x", "", ".", "./model.safetensors", "model.safetensors/", "\\..\\x",
                     "link-out", "fifo", "config.json", "model.safetensors"]),
    st.text(max_size=40))


@FUZZ
@given(data=st.data(), field=st.sampled_from(["outputs", "files"]), name=_HOSTILE_NAMES)
def test_manifest_path_fields(comp, data, field, name):
    """A file name of ``outputs`` or ``source.files`` is refused unless it names the very file recorded."""
    directory, base = comp
    m = copy.deepcopy(base)
    records = m["outputs"] if field == "outputs" else m["source"]["files"]
    i = data.draw(st.integers(0, len(records) - 1))
    original = records[i]["name"]
    records[i]["name"] = name
    try:
        (directory / MANIFEST_NAME).write_text(json.dumps(m))
        only_collab_errors(_report_and_verify, directory, valid=name == original)
        if name != original and field == "outputs":
            with pytest.raises(CollabError):
                with no_hang():
                    build_report(directory)
    finally:
        (directory / MANIFEST_NAME).write_text(json.dumps(base))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(created=st.text(max_size=30), version=st.text(max_size=30),
       seconds=st.floats(0, 1e9, allow_nan=False), iterations=st.integers(0, 10 ** 6))
def test_harmless_manifest_changes_are_accepted(comp, created, version, seconds, iterations):
    """Fields no check depends on may hold anything of their type: the readers still answer."""
    directory, base = comp
    m = copy.deepcopy(base)
    m["created_utc"], m["tool"]["version"] = created, version
    m["layers"][0].update(seconds=seconds, iterations=iterations)
    try:
        (directory / MANIFEST_NAME).write_text(json.dumps(m))
        only_collab_errors(_report_and_verify, directory, valid=True)
    finally:
        (directory / MANIFEST_NAME).write_text(json.dumps(base))


@FUZZ
@given(content=st.one_of(_json.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                         st.sampled_from([b"", b"1" * 5000, b"[" * 100_000, b"{\"format\": \"collabcompress/1\"}"])))
@example(content=None)  # None: the valid manifest itself
def test_random_manifest_bytes(comp, content):
    directory, base = comp
    content = json.dumps(base).encode() if content is None else content
    (directory / MANIFEST_NAME).write_bytes(content)
    only_collab_errors(load_manifest, directory, valid=_same(_loads(content), base))
    (directory / MANIFEST_NAME).write_text(json.dumps(base))


def _same(a, b) -> bool:
    """Equal as JSON (``True`` is not ``1`` there)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _loads(content: bytes):
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


@settings(FUZZ, max_examples=max(1, EXAMPLES // 8))
@given(data=st.data(), command=st.sampled_from(["report", "verify"]))
def test_mutated_manifest_through_the_cli(comp, data, command):
    from helpers import run_cli

    directory, base = comp
    valid = data.draw(st.booleans(), label="unchanged")
    if not valid:
        _write_mutated(directory, base, data)
    with no_hang():
        result = run_cli(command, directory)
    (directory / MANIFEST_NAME).write_text(json.dumps(base))
    assert result.exit_code in ((0,) if valid else (0, 3, 4)), (result.exit_code, repr(result.exception), result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    if result.exit_code:
        assert 1 <= len(result.stderr.strip().splitlines()) <= 2, result.stderr


# ---------------------------------------------------------------------------- calibration statistics

@pytest.fixture(scope="module")
def stats(root) -> tuple[Path, bytes]:
    path = write_stats(root / "src", root / "stats.safetensors", 200)
    return path, path.read_bytes()


def _load_stats(path: Path, src: Path, *, valid: bool) -> None:
    from collabcompress.files.statistics import load_moments, load_whitening

    ckpt = open_checkpoint(src)
    specs = detect(ckpt)
    for fn in (load_whitening, load_moments):
        only_collab_errors(fn, path, ckpt, specs, valid=valid)


@FUZZ
@given(data=st.data())
def test_mutated_calibration_statistics(root, stats, data):
    path, raw = stats
    (n,) = struct.unpack("<Q", raw[:8])
    buf = bytearray(raw)
    for pos, value in data.draw(st.lists(st.tuples(st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(raw) - 1)),
                                                   st.integers(0, 255)), min_size=0, max_size=6)):
        buf[pos] = value
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    target = root / "stats-fuzzed.safetensors"
    target.write_bytes(bytes(buf[:cut] if cut is not None else buf))
    _load_stats(target, root / "src", valid=target.read_bytes() == raw)


@FUZZ
@given(tokens=st.one_of(st.text(max_size=8), st.integers(-10, 10 ** 30).map(str)),
       scale=st.sampled_from([1.0, -1.0, 0.0, 1e-300, 1e300, math.nan, math.inf]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]))
@example(tokens="200", scale=1.0, dtype=torch.float64)
@example(tokens="1000000", scale=1.0, dtype=torch.float32)
def test_calibration_statistics_with_odd_values(root, stats, tokens, scale, dtype):
    from safetensors import safe_open

    from collabcompress.files.output import write_safetensors

    with safe_open(str(stats[0]), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["tokens"] = tokens
    tensors = {k: (v * scale).to(dtype) for k, v in tensors.items()}
    target = root / "stats-odd.safetensors"
    write_safetensors(target, [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()], meta)
    # valid: a plain positive token count, the moments unchanged in a float type that holds them
    valid = (tokens.isascii() and tokens.isdigit() and tokens == str(int(tokens)) and 1 <= int(tokens) <= 10 ** 12
             and scale == 1.0 and dtype in (torch.float64, torch.float32))
    _load_stats(target, root / "src", valid=valid)


@pytest.mark.parametrize("tokens,scale", [("abc", 1.0), ("1e9", 1.0), ("200", 1e200)],
                         ids=["tokens-not-int", "tokens-float", "moments-overflow"])
def test_unusable_statistics_metadata_is_bad_input(root, stats, tokens, scale):
    from safetensors import safe_open

    from collabcompress.files.statistics import load_whitening
    from collabcompress.files.output import write_safetensors

    with safe_open(str(stats[0]), framework="pt") as f:
        meta = {**f.metadata(), "tokens": tokens}
        tensors = {k: f.get_tensor(k) * (scale if k.endswith(".mean") else 1.0) for k in f.keys()}
    target = root / "stats-known.safetensors"
    write_safetensors(target, [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()], meta)
    ckpt = open_checkpoint(root / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CollabError):
            load_whitening(target, ckpt, detect(ckpt))
