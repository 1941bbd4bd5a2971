#!/usr/bin/env python
"""Embedding quality of the compressed real all-MiniLM-L6-v2: data-free, the paper's parafac, calibrated, refined.

Compresses the model several ways through the CLI (``collabcompress calibrate`` and
``compress``; times include each command's start-up) and evaluates every result the same way:

- data-free: the default method (factored CP-ALS, spectral initialisation) at ``--ranks``;
- the paper's code path (Cordonnier et al., github.com/epfml/collaborative-attention,
  ``swap_to_collaborative``): tensorly ``parafac(init="random", tol=1e-6)``, pytorch backend,
  float32, on the dense D x H x D tensor of every layer, at ``--parafac-rank``; its factors
  replace the collaborative tensors of our own output at that rank (every other tensor is the
  same), so both are loaded and evaluated alike (``--skip-parafac`` saves a few minutes);
- calibrated: ``calibrate`` on ``lee_background.cor`` (300 news documents; ``--keep-sequences``
  windows kept for refinement), then ``compress --calibration`` at ``--calibrated-ranks`` and
  with ``--refine-steps`` at ``--refine-ranks``.

Every result is evaluated with ``collabcompress evaluate --json`` on text NOT in the calibration
set: the bundled sample texts and the 50 Lee documents ``lee.cor``: cosine of the pooled
embeddings to the original's (mean, min), nearest-neighbour agreement, largest hidden-state
difference, and the Lee 50-document Spearman correlation with the human ratings.
``--in-sample N`` adds the mean cosine on the first N documents of the calibration set itself
(not a held-out figure). Errors: ``error_reported`` is the manifest's per-layer error (for
calibrated rows, of the whitened, head-weighted slices), ``error_plain`` ||P - P_hat||_F / ||P||_F,
the same measure for every row; both the mean over layers.

    python scripts/fetch_data.py                 # once: MiniLM and the Lee corpus
    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py [--skip-parafac] [--json PATH]
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import check, cli, lee, log, minilm, missing, parser, read_corpus, report, utf8_copy

NAME = "quality"
COSINE_TARGETS = (("calibrated", 192, 0.985), ("calibrated", 96, 0.96), ("refined", 192, 0.99))
TIME_TARGET = 60.0  # seconds: calibrate + compress at R = 192 without refinement
EMBEDDING = ("cosine_mean", "cosine_min", "nn_agreement", "max_abs_diff")


# --------------------------------------------------------------------------- the paper's code path

def parafac_factors(w_query, w_key, n_head: int, rank: int, seed: int):
    """The paper's decomposition of one layer -> ({query, key, mixing}, relative error)."""
    import tensorly as tl
    import torch
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    d_model = w_query.shape[1]
    wq = w_query.float().view(n_head, -1, d_model)  # (H, d, D)
    wk = w_key.float().view(n_head, -1, d_model)  # (H, d, D)
    dense = torch.einsum("hdq,hdk->qhk", wq, wk)  # (D, H, D), slice h = P_h
    weights, (u, mixing, v) = parafac(dense, rank, init="random", tol=1e-6, random_state=seed)
    mixing = mixing * weights  # (H, R); weights are ones unless normalised
    approx = torch.einsum("qr,hr,kr->qhk", u, mixing, v)  # (D, H, D)
    error = float((dense - approx).norm() / dense.norm())
    return {"query": u.T.contiguous(), "key": v.T.contiguous(), "mixing": mixing.contiguous()}, error


