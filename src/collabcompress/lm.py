"""Causal language-model measures on real text: token windows and perplexity.

SPEC section 2 "Rotary decoders" measures a decoder by its perplexity on the first 2,048
tokens of a text in non-overlapping 512-token windows: each window is a fresh context (no
cache carried over), its first token is only read, every later token is predicted, and the
perplexity is exp of the mean negative log-likelihood over all predicted tokens. A list of
documents (one per line of a corpus file, as ``lee.cor``) is joined with "\n" first: that is
how SPEC's figure for SmolLM2-135M-Instruct on lee.cor (32.04) was measured; joined with " "
it reads 34.04.

The model is any transformers causal LM (``model(input_ids=...).logits``) and the tokenizer
any transformers tokenizer; this module imports neither transformers nor the model's code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DOCUMENT_SEPARATOR", "join_documents", "token_ids", "token_windows", "window_nll", "perplexity"]

DOCUMENT_SEPARATOR = "\n"


def join_documents(text: str | Sequence[str]) -> str:
    """``text`` itself, or a sequence of documents joined with DOCUMENT_SEPARATOR."""
    return text if isinstance(text, str) else DOCUMENT_SEPARATOR.join(text)


def token_ids(tokenizer: Any, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """The token ids of ``text`` without special tokens (no BOS/EOS added), at most ``max_tokens``.

    Returns a 1-D int64 tensor.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)  # (N,)


def token_windows(ids: torch.Tensor, *, max_tokens: int = 2048, window: int = 512) -> list[torch.Tensor]:
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


@torch.inference_mode()
def window_nll(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each predicted token of one window, in float32.

    ``window`` is (T,) token ids; returns (T - 1,): entry t is -log p(window[t + 1] | window[:t + 1]).
    """
    device = next(model.parameters()).device
    ids = window.reshape(1, -1).to(device)  # (1, T)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()  # (T-1,)


def perplexity(model: torch.nn.Module, tokenizer: Any, text: str | Sequence[str], *, max_tokens: int = 2048,
               window: int = 512) -> dict[str, float | int]:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of ``text`` (SPEC section 2).

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
