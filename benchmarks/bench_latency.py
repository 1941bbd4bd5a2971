#!/usr/bin/env python
"""Forward latency, decode speed and key cache of compressed models: `collabcompress bench` on a set of cases.

Each case is a model compressed data-free at one rank (``collabcompress compress SRC --out OUT
--rank R --max-iter N``; speed does not depend on the fit), measured by the product's own
``collabcompress bench SRC OUT --level model --json`` (interleaved original / compressed runs,
medians; see its help), so every figure here is one a user can reproduce with the CLI:

    minilm-192, minilm-96  the real all-MiniLM-L6-v2 (encoder: forward only)
    mpnet-384              an MPNet-sized model, random weights (12 layers, D = 768, encoder)
    gpt2-384               a GPT-2-shaped causal LM, random weights (12 layers, D = 768, 12 heads)
    smollm2-128            the real SmolLM2-135M-Instruct, key cache 128 of 192 per token and layer

Forward rows: compressed / original wall time per (batch, N), beside the FLOP model's ratio.
Decode rows (causal cases): tokens per second after a ``--context``-token prefill, batch 1, and
the key cache bytes summed over the cache tensors. ``--profile`` adds where the time of one
attention module goes (MiniLM at R = 192, layer 0, 8 x 128 tokens, torch.profiler self time).

    python scripts/fetch_data.py            # once: MiniLM and SmolLM2
    python benchmarks/bench_latency.py [--cases minilm-192 smollm2-128] [--threads 1] [--profile] [--json PATH]
    python benchmarks/bench_latency.py --quick --cases gpt2-384     # a smoke run, about a minute
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _common import check, cli, log, minilm, missing, parser, report, smollm2

NAME = "latency"
CASES = {"minilm-192": ("minilm", 192), "minilm-96": ("minilm", 96), "mpnet-384": ("mpnet", 384),
         "gpt2-384": ("gpt2", 384), "smollm2-128": ("smollm2", 128)}
COPIES_TARGET = 0.15  # share of the collaborative module's self time in copies and element-wise work
CATEGORIES = {  # profiler op name -> category of the breakdown
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "softmax": ("aten::_softmax", "aten::softmax", "aten::_safe_softmax"),
    "fused_sdpa": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "copies_elementwise": ("aten::copy_", "aten::mul", "aten::add", "aten::add_", "aten::cat", "aten::where",
                           "aten::masked_fill", "aten::masked_fill_", "aten::clone", "aten::_to_copy",
                           "aten::fill_", "aten::index_select", "aten::addcmul", "aten::addcmul_", "aten::sub",
                           "aten::div", "aten::neg", "aten::mul_", "aten::contiguous", "aten::zero_",
                           "aten::logical_not", "aten::isnan", "aten::eye", "aten::tril", "aten::triu"),
}


def _random_model(kind: str, directory: Path, layers: int) -> Path:
    """A transformers model with random weights, saved: fidelity does not matter here, only shapes."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if kind == "mpnet":  # room for N = 512 and more
        model = transformers.MPNetModel(transformers.MPNetConfig(num_hidden_layers=layers,
                                                                 max_position_embeddings=1026))
    else:  # a causal LM, so that bench measures decoding too
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, n_positions=2048))
    model.save_pretrained(str(directory))
    return directory


def _expected_key_cache_ratio(kind: str, rank: int) -> float | None:
    """Compressed / original key cache per token and layer: (R + H) / D for GPT-2 (D = 768, H = 12),
    R / (G d) for SmolLM2's shared rotary key (G d = 192)."""
    return {"gpt2": (rank + 12) / 768, "smollm2": rank / 192}.get(kind)


