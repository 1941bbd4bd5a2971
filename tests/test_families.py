"""`analyze` on every architecture family's tiny checkpoint (SPEC.md section 6).

Each family is detected and analysed with the module list, head counts and widths that
tests/families.py records; the spectra are checked against ones computed here from q/k
blocks sliced independently of the library (the fused GPT-2 / timm layouts included);
rotary, grouped-query and q/k-norm checkpoints are refused with exit code 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


from families import FAMILIES, REFUSED, make_checkpoint
from helpers import assert_clean_failure, run_cli

ARCHS = sorted({f["arch"] for f in FAMILIES.values()})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every family and refused checkpoint, built once for the module."""
    root = tmp_path_factory.mktemp("families")
    return {name: make_checkpoint(name, root / name) for name in [*FAMILIES, *REFUSED]}


@pytest.fixture(scope="module")
def analysed(built, tmp_path_factory):
    """family -> the JSON of `analyze DIR --json FILE`, each family run once on demand."""
    out = tmp_path_factory.mktemp("analysed")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            path = out / f"{name}.json"
            result = run_cli("analyze", built[name], "--json", path)
            assert result.exit_code == 0, result.stderr
            cache[name] = json.loads(path.read_text())
        return cache[name]

    return get


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _own_query_key(name: str, directory: Path, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_Q, W_K) of one module in nn.Linear layout (H*d, D), sliced here from the raw tensors."""
    fused = FAMILIES[name]["fused"]
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor(entry["query"]).double()
        k = f.get_tensor(entry["key"]).double()
    width = entry["heads"] * entry["head_dim"]
    if fused == "conv1d":  # GPT-2 Conv1D: x @ W, W (D, 3*H*d), columns [q | k | v]
        return q[:, :width].T, q[:, width:2 * width].T
    if fused == "linear":  # timm: W x, W (3*H*d, D), rows [q | k | v]
        return q[:width], q[width:2 * width]
    return q, k


def _explicit_spectra(w_q: torch.Tensor, w_k: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of P_Q = [P_1 ... P_H] and P_K = [P_1^T ... P_H^T], built densely."""
    d = w_q.shape[0] // n_head
    p = [w_q[h * d:(h + 1) * d].T @ w_k[h * d:(h + 1) * d] for h in range(n_head)]  # H x (D, D)
    return torch.linalg.svdvals(torch.cat(p, dim=1)), torch.linalg.svdvals(torch.cat([x.T for x in p], dim=1))


def _energy(sv: torch.Tensor, width: int) -> torch.Tensor:
    power = sv.double() ** 2
    power = torch.cat([power, power.new_zeros(max(0, width - power.numel()))])[:width]
    return power.cumsum(0) / power.sum()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_detected_and_analysed(analysed, name):
    facts = FAMILIES[name]
    data = analysed(name)
    assert data["architecture"] == facts["arch"]
    layers = data["layers"]
    assert [la["module"] for la in layers] == [m["module"] for m in facts["modules"]]
    assert [la["index"] for la in layers] == list(range(facts["n_modules"]))
    for la, m in zip(layers, facts["modules"]):
        width = m["heads"] * m["head_dim"]
        assert (la["heads"], la["head_dim"], la["d_model"]) == (m["heads"], m["head_dim"], facts["d_model"])
        assert len(la["energy_query"]) == len(la["energy_key"]) == width
        for curve in (la["energy_query"], la["energy_key"]):
            assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
            assert curve[-1] == pytest.approx(1.0)
        assert set(la["rank_at"]) == {"0.9", "0.95", "0.99"}
        for tau, rank in la["rank_at"].items():
            # P_Q is D x H*D with rank <= min(D, H*d): the rank needed cannot exceed that.
            assert 1 <= rank <= min(facts["d_model"], width)
            assert la["redundancy"][tau] == pytest.approx(1 - rank / width, abs=1e-6)
            heads = la["head_effective_rank"][tau]
            assert len(heads) == m["heads"] and all(1 <= r <= m["head_dim"] for r in heads)
        assert la["rank_at"]["0.9"] <= la["rank_at"]["0.95"] <= la["rank_at"]["0.99"]
    assert data["summary"]["layers"] == facts["n_modules"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_spectrum_matches_independent_slicing(built, analysed, name):
    """Energy curves and ranks equal those of P_Q / P_K built densely from q/k blocks sliced here."""
    from collabcompress.commands.analyze import analyze

    data = analysed(name)
    api = analyze(built[name])
    for la, layer, entry in zip(data["layers"], api.layers, FAMILIES[name]["modules"]):
        w_q, w_k = _own_query_key(name, built[name], entry)
        width = w_q.shape[0]
        sv_q, sv_k = _explicit_spectra(w_q, w_k, entry["heads"])
        n = min(width, sv_q.numel())
        scale = float(sv_q[0])
        assert torch.allclose(layer.spectrum.sv_query[:n], sv_q[:n], rtol=1e-6, atol=1e-9 * scale)
        assert torch.allclose(layer.spectrum.sv_key[:n], sv_k[:n], rtol=1e-6, atol=1e-9 * scale)
        for side, sv in (("energy_query", sv_q), ("energy_key", sv_k)):
            assert torch.allclose(torch.tensor(la[side], dtype=torch.float64), _energy(sv, width), atol=1e-7)
        for tau, rank in la["rank_at"].items():
            needed = max(int((_energy(sv, width) < float(tau) - 1e-12).sum()) + 1 for sv in (sv_q, sv_k))
            assert rank == needed, (tau, rank, needed)


@pytest.mark.parametrize("name", ["gpt2", "timm-vit"])
def test_fused_slicing_is_discriminating(built, name):
    """Taking the key from the value block gives another spectrum: the check above could fail."""
    from collabcompress.commands.analyze import analyze

    entry = FAMILIES[name]["modules"][0]
    w_q, _ = _own_query_key(name, built[name], entry)
    width = w_q.shape[0]
    fused = _tensors(built[name])[entry["query"]].double()
    w_v = fused[:, 2 * width:].T if FAMILIES[name]["fused"] == "conv1d" else fused[2 * width:]
    wrong, _ = _explicit_spectra(w_q, w_v, entry["heads"])
    got = analyze(built[name]).layers[0].spectrum.sv_query[: wrong.numel()]
    assert not torch.allclose(got, wrong[: got.numel()], rtol=1e-3)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_exit_4(built, cli, name):
    result = cli("analyze", built[name])
    assert_clean_failure(result, 4, REFUSED[name])


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_even_with_arch_and_heads(built, cli, name):
    """An override does not bypass the refusal."""
    result = cli("analyze", built[name], "--arch", "bart", "--heads", "4")
    assert_clean_failure(result, 4, REFUSED[name])


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "timm-vit", "t5", "bart"])
def test_arch_override_matching_detection(built, analysed, cli, tmp_path, name):
    path = tmp_path / "out.json"
    result = cli("analyze", built[name], "--arch", FAMILIES[name]["arch"], "--json", path)
    assert result.exit_code == 0, result.stderr
    assert json.loads(path.read_text()) == analysed(name)


