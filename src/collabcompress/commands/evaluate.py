"""Compare a compressed model with its original on real text (``collabcompress evaluate``).

Both models run on the same tokenised texts (the bundled sample, or one text per line of
a UTF-8 file). Reported: the cosine similarity of each text's mean-pooled last hidden
state (attention-mask weighted) between the two models, mean and minimum; how often each
text's nearest neighbour among the others (cosine on pooled embeddings) is the same for
both models; the largest absolute difference of the last hidden states over real tokens;
and, when the Lee et al. (2005) corpus is in the cache, the Spearman correlation of each
model's 50 x 50 document similarities with the human ratings (upper triangle).

A causal language model (the rotary families: llama, mistral, qwen2) is compared on what it
predicts instead (:func:`evaluate_causal`): perplexity of both models on the first
``max_tokens`` tokens of the texts read as one stream, in ``window``-token windows
(:mod:`collabcompress.runtime.lm`, docs/method.md), the next-token top-1 agreement and KL divergence
on the same windows, and greedy generation from a few prompts taken from the texts.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..runtime import lm
from ..runtime.adapters import loadable_family
from ..errors import BadInputError, UnsupportedArchitectureError
from ..extras import quiet_transformers
from ..files.checkpoint import read_texts
from ..files.limits import check_memory, forward_bytes
from ..files.texts import leading_text, lee_corpus, load_tokenizer, position_limit, sample_texts

__all__ = ["evaluate", "evaluate_causal", "read_texts", "pooled_embeddings", "PROMPT_TOKENS"]

PROMPT_TOKENS = 32  # tokens of each generation prompt at most (the start of a text)

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- running the models

def encoder_of(model):
    """The part that maps tokens to hidden states: the encoder of an encoder-decoder model."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model.base_model if hasattr(model, "base_model") else model


@torch.inference_mode()
def _hidden_states(model, batches: list[dict[str, torch.Tensor]], step: Callable[[], None]) -> list[torch.Tensor]:
    encoder = encoder_of(model)
    out = []
    for batch in batches:
        out.append(encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                   .last_hidden_state.float())  # (B, N, D)
        step()
    return out