def _measure(args, name: str, source: Path, out: Path) -> tuple[list[dict], list[dict]]:
    kind, rank = CASES[name]
    cli("compress", source, "--out", out, "--rank", str(rank), "--max-iter", str(args.max_iter))
    result = cli("bench", source, out, "--level", "model", "--lengths", ",".join(map(str, args.lengths)),
                 "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--threads", str(args.threads),
                 "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--context", str(args.context),
                 "--decode-steps", str(args.decode_steps))
    for note in result["notes"]:
        log(f"{name}: {note}")
    rows = []
    for r in result["forward"]:
        memory = (r["peak_memory_bytes_compressed"] / r["peak_memory_bytes_original"]
                  if r["peak_memory_bytes_original"] else None)
        rows.append({"case": name, "batch_size": r["batch_size"], "seq_len": r["seq_len"],
                     "original_s": r["original"]["median_s"], "compressed_s": r["compressed"]["median_s"],
                     "ratio": r["ratio"]["median"], "ratio_q1": r["ratio"]["q1"], "ratio_q3": r["ratio"]["q3"],
                     "flop_model_ratio": r["flop_model_ratio"], "peak_memory_ratio": memory})
    checks = []
    d = result["decode"]
    if d is not None:
        expected = _expected_key_cache_ratio(kind, rank)
        rows.append({"case": name, "context": d["context"], "steps": d["steps"],
                     "original_tokens_per_s": d["original"]["tokens_per_second"],
                     "compressed_tokens_per_s": d["compressed"]["tokens_per_second"],
                     "tokens_per_s_ratio": d["tokens_per_second_ratio"],
                     "key_cache_bytes_original": d["key_cache_bytes_original"],
                     "key_cache_bytes_compressed": d["key_cache_bytes_compressed"],
                     "key_cache_ratio": d["key_cache_ratio"]})
        if expected is not None:
            checks.append(check(f"{name}: measured key cache is {expected:.6g} of the original's "
                                "(R + H of D per token; rotary: R of G d)", d["key_cache_ratio"],
                                abs(d["key_cache_ratio"] - expected) < 1e-5))
    return rows, checks


def _breakdown(module, x, repeats: int) -> dict[str, float]:
    """Milliseconds per call and the share of self CPU time per category over ``repeats`` calls."""
    import torch

    with torch.inference_mode():
        for _ in range(2):
            module(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                module(x)
    totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        category = next((c for c, ops in CATEGORIES.items() if event.key in ops), "other")
        totals[category] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {"ms_per_call": whole / repeats / 1e3, **{c: t / whole for c, t in totals.items()}}


def _profile(args, out: Path) -> tuple[list[dict], list[dict]]:
    """One attention module of MiniLM, original and compressed at R = 192 (``out``), profiled."""
    import torch
    import transformers

    from collabcompress.hf import from_pretrained

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    models = {"original": transformers.AutoModel.from_pretrained(str(minilm()), attn_implementation="sdpa").eval(),
              "compressed": from_pretrained(out).eval()}
    x = torch.randn(8, 128, models["original"].config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = [{"module": f"{side}, MiniLM R = 192 layer 0, 8 x 128",
             **_breakdown(m.encoder.layer[0].attention.self, x, args.profile_repeats)} for side, m in models.items()]
    share = rows[1]["copies_elementwise"]
    return rows, [check(f"copies and element-wise work < {COPIES_TARGET:.0%} of the compressed module's self time",
                        round(share, 4), share < COPIES_TARGET)]


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512], help="forward sequence lengths N")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="forward batch sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while measuring")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per setting (decode: steps)")
    ap.add_argument("--repeats", type=int, default=10, help="timed interleaved runs per setting")
    ap.add_argument("--context", type=int, default=1024, help="decode: prefill tokens")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode: timed one-token steps")
    ap.add_argument("--max-iter", type=int, default=3, help="compress --max-iter (speed does not depend on the fit)")
    ap.add_argument("--random-layers", type=int, default=12, help="layers of the random-weight cases")
    ap.add_argument("--profile", action="store_true", help="also profile one attention module of MiniLM at R = 192")
    ap.add_argument("--profile-repeats", type=int, default=20, help="profiled calls per module")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N = 32, batch 1, 2 repeats, 2 decode steps after 32 tokens, 2 random layers")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.batch_sizes, args.warmup, args.repeats = [32], [1], 0, 2
        args.context, args.decode_steps, args.random_layers, args.profile_repeats = 32, 2, 2, 2
    real = {"minilm": minilm(), "smollm2": smollm2()}
    for name in args.cases + (["minilm-192"] if args.profile else []):
        kind = CASES[name][0]
        if kind in real and not (real[kind] / "model.safetensors").is_file():
            return missing(f"{name} needs {real[kind]}")

    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="cc-bench-latency-") as tmp:
        tmp = Path(tmp)
        for name in args.cases:
            kind = CASES[name][0]
            source = real.get(kind) or _random_model(kind, tmp / kind, args.random_layers)
            log(f"{name}: compress and bench")
            case_rows, case_checks = _measure(args, name, source, tmp / name)
            rows += case_rows
            checks += case_checks
        if args.profile:
            out = tmp / "minilm-192"
            if not out.exists():
                cli("compress", minilm(), "--out", out, "--rank", "192", "--max-iter", str(args.max_iter))
            profile_rows, profile_checks = _profile(args, out)
            rows += profile_rows
            checks += profile_checks
    rows.sort(key=lambda r: ("context" in r, "module" in r))  # forward, then decode, then profile rows
    return report(NAME, args, rows, checks)


if __name__ == "__main__":
    sys.exit(main())
