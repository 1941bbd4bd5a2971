"""--budget: the allocation (exact knapsack), the ladder, the rotary attention KL, and compress end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from collabcompress.maths.budget import allocate, rank_ladder
from collabcompress.maths.refine import RotaryKL, refine_rotary, rotary_collab_logits, rotary_original_logits
from collabcompress.maths.rotary import rotary_factors, rotary_scores
from helpers import budget_losses


def test_ladder_steps_and_ends():
    assert rank_ladder(384, 8) == list(range(24, 385, 24))
    assert rank_ladder(192, 8, even=True) == list(range(16, 193, 16))
    assert rank_ladder(12, 8) == [8, 12]
    assert all(r % 2 == 0 for r in rank_ladder(30, 3, even=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocate_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    ladder = [8, 16, 24, 32]
    curves = [{r: float(torch.rand(1, generator=g)) * (40 - r) for r in ladder} for _ in range(4)]
    for total in (32, 50, 80, 128):
        ranks = allocate(curves, total)
        best = min(sum(c[r] for c, r in zip(curves, pick))
                   for pick in itertools.product(ladder, repeat=4) if sum(pick) <= total)
        assert sum(ranks) <= total
        assert math.isclose(sum(c[r] for c, r in zip(curves, ranks)), best, rel_tol=1e-12)


def test_allocate_gives_the_budget_where_the_loss_falls_most():
    flat = {8: 1.0, 16: 0.99, 32: 0.98}
    steep = {8: 5.0, 16: 1.0, 32: 0.0}
    assert allocate([flat, steep], 40) == [8, 32]
    assert allocate([steep, flat], 40) == [32, 8]


def test_allocate_refuses_a_budget_below_the_smallest_candidates():
    with pytest.raises(ValueError, match="below"):
        allocate([{8: 1.0}, {8: 1.0}], 15)


def _rotary_layer(seed=0, n_head=4, n_kv_head=2, head_dim=8, d_model=12, bias=True):
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(n_head * head_dim, d_model, generator=g)
    w_k = torch.randn(n_kv_head * head_dim, d_model, generator=g)
    b_q = torch.randn(n_head * head_dim, generator=g) if bias else None
    b_k = torch.randn(n_kv_head * head_dim, generator=g) if bias else None
    theta = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    x = torch.randn(3, 10, d_model, generator=g)
    return w_q, b_q, w_k, b_k, theta, x


@pytest.mark.parametrize("bias", [False, True])
def test_rotary_logits_match_the_float64_reference(bias):
    w_q, b_q, w_k, b_k, theta, x = _rotary_layer(bias=bias)
    rows = torch.arange(10).expand(3, 10)
    ref = rotary_scores(x, x, w_q, b_q, None, n_head=4, head_dim=8, theta=theta, positions=torch.arange(10),
                        w_key=w_k, b_key=b_k, n_kv_head=2)
    got = rotary_original_logits(x, rows, w_q, b_q, w_k, b_k, 4, 2, 8, theta.float(), 8 ** -0.5)
    assert torch.allclose(got.double(), ref, atol=1e-4)
    f = rotary_factors(w_k, b_k, 2, 8, 10)
    ref = rotary_scores(x, x, w_q, b_q, f, n_head=4, head_dim=8, theta=theta, positions=torch.arange(10))
    got = rotary_collab_logits(x, rows, w_q, b_q, f.key.float(), None if f.key_bias is None else f.key_bias.float(),
                               f.freq, f.mixing.float(), 4, 8, theta.float(), 8 ** -0.5)
    assert torch.allclose(got.double(), ref, atol=1e-4)


def test_rotary_kl_is_zero_at_full_rank_and_falls_with_rank():
    w_q, b_q, w_k, b_k, theta, x = _rotary_layer()
    kl = RotaryKL(x, torch.tensor([10, 7, 4]), w_q, b_q, w_k, b_k, 4, 2, 8, theta, 8 ** -0.5, query_rows=6)
    losses = []
    for r in (4, 8, 16):
        f = rotary_factors(w_k, b_k, 2, 8, r)
        losses.append(kl(f.key, f.key_bias, f.freq, f.mixing))
    assert losses[-1] < 1e-6
    assert losses[0] > losses[1] > losses[2]


def test_refine_rotary_lowers_the_kl_and_is_seeded():
    w_q, b_q, w_k, b_k, theta, x = _rotary_layer(seed=3)
    kl = RotaryKL(x, torch.tensor([10, 10, 10]), w_q, b_q, w_k, b_k, 4, 2, 8, theta, 8 ** -0.5)
    f = rotary_factors(w_k, b_k, 2, 8, 6)
    a = refine_rotary(kl, f.key, f.key_bias, f.freq, f.mixing, steps=30, seed=5)
    b = refine_rotary(kl, f.key, f.key_bias, f.freq, f.mixing, steps=30, seed=5)
    assert a.kl_after < a.kl_before
    assert torch.equal(a.key, b.key) and torch.equal(a.mixing, b.mixing) and torch.equal(a.key_bias, b.key_bias)
    assert a.key.shape == f.key.shape and a.mixing.shape == f.mixing.shape


# --------------------------------------------------------------------------- compress --budget, tiny models

@pytest.fixture(scope="module")
def tiny_llama_stats(rotary_stats):
    return rotary_stats("qwen2")


def test_budget_allocates_and_records_the_curves(tiny_llama_stats, tmp_path):
    from collabcompress.commands.compress import CompressOptions, compress

    model, stats = tiny_llama_stats
    manifest = compress(model, tmp_path / "o", CompressOptions(budget=0.5, calibration=str(stats)))
    for layer, losses in budget_losses(manifest, 0.5):
        assert layer["shared_dim"] in losses
        assert layer["allocation"]["chosen_loss"] == losses[layer["shared_dim"]]
        assert abs(losses[max(losses)]) < 1e-6  # the full key cache is the original layer
    assert manifest["settings"]["budget"] == 0.5


def test_without_budget_the_manifest_has_no_new_keys(tiny_llama_stats, tmp_path):
    from collabcompress.commands.compress import CompressOptions, compress

    model, stats = tiny_llama_stats
    manifest = compress(model, tmp_path / "o", CompressOptions(rank=8, calibration=str(stats)))
    assert not {"budget", "heal_steps", "heal_dtype"} & set(manifest["settings"])
    assert all("allocation" not in layer for layer in manifest["layers"])


def test_rotary_refine_steps_lower_the_recorded_kl(tiny_llama_stats, tmp_path):
    from collabcompress.commands.compress import CompressOptions, compress

    model, stats = tiny_llama_stats
    manifest = compress(model, tmp_path / "o", CompressOptions(rank=8, calibration=str(stats), refine_steps=10))
    for layer in manifest["layers"]:
        assert layer["refine"]["steps"] == 10
        assert layer["refine"]["kl_after"] <= layer["refine"]["kl_before"]
    again = compress(model, tmp_path / "p", CompressOptions(rank=8, calibration=str(stats), refine_steps=10))
    assert [o["sha256"] for o in manifest["outputs"] if o["name"] == "model.safetensors"] == \
        [o["sha256"] for o in again["outputs"] if o["name"] == "model.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.5"], "--budget allocates by the loss measured"),
    (["--budget", "0.5", "--rank", "8"], "exactly one of --rank and --energy"),
    (["--budget", "1.5", "--calibration", "STATS"], "--budget must be in (0, 1]"),
    (["--budget", "0.01", "--calibration", "STATS"], "--budget 0.01: the budget"),
])
def test_budget_bad_input_exits_3(tiny_llama_stats, tmp_path, cli, args, message):
    model, stats = tiny_llama_stats
    args = [str(stats) if a == "STATS" else a for a in args]
    result = cli("compress", model, "--out", tmp_path / "o", *args)
    assert result.exit_code == 3, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_heal_dtype_reaches_the_manifest_and_a_wrong_one_is_refused(tiny_llama_stats, tmp_path, cli):
    import json

    model, stats = tiny_llama_stats
    base = ["compress", model, "--rank", "4", "--calibration", stats, "--heal-steps", "1"]
    result = cli(*base, "--out", tmp_path / "o", "--heal-dtype", "float32", "--json", "-")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["settings"]["heal_dtype"] == manifest["heal"]["dtype"] == "float32"
    result = cli(*base, "--out", tmp_path / "p", "--heal-dtype", "float16")
    assert result.exit_code == 2 and "float16" in result.stderr and not (tmp_path / "p").exists()


def test_budget_without_kept_sequences_exits_3(rotary_checkpoints, tiny_llama_stats, tmp_path, cli):
    from collabcompress.commands.calibrate import calibrate

    texts = tiny_llama_stats[1].parent / "texts.txt"  # the lines the shared statistics were made from
    calibrate(rotary_checkpoints["llama"], texts, tmp_path / "s.safetensors", max_tokens=200, max_length=64)
    result = cli("compress", rotary_checkpoints["llama"], "--out", tmp_path / "o", "--budget", "0.5",
                 "--calibration", tmp_path / "s.safetensors")
    assert result.exit_code == 3 and "--keep-sequences" in result.stderr


# --------------------------------------------------------------------------- --heal-steps, tiny model

def test_heal_steps_never_worsen_held_out_loss_and_are_seeded(tiny_llama_stats, tmp_path):
    from collabcompress import hf
    from collabcompress.commands.compress import CompressOptions, compress
    from collabcompress.dtypes import compute_dtype
    from collabcompress.files.checkpoint import open_checkpoint

    model, stats = tiny_llama_stats
    opts = CompressOptions(rank=4, calibration=str(stats), heal_steps=4)
    manifest = compress(model, tmp_path / "a", opts)
    heal = manifest["heal"]
    assert heal["steps"] == 4 and 0 <= heal["accepted"] <= 4
    assert heal["held_out_after"] <= heal["held_out_before"]
    assert manifest["settings"]["heal_dtype"] == "auto" and heal["dtype"] == compute_dtype("auto")
    again = compress(model, tmp_path / "b", opts)
    weights = lambda m: [o["sha256"] for o in m["outputs"] if o["name"] == "model.safetensors"]
    assert weights(manifest) == weights(again)
    plain = compress(model, tmp_path / "c", CompressOptions(rank=4, calibration=str(stats)))
    if heal["accepted"]:
        assert weights(manifest) != weights(plain)
    hf.from_pretrained(tmp_path / "a")  # the healed directory loads (its sha256 records match)
    a, c = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "c")
    untouched = [n for n in a.names() if "collab_key" not in n and "collab_mixing" not in n]
    assert all(torch.equal(a.load(n), c.load(n)) for n in untouched)


def _rewritten(stats: Path, out: Path, change) -> Path:
    """A copy of a statistics file whose tensors ``change(tensors)`` edited in place (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(stats), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_healing_trains_on_every_calibration_window_but_the_held_out_one(tiny_llama_stats, tmp_path):
    from safetensors import safe_open

    from collabcompress.files.arch import detect
    from collabcompress.files.statistics import load_input_ids, load_window_ids
    from collabcompress.commands.compress import CompressOptions, compress
    from collabcompress.errors import BadInputError
    from collabcompress.files.checkpoint import open_checkpoint

    model, stats = tiny_llama_stats
    ckpt = open_checkpoint(model)
    specs = detect(ckpt)
    ids, lengths, kept = load_window_ids(stats, ckpt, specs)
    kept_ids, kept_lengths = load_input_ids(stats, ckpt, specs)
    with safe_open(str(stats), framework="pt") as f:
        assert ids.shape[0] == int(f.metadata()["windows"]) > kept.numel() == 3
    for i, w in enumerate(kept.tolist()):  # the kept windows are among them, where the index says
        assert torch.equal(ids[w, : lengths[w]], kept_ids[i, : kept_lengths[i]])
    heal = lambda path, out: compress(model, tmp_path / out, CompressOptions(rank=4, calibration=str(path),
                                                                              heal_steps=1))["heal"]
    healed = heal(stats, "all")  # every window but one (and their sentences shuffled, where there are any)
    assert healed["windows"] == int((lengths >= 2).sum()) - 1 + healed["shuffled_windows"]
    older = _rewritten(stats, tmp_path / "older.safetensors",
                       lambda t: [t.pop(k) for k in ("window_ids", "window_lengths", "kept_windows")])
    assert load_window_ids(older, ckpt, specs) is None
    healed = heal(older, "older")  # a file from before: the kept windows, one held out
    assert healed["windows"] == 2 + healed["shuffled_windows"]
    for name, change in (("out of range", lambda t: t["kept_windows"].fill_(ids.shape[0])),
                         ("disagrees", lambda t: t["kept_windows"].copy_(kept.roll(1))),
                         ("repeated", lambda t: t["kept_windows"].fill_(int(kept[0])))):
        bad = _rewritten(stats, tmp_path / "bad.safetensors", change)
        with pytest.raises(BadInputError, match="windows' token ids are malformed"):
            heal(bad, f"bad-{name.replace(' ', '-')}")
        assert not (tmp_path / f"bad-{name.replace(' ', '-')}").exists()


def test_healing_also_trains_on_shuffled_sentences_and_the_originals_text(rotary_stats, tmp_path, monkeypatch):
    import collabcompress.runtime.heal
    from collabcompress.commands.compress import CompressOptions, compress
    from collabcompress.runtime.heal import GENERATED, PROMPT_TOKENS, held_out_count
    from collabcompress.runtime.lm import sentences, shuffled_sentences, token_ids
    from collabcompress.files.texts import load_tokenizer

    model, stats = rotary_stats("llama")  # its character tokenizer decodes with spaces (qwen2's fixture drops them)
    seen = {}
    real = collabcompress.runtime.heal.heal

    def spy(reference, compressed, ids, lengths, **kwargs):
        seen.update(rows=[ids[i, : lengths[i]] for i in range(ids.shape[0])], held=kwargs["held_out"])
        return real(reference, compressed, ids, lengths, **kwargs)

    monkeypatch.setattr(collabcompress.runtime.heal, "heal", spy)
    options = CompressOptions(rank=4, calibration=str(stats), heal_steps=1)
    heal = compress(model, tmp_path / "o", options)["heal"]
    rows, held = seen["rows"], seen["held"]
    assert heal["held_out_windows"] == held and heal["windows"] == len(rows) - held and heal["shuffled_windows"] > 0
    own = heal["generated_windows"]
    # rows: the calibration windows trained on, their sentences shuffled, the original's text, then the held-out
    # windows and their sentences shuffled
    plain = heal["windows"] - heal["shuffled_windows"] - own
    held_plain = held_out_count(3)  # of the 3 kept windows
    tok = load_tokenizer([model])
    shuffle = lambda part: shuffled_sentences(tok, part, window=64, seed=0)
    trained = len(rows) - held
    assert all(torch.equal(a, b) for a, b in zip(rows[plain:trained - own], shuffle(rows[:plain]), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(rows[trained + held_plain:], shuffle(rows[trained: trained + held_plain]),
                                                 strict=True))
    starts = {tuple(token_ids(tok, s)[:PROMPT_TOKENS].tolist()) for s in sentences(tok, rows[:plain])}
    assert own == min(GENERATED, len(starts)) > 0
    assert all(r.numel() == 64 and tuple(r[:PROMPT_TOKENS].tolist()) in starts for r in rows[trained - own:trained])
    again = {}
    monkeypatch.setattr(collabcompress.runtime.heal, "heal", lambda *a, **k: (again.update(ids=a[2]), real(*a, **k))[1])
    compress(model, tmp_path / "again", options)
    assert torch.equal(again["ids"][trained - own:trained], torch.stack(rows[trained - own:trained]))  # seeded


def test_healing_without_a_tokenizer_trains_on_the_windows_alone(rotary_stats, tmp_path):
    import shutil

    from collabcompress.commands.compress import CompressOptions, compress

    model, stats = rotary_stats("llama")
    bare = shutil.copytree(model, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    with pytest.warns(UserWarning, match="calibration windows only"):
        heal = compress(bare, tmp_path / "o", CompressOptions(rank=4, calibration=str(stats), heal_steps=1))["heal"]
    assert heal["shuffled_windows"] == heal["generated_windows"] == 0 and heal["held_out_windows"] == 1


def test_analyze_with_calibration_shows_the_budget_curves(tiny_llama_stats, cli):
    model, stats = tiny_llama_stats
    result = cli("analyze", model, "--calibration", stats, "--json", "-")
    assert result.exit_code == 0, result.stderr
    import json

    for layer in json.loads(result.stdout)["layers"]:
        curve = {int(r): v for r, v in layer["loss_curve"].items()}
        assert max(curve) == layer["kv_heads"] * layer["head_dim"] and abs(curve[max(curve)]) < 1e-6
    text = cli("analyze", model, "--calibration", stats)
    assert text.exit_code == 0 and "next-token KL at key cache R" in text.stdout