def test_arch_override_picks_among_families(built, cli, tmp_path):
    """A file holding BERT and GPT-2 attention: detection takes one family, --arch the other."""
    tensors = {**_tensors(built["bert"]), **_tensors(built["gpt2"])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((built["bert"] / "config.json").read_text())
    picked = {}
    for arch in ("bert", "gpt2"):
        result = cli("analyze", tmp_path, "--arch", arch, "--json", "-")
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        picked[arch] = data
        assert data["architecture"] == arch
        assert [la["module"] for la in data["layers"]] == [m["module"] for m in FAMILIES[arch]["modules"]]
    # The gpt2 layers equal those of the gpt2 checkpoint on its own.
    alone = json.loads(cli("analyze", built["gpt2"], "--json", "-").stdout)
    assert [la["rank_at"] for la in picked["gpt2"]["layers"]] == [la["rank_at"] for la in alone["layers"]]
    assert [la["energy_query"] for la in picked["gpt2"]["layers"]] == [la["energy_query"] for la in alone["layers"]]


def test_arch_override_with_no_such_tensors(built, cli):
    result = cli("analyze", built["bert"], "--arch", "gpt2")
    assert_clean_failure(result, 3, "gpt2", "--arch")


def test_unknown_arch(built, cli):
    result = cli("analyze", built["bert"], "--arch", "nosuchfamily")
    msg = assert_clean_failure(result, 3, "nosuchfamily")
    for arch in ARCHS:
        assert arch in msg


def test_heads_override_without_config(tmp_path, analysed, cli):
    """--heads stands in for config.json and gives the same analysis."""
    directory = make_checkpoint("bert", tmp_path / "bert", with_config=False)
    result = cli("analyze", directory, "--heads", "4", "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["layers"] == analysed("bert")["layers"]


def test_timm_without_config_needs_heads(tmp_path, cli):
    directory = make_checkpoint("timm-vit", tmp_path / "timm", with_config=False)
    assert_clean_failure(cli("analyze", directory), 3, "--heads")
    result = cli("analyze", directory, "--heads", "4", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "timm-vit"


def test_archs_lists_every_family(cli):
    result = cli("archs")
    assert result.exit_code == 0, result.stderr
    for arch in ARCHS:
        assert arch in result.stdout
    for word in ("rotary", "grouped", "norm"):
        assert word in result.stdout.lower()


def test_archs_json_stdout(cli):
    result = cli("archs", "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert {row["family"] for row in data["families"]} == set(ARCHS) | {"llama", "mistral", "qwen2"}
    for row in data["families"]:
        assert row["query_key_tensors"] and row["models"]
    refused = " ".join(data["refused"]).lower()
    for word in ("rotary", "grouped", "norm"):
        assert word in refused
