"""Causal language-model measures on real text: token windows and perplexity.

docs/method.md "Rotary decoders" measures a decoder by its perplexity on the first 2,048
tokens of a text in non-overlapping 512-token windows: each window is a fresh context (no
cache carried over), its first token is only read, every later token is predicted, and the
perplexity is exp of the mean negative log-likelihood over all predicted tokens. A list of
documents (one per line of a corpus file, as ``lee.cor``) is joined with "\n" first: that is
how the reference figure for SmolLM2-135M-Instruct on lee.cor (32.04) was measured; joined with " "
it reads 34.04.

The model is any transformers causal LM (``model(input_ids=...).logits``) and the tokenizer
any transformers tokenizer; this module imports neither transformers nor the model's code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..defaults import DEFAULT_LM_TOKENS, DEFAULT_LM_WINDOW
from ..files.texts import leading_text

__all__ = ["DOCUMENT_SEPARATOR", "DEFAULT_MAX_TOKENS", "DEFAULT_WINDOW", "join_documents", "token_ids", "leading_ids",
           "token_windows", "padded_rows", "sentences", "shuffled_sentences", "sampled_continuations", "window_logits",
           "window_nll", "perplexity", "compare_windows", "greedy_agreement"]

DOCUMENT_SEPARATOR = "\n"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")  # after ".", "!" or "?", and where documents meet
MIN_SENTENCE_WORDS = 4  # shorter pieces are mostly abbreviations cut off ("Mr.", "U.S."), not sentences
DEFAULT_MAX_TOKENS = DEFAULT_LM_TOKENS
DEFAULT_WINDOW = DEFAULT_LM_WINDOW


def join_documents(text: str | Sequence[str]) -> str:
    """``text`` itself, or a sequence of documents joined with DOCUMENT_SEPARATOR."""
    return text if isinstance(text, str) else DOCUMENT_SEPARATOR.join(text)


def token_ids(tokenizer: Any, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """The token ids of ``text`` without special tokens (no BOS/EOS added), at most ``max_tokens``.

    With ``max_tokens``, only a prefix of the text that holds them is tokenised
    (:func:`collabcompress.files.texts.leading_text`). Returns a 1-D int64 tensor.
    """
    if max_tokens is not None:
        text = leading_text(tokenizer, text, max_tokens)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)  # (N,)


def leading_ids(tokenizer: Any, documents: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, int]:
    """The first ``max_tokens`` token ids of the documents joined as in :func:`join_documents`,
    and how many leading documents they come from.

    Only the shortest prefix of the documents that yields ``max_tokens`` tokens is tokenised
    (found by doubling, then bisection), so a large corpus is not tokenised whole, and of one
    enormous document only its start (:func:`token_ids`). Returns
    ``(ids (N,) int64, documents used)``.
    """
    def ids_of(n: int) -> torch.Tensor:
        return token_ids(tokenizer, join_documents(documents[:n]), max_tokens=max_tokens)

    hi = 1
    while hi < len(documents) and ids_of(hi).numel() < max_tokens:
        hi = min(2 * hi, len(documents))
    lo = hi // 2  # ids_of(lo) has fewer than max_tokens tokens (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ids_of(mid).numel() < max_tokens:
            lo = mid
        else:
            hi = mid
    return ids_of(hi), hi


def token_windows(ids: torch.Tensor, *, max_tokens: int = DEFAULT_MAX_TOKENS, window: int = DEFAULT_WINDOW) -> list[torch.Tensor]:
    """Split the first ``max_tokens`` of ``ids`` into consecutive non-overlapping windows.

    Every window has ``window`` tokens except perhaps the last, which is dropped when it has
    fewer than 2 (nothing to predict). Raises ``ValueError`` when no window remains or a
    size is below 2.
    """
    if window < 2 or max_tokens < 2:
        raise ValueError(f"window ({window}) and max_tokens ({max_tokens}) must be at least 2")
    ids = ids.reshape(-1)[:max_tokens]
    windows = [w for w in torch.split(ids, window) if w.numel() >= 2]
    if not windows:
        raise ValueError(f"the text has {ids.numel()} token(s): at least 2 are needed to predict one")
    return windows


def padded_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (N, T) int64 zero-padded on the right, and their lengths (N,)."""
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.int64)
    out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out, lengths


def sentences(tokenizer: Any, windows: Sequence[torch.Tensor]) -> list[str]:
    """The sentences of token ``windows`` in their order: the windows decoded and split at
    :data:`SENTENCE_END`; pieces of fewer than :data:`MIN_SENTENCE_WORDS` words are dropped."""
    text = (tokenizer.decode(w.reshape(-1).tolist()) for w in windows)
    return [s for t in text for s in SENTENCE_END.split(t) if len(s.split()) >= MIN_SENTENCE_WORDS]


