"""One home for each fact: the cost model, the dtype map, the extras guard, the defaults
shown in --help, and commands that only print staying free of torch."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from collabcompress import dtypes
from collabcompress.files.arch import AttentionSpec
from collabcompress.files.arch import stored_qk_params
from collabcompress.maths.costs import qk_params
from collabcompress.maths.cp import cp_als
from collabcompress.defaults import DEFAULT_MAX_ITER, DEFAULT_TOL
from collabcompress.errors import MissingExtraError
from collabcompress.extras import require_matplotlib, require_transformers


def _spec(fused: str | None, bias: bool) -> AttentionSpec:
    name = "h.0.attn.c_attn.weight" if fused else "l.0.q.weight"
    return AttentionSpec(module="m", index=0, family="f", n_head=4, head_dim=8, d_model=40, scale=1.0,
                         query=name, key=name if fused else "l.0.k.weight",
                         query_bias=name.replace("weight", "bias") if bias else None,
                         key_bias=None if fused or not bias else "l.0.k.bias", fused=fused)


@pytest.mark.parametrize("fused", [None, "conv1d", "linear"])
@pytest.mark.parametrize("bias", [False, True])
def test_stored_qk_params_counts_the_query_key_weights_and_biases(fused, bias):
    sizes = {"l.0.q.bias": 32, "l.0.k.bias": 32}  # separate layers: biases by their size
    spec = _spec(fused, bias)
    # 2 * (H*d) * D weights; the fused bias holds query, key and value: two thirds count
    assert stored_qk_params(spec, sizes.__getitem__) == 2 * 32 * 40 + (64 if bias else 0)
    assert stored_qk_params(spec, sizes.__getitem__) == qk_params(40, 4, 8, bias_elements=64 if bias else 0)


def test_the_collaborative_count_is_spec_section_5():
    d_model, n_head, head_dim, r = 384, 12, 32, 128
    assert qk_params(d_model, n_head, head_dim, r) == 2 * d_model * r + n_head * r + n_head * d_model


@pytest.mark.parametrize("st", ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"])
def test_dtype_map_round_trips_and_sizes(st):
    t = dtypes.to_torch(st)
    assert isinstance(t, torch.dtype)
    assert dtypes.st_name(t) == st
    assert dtypes.to_torch(dtypes.dtype_name(st)) is t
    assert dtypes.ELEMENT_SIZE[st] == dtypes.ELEMENT_SIZE[dtypes.dtype_name(st)] == torch.empty((), dtype=t).element_size()


def test_dtype_map_unknowns():
    assert dtypes.dtype_name("U64") == "U64"  # passed through, as the manifest and report always did
    assert dtypes.st_name(torch.complex64) is None
    assert dtypes.to_torch("complex64") is None and dtypes.to_torch("nonsense") is None
    assert dtypes.FLOATS == {"F32", "F16", "BF16", "F64"}
    assert all(dtypes.to_torch(n).is_floating_point for n in dtypes.OUTPUT_NAMES)


def test_missing_extras_give_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"^plotting needs matplotlib: pip install 'collabcompress\[plot\]'$"):
        require_matplotlib()
    with pytest.raises(MissingExtraError, match=r"^calibrate needs transformers: pip install 'collabcompress\[hf\]'$"):
        require_transformers("calibrate")
    from collabcompress import hf
    from collabcompress.commands import calibrate as calibration

    for guard in (hf._transformers, calibration._transformers):
        with pytest.raises(MissingExtraError, match=r"pip install 'collabcompress\[hf\]'"):
            guard()


def test_cp_als_defaults_are_the_shared_ones():
    params = inspect.signature(cp_als).parameters
    assert params["max_iter"].default == DEFAULT_MAX_ITER and params["tol"].default == DEFAULT_TOL


def test_compress_help_shows_the_real_defaults(cli):
    out = " ".join(cli("compress", "--help").stdout.replace("│", " ").split())  # the help box, unwrapped
    assert f"Most ALS sweeps per layer. [default: {DEFAULT_MAX_ITER}]" in out
    assert f"Stop when the fit changes less than this. [default: {DEFAULT_TOL:g}]" in out


PRINT_ONLY = [["archs"], ["archs", "--json", "-"], ["--help"], ["compress", "--help"]]

# One fresh interpreter runs every command of PRINT_ONLY in turn (a child per command cost a
# Python start each): before each, a marker line on stdout and stderr; after each, whether torch
# is imported by then and the exit code. The torch check is cumulative, so a command that
# imports torch fails its own test and every later one.
_NO_TORCH = """
import json, sys
from collabcompress.cli import main
for i, args in enumerate(json.loads(sys.argv[1])):
    print(f"=== run {i}", flush=True)
    print(f"=== run {i}", file=sys.stderr, flush=True)
    sys.argv = ["collabcompress", *args]
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    sys.stdout.flush()
    print("TORCH" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def print_only_runs() -> tuple[int, list[str], list[str]]:
    """(the child's exit code, each command's stdout, each command's stderr), for PRINT_ONLY."""
    import json
    import re

    done = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(PRINT_ONLY)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    split = re.compile(r"^=== run \d+\n", re.M)
    return done.returncode, split.split(done.stdout)[1:], split.split(done.stderr)[1:]


@pytest.mark.parametrize("args", PRINT_ONLY)
def test_commands_that_only_print_do_not_import_torch(args, print_only_runs):
    returncode, stdouts, stderrs = print_only_runs
    assert returncode == 0 and len(stdouts) == len(stderrs) == len(PRINT_ONLY), stderrs
    i = PRINT_ONLY.index(args)
    assert stderrs[i].strip().splitlines()[-1] in ("NO-TORCH 0", "NO-TORCH None"), stderrs[i]
    assert "Usage" in stdouts[i] or "bert" in stdouts[i]


def test_multiple_of_has_one_home():
    """--multiple-of's default is defaults.DEFAULT_MULTIPLE_OF wherever it is a default."""
    from collabcompress.commands.compress import loss_curves
    from collabcompress.defaults import DEFAULT_MULTIPLE_OF
    from collabcompress.maths.spectra import choose_rank, rank_for_energy
    from collabcompress.options import CompressOptions

    assert CompressOptions().multiple_of == DEFAULT_MULTIPLE_OF
    for fn in (choose_rank, rank_for_energy, loss_curves):
        assert inspect.signature(fn).parameters["multiple_of"].default == DEFAULT_MULTIPLE_OF, fn.__name__
    from collabcompress import cli

    assert inspect.signature(cli.compress).parameters["multiple_of"].default == DEFAULT_MULTIPLE_OF


def test_score_formulas_and_the_rotation_have_one_home():
    """The original heads' scores are maths.scores.original_scores (refinement's target too), and
    the RoPE rotation e^{i p theta} is maths.rotary.rotation: no module defines its own."""
    import ast
    from pathlib import Path

    import collabcompress

    package = Path(collabcompress.__file__).parent
    defined: dict[str, list[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name.lstrip("_"), []).append(str(path.relative_to(package)))
    assert defined["original_scores"] == ["maths/scores.py"]
    assert "original_logits" not in defined
    assert defined["rotation"] == ["maths/rotary.py"]
