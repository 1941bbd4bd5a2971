"""calibrate and evaluate for causal LMs (rotary decoders), and the quality of shared rotary keys.

Tiny random llama and qwen2 checkpoints (tests/families.py, 64-token character tokenizer)
check what calibrate records (moments of the attention input, query energies per head and
frequency, measured here directly from the model) and what evaluate reports (perplexity,
next-token agreement, KL, greedy generation) against models built in memory. One real
SmolLM2-135M-Instruct run checks the whole path calibrate -> compress -> evaluate.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from collabcompress.calibration import STATS_FORMAT, calibrate  # noqa: E402
from collabcompress.lm import join_documents, leading_ids, token_windows  # noqa: E402
from collabcompress.rotary import query_energy  # noqa: E402

from families import ROTARY  # noqa: E402

TEXTS = [
    "the national executive met last night and appointed an interim leader.",
    "heavy rain caused flooding across the north of the country on monday.",
    "the central bank raised interest rates by a quarter of a point.",
    "scientists said the new vaccine could be ready within two years.",
    "the match ended in a draw after a late goal from the visitors.",
    "shares in the mining company fell sharply after the report.",
] * 3


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _direct_statistics(model_dir: Path, max_tokens: int, window: int) -> dict[str, dict[str, torch.Tensor]]:
    """Moments of each layer's attention input and E|q_{h,j}|^2, measured without calibrate's hooks:
    input_layernorm of the hidden states entering the layer, then q_proj, pairs (j, j + d/2)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    ids, _ = leading_ids(tok, TEXTS, max_tokens)
    xs = {i: [] for i in range(len(model.layers))}
    with torch.no_grad():
        for w in token_windows(ids, max_tokens=max_tokens, window=window):
            hidden = model(input_ids=w[None], output_hidden_states=True).hidden_states  # layers + 1 x (1, T, D)
            for i, layer in enumerate(model.layers):
                xs[i].append(layer.input_layernorm(hidden[i])[0].double())  # (T, D)
    out = {}
    for i, layer in enumerate(model.layers):
        x = torch.cat(xs[i])  # (N, D)
        attn = layer.self_attn
        head_dim = attn.head_dim
        q = attn.q_proj.double()(x).view(x.shape[0], -1, head_dim)  # (N, H, d)
        energy = (q[..., : head_dim // 2].square() + q[..., head_dim // 2:].square()).mean(0)  # (H, d/2)
        out[f"model.layers.{i}.self_attn"] = {"second_moment": x.T @ x / x.shape[0], "mean": x.mean(0),
                                              "query_energy": energy, "tokens": x.shape[0]}
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_calibrate_records_moments_and_query_energies(name, rotary_checkpoints, texts_file, tmp_path):
    model_dir = rotary_checkpoints[name]
    out = tmp_path / "stats.safetensors"
    summary = calibrate(model_dir, texts_file, out, max_tokens=300, max_length=64)
    assert summary["tokens"] == 300 and summary["windows"] == 5 and summary["max_length"] == 64
    # the shortest prefix of the texts that gives 300 tokens
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    n_tokens = [len(tok(join_documents(TEXTS[:n]), add_special_tokens=False)["input_ids"]) for n in (summary["texts"] - 1,
                                                                                                      summary["texts"])]
    assert n_tokens[0] < 300 <= n_tokens[1]
    direct = _direct_statistics(model_dir, 300, 64)
    facts = ROTARY[name]
    half = facts["head_dim"] // 2
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == STATS_FORMAT and f.metadata()["architecture"] == facts["model_type"]
        for module, want in direct.items():
            assert want["tokens"] == 300
            energy = f.get_tensor(f"{module}.query_energy")
            assert energy.dtype == torch.float64 and energy.shape == (facts["n_head"], half)
            second, mean = f.get_tensor(f"{module}.second_moment"), f.get_tensor(f"{module}.mean")
            torch.testing.assert_close(second, want["second_moment"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mean, want["mean"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(energy, want["query_energy"], rtol=1e-5, atol=1e-6)
            # the energy is fixed by the moments: E|a.x + a0|^2 (rotary.query_energy)
            state = transformers.AutoModel.from_pretrained(str(model_dir)).state_dict()
            attn = module.removeprefix("model.")
            bias = state.get(f"{attn}.q_proj.bias")
            from_moments = query_energy(state[f"{attn}.q_proj.weight"], bias, facts["n_head"], facts["head_dim"],
                                        second, mean)
            torch.testing.assert_close(energy, from_moments, rtol=1e-6, atol=1e-8)


def test_calibrate_causal_default_window_and_cli(rotary_checkpoints, texts_file, tmp_path, cli):
    out = tmp_path / "stats.safetensors"
    result = cli("calibrate", rotary_checkpoints["llama"], "--texts", texts_file, "--out", out, "--max-tokens", "200",
                 "--keep-sequences", "2", "--json", "-")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    # POSITIONS = 64 caps the default 512-token window of a causal LM
    assert summary["max_length"] == 64 and summary["tokens"] == 200 and summary["windows"] == 4
    assert summary["kept_sequences"] == 2
    with safe_open(str(out), "pt") as f:
        seqs, lengths = f.get_tensor("model.layers.1.self_attn.sequences"), f.get_tensor("model.layers.1.self_attn.lengths")
        assert seqs.shape == (2, 64, ROTARY["llama"]["d_model"]) and lengths.tolist() == [64, 64]


def test_calibrated_rotary_compress_takes_the_statistics(rotary_checkpoints, texts_file, tmp_path):
    from collabcompress.compress import CompressOptions, compress

    stats = tmp_path / "stats.safetensors"
    calibrate(rotary_checkpoints["qwen2"], texts_file, stats, max_tokens=400)
    manifest = compress(rotary_checkpoints["qwen2"], tmp_path / "out", CompressOptions(rank=8, calibration=str(stats)))
    assert manifest["settings"]["calibration"] is not None
    assert [layer["shared_dim"] for layer in manifest["layers"]] == [8, 8]
