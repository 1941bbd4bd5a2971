"""Refuse before allocating: inputs whose size would exhaust the machine are refused with exit 3
and the figures, before the allocation, and a hang-up ends a run as SIGTERM does.

Classes: safetensors headers claiming tensors larger than the file, D x D matrices (Gram,
calibration accumulators) and attention scores beyond the memory available, bench sizes beyond
the model's positions, the memory and the cores, ``evaluate --new-tokens`` beyond the positions,
texts tokenised beyond what ``--max-tokens`` needs, and SIGHUP. Every case uses tiny synthetic
checkpoints; none measures wall time. Inputs are hashed before and after, and nothing may be
left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import signal_child  # noqa: E402
from families import make_checkpoint  # noqa: E402
from helpers import assert_clean_failure, split_stage_lines  # noqa: E402

from collabcompress.errors import BadInputError  # noqa: E402
from collabcompress.files.checkpoint import open_checkpoint  # noqa: E402

PROPERTY = settings(max_examples=int(os.environ.get("COLLABCOMPRESS_FUZZ_EXAMPLES", "50")), deadline=None,
                    database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def listing(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones included), and every directory."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def write_safetensors_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly this header and data (no checks: crafted files)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# ---------------------------------------------------------------------------- 5a: headers larger than the file

QUERY = "encoder.layer.0.attention.self.query.weight"
KEY = "encoder.layer.0.attention.self.key.weight"


def _crafted(tmp_path: Path, query: dict) -> Path:
    """A BERT-named checkpoint (with config.json) whose query tensor's header entry is ``query``."""
    header = {KEY: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, QUERY: query}
    directory = tmp_path / "crafted"
    write_safetensors_raw(directory / "model.safetensors", header, bytes(32))
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "num_attention_heads": 1}))
    return directory


