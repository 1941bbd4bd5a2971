"""Inputs that are each well-formed but inconsistent must never give a broken model with exit 0.

Three classes, each refused with a one- or two-line message (exit 3, or 4 for an unknown rope
type), the inputs unchanged and nothing left behind:

* calibration statistics whose values are finite but extreme (second moments near 1e300 or
  1e-300, overflowing query energies, token ids beyond the vocabulary), and any new tensor
  that would still come out NaN or Inf (checked before the output is renamed into place);
* a config.json that contradicts the weights (layer count, width, q/k biases, a layer with a
  query but no key weight) or gives unusable rotary settings, refused by ``analyze``,
  ``compress`` and ``calibrate`` before any work;
* numbers too long for Python's ``int`` (``--layers 0,99...9``, tensor names), exit 3 not 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file


from families import make_checkpoint
from helpers import assert_clean_failure, digest, write_stats

from collabcompress.files.arch import detect
from collabcompress.commands.compress import parse_layers
from collabcompress.errors import BadInputError, UnsupportedArchitectureError
from collabcompress.files.checkpoint import open_checkpoint

pytest.importorskip("transformers")

LLAMA = "model.layers.{i}.self_attn"
BERT = "encoder.layer.{i}.attention.self"
HUGE = "9" * 5000  # more digits than Python's int() converts
PROPERTY = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    """A tiny BERT (D = 32, 4 heads, 2 layers) with config.json; never modified."""
    return make_checkpoint("bert", tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def bert_stats(bert, tmp_path_factory) -> Path:
    return write_stats(bert, tmp_path_factory.mktemp("bert-stats") / "stats.safetensors", 2000)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(cli, code: int, inputs: list[Path], args: list, *needles: str) -> str:
    """Run the CLI; exit ``code`` with a clean message holding the needles, the inputs unchanged,
    and nothing new beside the output (no output directory, no temporary one)."""
    before = {p: digest(p) if p.is_dir() else _sha(p) for p in inputs}
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    siblings = set(out.parent.iterdir()) if out is not None else set()
    stderr = assert_clean_failure(cli(*args), code, *needles)
    assert {p: digest(p) if p.is_dir() else _sha(p) for p in inputs} == before
    if out is not None:
        assert not out.exists() and set(out.parent.iterdir()) == siblings
    return stderr


def _tampered(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the statistics file ``src`` with ``edit`` applied to its tensors (metadata kept)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _new_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(directory / "model.safetensors")).items() if ".collab_" in k}


# --------------------------------------------------------------------------- 1. statistics out of range

def _scale(name: str, factor: float):
    def edit(t):
        t[name] = t[name] * factor
    return edit


def _fill(name: str, value: float):
    def edit(t):
        t[name] = torch.full_like(t[name], value)
    return edit


L0, B0 = LLAMA.format(i=0), BERT.format(i=0)
EXTREME = {
    "llama-second-1e300": ("llama", f"{L0}.second_moment", _scale(f"{L0}.second_moment", 1e300)),
    "llama-second-1e150": ("llama", f"{L0}.second_moment", _scale(f"{L0}.second_moment", 1e150)),
    "llama-second-1e-300": ("llama", f"{L0}.second_moment", _scale(f"{L0}.second_moment", 1e-300)),
    "llama-mean-1e300": ("llama", f"{L0}.mean", _scale(f"{L0}.mean", 1e300)),
    "llama-energy-1e300": ("llama", f"{L0}.query_energy", _scale(f"{L0}.query_energy", 1e300)),
    "llama-energy-max": ("llama", f"{L0}.query_energy", _fill(f"{L0}.query_energy", 1.7e308)),
    "bert-second-1e150": ("bert", f"{B0}.second_moment", _scale(f"{B0}.second_moment", 1e150)),
    "bert-second-1e-300": ("bert", f"{B0}.second_moment", _scale(f"{B0}.second_moment", 1e-300)),
}


@pytest.mark.parametrize("case", EXTREME)
def test_extreme_statistics_are_refused(cli, tmp_path, bert, bert_stats, rotary_stats, case):
    family, tensor, edit = EXTREME[case]
    model, stats = rotary_stats("llama") if family == "llama" else (bert, bert_stats)
    bad = _tampered(stats, tmp_path / "stats.safetensors", edit)
    rank = "4" if family == "llama" else "8"
    _refused(cli, 3, [model, bad], ["compress", model, "--out", tmp_path / "out", "--rank", rank,
                                    "--calibration", bad], "stats.safetensors", tensor)


@PROPERTY
@given(exponent=st.integers(-320, 308), dtype=st.sampled_from(["auto", "float16"]))
@example(exponent=0, dtype="auto")
@example(exponent=-11, dtype="float16")
def test_statistics_at_any_scale_give_a_finite_model_or_a_clean_refusal(cli, tmp_path, bert, bert_stats,
                                                                        exponent, dtype):
    """Scaling the moments by 10**exponent (the mean by its square root) never writes NaN or Inf:
    compress exits 0 with finite new tensors, or 3 with nothing written; ordinary scales work."""
    factor = 10.0 ** exponent

    def edit(t):
        for name in list(t):
            t[name] = t[name] * (factor if name.endswith("second_moment") else math.sqrt(factor))

    stats = _tampered(bert_stats, tmp_path / f"stats{exponent}.safetensors", edit)
    out = tmp_path / f"out{exponent}{dtype}"
    result = cli("compress", bert, "--out", out, "--rank", "8", "--calibration", stats, "--dtype", dtype)
    if result.exit_code == 0:
        assert all(bool(torch.isfinite(t.float()).all()) for t in _new_tensors(out).values())
        shutil.rmtree(out)
    else:
        assert_clean_failure(result, 3)
        assert not out.exists()
    if abs(exponent) <= 4:
        assert result.exit_code == 0, result.stderr


def test_non_finite_new_tensor_is_never_written(cli, tmp_path, bert, bert_stats):
    """Statistics within bounds but small (mean square input 1e-11) make the whitened factors too
    large for float16: refused before the output is renamed into place, naming the tensor."""
    stats = _tampered(bert_stats, tmp_path / "small.safetensors",
                      lambda t: t.update({k: v * (1e-11 if k.endswith("second_moment") else math.sqrt(1e-11))
                                          for k, v in t.items()}))
    stderr = _refused(cli, 3, [bert, stats], ["compress", bert, "--out", tmp_path / "out", "--rank", "8",
                                              "--calibration", stats, "--dtype", "float16"],
                      "NaN or Inf", ".collab_", "float16", "small.safetensors")
    assert "nothing was written" in stderr


def _kept_window_id(value: int):
    """input_ids[0, 0] and the same token of its window in window_ids set to ``value``."""
    def edit(t):
        kept = int(t["kept_windows"][0])
        t["input_ids"], t["window_ids"] = t["input_ids"].clone(), t["window_ids"].clone()
        t["input_ids"][0, 0] = value
        t["window_ids"][kept, 0] = value
    return edit


def _unkept_window_id(value: int):
    def edit(t):
        kept = set(t["kept_windows"].tolist())
        free = next(w for w in range(t["window_ids"].shape[0]) if w not in kept)
        t["window_ids"] = t["window_ids"].clone()
        t["window_ids"][free, 0] = value
    return edit


@pytest.mark.parametrize("edit,option,tensor", [
    (_kept_window_id(10 ** 6), ["--heal-steps", "1", "--rank", "4"], "input_ids"),
    (_kept_window_id(64), ["--budget", "0.5"], "input_ids"),
    (_unkept_window_id(10 ** 6), ["--heal-steps", "1", "--rank", "4"], "window_ids"),
], ids=["heal-kept", "budget-kept-vocab-size", "heal-unkept"])
def test_token_ids_beyond_the_vocabulary_are_bad_input(cli, tmp_path, rotary_stats, edit, option, tensor):
    model, stats = rotary_stats("llama")
    bad = _tampered(stats, tmp_path / "stats.safetensors", edit)
    _refused(cli, 3, [model, bad], ["compress", model, "--out", tmp_path / "out", "--calibration", bad, *option],
             tensor, "vocab_size 64", "stats.safetensors")


def test_consistent_inputs_still_work(cli, tmp_path, rotary_stats):
    """The checks refuse nothing real: the calibrated tiny llama compresses with every new tensor finite."""
    model, stats = rotary_stats("llama")
    result = cli("compress", model, "--out", tmp_path / "out", "--rank", "4", "--calibration", stats)
    assert result.exit_code == 0, result.stderr
    assert all(bool(torch.isfinite(t).all()) for t in _new_tensors(tmp_path / "out").values())


# --------------------------------------------------------------------------- 2. config against weights

def _variant(src: Path, dst: Path, config: Callable[[dict], None] | None = None,
             weights: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of the model directory ``src`` with its config.json and/or weights edited."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if weights is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        weights(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _set(**values):
    return lambda cfg: cfg.update(values)


def _rope(**values):
    return lambda cfg: cfg["rope_parameters"].update(values)


def _drop(name: str):
    return lambda t: t.pop(name)


def _qk_biases(t: dict[str, torch.Tensor]) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        for p in "qk":
            w = t[f"{LLAMA.format(i=i)}.{p}_proj.weight"]
            t[f"{LLAMA.format(i=i)}.{p}_proj.bias"] = 0.2 * torch.randn(w.shape[0], generator=g)


# name -> (fixture, config edit, weights edit, exit code, needles)
CONTRADICTIONS = {
    "llama-layers-3": ("llama", _set(num_hidden_layers=3), None, 3, ["num_hidden_layers", "q_proj.weight"]),
    "llama-layers-1": ("llama", _set(num_hidden_layers=1), None, 3, ["num_hidden_layers", "q_proj.weight"]),
    "llama-layers-string": ("llama", _set(num_hidden_layers="2"), None, 3, ["num_hidden_layers", "positive integer"]),
    "llama-hidden-size": ("llama", _set(hidden_size=48), None, 3, ["hidden_size", f"{L0}.q_proj.weight"]),
    "llama-no-k_proj-layer-1": ("llama", None, _drop(f"{LLAMA.format(i=1)}.k_proj.weight"), 3,
                                [f"{LLAMA.format(i=1)}.q_proj.weight", f"{LLAMA.format(i=1)}.k_proj.weight"]),
    "llama-no-k_proj-layer-0": ("llama", None, _drop(f"{L0}.k_proj.weight"), 3, [f"{L0}.k_proj.weight"]),
    "llama-no-q_proj-layer-1": ("llama", None, _drop(f"{LLAMA.format(i=1)}.q_proj.weight"), 3,
                                [f"{LLAMA.format(i=1)}.q_proj.weight"]),
    "llama-biases-without-attention_bias": ("llama", None, _qk_biases, 3, ["attention_bias", f"{L0}.q_proj.bias"]),
    "mistral-biases": ("mistral", None, _qk_biases, 3, ["mistral", f"{L0}.q_proj.bias"]),
    "rope_theta-string": ("llama", _rope(rope_theta="10000"), None, 3, ["rope_parameters.rope_theta", "10000"]),
    "rope_theta-nan": ("llama", _rope(rope_theta=math.nan), None, 3, ["rope_parameters.rope_theta", "NaN"]),
    "rope_theta-top-level-string": ("llama", _set(rope_theta="10000"), None, 3, ["rope_theta", "10000"]),
    "rope_scaling-factor-string": ("llama", _set(rope_scaling={"rope_type": "linear", "factor": "2.0"}), None, 3,
                                   ["rope_scaling.factor", "2.0"]),
    "partial_rotary_factor-string": ("llama", _rope(partial_rotary_factor="0.5"), None, 3,
                                     ["partial_rotary_factor", "0.5"]),
    "rope-type-made-up": ("llama", _rope(rope_type="made-up"), None, 4, ["rope type", "made-up"]),
    # settings transformers' own rope initialisation rejects: before, the default formula stood in
    "yarn-without-factor": ("llama", _rope(rope_type="yarn"), None, 3, ["yarn", "factor"]),
    "llama3-without-bands": ("llama", _rope(rope_type="llama3", factor=8.0), None, 3, ["llama3", "freq_factor"]),
    "longrope-factors-of-two-lengths": ("llama", _rope(rope_type="longrope", short_factor=[1.0] * 2, long_factor=[1.0] * 3), None,
                                   3, ["longrope"]),
    "rope_scaling-type-made-up": ("llama", _set(rope_scaling={"type": "made-up", "factor": 2.0}), None, 4,
                                  ["made-up"]),
    "bert-layers-3": ("bert", _set(num_hidden_layers=3), None, 3, ["num_hidden_layers", "query.weight"]),
    "bert-hidden-size": ("bert", _set(hidden_size=48), None, 3, ["hidden_size", f"{B0}.query.weight"]),
    "bert-no-key-layer-1": ("bert", None, _drop(f"{BERT.format(i=1)}.key.weight"), 3,
                            [f"{BERT.format(i=1)}.key.weight"]),
    "bert-no-query-layer-1": ("bert", None, _drop(f"{BERT.format(i=1)}.query.weight"), 3,
                              [f"{BERT.format(i=1)}.query.weight"]),
}


@pytest.fixture(scope="module")
def contradictions(tmp_path_factory, bert, rotary_checkpoints) -> dict[str, Path]:
    """Every checkpoint of CONTRADICTIONS, built once; never modified."""
    root = tmp_path_factory.mktemp("contradictions")
    sources = {"bert": bert, **rotary_checkpoints}
    return {name: _variant(sources[src], root / name, config, weights)
            for name, (src, config, weights, _, _) in CONTRADICTIONS.items()}


@pytest.mark.parametrize("command", ["analyze", "compress", "calibrate"])
@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_config_contradicting_the_weights_is_refused_before_any_work(cli, tmp_path, contradictions, case, command):
    model, (_, _, _, code, needles) = contradictions[case], CONTRADICTIONS[case]
    texts = tmp_path / "texts.txt"
    texts.write_text("a short text\n", encoding="utf-8")
    args = {"analyze": ["analyze", model],
            "compress": ["compress", model, "--out", tmp_path / "out", "--rank", "4"],
            "calibrate": ["calibrate", model, "--texts", texts, "--out", tmp_path / "out"]}[command]
    _refused(cli, code, [model, texts], args, *needles)
    assert not (tmp_path / "out").exists()


def _with_config(ckpt, change: Callable[[dict], None]):
    cfg = json.loads(json.dumps(ckpt.config))
    change(cfg)
    return dataclasses.replace(ckpt, config=cfg)


_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 2 ** 70), st.floats(allow_nan=True),
                         st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2))


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and v > 0


@settings(PROPERTY, max_examples=150)
@given(field=st.sampled_from(["num_hidden_layers", "hidden_size", "rope_theta", "factor", "partial_rotary_factor"]),
       value=_JSON_VALUES)
@example(field="num_hidden_layers", value=2)
@example(field="hidden_size", value=32)
@example(field="rope_theta", value=500000.0)
@example(field="partial_rotary_factor", value=0.5)
def test_any_config_value_is_accepted_only_when_consistent(rotary_checkpoints, field, value):
    """Property over detect (what analyze, compress and calibrate run first): a config value is
    accepted exactly when it agrees with the weights (2 layers, width 32) or is a usable rotary
    setting; anything else is a CollabError (a partial rotary factor below 1: unsupported)."""
    ckpt = open_checkpoint(rotary_checkpoints["llama"])
    if field in ("num_hidden_layers", "hidden_size"):
        change, good = _set(**{field: value}), value is None or (
            type(value) is int and value == {"num_hidden_layers": 2, "hidden_size": 32}[field])
    elif field == "factor":
        change = _set(rope_scaling={"rope_type": "linear", "factor": value})
        good = value is None or _positive(value)
    else:
        change, good = _rope(**{field: value}), value is None or (
            _positive(value) and (field != "partial_rotary_factor" or value <= 1))
    try:
        specs = detect(_with_config(ckpt, change))
    except UnsupportedArchitectureError:
        assert field == "partial_rotary_factor" and good and value < 1
    except BadInputError:
        assert not good, value
    else:
        assert good and len(specs) == 2, value
        assert field != "partial_rotary_factor" or value is None or value == 1


# --------------------------------------------------------------------------- 3. numbers too long for int()

@pytest.mark.parametrize("layers", [f"0,{HUGE}", f"0-{HUGE}", HUGE, f"{'0' * 5000}1"])
def test_layers_with_huge_numbers_are_bad_input(cli, tmp_path, bert, layers):
    args = ["compress", bert, "--out", tmp_path / "out", "--rank", "8", "--layers", layers]
    if layers.endswith("01"):  # leading zeros only: layer 1
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        assert json.loads((tmp_path / "out" / "collab_manifest.json").read_text())["layers"][0]["index"] == 1
        return
    stderr = _refused(cli, 3, [bert], args, "--layers", "attention layers 0 to 1")
    assert len(stderr) < 300


@settings(PROPERTY, max_examples=300)
@given(text=st.one_of(st.text(alphabet="0123456789,- ", max_size=30),
                      st.lists(st.sampled_from(["0", "1", "5", HUGE, "-", ",", "00"]), max_size=6).map("".join)),
       n_layers=st.integers(1, 12))
def test_any_layers_spec_parses_or_is_bad_input(text, n_layers):
    try:
        chosen = parse_layers(text, n_layers)
    except BadInputError as e:
        assert len(str(e)) < 200
    else:
        assert chosen <= set(range(n_layers))


def test_tensor_name_with_a_huge_number_is_bad_input(cli, tmp_path, bert):
    model = _variant(bert, tmp_path / "model", weights=lambda t: t.update(
        {k.replace("encoder.layer.1.", f"encoder.layer.{HUGE}."): t.pop(k) for k in list(t)
         if k.startswith("encoder.layer.1.")}))
    _refused(cli, 3, [model], ["analyze", model], "5000 digits")
    _refused(cli, 3, [model], ["compress", model, "--out", tmp_path / "out", "--rank", "8"], "5000 digits")
