"""`collabcompress analyze` end to end: the real all-MiniLM-L6-v2 checkpoint and the bundled sample.

The real model is analysed once per module (one in-process call) and its JSON reused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from helpers import assert_clean_failure, digest, run_cli

# Shared rank needed at tau = 0.95 per layer of all-MiniLM-L6-v2 (float32).
MINILM_RANK_095 = [130, 178, 182, 184, 165, 196]
# The bundled float16 sample's ranks: the same as float32's at tau = 0.95. Not a record of the
# code's own output: test_sample_ranks_equal_an_explicit_svd derives them from the weights.
SAMPLE_RANK_AT = [
    {"0.9": 91, "0.95": 130, "0.99": 210},
    {"0.9": 140, "0.95": 178, "0.99": 246},
    {"0.9": 142, "0.95": 182, "0.99": 250},
    {"0.9": 145, "0.95": 184, "0.99": 255},
    {"0.9": 124, "0.95": 165, "0.99": 241},
    {"0.9": 158, "0.95": 196, "0.99": 265},
]
LAYER_KEYS = {"module", "index", "heads", "head_dim", "d_model", "energy_query", "energy_key", "rank_at",
              "redundancy", "head_effective_rank"}


@pytest.fixture(scope="module")
def minilm(minilm_dir, tmp_path_factory):
    """(result, json) of `analyze <MiniLM> --json out.json`, run once; the input's sha256 is checked."""
    before = digest(minilm_dir)
    path = tmp_path_factory.mktemp("minilm") / "out.json"
    result = run_cli("analyze", minilm_dir, "--json", path)
    assert result.exit_code == 0, result.stderr
    assert digest(minilm_dir) == before, "analyze modified its input"
    return result, json.loads(path.read_text())


@pytest.fixture(scope="module")
def sample(sample_dir):
    """JSON of `analyze <sample> --json -` (stdout), run once."""
    result = run_cli("analyze", sample_dir, "--json", "-")
    assert result.exit_code == 0, result.stderr
    return result, json.loads(result.stdout)


def _check_layer_keys(data: dict) -> None:
    assert {"checkpoint", "architecture", "layers", "summary"} <= set(data)
    assert isinstance(data["checkpoint"], str) and isinstance(data["architecture"], str)
    for i, layer in enumerate(data["layers"]):
        assert LAYER_KEYS <= set(layer)
        assert layer["index"] == i
        width = layer["heads"] * layer["head_dim"]
        assert len(layer["energy_query"]) == len(layer["energy_key"]) == width
        assert all(isinstance(v, float) for v in layer["energy_query"])
        assert set(layer["rank_at"]) == set(layer["redundancy"]) == set(layer["head_effective_rank"])
        for tau, rank in layer["rank_at"].items():
            assert isinstance(rank, int) and 1 <= rank <= width
            assert layer["redundancy"][tau] == pytest.approx(1 - rank / width, abs=1e-6)
            assert len(layer["head_effective_rank"][tau]) == layer["heads"]
            assert all(1 <= r <= layer["head_dim"] for r in layer["head_effective_rank"][tau])


# --------------------------------------------------------------------------- the real MiniLM

def test_minilm_layers_and_ranks(minilm, minilm_dir):
    result, data = minilm
    assert data["checkpoint"] == str(minilm_dir)
    assert data["architecture"] == "bert"
    assert len(data["layers"]) == 6
    assert [la["module"] for la in data["layers"]] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    for la in data["layers"]:
        assert (la["heads"], la["head_dim"], la["d_model"]) == (12, 32, 384)
    assert [la["rank_at"]["0.95"] for la in data["layers"]] == MINILM_RANK_095


def test_minilm_json_keys(minilm):
    _, data = minilm
    _check_layer_keys(data)
    assert set(data["layers"][0]["rank_at"]) == {"0.9", "0.95", "0.99"}
    summary = data["summary"]
    assert summary["layers"] == 6 and summary["total_width"] == 6 * 384
    assert summary["total_rank_at"]["0.95"] == sum(MINILM_RANK_095)