def pooled_embeddings(hidden: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Attention-mask-weighted mean of the last hidden states: -> (n_texts, D), float64."""
    pooled = []
    for h, batch in zip(hidden, batches):
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float64)  # (B, N, 1)
        pooled.append((h.double() * mask).sum(1) / mask.sum(1).clamp(min=1.0))  # (B, D)
    return torch.cat(pooled)


def _cosine_matrix(e: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(e, dim=-1)
    return e @ e.T  # (n, n)


def _batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch_size):
        batch = [leading_text(tokenizer, t, max_length) for t in texts[i:i + batch_size]]  # truncated anyway
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _upper(m: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(m.shape[0], m.shape[1], offset=1)
    return m[i, j]



def _texts(texts: list[str] | None, texts_name: str | None) -> tuple[str, list[str]]:
    """(where the texts come from, the non-empty texts); the bundled sample by default."""
    source = "bundled sample" if texts is None else (texts_name or "given")
    texts = sample_texts() if texts is None else [t for t in texts if t.strip()]
    if not texts:
        raise BadInputError("no texts to evaluate on")
    return source, texts


def _models(original: Path, compressed: Path):
    """(compressed model, original model of the same class, tokenizer), checked to be one model type."""
    from .. import hf

    with quiet_transformers():
        model = hf.load_model(compressed)  # an export (no collab_manifest.json) loads as a plain model
        reference = hf.load_model(original, model_class=type(model))
    if reference.config.model_type != model.config.model_type:
        raise BadInputError(f"{original} is a {reference.config.model_type!r} model but {compressed} was compressed "
                            f"from a {model.config.model_type!r} model")
    return model, reference, load_tokenizer([original, compressed])


def evaluate(original: str | os.PathLike, compressed: str | os.PathLike, texts: Sequence[str] | None = None, *,
             max_length: int = 256, batch_size: int = 16, lee: str | os.PathLike | bool = True,
             texts_name: str | None = None, progress: Progress | None = None,
             max_tokens: int = lm.DEFAULT_MAX_TOKENS, window: int = lm.DEFAULT_WINDOW, prompts: int = 4,
             new_tokens: int = 32) -> dict[str, Any]:
    """Run the original and the compressed model on the same texts and compare their embeddings
    (a causal language model: their predictions, :func:`evaluate_causal`, which takes
    ``max_tokens``, ``window``, ``prompts`` and ``new_tokens``; the other options are for
    embeddings).

    Args:
        original: the uncompressed model directory (config.json, weights, tokenizer).
        compressed: its ``compress`` output directory.
        texts: the texts (default: the bundled sample, :func:`sample_texts`).
        texts_name: where the texts came from, for the record (e.g. the file name).
        max_length: tokens per text at most (longer texts are truncated; capped at the model's
            position limit).
        batch_size: texts per forward pass.
        lee: the Lee corpus directory, ``True`` = the cache if present, ``False`` = skip.
        progress: called as ``(stage, done, total)`` after every batch.

    Returns:
        A JSON-ready dict: ``cosine_mean``, ``cosine_min``, ``nn_agreement`` (``None`` for a
        single text), ``max_abs_diff``, ``lee`` (``None`` or ``{"documents", "pairs",
        "spearman_original", "spearman_compressed"}``) and what was run.

    Raises:
        BadInputError: not a compressed directory, no tokenizer, unreadable models, bad options.
        UnsupportedArchitectureError: a family that cannot be loaded or is not a text model.
        MissingExtraError: transformers is not installed.
    """
    from ..files.manifest import read
    from .export import read_export

    start = time.perf_counter()
    original, compressed = Path(original), Path(compressed)
    if max_length < 2 or batch_size < 1:
        raise BadInputError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
    manifest = read_export(compressed) or read(compressed)  # an export is a plain model
    family = manifest.source.architecture
    if loadable_family(family, compressed).causal_lm:
        return evaluate_causal(original, compressed, texts, max_tokens=max_tokens, window=window, prompts=prompts,
                               new_tokens=new_tokens, texts_name=texts_name, progress=progress)
    if not loadable_family(family, compressed).text:
        raise UnsupportedArchitectureError(f"{compressed}: evaluate compares text embeddings; family {family!r} is "
                                           "not a text model")
    _check_models(original, compressed)
    source, texts = _texts(texts, texts_name)
    corpus = None if lee is False else lee_corpus(None if lee is True else lee)
    if lee not in (True, False) and corpus is None:
        raise BadInputError(f"no Lee corpus (lee.cor, similarities0-1.txt) in {lee}")

    model, reference, tokenizer = _models(original, compressed)
    max_length = min(max_length, position_limit(reference.config, tokenizer))
    batches = _batches(tokenizer, texts, max_length, batch_size)
    lee_batches = _batches(tokenizer, corpus.documents, max_length, batch_size) if corpus else []
    rows, length = max((tuple(b["input_ids"].shape) for b in batches + lee_batches), key=lambda s: s[0] * s[1] ** 2)
    check_memory(forward_bytes(manifest.layers, rows, length), f"the attention scores and activations of a batch of "
                 f"{rows:,} texts of {length:,} tokens (--batch-size, --max-length)")
    total = 2 * (len(batches) + len(lee_batches))
    done = [0]

    def step(stage: str) -> Callable[[], None]:
        def tick() -> None:
            done[0] += 1
            if progress:
                progress(stage, done[0], total)
        return tick

    h_orig = _hidden_states(reference, batches, step("original"))
    h_comp = _hidden_states(model, batches, step("compressed"))
    e_orig, e_comp = pooled_embeddings(h_orig, batches), pooled_embeddings(h_comp, batches)
    cosine = torch.nn.functional.cosine_similarity(e_orig, e_comp, dim=-1)  # (n,)
    max_diff = max(float(((a - b).abs() * batch["attention_mask"].unsqueeze(-1)).max())
                   for a, b, batch in zip(h_orig, h_comp, batches))
    nn_agreement = None
    if len(texts) > 1:
        sim_o, sim_c = _cosine_matrix(e_orig), _cosine_matrix(e_comp)
        sim_o.fill_diagonal_(-2.0)
        sim_c.fill_diagonal_(-2.0)
        nn_agreement = float((sim_o.argmax(-1) == sim_c.argmax(-1)).double().mean())
    lee_result = None
    if corpus is not None:
        from scipy.stats import spearmanr

        human = _upper(corpus.ratings).numpy()
        figures = {}
        for name, m in (("original", reference), ("compressed", model)):
            hidden = _hidden_states(m, lee_batches, step(f"Lee {name}"))
            sims = _upper(_cosine_matrix(pooled_embeddings(hidden, lee_batches))).numpy()
            figures[f"spearman_{name}"] = float(spearmanr(sims, human).statistic)
        lee_result = {"documents": len(corpus.documents), "pairs": int(human.size), **figures}
    return {
        "original": str(original),
        "compressed": str(compressed),
        "family": family,
        "model_class": type(reference).__name__,
        "shared_dims": sorted({layer.shared_dim for layer in manifest.layers}),
        "texts": {"source": source, "count": len(texts), "max_length": max_length},
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "nn_agreement": nn_agreement,
        "max_abs_diff": max_diff,
        "lee": lee_result,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _check_models(original: Path, compressed: Path) -> None:
    if not original.is_dir():
        raise BadInputError(f"original model directory not found: {original}")
    if not (original / "config.json").is_file():
        raise BadInputError(f"{original} has no config.json; pass the uncompressed model directory")


def evaluate_causal(original: str | os.PathLike, compressed: str | os.PathLike, texts: Sequence[str] | None = None,
                    *, max_tokens: int = lm.DEFAULT_MAX_TOKENS, window: int = lm.DEFAULT_WINDOW, prompts: int = 4,
                    new_tokens: int = 32, texts_name: str | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Compare a compressed causal language model with its original on what they predict.

    Args:
        original, compressed: the uncompressed model directory and its ``compress`` output.
        texts: documents (default: the bundled sample, :func:`sample_texts`), read as one stream
            joined with "\n" (:func:`collabcompress.runtime.lm.join_documents`).
        max_tokens, window: the first ``max_tokens`` tokens of the stream, in non-overlapping
            ``window``-token windows each run from an empty context (docs/method.md's
            perplexity: 2,048 and 512).
        prompts: greedy generation from the first ``PROMPT_TOKENS`` tokens of this many texts.
        new_tokens: tokens generated per prompt.
        texts_name: where the texts came from, for the record.
        progress: called as ``(stage, done, total)`` after every window and prompt.

    Returns:
        A JSON-ready dict: ``perplexity`` ``{"original", "compressed", "change"}`` (change =
        compressed / original - 1), ``nll`` ``{"original", "compressed"}`` (nats per predicted
        token), ``top1_agreement``, ``kl_mean`` and ``kl_max`` (KL(original || compressed) of
        the next-token distributions, nats), ``max_abs_logit_diff``, ``generation``
        (:func:`collabcompress.runtime.lm.greedy_agreement` without the token lists, plus
        ``prompt_tokens``: the length of each prompt), ``texts``
        ``{"source", "count", "tokens", "windows", "max_tokens", "window"}`` and what was run.

    Raises:
        BadInputError: unreadable models, no tokenizer, too little text, bad options.
    """
    from ..files.manifest import read
    from .export import read_export

    start = time.perf_counter()
    original, compressed = Path(original), Path(compressed)
    if max_tokens < 2 or window < 2 or prompts < 0 or new_tokens < 1:
        raise BadInputError(f"--max-tokens and --window must be >= 2, --prompts >= 0 and --new-tokens >= 1 (got "
                            f"{max_tokens}, {window}, {prompts}, {new_tokens})")
    manifest = read_export(compressed) or read(compressed)  # an export is a plain model
    _check_models(original, compressed)
    source, texts = _texts(texts, texts_name)
    model, reference, tokenizer = _models(original, compressed)
    window = min(window, position_limit(reference.config, tokenizer))
    ids, used = lm.leading_ids(tokenizer, texts, max_tokens)  # (N,)
    try:
        windows = lm.token_windows(ids, max_tokens=max_tokens, window=window)
    except ValueError as e:
        raise BadInputError(f"evaluate: {e}") from e
    starts = list(itertools.islice((p for p in (lm.token_ids(tokenizer, t, max_tokens=PROMPT_TOKENS) for t in texts)
                                    if p.numel()), prompts))  # only the texts needed are tokenised
    positions = position_limit(reference.config, tokenizer)
    longest = max((p.numel() for p in starts), default=0)
    if starts and longest + new_tokens > positions:
        raise BadInputError(f"--new-tokens {new_tokens:,}: a prompt of {longest} tokens and {new_tokens:,} new tokens "
                            f"exceed the model's {positions:,} positions; give --new-tokens {positions - longest:,} "
                            "or fewer")
    vocab = int(getattr(reference.config, "vocab_size", 0) or 0)
    longest_window = max(w.numel() for w in windows)
    # compare_windows holds both models' logits as float64 log-probabilities, several times over
    check_memory(forward_bytes(manifest.layers, 1, longest_window, vocab=vocab) + 7 * 8 * longest_window * vocab,
                 f"the attention scores, activations and logits of a {longest_window:,}-token window (--window)")
    total, done = len(windows) + len(starts), [0]

    def tick(stage: str) -> None:
        done[0] += 1
        if progress:
            progress(stage, done[0], total)

    figures = lm.compare_windows(reference, model, windows, step=lambda: tick("windows"))
    with quiet_transformers():
        generation = lm.greedy_agreement(reference, model, starts, new_tokens=new_tokens,
                                         step=lambda: tick("generation"))
    generation = {"prompt_tokens": [p.numel() for p in starts], **{k: v for k, v in generation.items() if k != "tokens"}}
    return {
        "original": str(original),
        "compressed": str(compressed),
        "family": manifest.source.architecture,
        "model_class": type(reference).__name__,
        "shared_dims": sorted({layer.shared_dim for layer in manifest.layers}),
        "texts": {"source": source, "count": used, "tokens": figures["tokens"], "windows": figures["windows"],
                  "max_tokens": max_tokens, "window": window},
        "perplexity": {"original": figures["ppl_reference"], "compressed": figures["ppl_model"],
                       "change": figures["ppl_model"] / figures["ppl_reference"] - 1.0},
        "nll": {"original": figures["nll_reference"], "compressed": figures["nll_model"]},
        "top1_agreement": figures["top1_agreement"],
        "kl_mean": figures["kl_mean"],
        "kl_max": figures["kl_max"],
        "max_abs_logit_diff": figures["max_abs_logit_diff"],
        "generation": generation,
        "seconds": round(time.perf_counter() - start, 3),
    }
