"""collabcompress.runtime.lm: token windows and perplexity, on a tiny random llama and on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from collabcompress.runtime.lm import (_nucleus, join_documents, padded_rows, perplexity, sampled_continuations,
                               shuffled_sentences, token_ids, token_windows, window_nll)

transformers = pytest.importorskip("transformers")

TEXT = ("The national executive met last night. It appointed an interim leader, "
        "a move likely to provoke further conflict.\n") * 4


@pytest.fixture(scope="module")
def tiny(rotary_checkpoints):
    d = rotary_checkpoints["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(d))


def test_token_windows():
    ids = torch.arange(10)
    assert [w.tolist() for w in token_windows(ids, max_tokens=9, window=4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w.numel() for w in token_windows(ids, max_tokens=10, window=4)] == [4, 4, 2]
    assert [w.numel() for w in token_windows(ids, max_tokens=100, window=3)] == [3, 3, 3]  # a lone last token
    with pytest.raises(ValueError, match="at least 2 are needed"):
        token_windows(torch.arange(1))
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(ids, window=1)


def test_join_documents():
    assert join_documents(["a b", "c"]) == "a b\nc"
    assert join_documents("a b\nc") == "a b\nc"


def test_padded_rows():
    ids, lengths = padded_rows([torch.tensor([5, 6, 7]), torch.tensor([8])])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1] and ids.dtype == torch.int64


def test_shuffled_sentences_are_the_windows_sentences_in_a_seeded_order(tiny):
    _, tok = tiny
    sentences = [s for d in range(30) for s in (f"Story {d} begins here today.", "It goes on for a while!",
                                                f"Does story {d} end?")]
    text = "\n".join(f"{a} {b} {c} Yes, it ends. Dr. No." for a, b, c in zip(*[iter(sentences)] * 3))
    windows = token_windows(token_ids(tok, text), max_tokens=10**6, window=50)
    one = shuffled_sentences(tok, windows, window=32, seed=0)
    assert all(w.numel() == 32 for w in one[:-1]) and 2 <= one[-1].numel() <= 32
    assert all(torch.equal(a, b) for a, b in zip(one, shuffled_sentences(tok, windows, window=32, seed=0)))
    assert not all(torch.equal(a, b) for a, b in zip(one, shuffled_sentences(tok, windows, window=32, seed=1)))
    # each window's pieces: whole sentences, or the ends of one cut by the windows; 3 words or fewer are left out
    lines = tok.decode(torch.cat(one)).lower().split("\n")
    whole = [line for line in lines if line in {s.lower() for s in sentences}]
    assert len(whole) > len(sentences) // 2 and "yes, it ends." not in lines and "dr. no." not in lines
    assert whole != sorted(whole, key=[s.lower() for s in sentences].index)  # not in the text's order
    assert shuffled_sentences(tok, [token_ids(tok, "no")], window=32, seed=0) == []


def test_nucleus_draws_only_from_the_most_likely_tokens_that_reach_top_p():
    logits = torch.tensor([[0.1, 0.6, 0.3]]).log().expand(400, 3)
    g = torch.Generator().manual_seed(0)
    drawn = _nucleus(logits, 0.85, g)  # 0.6 + 0.3 reach it: token 0 (0.1) is never drawn
    assert drawn.shape == (400, 1) and set(drawn.flatten().tolist()) == {1, 2}
    assert 0.55 < float((drawn == 1).float().mean()) < 0.78  # renormalised: 2/3 and 1/3
    assert _nucleus(logits, 0.5, g).flatten().tolist() == [1] * 400  # the most likely alone reaches it


@pytest.mark.parametrize("candidates", [3, 64, 4096])
def test_nucleus_from_the_most_likely_candidates_draws_as_from_the_whole_sorted_row(monkeypatch, candidates):
    def whole(logits, top_p, generator):  # every token sorted
        probs, order = torch.softmax(logits.float(), -1).sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        return order.gather(-1, torch.multinomial(probs, 1, generator=generator))

    monkeypatch.setattr("collabcompress.runtime.lm.NUCLEUS_CANDIDATES", candidates)
    logits = torch.randn(8, 5000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 8, 8)[:, None]
    for top_p in (0.3, 0.9, 1.0):
        got, want = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for _ in range(20):
            assert torch.equal(_nucleus(logits, top_p, got), whole(logits, top_p, want))


def test_sampled_continuations_are_seeded_and_start_with_their_prompts(tiny):
    model, _ = tiny
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    one = sampled_continuations(model, prompts, length=12, seed=0)
    assert [r.shape for r in one] == [(12,), (12,)] and all(r.dtype == torch.int64 for r in one)
    assert torch.equal(torch.stack(one)[:, :3], prompts)
    assert all(torch.equal(a, b) for a, b in zip(one, sampled_continuations(model, prompts, length=12, seed=0)))
    assert not all(torch.equal(a, b) for a, b in zip(one, sampled_continuations(model, prompts, length=12, seed=1)))
    # a tiny top_p keeps the most likely token alone: the greedy continuation
    greedy = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                            max_new_tokens=9, min_new_tokens=9)
    assert torch.equal(torch.stack(sampled_continuations(model, prompts, length=12, seed=3, top_p=1e-6)), greedy)
    with pytest.raises(ValueError, match="prompts must be"):
        sampled_continuations(model, prompts, length=2, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        sampled_continuations(model, prompts, length=12, seed=0, top_p=0.0)


def test_token_ids_add_no_special_tokens(tiny):
    _, tok = tiny
    ids = token_ids(tok, "ab c", max_tokens=3)
    assert ids.dtype == torch.long and ids.tolist() == tok("ab", add_special_tokens=False)["input_ids"] + [
        tok(" ", add_special_tokens=False)["input_ids"][0]]


def test_perplexity_is_mean_nll_of_fresh_windows(tiny):
    model, tok = tiny
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][:200])
    expected = []
    for start in range(0, 200, 64):  # each window from an empty context
        chunk = ids[start:start + 64]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), -1)
        expected.append(-logp[:-1].gather(1, chunk[1:, None]).squeeze(1))
    expected = torch.cat(expected)
    got = perplexity(model, tok, TEXT, max_tokens=200, window=64)
    assert got["windows"] == 4 and got["tokens"] == 200 - 4 == expected.numel()
    assert got["nll"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(float(expected.mean())), rel=1e-5)
    # a window does not see the one before it: the long-context figure differs
    assert perplexity(model, tok, TEXT, max_tokens=200, window=200)["nll"] != pytest.approx(got["nll"], rel=1e-4)


def test_uniform_model_has_vocabulary_perplexity(rotary_checkpoints):
    d = rotary_checkpoints["mistral"]  # untied head: zeroing it leaves the embedding alone
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    got = perplexity(model, tok, TEXT, max_tokens=100, window=32)
    assert got["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-5)
    assert window_nll(model, torch.tensor([3, 4, 5])).shape == (2,)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_is_the_real_model(smollm2_dir, lee_dir):
    """The fetched SmolLM2: SPEC's shape, SPEC's perplexity on lee.cor (32.04), and sensible text."""
    import json

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["hidden_size"]) == (30, 9, 3, 64, 576)
    assert config["rope_parameters"]["rope_theta"] == 100000.0 and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    documents = (lee_dir / "lee.cor").read_text(encoding="latin-1").splitlines()
    got = perplexity(model, tok, documents)
    assert got["tokens"] == 2044 and got["windows"] == 4
    assert got["ppl"] == pytest.approx(32.04, abs=0.01)
    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