def shuffled_sentences(tokenizer: Any, windows: Sequence[torch.Tensor], *, window: int,
                       seed: int) -> list[torch.Tensor]:
    """The sentences of token ``windows`` (:func:`sentences`) in a seeded random order, as
    windows of ``window`` tokens.

    Joined with :data:`DOCUMENT_SEPARATOR`, tokenised again and cut as :func:`token_windows`
    cuts (the last window may be shorter); no windows when fewer than 2 tokens remain. Text
    that changes topic every sentence, as a stream of short texts does, made from the same text.
    """
    found = sentences(tokenizer, windows)
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = token_ids(tokenizer, DOCUMENT_SEPARATOR.join(found[i] for i in order))
    return token_windows(ids, max_tokens=ids.numel(), window=window) if ids.numel() >= 2 else []


NUCLEUS_CANDIDATES = 4096  # most likely tokens sorted first; all V only when their probability falls short of top_p


def _nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (B, V), drawn from the smallest set of most likely tokens
    whose probability reaches ``top_p`` (renormalised): (B, 1) int64.

    Only the :data:`NUCLEUS_CANDIDATES` most likely tokens are sorted when every row's nucleus
    lies among them (else all V): the same draw as from the whole sorted row, whose other tokens
    have probability 0, so the generator still advances by B x V numbers (measured, SmolLM2's
    49,152 tokens, 16 rows: sorting all 41 ms, the 4,096 most likely 7 ms).
    """
    probs = torch.softmax(logits.float(), -1)
    top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), -1)  # sorted, most likely first
    total = top.cumsum(-1)
    if top.shape[-1] < probs.shape[-1] and not bool((total[:, -1] >= top_p).all()):
        top, order = probs.sort(-1, descending=True)
        total = top.cumsum(-1)
    probs.zero_()[:, : top.shape[-1]] = top.masked_fill(total - top >= top_p, 0.0)  # the most likely token stays
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def sampled_continuations(model: torch.nn.Module, prompts: torch.Tensor, *, length: int, seed: int,
                          top_p: float = 0.9) -> list[torch.Tensor]:
    """The model's own text: each prompt continued to ``length`` tokens by nucleus sampling.

    ``prompts`` is (N, P) token ids (one length, no padding). All are run as one batch with
    the model's cache; each new token comes from the most likely tokens that reach ``top_p``
    of the probability (:func:`_nucleus`), drawn with a generator seeded by ``seed``, so the
    text is the same for the same model, prompts and seed on one machine. Returns N (length,)
    int64 rows, each starting with its prompt.
    """
    if prompts.dim() != 2 or not 1 <= prompts.shape[1] <= length:
        raise ValueError(f"prompts must be (N, P) with 1 <= P <= length ({length}), got {tuple(prompts.shape)}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    from .adapters import cache_keyword  # imports no transformers

    g = torch.Generator().manual_seed(seed)
    device, keyword = next(model.parameters()).device, cache_keyword(model)
    tokens = [prompts.cpu()]
    out, new = model(input_ids=prompts.to(device), use_cache=True), length - prompts.shape[1]
    for i in range(new):
        tokens.append(_nucleus(out.logits[:, -1].cpu(), top_p, g))  # (N, 1)
        if i + 1 < new:
            out = model(input_ids=tokens[-1].to(device), **{keyword: getattr(out, keyword)}, use_cache=True)
    return list(torch.cat(tokens, 1))


@torch.inference_mode()
def window_logits(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token logits of one window from an empty context, float32 on the CPU.

    ``window`` is (T,) token ids; returns (T - 1, V): row t predicts window[t + 1].
    """
    device = next(model.parameters()).device
    ids = window.reshape(1, -1).to(device)  # (1, T)
    return model(input_ids=ids, use_cache=False).logits[0, :-1].float().cpu()  # (T-1, V)