def test_minilm_curves_consistent_with_ranks(minilm):
    _, data = minilm
    for la in data["layers"]:
        for curve in (la["energy_query"], la["energy_key"]):
            assert all(b >= a for a, b in zip(curve, curve[1:]))
            assert curve[-1] == pytest.approx(1.0)
        for tau, rank in la["rank_at"].items():
            sides = [next(i + 1 for i, e in enumerate(c) if e >= float(tau) - 1e-12)
                     for c in (la["energy_query"], la["energy_key"])]
            assert rank == max(sides)
        # Real heads are redundant: far fewer than H*d = 384 directions carry 95 % of the energy.
        assert la["redundancy"]["0.95"] > 0.4


def test_minilm_table_on_stdout(minilm):
    result, _ = minilm
    assert "Head redundancy" in result.stdout
    assert "130" in result.stdout and "196" in result.stdout
    assert result.stderr == ""


# --------------------------------------------------------------------------- the bundled sample

def test_sample_json_stdout_only(sample, sample_dir):
    result, data = sample
    assert result.stdout.lstrip().startswith("{")  # nothing but JSON: json.loads above succeeded
    assert "Head redundancy" not in result.stdout
    assert data["checkpoint"] == str(sample_dir)
    _check_layer_keys(data)


def test_sample_ranks_match_full_model(sample):
    _, data = sample
    ranks = [la["rank_at"] for la in data["layers"]]
    assert ranks == SAMPLE_RANK_AT
    for got, expected in zip((r["0.95"] for r in ranks), MINILM_RANK_095, strict=True):
        assert abs(got - expected) <= 1


