#!/usr/bin/env python
"""Issue 15: the compressed model's wall time against the original's, before and after the runtime work.

One run, side by side, ``--threads`` threads (default 1), every measurement interleaved
(original, before, after in turn, ``--runs`` times after a warm-up), medians and spread
(min..max) of the per-run ratios compressed / original:

(a) whole-model forward, batch ``--batch`` (8), N in ``--lengths`` (32, 128, 512): the real
    all-MiniLM-L6-v2 compressed at R = 192 and R = 96, and an MPNet-sized random model (12
    layers, D = 768, 12 heads) at R = 384, beside the FLOP ratio of the FLOP model
    (:func:`collabcompress.commands.report.build_report`, from :mod:`collabcompress.maths.costs`);
(b) decoding with a DynamicCache, batch 1: a GPT-2-shaped random ``GPT2Model`` (12 layers,
    D = 768) at R = 384, time per step over 64 steps after a 512-token prefill; the real
    SmolLM2-135M-Instruct at 128 of 192 key numbers per token, tokens per second over
    ``--steps`` steps after a 1,024-token prefill; key cache bytes summed over the cache
    tensors after the prefill (measured);
(c) a torch.profiler breakdown of one collaborative attention module (the swapped
    ``BertSelfAttention`` of MiniLM R = 192: its q/k/v projections and the attention, on
    8 x 128): self time in matmul, softmax, copies and element-wise work, other.

"before" is the package as it was at git revision ``--before`` (default 9a0e71e, the last
commit before issue 15's runtime: q' = [m_h U^T x, e_h] concatenated and torch SDPA with a
broadcast key), extracted with ``git archive`` into a temporary directory and imported as
``collabcompress_before``; both load the same compressed directory. Compression uses
``--max-iter`` CP-ALS sweeps (speed does not depend on the fit).

    python benchmarks/bench_runtime.py [--quick] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from _common import cache_dir, default_model

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = {  # profiler op name -> category of the breakdown
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "softmax": ("aten::_softmax", "aten::softmax", "aten::_safe_softmax"),
    "fused SDPA kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "copies and element-wise": ("aten::copy_", "aten::mul", "aten::add", "aten::add_", "aten::cat", "aten::where",
                                "aten::masked_fill", "aten::masked_fill_", "aten::clone", "aten::_to_copy",
                                "aten::fill_", "aten::index_select", "aten::addcmul", "aten::addcmul_", "aten::sub",
                                "aten::div", "aten::neg", "aten::mul_", "aten::contiguous", "aten::zero_",
                                "aten::logical_not", "aten::isnan", "aten::eye", "aten::tril", "aten::triu"),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _before_package(ref: str, into: Path):
    """The package at git revision ``ref``, importable as ``collabcompress_before``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src/collabcompress"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "collabcompress").rename(into / "collabcompress_before")
    sys.path.insert(0, str(into))
    return importlib.import_module("collabcompress_before.hf")