def window_nll(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each predicted token of one window, in float32.

    ``window`` is (T,) token ids; returns (T - 1,): entry t is -log p(window[t + 1] | window[:t + 1]).
    """
    logits = window_logits(model, window)  # (T-1, V)
    return torch.nn.functional.cross_entropy(logits, window.reshape(-1)[1:].cpu(), reduction="none")  # (T-1,)


def perplexity(model: torch.nn.Module, tokenizer: Any, text: str | Sequence[str], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               window: int = DEFAULT_WINDOW) -> dict[str, float | int]:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of ``text`` (docs/method.md).

    ``text`` is one string or a sequence of documents (``join_documents``). It is tokenised
    once without special tokens (``token_ids``), cut into non-overlapping windows of
    ``window`` tokens (``token_windows``), and each window is run from an empty context. Returns ``{"ppl": exp(nll), "nll": mean NLL per predicted token
    (nats), "tokens": predicted tokens, "windows": number of windows}``.
    """
    ids = token_ids(tokenizer, join_documents(text), max_tokens=max_tokens)  # (N,)
    windows = token_windows(ids, max_tokens=max_tokens, window=window)
    nll = torch.cat([window_nll(model, w) for w in windows]).double()  # (tokens,)
    mean = float(nll.mean())
    return {"ppl": math.exp(mean), "nll": mean, "tokens": int(nll.numel()), "windows": len(windows)}


def compare_windows(reference: torch.nn.Module, model: torch.nn.Module, windows: Sequence[torch.Tensor], *,
                    step: Callable[[], None] | None = None) -> dict[str, float | int]:
    """Next-token predictions of ``model`` against ``reference`` on the same windows (each from
    an empty context, as :func:`perplexity`).

    Returns ``{"nll_reference", "nll_model"}`` (mean NLL per predicted token, nats),
    ``"ppl_reference"``, ``"ppl_model"``, ``"top1_agreement"`` (fraction of positions whose most
    likely next token is the same), ``"kl_mean"`` and ``"kl_max"`` (KL(reference || model) of
    the next-token distributions, nats, over positions), ``"max_abs_logit_diff"``, ``"tokens"``
    (predicted tokens) and ``"windows"``. ``step`` is called after each window.
    """
    nll_ref, nll_mod, agree, kl = [], [], [], []
    max_diff = 0.0
    for w in windows:
        targets = w.reshape(-1)[1:].cpu()  # (T-1,)
        a, b = window_logits(reference, w).double(), window_logits(model, w).double()  # (T-1, V)
        log_a, log_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        nll_ref.append(-log_a.gather(1, targets[:, None])[:, 0])
        nll_mod.append(-log_b.gather(1, targets[:, None])[:, 0])
        agree.append(a.argmax(-1) == b.argmax(-1))
        kl.append((log_a.exp() * (log_a - log_b)).sum(-1).clamp_min(0.0))  # (T-1,)
        max_diff = max(max_diff, float((a - b).abs().max()))
        if step:
            step()
    if not kl:
        raise ValueError("no windows to compare")
    nll_a, nll_b, kl_all = torch.cat(nll_ref).mean(), torch.cat(nll_mod).mean(), torch.cat(kl)
    return {"nll_reference": float(nll_a), "nll_model": float(nll_b), "ppl_reference": math.exp(float(nll_a)),
            "ppl_model": math.exp(float(nll_b)), "top1_agreement": float(torch.cat(agree).double().mean()),
            "kl_mean": float(kl_all.mean()), "kl_max": float(kl_all.max()), "max_abs_logit_diff": max_diff,
            "tokens": int(kl_all.numel()), "windows": len(kl)}


@torch.inference_mode()
def greedy_agreement(reference: torch.nn.Module, model: torch.nn.Module, prompts: Sequence[torch.Tensor], *,
                     new_tokens: int = 32, step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Greedy generation (``generate``, with the model's cache) of both models from the same prompts.

    Each prompt is (P,) token ids; exactly ``new_tokens`` tokens are generated (end-of-text is
    suppressed, so both continuations have the same length). Returns ``{"prompts",
    "new_tokens", "first_divergence"}`` (per prompt, the index of the first new token that
    differs, ``None`` when all agree), ``"identical"`` (prompts with no divergence) and
    ``"mean_agreed_tokens"`` (new tokens before the first divergence, averaged), plus
    ``"tokens"`` ``{"reference", "model"}`` (the generated ids, per prompt). ``step`` is
    called after each prompt.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    device = next(model.parameters()).device
    divergence, ref_out, mod_out = [], [], []
    for prompt in prompts:
        ids = prompt.reshape(1, -1).to(device)  # (1, P)
        pair = []
        for m in (reference, model):
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            pair.append(out[0, ids.shape[1]:].cpu())  # (new_tokens,)
        differ = (pair[0] != pair[1]).nonzero()
        divergence.append(int(differ[0, 0]) if differ.numel() else None)
        ref_out.append(pair[0].tolist())
        mod_out.append(pair[1].tolist())
        if step:
            step()
    agreed = [new_tokens if d is None else d for d in divergence]
    return {"prompts": len(divergence), "new_tokens": new_tokens, "first_divergence": divergence,
            "identical": sum(d is None for d in divergence),
            "mean_agreed_tokens": sum(agreed) / len(agreed) if agreed else None,
            "tokens": {"reference": ref_out, "model": mod_out}}
