#!/usr/bin/env python
"""Shared rotary keys on the real SmolLM2-135M-Instruct: perplexity data-free, calibrated, refined and healed.

Everything through the CLI, as a user runs it (``collabcompress calibrate``, ``compress`` and
``evaluate --json``; times include each command's start-up):

- perplexity of the original and of the model compressed at key caches ``--ranks`` (reals per
  token and layer, of G*d = 192), data-free and calibrated (``calibrate`` on the first
  ``--calib-tokens`` tokens of ``lee_background.cor``), on the first ``--eval-tokens`` tokens of
  ``lee.cor`` (the 50 Lee documents joined with newlines, ``--window``-token windows; a different
  set of documents), beside the reference figures of docs/rotary.md ("Quality of the fit alone");
- variants (``--variants``: compress options such as ``rank=128,refine_steps=100,heal_steps=80``,
  ``budget=0.5,...`` or, sharing the values too, ``rank=128,value_rank=128,...`` and
  ``budget=0.75,budget_of=kv``), calibrated with ``--keep-windows`` kept windows of the first
  ``--variant-tokens`` tokens of ``lee_background.cor``, each with its perplexity on lee.cor and on
  all of the bundled sample texts, its key cache over all layers, and the time of compress and of
  its healing;
- the wall time of each ``calibrate`` and ``compress``.

Decode speed and cache bytes of SmolLM2 are measured by ``bench_latency.py --cases smollm2-128``.

    python scripts/fetch_data.py            # once: SmolLM2 and the Lee corpus
    python benchmarks/bench_rotary.py [--ranks 192 128 96 64] [--json PATH]
    python benchmarks/bench_rotary.py --quick     # rank 128, two short variants
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _common import cli, lee, log, missing, parser, read_corpus, report, smollm2, utf8_copy

NAME = "rotary"
# reference perplexity at each key cache (data-free, calibrated; docs/rotary.md); the original's 32.04
REFERENCE = {"original": 32.04, 128: (806.01, 35.81), 96: (879.57, 43.38), 64: (1218.61, 87.45)}
VARIANTS = ["rank=128,refine_steps=100", "rank=128,refine_steps=100,heal_steps=80",
            "budget=0.667,refine_steps=100,heal_steps=80", "budget=0.5,refine_steps=100,heal_steps=80",
            "budget=0.333,refine_steps=100,heal_steps=80"]
QUICK = ["rank=128,refine_steps=10", "budget=0.5,heal_steps=2"]


def _options(variant: str) -> list[str]:
    """``"budget=0.5,refine_steps=100"`` -> ``["--budget", "0.5", "--refine-steps", "100"]``."""
    out: list[str] = []
    for item in variant.split(","):
        key, _, value = item.partition("=")
        out += [f"--{key.strip().replace('_', '-')}", value.strip()]
    return out


def _timed_cli(*arguments, env: dict[str, str] | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    result = cli(*arguments, env=env)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=None, help="SmolLM2 directory (default: the data cache)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[192, 128, 96, 64], help="key cache per layer, of 192")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="calibrate --max-tokens of the rank rows")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="evaluate --max-tokens")
    ap.add_argument("--window", type=int, default=512, help="evaluate --window and calibrate --max-length")
    ap.add_argument("--variants", nargs="*", default=None,
                    help=f"compress options of the variants, key=value,... (default: {' '.join(VARIANTS)})")
    ap.add_argument("--variant-tokens", type=int, default=32768,
                    help="calibrate --max-tokens of the variants (moments from fewer tokens are noisy)")
    ap.add_argument("--keep-windows", type=int, default=16, help="calibrate --keep-sequences of the variants")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of every command (default: the environment's)")
    ap.add_argument("--quick", action="store_true", help=f"rank 128 only, variants {' '.join(QUICK)} (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks = [128]
        args.variants = QUICK if args.variants is None else args.variants
    args.variants = VARIANTS if args.variants is None else args.variants
    args.model = args.model or smollm2()
    corpus = lee()
    if not (args.model / "model.safetensors").is_file() or not (corpus / "lee.cor").is_file():
        return missing(f"needs SmolLM2 in {args.model} and the Lee corpus in {corpus}")

    env = None if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
    rows, steps = [], []  # steps: the calibrate runs, last
    with tempfile.TemporaryDirectory(prefix="cc-bench-rotary-") as tmp:
        tmp = Path(tmp)
        held_out = utf8_copy(read_corpus(corpus / "lee.cor"), tmp / "lee.txt")
        background = utf8_copy(read_corpus(corpus / "lee_background.cor"), tmp / "background.txt")

        def ppl(out: Path, texts: Path | None = None) -> dict:
            """evaluate's perplexity of the original and of ``out``: on ``texts`` (the first --eval-tokens
            tokens), else on all of the bundled sample."""
            which = ["--texts", texts, "--max-tokens", args.eval_tokens] if texts else ["--max-tokens", 10**8]
            return cli("evaluate", args.model, out, *map(str, which), "--window", str(args.window),
                       "--prompts", "0", env=env)["perplexity"]

        stats = tmp / "stats.safetensors"
        _, seconds = _timed_cli("calibrate", args.model, "--texts", background, "--out", stats,
                                "--max-tokens", str(args.calib_tokens), "--max-length", str(args.window), env=env)
        steps.append({"step": "calibrate", "tokens": args.calib_tokens, "seconds": seconds})
        original = None
        for rank in args.ranks:
            row = {"rank": rank}
            for kind, calibration in (("data_free", []), ("calibrated", ["--calibration", str(stats)])):
                out = tmp / f"{kind}-{rank}"
                _, seconds = _timed_cli("compress", args.model, "--out", out, "--rank", str(rank), *calibration,
                                        env=env)
                figures = ppl(out, held_out)
                original = figures["original"]
                row[f"{kind}_ppl"] = figures["compressed"]
                row[f"{kind}_compress_s"] = seconds
                log(f"rank {rank} {kind}: perplexity {figures['compressed']:.4f}")
            row["reference_data_free_ppl"], row["reference_calibrated_ppl"] = REFERENCE.get(rank, (None, None))
            rows.append(row)
        if args.variants:
            kept = tmp / "kept.safetensors"
            _, seconds = _timed_cli("calibrate", args.model, "--texts", background, "--out", kept,
                                    "--max-tokens", str(args.variant_tokens), "--max-length", str(args.window),
                                    "--keep-sequences", str(args.keep_windows), env=env)
            steps.append({"step": "calibrate, kept windows", "tokens": args.variant_tokens, "seconds": seconds})
        original_bundled = None
        for i, variant in enumerate(args.variants):
            out = tmp / f"variant-{i}"
            manifest, seconds = _timed_cli("compress", args.model, "--out", out, "--calibration", kept,
                                           *_options(variant), env=env)
            heal = manifest.get("heal") or {}
            figures, bundled = ppl(out, held_out), ppl(out)
            original, original_bundled = figures["original"], bundled["original"]
            rows.append({"variant": variant, "ppl": figures["compressed"], "ppl_bundled": bundled["compressed"],
                         "key_cache": sum(layer["shared_dim"] for layer in manifest["layers"]),
                         "full_key_cache": sum(layer["kv_heads"] * layer["head_dim"] for layer in manifest["layers"]),
                         "value_cache": sum(layer.get("value_rank") or layer["kv_heads"] * layer["head_dim"]
                                            for layer in manifest["layers"]),
                         "compress_s": seconds, "heal_s": heal.get("seconds"), "heal_steps_kept": heal.get("accepted"),
                         "heal_dtype": heal.get("dtype")})
            log(f"{variant}: perplexity {figures['compressed']:.4f}, bundled texts {bundled['compressed']:.4f}")
    rows.insert(0, {"model": "original", "ppl": original, "reference_ppl": REFERENCE["original"],
                    "ppl_bundled": original_bundled})
    return report(NAME, args, rows + steps)


if __name__ == "__main__":
    sys.exit(main())
