#!/usr/bin/env python
"""A causal prefill of the real SmolLM2-135M-Instruct: torch SDPA's flash kernel against the product.

One run, side by side, interleaved (:func:`collabcompress.commands.bench.interleaved`: original,
compressed with the product path, compressed with the flash path in turn, ``--repeats`` rounds
after one warm-up), batch 1, N in
``--lengths``, ``--threads`` threads, float32, on the model compressed data-free at ``--rank``
(the time does not depend on how good the fit is):

- the forward pass without autograd (a prefill, what ``bench`` times);
- the forward and backward pass of the last hidden states with only the collaborative tensors
  trained (the body of a healing step; the output layer is not included);
- the largest difference of the logits between the two paths, against the largest logit.

"product" is :func:`collabcompress.runtime.attention.collaborative_attention`'s own batched product (full
scores, the causal mask filled in); "flash" is its rule of today
(:func:`collabcompress.runtime.attention._cpu_flash`: SDPA's fused CPU kernel with the values zero-padded to
the key width). Medians of the wall times, and the medians of the per-round ratios.

    python scripts/fetch_data.py            # once: SmolLM2
    python benchmarks/bench_prefill.py [--lengths 128 512 1024] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import json
import statistics

import torch

from _common import smollm2_pair, smollm2_parser


def main() -> int:
    ap = smollm2_parser(__doc__, repeats=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    args = ap.parse_args()
    loaded = smollm2_pair(args)
    if loaded is None:
        return 2
    model_dir, original, model = loaded
    import collabcompress.runtime.attention as cnn
    from collabcompress.commands.bench import interleaved

    flash_rule = cnn._cpu_flash

    def path(flash: bool) -> None:
        cnn._cpu_flash = flash_rule if flash else (lambda *a, **k: False)

    rows = []
    for n in args.lengths:
        ids = torch.randint(0, original.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            path(False)
            product = model(input_ids=ids).logits
            path(True)
            flash = model(input_ids=ids).logits
        row = {"n": n, "max_logit_diff": float((product - flash).abs().max()),
               "max_logit": float(product.abs().max())}
        for kind in ("forward", "forward+backward"):
            def run(m, flash=True, kind=kind):
                path(flash)
                if kind == "forward":
                    with torch.no_grad():
                        m(input_ids=ids)
                else:
                    m.base_model(input_ids=ids).last_hidden_state.square().mean().backward()

            runs = {"product": lambda: run(model, False), "flash": lambda: run(model, True)}
            if kind == "forward":
                runs = {"original": lambda: run(original), **runs}
            times = dict(zip(runs, interleaved(*runs.values(), warmup=1, repeats=args.repeats)))
            model.zero_grad(set_to_none=True)
            row[kind] = {name: statistics.median(t) for name, t in times.items()}
            row[kind]["flash_over_product"] = statistics.median(
                f / p for f, p in zip(times["flash"], times["product"]))
            if "original" in times:
                for name in ("product", "flash"):
                    row[kind][f"{name}_over_original"] = statistics.median(
                        c / o for c, o in zip(times[name], times["original"]))
        rows.append(row)
    path(True)
    print(f"SmolLM2-135M-Instruct at rank {args.rank}, batch 1, {args.threads} threads, float32, "
          f"medians of {args.repeats} interleaved rounds")
    print("| N | original forward | product forward (/ original) | flash forward (/ original) | flash / product, "
          "forward | product fwd+bwd | flash fwd+bwd | flash / product, fwd+bwd | logits differ by |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, b = r["forward"], r["forward+backward"]
        print(f"| {r['n']} | {f['original']:.3f} s | {f['product']:.3f} s ({f['product_over_original']:.2f}) | "
              f"{f['flash']:.3f} s ({f['flash_over_original']:.2f}) | {f['flash_over_product']:.2f} | "
              f"{b['product']:.3f} s | {b['flash']:.3f} s | {b['flash_over_product']:.2f} | "
              f"{r['max_logit_diff']:.1e} of {r['max_logit']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_dir), "rank": args.rank, "threads": args.threads,
                                         "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
