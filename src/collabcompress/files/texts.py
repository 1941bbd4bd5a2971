"""Texts and where real data lives: the bundled sample, the data cache, the Lee corpus, a model's tokenizer.

Shared by ``evaluate`` and ``calibrate``; no model is run here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInputError

if TYPE_CHECKING:
    import torch

__all__ = ["sample_texts", "cache_dir", "LeeCorpus", "lee_corpus", "load_tokenizer", "position_limit", "leading_text"]

SAMPLE_TEXTS = "sample_texts.txt"
CHARS_PER_TOKEN = 16  # leading_text's first cut, in characters per token wanted; doubled while too few come out


def sample_texts() -> list[str]:
    """The bundled sample of English texts (see ``collabcompress/data/README.md``)."""
    data = resources.files("collabcompress").joinpath("data", SAMPLE_TEXTS).read_text(encoding="utf-8")
    return [line.strip() for line in data.splitlines() if line.strip() and not line.startswith("#")]


def cache_dir() -> Path:
    """Where scripts/fetch_data.py puts the real data: ``$COLLABCOMPRESS_CACHE``, else
    ``~/.cache/collabcompress``."""
    env = os.environ.get("COLLABCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "collabcompress"


@dataclass(frozen=True)
class LeeCorpus:
    """The 50 documents of ``lee.cor`` and the human similarity ratings (pairs i < j)."""

    documents: list[str]
    ratings: torch.Tensor  # (50, 50), upper triangle filled

    def __post_init__(self) -> None:
        n = len(self.documents)
        if self.ratings.shape != (n, n):
            raise BadInputError(f"Lee corpus: {n} documents but a {tuple(self.ratings.shape)} rating matrix")


def lee_corpus(directory: str | os.PathLike | None = None) -> LeeCorpus | None:
    """Read ``lee.cor`` (latin-1, one document per line) and ``similarities0-1.txt``.

    ``directory`` defaults to ``$COLLABCOMPRESS_CACHE/lee`` or ``~/.cache/collabcompress/lee``
    (``scripts/fetch_data.py`` puts it there). Returns ``None`` when the files are not there.
    """
    directory = Path(directory) if directory is not None else cache_dir() / "lee"
    docs, sims = directory / "lee.cor", directory / "similarities0-1.txt"
    if not (docs.is_file() and sims.is_file()):
        return None
    try:
        documents = [line.strip() for line in docs.read_text(encoding="latin-1").splitlines() if line.strip()]
        rows = [[float(v) for v in line.split()] for line in sims.read_text(encoding="latin-1").splitlines()
                if line.strip()]
        import torch

        ratings = torch.tensor(rows, dtype=torch.float64)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read the Lee corpus in {directory}: {e}") from e
    return LeeCorpus(documents, ratings)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")
# every file transformers' AutoTokenizer may open in a model directory (besides _TOKENIZER_FILES)
_TOKENIZER_READS = _TOKENIZER_FILES + ("config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
                                       "chat_template.jinja", "chat_template.json", "normalizer.json", "source.spm",
                                       "target.spm", "bpe.codes", "prophetnet.tokenizer")


def load_tokenizer(directories: Sequence[Path]):
    """The first tokenizer that loads from ``directories`` (GPT-2 style ones get a pad token).

    Only regular files inside each directory are read (a link out of it is refused): the
    tokenizer is built from checked copies (:func:`collabcompress.files.checkpoint.staged`).

    Raises:
        BadInputError: none of them holds a usable tokenizer, or one of its files points outside
            its directory or is not a regular file.
    """
    from transformers import AutoTokenizer

    from .checkpoint import staged

    errors = []
    for d in directories:
        if not any((d / name).is_file() or (d / name).is_symlink() for name in _TOKENIZER_FILES):
            continue
        with staged(d, _TOKENIZER_READS) as copies:
            try:
                tok = AutoTokenizer.from_pretrained(str(copies), local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError) as e:
                errors.append(f"{d}: {str(e).splitlines()[0].replace(str(copies), str(d)) if str(e) else type(e).__name__}")
                continue
        if len(tok) <= len(tok.all_special_tokens) + 1:  # transformers 5 builds an empty one from nothing
            errors.append(f"{d}: the tokenizer has no vocabulary")
            continue
        if tok.pad_token is None:  # GPT-2 style tokenizers: pad with EOS, masked out anyway
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok
    raise BadInputError("no tokenizer found (tokenizer.json or vocabulary files) in "
                        + " or ".join(str(d) for d in directories) + "".join(f"; {e}" for e in errors))


def position_limit(config, tokenizer=None) -> int:
    """Most tokens the model takes: its absolute position table (RoBERTa-style offsets removed)
    and the tokenizer's ``model_max_length``; ``1 << 30`` when neither sets one.

    ``config`` is a transformers config or the dict of a config.json (or ``None``).
    """
    def get(key: str):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    limits = [n for n in (get("max_position_embeddings"), get("n_positions"))
              if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    pad = get("pad_token_id")
    if limits and get("model_type") in ("roberta", "xlm-roberta", "camembert") and isinstance(pad, int):
        limits = [n - pad - 1 for n in limits]
    most = getattr(tokenizer, "model_max_length", None)
    if isinstance(most, int) and most < 1_000_000:
        limits.append(most)
    return min(limits) if limits else 1 << 30


def leading_text(tokenizer, text: str, max_tokens: int) -> str:
    """A prefix of ``text`` that holds its first ``max_tokens`` tokens (no special tokens), so
    that one enormous text is never tokenised whole when only its start is used.

    ``text`` itself when it has at most ``CHARS_PER_TOKEN * max_tokens`` characters; else the
    first that many, cut back to a whitespace (so that the last word is not split into other
    tokens) and doubled until they tokenise to more than ``max_tokens`` tokens or the whole
    text is reached: what is tokenised is a small multiple of the prefix needed, whatever the
    length of ``text``.
    """
    limit = CHARS_PER_TOKEN * max(1, max_tokens)
    while len(text) > limit:
        piece = text[:limit]
        space = max(piece.rfind(c) for c in " \n\t")
        piece = piece[:space] if space > limit // 2 else piece
        if len(tokenizer(piece, add_special_tokens=False)["input_ids"]) > max_tokens:
            return piece
        limit *= 2
    return text

