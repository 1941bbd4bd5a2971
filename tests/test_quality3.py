"""heal(): the default step size depends on the family (causal LM or encoder)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_pair(rotary_checkpoints, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from collabcompress.compress import CompressOptions, compress

    source = rotary_checkpoints["qwen2"]
    out = tmp_path_factory.mktemp("heal-lr") / "o"
    compress(source, out, CompressOptions(rank=4))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(source)).float()
    ids = torch.randint(0, reference.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    return reference, out, ids, torch.tensor([16, 12, 16])


def _healed(tiny_pair, **kw) -> dict[str, torch.Tensor]:
    from collabcompress import hf
    from collabcompress.heal import heal, trainable

    reference, out, ids, lengths = tiny_pair
    model = hf.from_pretrained(out).float()
    heal(reference, model, ids, lengths, steps=2, causal=True, check_every=1, **kw)
    return {k: p.detach().clone() for k, p in trainable(model).items()}


def test_causal_default_step_size_is_lr_causal(tiny_pair):
    from collabcompress.heal import LR_CAUSAL, LR_ENCODER

    assert LR_CAUSAL != LR_ENCODER
    default, causal, encoder = _healed(tiny_pair), _healed(tiny_pair, lr=LR_CAUSAL), _healed(tiny_pair, lr=LR_ENCODER)
    assert all(torch.equal(default[k], causal[k]) for k in default)
    assert any(not torch.equal(default[k], encoder[k]) for k in default)
