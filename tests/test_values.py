"""Shared values: the maths of the fit, the statistics calibrate records, compress's options,
tensors and manifest, the kv budget, verify and healing (docs/method.md, "Shared values")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from collabcompress.maths.values import (output_weights, value_factors, value_moment, value_rank_at,
                                         value_spectrum)
from families import make_rotary_checkpoint, quiet_transformers
from helpers import assert_clean_failure, run_cli, stored_shapes

TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. " * 6).strip()


# --------------------------------------------------------------------------- the fit


def _layer(seed: int = 0, groups: int = 3, head_dim: int = 8, d_model: int = 40, heads: int = 6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups * head_dim, d_model, generator=g, dtype=torch.float64)
    b = torch.randn(groups * head_dim, generator=g, dtype=torch.float64)
    w_out = torch.randn(30, heads * head_dim, generator=g, dtype=torch.float64)
    z = torch.randn(500, d_model, generator=g, dtype=torch.float64) @ torch.randn(d_model, d_model, generator=g,
                                                                                   dtype=torch.float64) / 6
    moment = value_moment(z.T @ z / 500 * heads, z.mean(0) * heads, heads, bias=True)
    return w, b, output_weights(w_out, heads, groups, head_dim), moment, z


@pytest.mark.parametrize("weighted, whitened", [(False, False), (True, False), (True, True)])
def test_full_width_is_exact(weighted, whitened):
    w, b, weights, moment, z = _layer()
    f = value_factors(w, b, w.shape[0], out_weights=weights if weighted else None, n_kv_head=3, head_dim=8,
                      moment=moment if whitened else None)
    v, latent = z @ w.T + b, z @ f.down.T + f.down_bias
    assert torch.allclose(latent @ f.up.T, v, atol=1e-9)
    assert f.relative_error < 1e-7 and f.energy == pytest.approx(1.0)


def test_a_latent_wider_than_the_input_is_exact():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 10, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    f = value_factors(w, b, 24, n_kv_head=3, head_dim=8)
    x = torch.randn(7, 10, generator=g, dtype=torch.float64)
    assert f.down.shape == (24, 10) and f.up.shape == (24, 24)
    assert torch.allclose((x @ f.down.T + f.down_bias) @ f.up.T, x @ w.T + b, atol=1e-9)


def test_error_falls_with_the_width_and_matches_the_spectrum():
    w, b, weights, moment, _ = _layer(seed=1)
    errors = [value_factors(w, b, r, out_weights=weights, n_kv_head=3, head_dim=8, moment=moment).relative_error
              for r in range(1, 25)]
    assert all(a >= c - 1e-12 for a, c in zip(errors, errors[1:])) and errors[-1] < 1e-7
    sv = value_spectrum(w, b, weights, 3, 8, moment)
    energy = sv.square().cumsum(0) / sv.square().sum()
    assert errors[9] == pytest.approx(float(1 - energy[9]) ** 0.5, abs=1e-9)
    assert value_rank_at(sv, float(energy[9]) - 1e-9) == 10


def test_whitening_beats_plain_svd_on_its_own_metric():
    """The whitened fit is the best rank-r fit in the whitened, weighted metric (an SVD)."""
    w, b, weights, moment, z = _layer(seed=2)
    zz = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)

    def seen(f):  # the output-weighted error on the data the moment came from
        diff = (zz @ torch.cat([w, b[:, None]], 1).T - (z @ f.down.T + f.down_bias) @ f.up.T).reshape(-1, 3, 8)
        return float(torch.einsum("gij,ngj->ngi", weights, diff).square().sum())

    whitened = value_factors(w, b, 8, out_weights=weights, n_kv_head=3, head_dim=8, moment=moment)
    plain = value_factors(w, b, 8, out_weights=weights, n_kv_head=3, head_dim=8)
    assert seen(whitened) < seen(plain)


def test_bad_widths_are_refused():
    w, b, *_ = _layer()
    for r in (0, 25):
        with pytest.raises(ValueError, match="value rank"):
            value_factors(w, b, r, n_kv_head=3, head_dim=8)


# --------------------------------------------------------------------------- calibrate, compress, verify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny rotary decoder with a tokenizer, a text file and calibration statistics (2 kept windows)."""
    root = tmp_path_factory.mktemp("values")
    model = make_rotary_checkpoint("qwen2", root / "model")  # value biases: the augmented fit
    texts = root / "texts.txt"
    texts.write_text("\n".join([TEXT] * 4), encoding="utf-8")
    stats = root / "stats.safetensors"
    result = run_cli("calibrate", model, "--texts", texts, "--out", stats, "--max-length", 32,
                     "--max-tokens", 256, "--keep-sequences", 3)
    assert result.exit_code == 0, result.stderr
    return {"model": model, "texts": texts, "stats": stats, "root": root}


