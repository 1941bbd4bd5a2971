#!/usr/bin/env python
"""Factored CP-ALS (collabcompress) against tensorly ``parafac``, layer by layer, on all-MiniLM-L6-v2.

For every attention layer and every shared width R in ``--ranks``, in one process:

* tensorly ``parafac`` on the dense H x D x D tensor of slices P_h = W_Q^h^T W_K^h, as the
  paper's code does it (Cordonnier, Loukas, Jaggi, arXiv 2006.16362: pytorch backend,
  ``init="random"``, ``tol=1e-6``, default ``n_iter_max``), fixed ``random_state``; run once
  per layer, forming the dense tensor not timed;
* ``cp_als`` with its defaults, which never forms that tensor; the median of ``--repeat`` runs.

Rows: seconds and relative error ||P - P_hat||_F / ||P||_F of each method, ours' sweeps, and the
speed ratio. ``--threads N`` sets the threads of torch and BLAS before they load; on a busy
machine also set OMP_WAIT_POLICY=PASSIVE.

    pip install tensorly          # benchmark-only dependency (the `bench` extra)
    python benchmarks/bench_decompose.py [--ranks 96 192] [--layers 0,1] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from _common import check, log, minilm, missing, parser, report

NAME = "decompose"
H, D_HEAD = 12, 32  # all-MiniLM-L6-v2: 12 heads of width 32 over d_model = 384
N_LAYERS = 6


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=None, help="MiniLM checkpoint directory (default: the data cache)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[96, 192], help="shared widths R")
    ap.add_argument("--layers", default=",".join(map(str, range(N_LAYERS))), help="layer indices, e.g. 0,3")
    ap.add_argument("--check-rank", type=int, default=192, help="the rank at which the targets apply")
    ap.add_argument("--min-speedup", type=float, default=50.0, help="required speed ratio on every layer")
    ap.add_argument("--seed", type=int, default=0, help="tensorly random_state")
    ap.add_argument("--backend", choices=["pytorch", "numpy"], default="pytorch", help="tensorly backend")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and BLAS (default: theirs)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of ours per layer, median kept")
    args = ap.parse_args(argv)
    if args.threads is not None:  # must precede the first import of torch / numpy
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    args.model = args.model or minilm()
    checkpoint = args.model / "model.safetensors"
    if not checkpoint.is_file():
        return missing(f"model not found: {checkpoint}")
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
    except ImportError:
        log("tensorly is missing: pip install tensorly (the bench extra)")
        return 2
    import torch
    from safetensors import safe_open

    from collabcompress.maths.cp import cp_als

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tl.set_backend(args.backend)
    args.tensorly = tl.__version__
    layers = [int(i) for i in args.layers.split(",") if i.strip()]
    weights = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for i in layers:
            prefix = f"encoder.layer.{i}.attention.self"
            weights[i] = (f.get_tensor(f"{prefix}.query.weight"), f.get_tensor(f"{prefix}.key.weight"))

    def dense(w_query, w_key):
        q = w_query.reshape(H, D_HEAD, -1)  # (H, d, D)
        k = w_key.reshape(H, D_HEAD, -1)  # (H, d, D)
        return q.mT @ k  # (H, D, D), the dtype of the weights, as in the paper's code

    def rel(p, p_hat) -> float:
        p = torch.as_tensor(p).double()
        return float((p - torch.as_tensor(p_hat).double()).norm() / p.norm())

    rows = []
    for rank in args.ranks:
        cp_als(*weights[layers[0]], H, rank, max_iter=2)  # warm-up at this shape, not timed
        for i in layers:
            w_query, w_key = weights[i]
            times = []
            for _ in range(max(1, args.repeat)):
                start = time.perf_counter()
                ours = cp_als(w_query, w_key, H, rank)
                times.append(time.perf_counter() - start)
            ours_s = statistics.median(times)
            tensor = dense(w_query, w_key)
            if args.backend == "numpy":
                tensor = tensor.numpy()
            start = time.perf_counter()
            cp = parafac(tensor, rank, init="random", tol=1e-6, random_state=args.seed)
            tl_s = time.perf_counter() - start
            rows.append({"rank": rank, "layer": i, "ours_s": ours_s, "ours_error": ours.relative_error,
                         "ours_sweeps": ours.iterations, "tensorly_s": tl_s,
                         "tensorly_error": rel(tensor, tl.cp_to_tensor(cp)), "speedup": tl_s / ours_s})
            log(f"R={rank} layer {i}: ours {ours_s:.3f} s, tensorly {tl_s:.2f} s")

    at = [r for r in rows if r["rank"] == args.check_rank]
    target = f"at R = {args.check_rank}, every layer"
    checks = [
        check(f"{target}: ours >= {args.min_speedup:g}x faster than tensorly (the slowest layer's ratio)",
              round(min(r["speedup"] for r in at), 1) if at else None,
              all(r["speedup"] >= args.min_speedup for r in at) if at else None),
        check(f"{target}: ours' relative error <= tensorly's (layers where it holds)",
              f"{sum(r['ours_error'] <= r['tensorly_error'] for r in at)} of {len(at)}" if at else None,
              all(r["ours_error"] <= r["tensorly_error"] for r in at) if at else None),
    ]
    return report(NAME, args, rows, checks)


if __name__ == "__main__":
    sys.exit(main())