def overwrite_with_parafac(out: Path, source: Path, rank: int, seed: int) -> float:
    """Replace the collaborative query, key and mixing tensors of the unsharded output ``out`` by
    parafac's, and its manifest's errors and file record to match; returns the seconds of the
    decompositions."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    manifest_path = out / "collab_manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    weights_file = out / "model.safetensors"
    tensors = load_file(str(weights_file))
    with safe_open(str(weights_file), "pt") as f:
        metadata = f.metadata()
    seconds = 0.0
    with safe_open(str(source / "model.safetensors"), "pt") as original:
        for layer in manifest["layers"]:
            w_query = original.get_tensor(f"{layer['module']}.query.weight")  # (H*d, D)
            w_key = original.get_tensor(f"{layer['module']}.key.weight")  # (H*d, D)
            start = time.perf_counter()
            factors, error = parafac_factors(w_query, w_key, layer["heads"], rank, seed)
            seconds += time.perf_counter() - start
            log(f"  parafac {layer['module']}: relative error {error:.4f}")
            for key, factor in factors.items():
                name = layer["tensors"][key]
                tensors[name] = factor.to(tensors[name].dtype).contiguous()
            layer["relative_error"] = layer["relative_error_plain"] = error
    save_file(tensors, str(weights_file), metadata=metadata)
    data = weights_file.read_bytes()
    for record in manifest["outputs"]:
        if record["name"] == weights_file.name:
            record.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return seconds


# --------------------------------------------------------------------------- evaluation

def measure(source: Path, out: Path, lee_file: Path, in_sample: Path | None, in_sample_length: int) -> dict:
    """The evaluation of one output (the columns of a row)."""
    manifest = json.loads((out / "collab_manifest.json").read_text(encoding="utf-8"))
    layers = manifest["layers"]
    plain = [la["relative_error_plain"] if la.get("relative_error_plain") is not None else la["relative_error"]
             for la in layers]
    bundled = cli("evaluate", source, out)  # the bundled texts, and the Lee Spearman on lee.cor
    held = cli("evaluate", source, out, "--texts", lee_file)
    row = {"error_reported": sum(la["relative_error"] for la in layers) / len(layers),
           "error_plain": sum(plain) / len(plain),
           "bundled": {k: bundled[k] for k in EMBEDDING}, "lee_cor": {k: held[k] for k in EMBEDDING},
           "lee_spearman": bundled["lee"]["spearman_compressed"] if bundled.get("lee") else None,
           "lee_spearman_original": bundled["lee"]["spearman_original"] if bundled.get("lee") else None}
    if in_sample is not None:
        row["in_sample_cosine_mean"] = cli("evaluate", source, out, "--texts", in_sample,
                                           "--max-length", str(in_sample_length))["cosine_mean"]
    return row


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--ranks", type=int, nargs="*", default=[96, 192, 288], help="data-free ranks")
    ap.add_argument("--parafac-rank", type=int, default=192, help="rank of the paper's code path")
    ap.add_argument("--skip-parafac", action="store_true", help="skip the paper's code path (a few minutes)")
    ap.add_argument("--calibrated-ranks", type=int, nargs="*", default=[96, 192, 288])
    ap.add_argument("--refine-ranks", type=int, nargs="*", default=[96, 192])
    ap.add_argument("--refine-steps", type=int, default=100, help="compress --refine-steps of the refined rows")
    ap.add_argument("--keep-sequences", type=int, default=64, help="calibrate --keep-sequences")
    ap.add_argument("--calib-max-length", type=int, default=128, help="calibrate --max-length (window)")
    ap.add_argument("--calib-max-tokens", type=int, default=None, help="calibrate --max-tokens (default: its own)")
    ap.add_argument("--in-sample", type=int, default=0, metavar="N",
                    help="also the mean cosine on the first N lee_background documents (IN-SAMPLE: the "
                         "calibration set itself)")
    ap.add_argument("--in-sample-length", type=int, default=256, help="evaluate --max-length of --in-sample")
    ap.add_argument("--seed", type=int, default=0, help="compress and calibrate --seed, parafac random_state")
    args = ap.parse_args(argv)
    source, corpus = minilm(), lee()
    if not (source / "model.safetensors").is_file() or not all(
            (corpus / n).is_file() for n in ("lee_background.cor", "lee.cor", "similarities0-1.txt")):
        return missing(f"needs the real MiniLM in {source} and the Lee corpus in {corpus}")
    if not args.skip_parafac:
        try:
            import tensorly  # noqa: F401
        except ImportError:
            log("tensorly is missing: pip install tensorly (the bench extra), or --skip-parafac")
            return 2
    background = read_corpus(corpus / "lee_background.cor")

    rows: list[dict] = []

    def compress(out: Path, rank: int, *options: str | Path) -> tuple[dict, float]:
        start = time.perf_counter()
        manifest = cli("compress", source, "--out", out, "--rank", str(rank), "--seed", str(args.seed), *options)
        return manifest, time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="cc-bench-quality-") as tmp:
        tmp = Path(tmp)
        lee_file = utf8_copy(read_corpus(corpus / "lee.cor"), tmp / "lee.txt")
        in_sample = utf8_copy(background[:args.in_sample], tmp / "in-sample.txt") if args.in_sample else None

        def run(method: str, kind: str, rank: int, out: Path, seconds: float, kl: list | None = None) -> None:
            row = {"method": method, "kind": kind, "rank": rank, "seconds": seconds,
                   **measure(source, out, lee_file, in_sample, args.in_sample_length),
                   "refine_kl_before": sum(r["kl_before"] for r in kl) / len(kl) if kl else None,
                   "refine_kl_after": sum(r["kl_after"] for r in kl) / len(kl) if kl else None}
            rows.append(row)
            log(f"{method} R={rank}: {seconds:.1f} s, bundled cosine {row['bundled']['cosine_mean']:.4f}, "
                f"lee.cor cosine {row['lee_cor']['cosine_mean']:.4f}")

        for rank in args.ranks:
            out = tmp / f"cpals-{rank}"
            run("cp-als data-free", "data-free", rank, out, compress(out, rank)[1])
        if not args.skip_parafac:
            out = tmp / f"parafac-{args.parafac_rank}"
            compress(out, args.parafac_rank)
            run("parafac (paper) data-free", "parafac", args.parafac_rank, out,
                overwrite_with_parafac(out, source, args.parafac_rank, args.seed))

        calibrate_s, calibration = None, None
        if args.calibrated_ranks or args.refine_ranks:
            stats = tmp / "stats.safetensors"
            tokens = [] if args.calib_max_tokens is None else ["--max-tokens", str(args.calib_max_tokens)]
            start = time.perf_counter()
            summary = cli("calibrate", source, "--texts", utf8_copy(background, tmp / "background.txt"),
                          "--out", stats, "--max-length", str(args.calib_max_length),
                          "--keep-sequences", str(args.keep_sequences), "--seed", str(args.seed), *tokens)
            calibrate_s = time.perf_counter() - start
            calibration = {"method": "calibrate (shared by every calibrated row)", "seconds": calibrate_s,
                           "tokens": summary["tokens"], "texts": summary["texts"], "windows": summary["windows"],
                           "kept_sequences": summary["kept_sequences"], "bytes": stats.stat().st_size}
            for rank in args.calibrated_ranks:
                out = tmp / f"calibrated-{rank}"
                run("cp-als calibrated", "calibrated", rank, out, compress(out, rank, "--calibration", stats)[1])
            for rank in args.refine_ranks:
                out = tmp / f"refined-{rank}"
                manifest, seconds = compress(out, rank, "--calibration", stats, "--refine-steps",
                                             str(args.refine_steps))
                run(f"calibrated + refine {args.refine_steps}", "refined", rank, out, seconds,
                    [layer["refine"] for layer in manifest["layers"] if layer.get("refine")])

    def find(kind: str, rank: int) -> dict | None:
        return next((r for r in rows if r.get("kind") == kind and r["rank"] == rank), None)

    checks = []
    for kind, rank, target in COSINE_TARGETS:
        r = find(kind, rank)
        checks.append(check(f"{kind} R = {rank}: mean cosine >= {target} on the held-out bundled texts",
                            None if r is None else round(r["bundled"]["cosine_mean"], 4),
                            None if r is None else r["bundled"]["cosine_mean"] >= target))
    r = find("calibrated", 192)
    total = None if r is None or calibrate_s is None else calibrate_s + r["seconds"]
    checks.append(check(f"calibrate + compress at R = 192 without refinement < {TIME_TARGET:g} s",
                        None if total is None else round(total, 1), None if total is None else total < TIME_TARGET))
    return report(NAME, args, rows + ([calibration] if calibration else []), checks)


if __name__ == "__main__":
    sys.exit(main())