def test_calibrate_records_the_attention_weighted_input_moments(tiny):
    """value_second_moment is E[sum_h z_h z_h^T], z_h = sum_s p_hs y_s, with the model's own weights."""
    from transformers import AutoModelForCausalLM

    from collabcompress.commands.calibrate import causal_windows
    from collabcompress.files.texts import load_tokenizer

    tokenizer = load_tokenizer([tiny["model"]])
    batches, _ = causal_windows(tokenizer, [TEXT] * 4, 256, 32, 16)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(tiny["model"], attn_implementation="eager").eval()
    inputs = {}
    layer = model.model.layers[1].self_attn
    handle = layer.q_proj.register_forward_pre_hook(lambda _m, args: inputs.__setitem__("x", args[0]))
    second, total, count = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for _, ids, _mask in batches:
                probs = model(input_ids=ids, output_attentions=True).attentions[1].double()  # (B, H, T, T)
                z = probs @ inputs["x"].double()[:, None]  # (B, H, T, D)
                second = second + torch.einsum("bhti,bhtj->ij", z, z)
                total = total + z.sum((0, 1, 2))
                count += ids.numel()
    finally:
        handle.remove()
    with safe_open(str(tiny["stats"]), framework="pt") as f:
        got_second = f.get_tensor("model.layers.1.self_attn.value_second_moment")
        got_mean = f.get_tensor("model.layers.1.self_attn.value_mean")
    assert torch.allclose(got_second, second / count, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got_mean, total / count, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def halves(tiny):
    """Keys at half width and values at half width, calibrated."""
    out = tiny["root"] / "half"
    result = run_cli("compress", tiny["model"], "--out", out, "--rank", 8, "--value-rank", 8,
                     "--calibration", tiny["stats"], "--json", tiny["root"] / "half.json")
    assert result.exit_code == 0, result.stderr
    return out


def test_tensors_and_manifest(tiny, halves):
    shapes = stored_shapes(halves)
    manifest = json.loads((halves / "collab_manifest.json").read_text())
    layer = manifest["layers"][0]
    m = layer["module"]
    assert shapes[f"{m}.collab_value.weight"] == (8, 32) and shapes[f"{m}.collab_value.bias"] == (8,)
    assert shapes[f"{m}.collab_value_up.weight"] == (2 * 8, 8)
    assert f"{m}.v_proj.weight" not in shapes and f"{m}.v_proj.bias" not in shapes
    assert layer["value_rank"] == 8 and layer["value"]["tensors"]["up"] == f"{m}.collab_value_up.weight"
    assert f"{m}.v_proj.weight" in layer["removed"]
    assert manifest["settings"]["value_rank"] == 8 and manifest["settings"]["budget_of"] == "keys"
    config = json.loads((halves / "config.json").read_text())
    assert config["collaborative_attention"]["layers"][m]["value_rank"] == 8


def test_keys_only_manifests_carry_no_value_keys(tiny, tmp_path):
    out = tmp_path / "keys"
    assert run_cli("compress", tiny["model"], "--out", out, "--rank", 8, "--calibration", tiny["stats"]).exit_code == 0
    manifest = json.loads((out / "collab_manifest.json").read_text())
    assert "value_rank" not in manifest["layers"][0] and "value_rank" not in manifest["settings"]


def test_values_only_keep_the_keys_exact_and_the_model_runs(tiny, tmp_path):
    from collabcompress import hf

    out = tmp_path / "values"
    result = run_cli("compress", tiny["model"], "--out", out, "--value-rank", 16, "--calibration", tiny["stats"])
    assert result.exit_code == 0, result.stderr
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(0))
    with quiet_transformers(), torch.no_grad():
        original = hf.load_model(tiny["model"]).eval()(input_ids=ids).logits
        compressed = hf.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.allclose(original, compressed, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_equals_the_cache_free_forward(halves, attn):
    from collabcompress import hf

    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    with quiet_transformers(), torch.no_grad():
        model = hf.from_pretrained(halves, attn_implementation=attn).eval()
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
        layer = out.past_key_values.layers[0]
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-4)
    assert layer.values.shape[1] == 1 and layer.values.shape[-1] == 8  # one latent of r_v reals per token


def test_verify_reports_the_value_error(tiny, halves, tmp_path):
    result = run_cli("verify", halves, "--json", "-")
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    assert 0 < got["layers"][0]["relative_value_error"] < 1 and got["layers"][0]["value_rank"] == 8
    full = tmp_path / "full"
    assert run_cli("compress", tiny["model"], "--out", full, "--rank", 16, "--value-rank", 16,
                   "--calibration", tiny["stats"]).exit_code == 0
    exact = json.loads(run_cli("verify", full, "--json", "-").stdout)
    assert exact["overall"]["relative_value_error"] < 1e-5