@pytest.mark.parametrize("command", ["analyze", "compress"])
@pytest.mark.parametrize("query, words", [
    ({"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [16, 16 + 4 * 10 ** 12]},
     ["truncated", "4,000,000,000,016", "holds 32"]),
    ({"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [16, 32]}, ["damaged", "span 16"]),
    ({"dtype": "BF16", "shape": [2, 2], "data_offsets": [16, 32]}, ["damaged", "needs 8 bytes", "span 16"]),
], ids=["beyond-the-file", "shape-larger-than-offsets", "offsets-larger-than-shape"])
def test_a_header_claiming_more_than_the_file_is_refused_naming_file_and_tensor(cli, tmp_path, command, query,
                                                                                   words):
    directory = _crafted(tmp_path, query)
    before = listing(tmp_path)
    argv = [command, directory] + (["--out", tmp_path / "out", "--rank", "1"] if command == "compress" else [])
    assert_clean_failure(cli(*argv), 3, "model.safetensors", QUERY, *words)
    assert listing(tmp_path) == before


_ELEMENT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}


@PROPERTY
@given(dtype=st.sampled_from(sorted(_ELEMENT)),
       shape=st.lists(st.one_of(st.integers(0, 6), st.integers(0, 10 ** 12)), max_size=4),
       span=st.one_of(st.integers(0, 64), st.integers(0, 10 ** 15)),
       slack=st.integers(-16, 16))
@example(dtype="F32", shape=[10 ** 6, 10 ** 6], span=4 * 10 ** 12, slack=0)
@example(dtype="F32", shape=[10 ** 6, 10 ** 6], span=16, slack=0)
@example(dtype="F32", shape=[3], span=12, slack=0)
def test_open_checkpoint_refuses_every_tensor_that_does_not_fit_its_file(tmp_path_factory, dtype, shape, span,
                                                                         slack):
    """Property: a tensor entry is opened only when its offsets span exactly shape x dtype bytes
    inside the file; anything else is a BadInputError naming the file and the tensor, raised
    from the header alone (the data is at most 64 bytes, whatever the header claims)."""
    fits = math.prod(shape) * _ELEMENT[dtype] == span
    data = min(max(8, 8 + span + slack), 8 + 64)  # 8 bytes of a valid tensor first
    header = {"ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "w": {"dtype": dtype, "shape": shape, "data_offsets": [8, 8 + span]}}
    path = write_safetensors_raw(tmp_path_factory.mktemp("hdr") / "x.safetensors", header, bytes(data))
    if fits and data == 8 + span:
        assert open_checkpoint(path).shape("w") == tuple(shape)
        return
    with pytest.raises(BadInputError) as e:
        open_checkpoint(path)
    if not fits or 8 + span > data:
        assert "'w'" in str(e.value) and "x.safetensors" in str(e.value), str(e.value)


# ---------------------------------------------------------------------------- 6: SIGHUP ends like SIGTERM



def test_sighup_while_writing_exits_129_and_removes_the_temporary_directory(tmp_path):
    ws = tmp_path / "ws"
    src = make_checkpoint("bert", ws / "src")
    before = listing(src)
    marker, stderr = tmp_path / "started", tmp_path / "stderr.txt"
    argv = ["compress", str(src), "--out", str(ws / "out"), "--rank", "4", "--max-iter", "2"]
    proc = signal_child.start(argv, marker, "write", stderr)
    assert len(list(ws.glob(".out.tmp-*"))) == 1, "the signal should land while the output is being written"
    os.kill(proc.pid, signal.SIGHUP)
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail("still running 60 s after SIGHUP")
    text = stderr.read_text(errors="replace")
    assert proc.exitcode == 129, text
    assert split_stage_lines(text)[1] == ["hung up"] and "Traceback" not in text, text
    assert sorted(p.name for p in ws.iterdir()) == ["src"]  # no output, no temporary directory
    assert listing(src) == before


# ---------------------------------------------------------------------------- shared tiny models

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models, built once and never changed: ``wide`` (BERT names, one head, query and key
    of shape (1, 10**6): d_model = 10**6 in 4 MB, with a character tokenizer), ``bert`` (the
    tiny BERT of families.py with a character tokenizer, 64 positions) and its compression
    ``bert-r4``, ``llama`` (the tiny rotary decoder, 64 positions) and ``llama-r8``."""
    pytest.importorskip("transformers")
    from families import make_char_tokenizer, make_rotary_checkpoint
    from safetensors.torch import save_file

    from collabcompress.commands.compress import CompressOptions, compress

    root = tmp_path_factory.mktemp("limits")
    wide = root / "wide"
    wide.mkdir()
    w = torch.zeros(1, 10 ** 6, dtype=torch.float16)
    save_file({QUERY: w, KEY: w.clone()}, str(wide / "model.safetensors"))
    (wide / "config.json").write_text(json.dumps({"model_type": "bert", "num_attention_heads": 1}))
    make_char_tokenizer(wide)
    bert = make_checkpoint("bert", root / "bert")
    make_char_tokenizer(bert)
    llama = make_rotary_checkpoint("llama", root / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free rotary warning
        compress(bert, root / "bert-r4", CompressOptions(rank=4, max_iter=2), workers=1)
        compress(llama, root / "llama-r8", CompressOptions(rank=8, max_iter=2), workers=1)
    return {"root": root, "wide": wide, "bert": bert, "bert-r4": root / "bert-r4", "llama": llama,
            "llama-r8": root / "llama-r8"}


@pytest.fixture
def unchanged(models, tmp_path):
    """The models are hashed before and after the test, and the test's directory may hold only
    its inputs afterwards (texts.txt, a copied model)."""
    before = listing(models["root"])
    yield
    assert listing(models["root"]) == before, "an input changed"
    assert {p.name for p in tmp_path.iterdir()} <= {"texts.txt", "bert"}, "something was left behind"


def _texts(tmp_path: Path, text: str = "the first text.\na second text about attention heads.\n") -> Path:
    path = tmp_path / "texts.txt"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- 5b: D x D matrices and scores

@pytest.mark.parametrize("command", ["analyze", "compress", "calibrate"])
def test_d_model_of_a_million_is_refused_before_allocating(cli, models, tmp_path, unchanged, command):
    """Query and key of shape (1, 10**6): the D x D Gram matrices (or calibration
    accumulators) would take 8 TB; before, the allocator failed (exit 1) or the kernel killed us."""
    texts = _texts(tmp_path)
    argv = {"analyze": ["analyze", models["wide"]],
            "compress": ["compress", models["wide"], "--out", tmp_path / "out", "--rank", "1"],
            "calibrate": ["calibrate", models["wide"], "--texts", texts, "--out", tmp_path / "s.safetensors"]}[command]
    err = assert_clean_failure(cli(*argv), 3, "d_model 1,000,000", "memory", "available")
    assert "GiB" in err


def test_a_config_claiming_d_model_of_a_million_is_refused(cli, models, tmp_path, unchanged):
    """config.json says hidden_size 10**6, the tensors 32: refused before transformers builds the model
    (before: transformers' size-mismatch RuntimeError, exit 1)."""
    bert = tmp_path / "bert"
    bert.mkdir()
    for f in models["bert"].iterdir():
        (bert / f.name).write_bytes(f.read_bytes())
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "hidden_size": 10 ** 6}))
    before = listing(bert)
    assert_clean_failure(cli("calibrate", bert, "--texts", _texts(tmp_path), "--out", tmp_path / "s.safetensors"), 3,
                         "hidden_size = 1000000", "width 32")
    assert listing(bert) == before and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_evaluate_refuses_scores_beyond_the_memory(cli, models, tmp_path, unchanged, monkeypatch, model):
    """With 64 KiB free, the scores of the first batch (embeddings) or window (causal LM) do not fit."""
    from collabcompress.files import limits

    monkeypatch.setattr(limits, "available_memory", lambda device="cpu": 64 * 1024)
    assert_clean_failure(cli("evaluate", models[model], models[f"{model}-r{4 if model == 'bert' else 8}"],
                             "--texts", _texts(tmp_path)), 3, "memory", "64.0 KiB is available")


def test_the_memory_figure_is_memavailable():
    from collabcompress.files.limits import available_memory

    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(available_memory() - kib * 1024) < 2 ** 30  # read a moment apart


# ---------------------------------------------------------------------------- 5c: bench sizes

@pytest.mark.parametrize("level, original, compressed", [("module", "bert", "bert-r4"), ("model", "llama", "llama-r8")])
def test_bench_lengths_beyond_the_positions_are_refused(cli, models, unchanged, level, original, compressed):
    """Both tiny models have 64 positions. Before: the module level ran any length (the module
    has no position table, the model had), the model level skipped it with a note."""
    assert_clean_failure(cli("bench", models[original], models[compressed], "--level", level, "--lengths", "8,65",
                             "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--decode-steps", "1"),
                         3, "--lengths 65", "64 positions")


def test_bench_threads_beyond_the_cores_are_refused(cli, models, unchanged):
    from collabcompress.files.limits import usable_cores

    cores = usable_cores()
    assert_clean_failure(cli("bench", models["bert"], models["bert-r4"], "--level", "module", "--lengths", "8",
                             "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--threads", str(cores + 1)),
                         3, f"--threads {cores + 1}", f"at most {cores}")


def test_bench_batch_beyond_the_memory_is_refused(cli, models, unchanged):
    """--batch-sizes 999999999: the inputs alone would take 1 TB (before: exit 1 from the allocator)."""
    assert_clean_failure(cli("bench", models["bert"], models["bert-r4"], "--level", "module", "--lengths", "8",
                             "--batch-sizes", "999999999", "--repeats", "1", "--warmup", "0"),
                         3, "--batch-sizes 999,999,999", "memory", "available")


def test_bench_within_every_cap_runs(cli, models, unchanged):
    result = cli("bench", models["bert"], models["bert-r4"], "--level", "module", "--lengths", "64", "--batch-sizes",
                 "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert [(r["seq_len"], r["batch_size"]) for r in json.loads(result.stdout)["forward"]] == [(64, 2)]


# ---------------------------------------------------------------------------- 5d: evaluate --new-tokens

def test_evaluate_new_tokens_beyond_the_positions_are_refused(cli, models, tmp_path, unchanged):
    """64 positions: a prompt and 64 new tokens do not fit (before: generated past the table; with
    --new-tokens 1000000 it ran for hours)."""
    assert_clean_failure(cli("evaluate", models["llama"], models["llama-r8"], "--texts", _texts(tmp_path),
                             "--max-tokens", "32", "--window", "16", "--prompts", "1", "--new-tokens", "64"),
                         3, "--new-tokens 64", "64 positions", "or fewer")


# ---------------------------------------------------------------------------- 5e: never tokenise more than needed

class _Spy:
    """A tokenizer that records the characters of every text it is asked to tokenise."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.sizes = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.sizes.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


BIG_LINE = "a few plain words " * 250_000  # 4.5 MB on one line


@pytest.mark.parametrize("model", ["llama", "bert"])  # the causal stream and the encoder's windows
def test_calibrate_tokenises_only_the_start_of_an_enormous_line(cli, models, tmp_path, unchanged, monkeypatch, model):
    from collabcompress.commands import calibrate as calibration

    spies = []

    def load(directories):
        spies.append(_Spy(real_load(directories)))
        return spies[-1]

    real_load = calibration.load_tokenizer
    monkeypatch.setattr(calibration, "load_tokenizer", load)
    texts = _texts(tmp_path, BIG_LINE + "\n")
    result = cli("calibrate", models[model], "--texts", texts, "--out", tmp_path / "s.safetensors",
                 "--max-tokens", "1000", "--max-length", "32", "--json", "-")
    assert result.exit_code == 0, result.stderr
    (spy,) = spies
    assert json.loads(result.stdout)["tokens"] >= 1000
    assert max(spy.sizes) <= 4 * 16 * 1000 and sum(spy.sizes) <= 16 * 16 * 1000, (max(spy.sizes), sum(spy.sizes))
    (tmp_path / "s.safetensors").unlink()


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from families import make_char_tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(make_char_tokenizer(tmp_path_factory.mktemp("tok"))))


_WORDS = st.lists(st.sampled_from(["a", "bb", "word", "x" * 40, " ", "  ", "\n", "\t", "z" * 700]), max_size=400)


@PROPERTY
@given(pieces=_WORDS, repeat=st.sampled_from([1, 1, 50]), max_tokens=st.integers(1, 300))
@example(pieces=["z" * 700], repeat=50, max_tokens=1)  # 35,000 characters without a space
def test_token_ids_reads_a_bounded_prefix_and_gives_the_same_tokens(char_tokenizer, pieces, repeat, max_tokens):
    """Property: with max_tokens, token_ids gives the first max_tokens tokens of the whole text,
    and tokenises at most a small multiple of 16 characters per token wanted, however long the text."""
    from collabcompress.runtime.lm import token_ids

    text = "".join(pieces) * repeat
    spy = _Spy(char_tokenizer)
    got = token_ids(spy, text, max_tokens=max_tokens)
    whole = char_tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    assert got.tolist() == whole
    assert sum(spy.sizes) <= 5 * 16 * max_tokens + 2 * 16 * max_tokens, (len(text), spy.sizes)