def _interleaved(fns: dict, runs: int) -> dict[str, list[float]]:
    """Wall seconds of each function, ``runs`` rounds after one warm-up, the order rotating per round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            fns[n]()
        for i in range(runs):
            for n in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    return times


def _ratios(times: dict[str, list[float]], base: str = "original") -> dict[str, dict[str, float]]:
    """Per-round ratio to ``base``: median, min, max; plus the median seconds of each."""
    out = {}
    for name, ts in times.items():
        r = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"seconds": statistics.median(ts), "ratio": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def _compress(src: Path, out: Path, rank: int, max_iter: int) -> Path:
    from collabcompress.commands.compress import CompressOptions, compress

    if not out.exists():
        compress(src, out, CompressOptions(rank=rank, max_iter=max_iter))
    return out


def _three(src: Path, out: Path, before_hf, model_class: str | None = None) -> dict[str, torch.nn.Module]:
    import transformers

    from collabcompress import hf

    cls = getattr(transformers, model_class) if model_class else transformers.AutoModel
    try:
        original = cls.from_pretrained(str(src), attn_implementation="sdpa")
    except ValueError:  # e.g. MPNet computes its attention itself
        original = cls.from_pretrained(str(src))
    return {"original": original.eval(),
            "before": before_hf.from_pretrained(out, model_class=model_class).eval(),
            "after": hf.from_pretrained(out, model_class=model_class).eval()}


def _encoders(args, tmp: Path, before_hf) -> list[dict]:
    import transformers

    from collabcompress.commands.report import build_report

    mpnet = tmp / "mpnet"
    if not mpnet.exists():
        torch.manual_seed(0)
        config = transformers.MPNetConfig(max_position_embeddings=1026)  # room for N = 512 and more
        transformers.MPNetModel(config).save_pretrained(str(mpnet))
    sources = {"MiniLM": default_model(), "MPNet-sized": mpnet}
    cases = [(label, sources[label], int(rank)) for label, rank in (c.split(":") for c in args.encoder_cases)]
    rows = []
    for label, src, rank in cases:
        out = _compress(src, tmp / f"{label}-{rank}", rank, args.max_iter)
        models = _three(src, out, before_hf)
        report = build_report(out, args.lengths)
        vocab = models["original"].config.vocab_size
        for n in args.lengths:
            ids = torch.randint(5, vocab, (args.batch, n), generator=torch.Generator().manual_seed(n))
            mask = torch.ones_like(ids)
            fns = {k: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for k, m in models.items()}
            r = _ratios(_interleaved(fns, args.runs))
            flops = report.model_flops(n, True) / report.model_flops(n, False)
            rows.append({"model": label, "rank": rank, "batch": args.batch, "seq_len": n, "flop_ratio": flops,
                         "before": r["before"], "after": r["after"], "original_seconds": r["original"]["seconds"]})
            _log(f"{label} R={rank} N={n}: before {r['before']['ratio']:.2f}, after {r['after']['ratio']:.2f}, "
                 f"FLOPs {flops:.3f}")
        del models
    return rows


def _key_cache_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)


def _decoder(models: dict, prefill: int, steps: int, runs: int, vocab: int) -> dict:
    """Seconds per cached decoding step after ``prefill`` tokens (batch 1), and key cache bytes."""
    import transformers

    from collabcompress.runtime import adapters

    ids = torch.randint(5, vocab, (1, prefill + steps), generator=torch.Generator().manual_seed(0))
    caches: dict[str, int] = {}

    def step_time(name, model):
        def run():
            cache = transformers.DynamicCache(config=model.config)
            model(input_ids=ids[:, :prefill], **{adapters.cache_keyword(model): cache}, use_cache=True)
            caches[name] = _key_cache_bytes(cache)
            t0 = time.perf_counter()
            for i in range(prefill, prefill + steps):
                model(input_ids=ids[:, i:i + 1], **{adapters.cache_keyword(model): cache}, use_cache=True)
            return (time.perf_counter() - t0) / steps
        return run

    names = list(models)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(runs + 1):  # round 0 warms up
            for n in names[i % len(names):] + names[:i % len(names)]:
                t = step_time(n, models[n])()
                if i:
                    per_step[n].append(t)
    r = _ratios(per_step)
    return {k: {**v, "key_cache_bytes": caches[k]} for k, v in r.items()}


def _decoders(args, tmp: Path, before_hf) -> list[dict]:
    import transformers

    gpt2 = tmp / "gpt2"
    if not gpt2.exists():
        torch.manual_seed(0)
        transformers.GPT2Model(transformers.GPT2Config()).save_pretrained(str(gpt2))
    smol = cache_dir() / "smollm2-135m-instruct"
    rows = []
    for label, src, rank, prefill, steps, cls in (
            ("GPT-2-shaped", gpt2, 384, args.gpt2_prefill, args.gpt2_steps, None),
            ("SmolLM2-135M", smol, 128, args.context, args.steps, "LlamaForCausalLM")):
        out = _compress(src, tmp / f"{label}-{rank}", rank, args.max_iter)
        models = _three(src, out, before_hf, cls)
        r = _decoder(models, prefill, steps, args.decode_runs, models["original"].config.vocab_size)
        rows.append({"model": label, "rank": rank, "prefill": prefill, "steps": steps, **r})
        _log(f"{label} R={rank} decode after {prefill}: step before {r['before']['ratio']:.3f}, after "
             f"{r['after']['ratio']:.3f}; key cache {r['after']['key_cache_bytes']:,} of "
             f"{r['original']['key_cache_bytes']:,} bytes")
        del models
    return rows


def _breakdown(module, args_, kwargs, repeats: int, op_rows: int = 0) -> dict[str, float]:
    """Share of self CPU time per category over ``repeats`` calls; the ``op_rows`` costliest ops to stderr."""
    with torch.inference_mode():
        for _ in range(2):
            module(*args_, **kwargs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                module(*args_, **kwargs)
    if op_rows:
        _log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=op_rows))
    totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        category = next((c for c, ops in CATEGORIES.items() if event.key in ops), "other")
        totals[category] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {"ms_per_call": whole / repeats / 1e3, **{c: t / whole for c, t in totals.items()}}


def _profile(args, tmp: Path, before_hf) -> dict:
    out = _compress(default_model(), tmp / "MiniLM-192", 192, args.max_iter)
    models = _three(default_model(), out, before_hf)
    x = torch.randn(8, 128, models["original"].config.hidden_size, generator=torch.Generator().manual_seed(0))
    result = {}
    for name, model in models.items():
        layer = model.encoder.layer[0].attention.self
        result[name] = _breakdown(layer, (x,), {}, 5 if args.quick else 20, args.op_table)
        _log(f"profile {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in result[name].items()))
    return result


def _table(results: dict) -> str:
    lines = ["| model | N | FLOP ratio | before | after |", "|---|---|---|---|---|"]
    def cell(r: dict, digits: int) -> dict[str, str]:
        return {k: f"{r[k]['ratio']:.{digits}f} ({r[k]['min']:.{digits}f}..{r[k]['max']:.{digits}f})"
                for k in ("before", "after")}

    for r in results["encoders"]:
        c = cell(r, 2)
        lines.append(f"| {r['model']} R = {r['rank']}, B = {r['batch']} | {r['seq_len']} | {r['flop_ratio']:.3f} | "
                     f"{c['before']} | {c['after']} |")
    lines += ["", "| decoder, batch 1 | context | step time before | step time after | key cache bytes "
                  "(original -> after) |", "|---|---|---|---|---|"]
    for r in results["decoders"]:
        c = cell(r, 3)
        lines.append(f"| {r['model']} R = {r['rank']} | {r['prefill']} + {r['steps']} | {c['before']} | "
                     f"{c['after']} | {r['original']['key_cache_bytes']:,} -> {r['after']['key_cache_bytes']:,} |")
    lines += ["", "| one attention module, MiniLM R = 192, 8 x 128 | ms | matmul | softmax | fused SDPA | copies and "
                  "element-wise | other |", "|---|---|---|---|---|---|---|"]
    for name, p in results["profile"].items():
        lines.append(f"| {name} | {p['ms_per_call']:.2f} | {p['matmul']:.0%} | {p['softmax']:.0%} | "
                     f"{p['fused SDPA kernel']:.0%} | {p['copies and element-wise']:.1%} | {p['other']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds per forward measurement")
    parser.add_argument("--decode-runs", type=int, default=3, help="interleaved rounds per decoding measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--context", type=int, default=1024, help="SmolLM2 prefill tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="SmolLM2 decoding steps timed")
    parser.add_argument("--gpt2-prefill", type=int, default=512)
    parser.add_argument("--gpt2-steps", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=10, help="CP-ALS sweeps when compressing")
    parser.add_argument("--before", default="9a0e71e", help="git revision of the 'before' runtime")
    parser.add_argument("--parts", nargs="+", default=["encoders", "decoders", "profile"])
    parser.add_argument("--encoder-cases", nargs="+", default=["MiniLM:192", "MiniLM:96", "MPNet-sized:384"],
                        help="model:R pairs of part (a)")
    parser.add_argument("--op-table", type=int, default=0, metavar="ROWS",
                        help="print the profile's costliest ROWS ops per model (stderr)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds, short sequences")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.decode_runs, args.lengths = 2, 1, [32, 128]
        args.context, args.steps, args.gpt2_prefill, args.gpt2_steps = 128, 4, 64, 4
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results: dict = {"threads": args.threads, "before": args.before, "torch": torch.__version__,
                     "transformers": transformers.__version__, "encoders": [], "decoders": [], "profile": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before_hf = _before_package(args.before, tmp / "before")
        if "encoders" in args.parts:
            results["encoders"] = _encoders(args, tmp, before_hf)
        if "decoders" in args.parts:
            results["decoders"] = _decoders(args, tmp, before_hf)
        if "profile" in args.parts:
            results["profile"] = _profile(args, tmp, before_hf)
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