def test_sample_ranks_equal_an_explicit_svd(sample_dir):
    """SAMPLE_RANK_AT from the SPEC definition by another road: form P_Q = [P_1 ... P_H] and
    P_K = [P_1^T ... P_H^T] (D x H*D, which the code never forms); their squared singular values
    are the eigenvalues of P P^T (test_analysis checks the code's Gram route against svdvals)."""
    with safe_open(str(sample_dir / "model.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k).double() for k in f.keys()}
    expected = []
    for i in range(6):
        m = f"encoder.layer.{i}.attention.self"
        w_q = weights[f"{m}.query.weight"].unflatten(0, (12, 32))  # (H, d, D)
        w_k = weights[f"{m}.key.weight"].unflatten(0, (12, 32))
        p = w_q.transpose(1, 2) @ w_k  # (H, D, D): P_h = W_Q^h^T W_K^h
        energies = []
        for concat in (torch.cat(list(p), dim=1), torch.cat(list(p.transpose(1, 2)), dim=1)):  # (D, H*D)
            s2 = torch.linalg.eigvalsh(concat @ concat.T).flip(0).clamp_min(0)  # sigma^2, descending
            energies.append(torch.cumsum(s2, 0) / s2.sum())
        expected.append({tau: max(int((e < float(tau)).sum()) + 1 for e in energies) for tau in ("0.9", "0.95", "0.99")})
    assert expected == SAMPLE_RANK_AT


def test_sample_close_to_minilm(sample, minilm):
    """float16 sample vs float32 original: the same ranks within 1 and nearly the same curves."""
    _, half = sample
    _, full = minilm
    for a, b in zip(half["layers"], full["layers"], strict=True):
        for tau in b["rank_at"]:
            assert abs(a["rank_at"][tau] - b["rank_at"][tau]) <= 1
        assert max(abs(x - y) for x, y in zip(a["energy_query"], b["energy_query"])) < 1e-3


def test_bfloat16_copy_keeps_ranks(sample, sample_dir, cli, tmp_path):
    """Real weights: a bfloat16 copy of the float16 sample needs the same ranks within 1."""
    with safe_open(str(sample_dir / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(sample_dir / "config.json", tmp_path)
    result = cli("analyze", tmp_path, "--json", "-")
    assert result.exit_code == 0, result.stderr
    for a, b in zip(sample[1]["layers"], json.loads(result.stdout)["layers"], strict=True):
        for tau in a["rank_at"]:
            assert abs(a["rank_at"][tau] - b["rank_at"][tau]) <= 1, (a["module"], tau)
        assert max(abs(x - y) for x, y in zip(a["energy_query"], b["energy_query"])) < 1e-3


def test_energy_options(cli, sample_dir):
    result = cli("analyze", sample_dir, "--energy", "0.99", "--energy", "0.8", "--energy", "0.8", "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["energies"] == [0.8, 0.99]
    for la, expected in zip(data["layers"], SAMPLE_RANK_AT):
        assert set(la["rank_at"]) == {"0.8", "0.99"}
        assert la["rank_at"]["0.99"] == expected["0.99"]
        assert la["rank_at"]["0.8"] < expected["0.9"]


def test_json_file_and_table(cli, sample_dir, tmp_path):
    path = tmp_path / "a.json"
    before = digest(sample_dir)
    result = cli("analyze", sample_dir, "--json", path)
    assert result.exit_code == 0, result.stderr
    assert "Head redundancy" in result.stdout
    assert [la["rank_at"] for la in json.loads(path.read_text())["layers"]] == SAMPLE_RANK_AT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left
    assert digest(sample_dir) == before


def test_plot_writes_png(cli, sample_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "energy.png"
    result = cli("analyze", sample_dir, "--plot", png)
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("n_layers", [6, 30])
def test_energy_plot_tells_every_layer_apart_without_covering_the_curves(sample_dir, tmp_path, monkeypatch,
                                                                         n_layers):
    """A few layers: one colour each and a legend outside the axes; many (a 30-layer model): a
    colour per layer index from a colormap and a colorbar, no legend."""
    pytest.importorskip("matplotlib")
    import dataclasses

    import collabcompress.tables as tables
    from collabcompress.commands.analyze import AnalysisResult, analyze

    sample = analyze(sample_dir)
    layers = tuple(dataclasses.replace(la, spec=dataclasses.replace(la.spec, index=i))
                   for i, la in enumerate(sample.layers[i % len(sample.layers)] for i in range(n_layers)))
    figures = []
    monkeypatch.setattr(tables, "save_figure", lambda plt, fig, title, path: figures.append(fig))
    tables.plot_energy(AnalysisResult(sample.checkpoint, sample.architecture, layers, sample.energies),
                       tmp_path / "energy.png")
    (fig,) = figures
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                   for line in ax.get_lines() if line.get_linestyle() == "-"}
        assert len(colours) == n_layers
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    if n_layers <= 10:
        (legend,) = legends
        assert len(legend.get_texts()) == n_layers
        box, right = legend.get_window_extent(), max(ax.get_window_extent().x1 for ax in panels)
        assert box.x0 >= right  # beside the curves, not over them
    else:
        assert legends == [] and len(fig.axes) == 3  # the third: the colorbar
        assert "layer" in fig.axes[2].get_ylabel()


def test_plot_without_matplotlib(cli, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "energy.png"
    result = cli("analyze", sample_dir, "--plot", png)
    assert_clean_failure(result, 3, "matplotlib", "pip install")
    assert not png.exists()


def test_plot_without_matplotlib_names_the_extra(cli, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli("analyze", sample_dir, "--plot", tmp_path / "energy.png")
    assert result.exit_code == 3
    assert "collabcompress[plot]" in result.stderr


def test_path_with_brackets_is_reported_verbatim(cli, tmp_path):
    missing = tmp_path / "[/x]" / "weights"
    result = cli("analyze", missing)
    assert_clean_failure(result, 3, str(missing))


def test_real_process_error_is_clean(tmp_path):
    """A real process, not CliRunner: exit 3, one plain line on stderr, no traceback, nothing on
    stdout. (`archs`, which imports no torch, reaches the same error boundary as every command
    at a tenth of the CPU time of `analyze`.)"""
    out = tmp_path / "missing" / "archs.json"
    result = subprocess.run([sys.executable, "-m", "collabcompress.cli", "archs", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == \
        [f"error: cannot write JSON to {out}: {out.parent} is not a writable directory"]
    assert result.stdout == "" and not out.parent.exists()
