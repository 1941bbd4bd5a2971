"""heal(): held-out checks every few steps, undoing a whole block of steps that made it worse; its arithmetic."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_pair(rotary_checkpoints, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from collabcompress.compress import CompressOptions, compress

    source = rotary_checkpoints["qwen2"]
    out = tmp_path_factory.mktemp("heal") / "o"
    compress(source, out, CompressOptions(rank=4))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(source)).float()
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))
    return reference, out, ids, torch.tensor([24, 20, 24, 18])


def _healed(tiny_pair, **kw):
    from collabcompress import hf
    from collabcompress.heal import heal, trainable

    reference, out, ids, lengths = tiny_pair
    model = hf.from_pretrained(out).float()
    start = {k: p.detach().clone() for k, p in trainable(model).items()}
    result = heal(reference, model, ids, lengths, causal=True, **kw)
    return result, start, {k: p.detach().clone() for k, p in trainable(model).items()}


@pytest.mark.parametrize("check_every", [1, 3, 6])
def test_blocks_are_kept_or_undone_whole_and_never_worsen_held_out(tiny_pair, check_every):
    result, start, end = _healed(tiny_pair, steps=6, lr=1e-2, check_every=check_every)
    assert result.accepted % check_every == 0 and 0 <= result.accepted <= 6
    assert result.held_out_after <= result.held_out_before
    changed = any(not torch.equal(start[k], end[k]) for k in start)
    assert changed == (result.accepted > 0)


def test_steps_that_wreck_the_held_out_window_are_undone(tiny_pair):
    result, start, end = _healed(tiny_pair, steps=4, lr=1e3, check_every=2)  # absurd steps: worse held-out loss
    assert result.accepted == 0 and result.held_out_after == result.held_out_before
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_check_every_must_be_positive(tiny_pair):
    with pytest.raises(ValueError, match="check_every"):
        _healed(tiny_pair, steps=2, check_every=0)


def test_same_seed_same_tensors(tiny_pair):
    _, _, a = _healed(tiny_pair, steps=4, lr=1e-2, check_every=2)
    _, _, b = _healed(tiny_pair, steps=4, lr=1e-2, check_every=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_targets_are_the_references_next_token_log_probabilities(tiny_pair):
    from collabcompress.heal import _Targets

    reference, _, ids, lengths = tiny_pair
    targets = _Targets(reference, causal=True)
    assert targets.split
    x = ids[1, : int(lengths[1])]
    want = torch.log_softmax(reference(input_ids=x[None]).logits.float(), -1)
    for _ in range(2):  # computed, then from the cache
        assert torch.allclose(targets(1, x), want, atol=1e-5)
    assert list(targets.cache) == [1]


def test_bfloat16_arithmetic_is_seeded_keeps_float32_tensors_and_never_worsens_held_out(tiny_pair):
    runs = [_healed(tiny_pair, steps=6, lr=1e-2, check_every=2, compute=torch.bfloat16) for _ in range(2)]
    (result, start, end), (_, _, again) = runs
    assert result.held_out_after <= result.held_out_before
    assert all(t.dtype == torch.float32 for t in end.values())
    assert all(torch.equal(end[k], again[k]) for k in end)
    float32, _, plain = _healed(tiny_pair, steps=6, lr=1e-2, check_every=2)
    assert result.held_out_before != float32.held_out_before  # the passes really ran in bfloat16
    assert abs(result.held_out_before - float32.held_out_before) < 0.05 * float32.held_out_before


def test_healing_computes_in_float32_or_bfloat16_only(tiny_pair):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        _healed(tiny_pair, steps=1, compute=torch.float16)


def test_auto_arithmetic_is_bfloat16_only_where_the_cpu_has_bfloat16_units(monkeypatch):
    from collabcompress.dtypes import COMPUTE_NAMES, compute_dtype

    assert [compute_dtype(name) for name in COMPUTE_NAMES] == list(COMPUTE_NAMES)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert compute_dtype("auto") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert compute_dtype("auto") == "bfloat16"


def test_several_held_out_windows_are_never_trained_on_and_weighed_by_tokens(tiny_pair, monkeypatch):
    from collabcompress import hf
    from collabcompress.heal import _loss, _Targets, held_out_count

    assert [held_out_count(n) for n in (2, 3, 7, 8, 15, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    reference, out, ids, lengths = tiny_pair
    with pytest.raises(ValueError, match="needs one more to train on"):
        _healed(tiny_pair, steps=1, held_out=4)
    result, _, _ = _healed(tiny_pair, steps=0, held_out=2)

    model, targets = hf.from_pretrained(out).float(), _Targets(reference, causal=True)
    with torch.no_grad():
        losses = [float(_loss(model, ids[i], int(lengths[i]), True, targets(i, ids[i, : int(lengths[i])])))
                  for i in (2, 3)]
    want = (losses[0] * 24 + losses[1] * 18) / 42
    assert result.held_out_before == pytest.approx(want, rel=1e-6)
    # training touches windows 0 and 1 only: the held-out ones never get a target computed for training
    seen, original = [], _Targets.__call__
    monkeypatch.setattr(_Targets, "__call__", lambda self, i, x: seen.append(i) or original(self, i, x))
    _healed(tiny_pair, steps=4, held_out=2)
    assert seen[:2] == [2, 3] and set(seen[2:]) == {0, 1}