def test_kv_budget_allocates_keys_and_values_together(tiny, tmp_path):
    out = tmp_path / "kv"
    result = run_cli("compress", tiny["model"], "--out", out, "--budget", 0.5, "--budget-of", "kv",
                     "--calibration", tiny["stats"], "--json", tmp_path / "kv.json")
    assert result.exit_code == 0, result.stderr
    layers = json.loads((tmp_path / "kv.json").read_text())["layers"]
    total = sum(la["shared_dim"] + la["value_rank"] for la in layers)
    assert total <= 0.5 * len(layers) * (16 + 16)
    for la in layers:
        allocation = la["value"]["allocation"]
        assert allocation["loss"] == "next_token_kl" and str(la["value_rank"]) in allocation["losses"]
        assert allocation["losses"]["16"] == 0.0


def test_healing_trains_the_value_tensors(halves):
    from collabcompress import hf
    from collabcompress.runtime.heal import trainable

    with quiet_transformers():
        names = set(trainable(hf.from_pretrained(halves)))
    assert any(n.endswith("collab_value.weight") for n in names)
    assert any(n.endswith("collab_value_up.weight") for n in names)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("args, words", [
    (["--value-rank", 0], ["--value-rank must be at least 1"]),
    (["--value-rank", 17], ["--value-rank 17", "G*d = 16"]),
    (["--value-rank", 8, "--value-energy", 0.9], ["at most one of --value-rank and --value-energy"]),
    (["--value-energy", 1.5], ["--value-energy must be in (0, 1]"]),
    (["--rank", 8, "--budget-of", "kv"], ["--budget-of kv goes with --budget"]),
    (["--budget", 0.5, "--budget-of", "kv", "--value-rank", 8], ["drop --value-rank"]),
])
def test_bad_value_options(tiny, tmp_path, args, words):
    out = tmp_path / "out"
    result = run_cli("compress", tiny["model"], "--out", out, *args, "--calibration", tiny["stats"])
    assert_clean_failure(result, 3, *words)
    assert not out.exists()


def test_causal_lm_values_need_statistics_unless_forced(tiny, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("compress", tiny["model"], "--out", out, "--value-rank", 8), 3,
                         "--calibration", "--force-data-free")
    assert not out.exists()
    result = run_cli("compress", tiny["model"], "--out", out, "--value-rank", 8, "--force-data-free")
    assert result.exit_code == 0, result.stderr


def test_statistics_without_value_moments_are_refused(tiny, tmp_path):
    with safe_open(str(tiny["stats"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".value_" not in k}
        meta = f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("compress", tiny["model"], "--out", out, "--value-rank", 8, "--calibration", old),
                         3, "no value moments", "calibrate")
    assert not out.exists()


def test_a_manifest_whose_value_rank_was_edited_is_refused(tiny, halves, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(halves, edited)
    path = edited / "collab_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["value_rank"] = 4
    path.write_text(json.dumps(manifest))
    assert_clean_failure(run_cli("report", edited), 3, "collab_value")


def test_kv_budget_needs_a_causal_lm(tmp_path):
    from families import make_checkpoint

    model = make_checkpoint("bert", tmp_path / "bert")
    out = tmp_path / "out"
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"")  # never read: the refusal comes first
    assert_clean_failure(run_cli("compress", model, "--out", out, "--budget", 0.5, "--budget-of", "kv",
                                 "--calibration", stats), 3, "--budget-of kv", "causal LM")
    assert not out.exists()


def test_a_narrow_latent_is_absorbed_into_the_output_projection(halves, monkeypatch):
    """r_v (D - d) < D d: o_proj takes each head's weighted latent through W_O,h B_g, the same numbers."""
    from collabcompress import hf
    from collabcompress.maths.costs import output_absorbed, value_proj_flops

    ids = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(2))
    with quiet_transformers(), torch.no_grad():
        model = hf.from_pretrained(halves).eval()
        attention = next(m for m in model.modules() if hasattr(m, "_absorbs"))
        assert attention._absorbs() and output_absorbed(32, 8, 8) and not output_absorbed(32, 8, 16)
        absorbed = model(input_ids=ids).logits
        monkeypatch.setattr(type(attention), "_absorbs", lambda self: False)
        lifted = model(input_ids=ids).logits
    assert torch.allclose(absorbed, lifted, atol=1e-5)
    # the cost model counts what runs: the absorbed output projection where it is cheaper
    assert value_proj_flops(32, 4, 2, 8, 8, absorbed=True) < value_proj_flops(32, 4, 2, 8, 8)
