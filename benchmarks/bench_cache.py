#!/usr/bin/env python
"""Key cache of incremental decoding: original GPT-2 against the loaded collaborative model.

Builds a GPT-2-shaped transformers checkpoint (random weights, ``--layers`` x
``--d-model`` with ``--heads`` heads; fidelity does not matter here, only sizes and time),
compresses it at ``--rank``, loads it with ``collabcompress.hf.from_pretrained``, and for
both models runs a prompt of ``--prompt`` tokens through the model, then decodes
``--new`` tokens one at a time from the cache. Prints, side by side: the key-cache and
value-cache elements per token and layer as held in memory (read from the cache tensors
themselves), the total cache bytes after decoding, what ``report`` counts for the key
cache (R + H), and the median decode-step time; then checks that the greedy tokens agree
with a cache-free forward pass of the collaborative model.

    python benchmarks/bench_cache.py [--layers 12 --d-model 768 --heads 12 --rank 384]
                                     [--prompt 512 --new 64 --batch 1]

Exit code 0 when the key cache holds R + H elements per token and layer and the cached
decoding agrees with the cache-free one, 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _gpt2(directory: Path, layers: int, d_model: int, heads: int, positions: int) -> Path:
    import transformers

    config = transformers.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, n_positions=positions,
                                     vocab_size=1000)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(directory))
    return directory


def _decode(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, object, list[float]]:
    """Greedy decoding from the cache: (tokens, cache, seconds per step)."""
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(new - 1):
            start = time.perf_counter()
            out = model(input_ids=tokens[-1], cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache = out.past_key_values
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), cache, times


def _cache_sizes(cache) -> tuple[int, int, int, int]:
    """(key elements per token and layer, value elements per token and layer, tokens, total bytes)."""
    layer = cache.layers[0]
    tokens = layer.keys.shape[-2]
    per_token = lambda t: t[0].numel() // t.shape[-2]  # noqa: E731  (one sequence of the batch)
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return per_token(layer.keys), per_token(layer.values), tokens, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    import transformers
    from rich.console import Console
    from rich.table import Table

    from collabcompress.commands.compress import CompressOptions, compress
    from collabcompress.hf import from_pretrained

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        source = _gpt2(Path(tmp) / "gpt2", args.layers, args.d_model, args.heads, args.prompt + args.new)
        compress(source, Path(tmp) / "collab", CompressOptions(rank=args.rank, max_iter=3))
        original = transformers.GPT2LMHeadModel.from_pretrained(str(source)).eval()
        collab = from_pretrained(Path(tmp) / "collab", model_class="GPT2LMHeadModel")
        ids = torch.randint(0, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
        rows = {}
        for name, model in (("original", original), ("collaborative", collab)):
            tokens, cache, times = _decode(model, ids, args.new)
            rows[name] = (*_cache_sizes(cache), statistics.median(times), tokens)
        with torch.inference_mode():  # the same greedy tokens without a cache
            full = collab(input_ids=torch.cat([ids, rows["collaborative"][5][:, :-1]], 1), use_cache=False)
        agree = torch.equal(full.logits[:, args.prompt - 1:].argmax(-1), rows["collaborative"][5])

    expected_key = args.rank + args.heads
    table = Table(title=f"GPT-2 shape: {args.layers} layers, D = {args.d_model}, H = {args.heads}, R = {args.rank}; "
                        f"prompt {args.prompt} + {args.new} decoded tokens, batch {args.batch}, float32, 1 thread",
                  title_justify="left")
    for col in ("", "original", "collaborative", "change"):
        table.add_column(col, justify="left" if not col else "right")
    (ko, vo, n, bo, to, _), (kc, vc, _, bc, tc, _) = rows["original"], rows["collaborative"]
    table.add_row("key cache, elements per token and layer", f"{ko:,}", f"{kc:,}", f"{(kc - ko) / ko:+.1%}")
    table.add_row("value cache, elements per token and layer", f"{vo:,}", f"{vc:,}", f"{(vc - vo) / vo:+.1%}")
    table.add_row(f"cache bytes after {n} tokens", f"{bo:,}", f"{bc:,}", f"{(bc - bo) / bo:+.1%}")
    table.add_row("`report` key cache per token and layer (R + H)", f"{args.d_model:,}", f"{expected_key:,}", "")
    table.add_row("decode step, median ms", f"{to * 1e3:.2f}", f"{tc * 1e3:.2f}", f"{(tc - to) / to:+.1%}")
    Console(width=160).print(table)
    ok = kc == expected_key and agree
    print(f"key cache = R + H per token: {'yes' if kc == expected_key else 'NO'}; "
          f"cached greedy tokens equal the cache-free forward: {'yes' if agree else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
