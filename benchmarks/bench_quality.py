#!/usr/bin/env python
"""Embedding quality of the data-free compression of the real all-MiniLM-L6-v2.

For each shared width R the model is compressed with the default method (factored CP-ALS,
spectral initialisation, no calibration data) and evaluated with
``collabcompress.evaluate.evaluate`` on

- the first ``--docs`` documents of ``lee_background.cor`` (truncated to ``--max-length``
  tokens): cosine of the pooled embeddings to the original's (mean, min), nearest
  neighbour agreement, largest hidden-state difference, and the Lee 50-document Spearman
  correlation with the human ratings;
- the bundled sample texts: mean cosine (the acceptance figure of ``evaluate``).

The paper's code path (Cordonnier et al., github.com/epfml/collaborative-attention,
``swap_to_collaborative``): tensorly ``parafac(init="random", tol=1e-6)`` with the pytorch
backend, float32, on the dense tensor ``einsum("hdq,hdk->qhk")`` (D x H x D) of every
layer, is run at ``--parafac-rank``; its factors overwrite the collab tensors of our own
output at that rank (content bias, value and every other tensor are identical), so both
rows are loaded and evaluated the same way.

    python scripts/fetch_data.py                 # once: MiniLM and the Lee corpus
    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py [--ranks 96 192 288] [--no-parafac] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def _cache() -> Path:
    env = os.environ.get("COLLABCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "collabcompress"


def parafac_factors(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int, rank: int,
                    seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """The paper's decomposition of one layer -> ({query, key, mixing}, relative error)."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    d_model = w_query.shape[1]
    wq = w_query.float().view(n_head, -1, d_model)  # (H, d, D)
    wk = w_key.float().view(n_head, -1, d_model)  # (H, d, D)
    dense = torch.einsum("hdq,hdk->qhk", wq, wk)  # (D, H, D), slice h = P_h
    weights, (u, mixing, v) = parafac(dense, rank, init="random", tol=1e-6, random_state=seed)
    mixing = mixing * weights  # (H, R); weights are ones unless normalised
    approx = torch.einsum("qr,hr,kr->qhk", u, mixing, v)
    error = float((dense - approx).norm() / dense.norm())
    return {"query": u.T.contiguous(), "key": v.T.contiguous(), "mixing": mixing.contiguous()}, error


def overwrite_with_parafac(out: Path, source: Path, rank: int, seed: int) -> tuple[float, list[float]]:
    """Replace the collab tensors of the output directory ``out`` by parafac factors; -> (seconds, errors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from collabcompress.arch import detect, load_query_key
    from collabcompress.io import open_checkpoint

    manifest_path = out / "collab_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    ckpt = open_checkpoint(source)
    specs = {s.module: s for s in detect(ckpt)}
    weights_file = out / "model.safetensors"
    tensors = load_file(str(weights_file))
    with safe_open(str(weights_file), "pt") as f:
        metadata = f.metadata()
    start, errors = time.perf_counter(), []
    for layer in manifest["layers"]:
        spec = specs[layer["module"]]
        qk = load_query_key(ckpt, spec, torch.float32)
        factors, error = parafac_factors(qk.w_query, qk.w_key, spec.n_head, rank, seed)
        for key, name in layer["tensors"].items():
            if key in factors:
                tensors[name] = factors[key].to(tensors[name].dtype)
        layer["relative_error"] = error
        errors.append(error)
        print(f"  parafac {layer['module']}: relative error {error:.4f}", file=sys.stderr)
    seconds = time.perf_counter() - start
    ckpt.close()
    save_file(tensors, str(weights_file), metadata=metadata)
    manifest["settings"]["method"] = "tensorly-parafac (bench_quality.py)"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return seconds, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[96, 192, 288])
    parser.add_argument("--parafac-rank", type=int, default=192)
    parser.add_argument("--no-parafac", action="store_true", help="skip the paper's code path (about a minute)")
    parser.add_argument("--docs", type=int, default=200, help="lee_background.cor documents to evaluate on")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    import transformers
    from rich.console import Console
    from rich.table import Table

    from collabcompress.compress import CompressOptions, compress
    from collabcompress.evaluate import evaluate

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source, lee = _cache() / "all-MiniLM-L6-v2", _cache() / "lee"
    if not (source / "model.safetensors").is_file() or not (lee / "lee_background.cor").is_file():
        print("needs the real MiniLM and the Lee corpus: run `python scripts/fetch_data.py`", file=sys.stderr)
        return 3
    docs = [line.strip() for line in (lee / "lee_background.cor").read_text(encoding="latin-1").splitlines()
            if line.strip()][: args.docs]

    runs = [("cp-als (ours, data-free)", r, False) for r in args.ranks]
    if not args.no_parafac:
        runs.append(("tensorly parafac (paper)", args.parafac_rank, True))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        for method, rank, paper in runs:
            out = Path(tmp) / f"{'parafac' if paper else 'cpals'}-{rank}"
            start = time.perf_counter()
            manifest = compress(source, out, CompressOptions(rank=rank, seed=args.seed))
            seconds = time.perf_counter() - start
            errors = [layer["relative_error"] for layer in manifest["layers"]]
            if paper:
                seconds, errors = overwrite_with_parafac(out, source, rank, args.seed)
            on_docs = evaluate(source, out, docs, max_length=args.max_length, lee=lee)
            on_sample = evaluate(source, out, None, lee=False)
            rows.append({"method": method, "rank": rank, "seconds": round(seconds, 2),
                         "relative_error_mean": sum(errors) / len(errors),
                         "cosine_mean": on_docs["cosine_mean"], "cosine_min": on_docs["cosine_min"],
                         "nn_agreement": on_docs["nn_agreement"], "max_abs_diff": on_docs["max_abs_diff"],
                         "lee_spearman": on_docs["lee"]["spearman_compressed"],
                         "lee_spearman_original": on_docs["lee"]["spearman_original"],
                         "sample_cosine_mean": on_sample["cosine_mean"],
                         "sample_cosine_min": on_sample["cosine_min"]})
            print(f"done: {method} R={rank}", file=sys.stderr)

    table = Table(title=f"all-MiniLM-L6-v2 (H*d = 384), {len(docs)} lee_background docs <= {args.max_length} tokens; "
                        f"Lee Spearman of the original: {rows[0]['lee_spearman_original']:.4f}",
                  title_justify="left")
    for col in ("method", "R", "time s", "rel. error", "cos mean", "cos min", "NN agree", "max |diff|",
                "Lee Spearman", "sample cos mean", "sample cos min"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], str(r["rank"]), f"{r['seconds']:.1f}", f"{r['relative_error_mean']:.3f}",
                      f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}", f"{r['nn_agreement']:.1%}",
                      f"{r['max_abs_diff']:.3f}", f"{r['lee_spearman']:.4f}", f"{r['sample_cosine_mean']:.4f}",
                      f"{r['sample_cosine_min']:.4f}")
    Console(soft_wrap=False, width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
