"""Factored CP-ALS (collabcompress) against tensorly ``parafac``, layer by layer, on all-MiniLM-L6-v2.

For every attention layer and every requested shared width R, side by side in one process:

* tensorly ``parafac`` on the dense ``H x D x D`` tensor of slices ``P_h = W_Q^h^T W_K^h``,
  as the paper's code does it (Cordonnier, Loukas, Jaggi, arXiv 2006.16362: pytorch
  backend, ``init="random"``, ``tol=1e-6``, default ``n_iter_max``), fixed ``random_state``;
* ``collabcompress.maths.cp.cp_als`` with its defaults, which never forms that tensor.

It prints seconds and relative error ``||P - P_hat||_F / ||P||_F`` per layer and method and
the speed ratio, and checks at ``--check-rank`` (192 = H*d/2) that ours is at least
``--min-speedup`` (50) times faster on every layer at an equal or lower error.

    pip install tensorly          # benchmark-only dependency (the `bench` extra)
    python benchmarks/bench_decompose.py [--ranks 96 192] [--layers 0,1] [--threads 1] [--json out.json]

Forming the dense tensor for tensorly is not timed; tensorly runs once per layer, ours
``--repeat`` times (median). ``--threads N`` sets the threads of both (torch and BLAS)
before they load; on a busy machine also set ``OMP_WAIT_POLICY=PASSIVE``. Exit code 0 when
the check holds, 1 when it does not (with a WARNING line), 2 when the model or tensorly
is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import default_model as _default_model

H, D_HEAD = 12, 32  # all-MiniLM-L6-v2: 12 heads of width 32 over d_model = 384
N_LAYERS = 6


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_default_model(), help="checkpoint directory (default: cache)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[96, 192], help="shared widths R (default 96 192)")
    parser.add_argument("--layers", default=",".join(map(str, range(N_LAYERS))), help="layer indices, e.g. 0,3")
    parser.add_argument("--check-rank", type=int, default=192, help="rank at which the speed/quality check applies")
    parser.add_argument("--min-speedup", type=float, default=50.0, help="required speed ratio (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="tensorly random_state (default 0)")
    parser.add_argument("--backend", choices=["pytorch", "numpy"], default="pytorch", help="tensorly backend")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and BLAS (default: theirs)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of ours per layer, median kept (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads is not None:  # must precede the first import of torch / numpy
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    checkpoint = args.model / "model.safetensors"
    if not checkpoint.is_file():
        print(f"model not found: {checkpoint} (run `python scripts/fetch_data.py`)", file=sys.stderr)
        return 2
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
    except ImportError:
        print("tensorly is missing: `pip install tensorly` (the bench extra)", file=sys.stderr)
        return 2
    import torch
    from safetensors import safe_open

    try:
        from collabcompress.maths.cp import DEFAULT_MAX_ITER, DEFAULT_TOL, cp_als
    except ImportError:  # running from a source checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from collabcompress.maths.cp import DEFAULT_MAX_ITER, DEFAULT_TOL, cp_als

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tl.set_backend(args.backend)
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

    print(f"model: {checkpoint}")
    print(
        f"tensorly {tl.__version__} parafac (backend {args.backend}, init='random', tol=1e-6, "
        f"random_state={args.seed}) vs cp_als (max_iter={DEFAULT_MAX_ITER}, tol={DEFAULT_TOL:g}); "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}",
        flush=True,
    )
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
            tl_err = rel(tensor, tl.cp_to_tensor(cp))
            rows.append(
                {"rank": rank, "layer": i, "ours_s": ours_s, "ours_error": ours.relative_error,
                 "ours_sweeps": ours.iterations, "tensorly_s": tl_s, "tensorly_error": tl_err,
                 "speedup": tl_s / ours_s}
            )
            print(
                f"  R={rank:<4d} layer {i}: ours {ours_s:6.3f} s err {ours.relative_error:.4f} | "
                f"tensorly {tl_s:7.2f} s err {tl_err:.4f}",
                flush=True,
            )

    print()
    header = (f"{'R':>4} {'layer':>5} | {'ours s':>7} {'ours err':>9} {'sweeps':>6} | "
              f"{'tensorly s':>10} {'tl err':>7} | {'speedup':>8} {'err ours-tl':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['rank']:>4} {r['layer']:>5} | {r['ours_s']:7.3f} {r['ours_error']:9.4f} {r['ours_sweeps']:>6} | "
              f"{r['tensorly_s']:10.2f} {r['tensorly_error']:7.4f} | {r['speedup']:7.0f}x "
              f"{r['ours_error'] - r['tensorly_error']:+11.4f}")
    for rank in args.ranks:
        sel = [r for r in rows if r["rank"] == rank]
        ours_total, tl_total = sum(r["ours_s"] for r in sel), sum(r["tensorly_s"] for r in sel)
        print(f"R={rank}: {len(sel)} layers, ours {ours_total:.2f} s, tensorly {tl_total:.1f} s, "
              f"{tl_total / ours_total:.0f}x; ours lower error on {sum(r['ours_error'] <= r['tensorly_error'] for r in sel)}"
              f"/{len(sel)} layers")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")

    failures = [
        r for r in rows
        if r["rank"] == args.check_rank
        and not (r["speedup"] >= args.min_speedup and r["ours_error"] <= r["tensorly_error"])
    ]
    for r in failures:
        print(f"WARNING: R={r['rank']} layer {r['layer']}: ours is {r['speedup']:.0f}x faster (need "
              f">= {args.min_speedup:g}x) at error {r['ours_error']:.4f} vs tensorly {r['tensorly_error']:.4f}")
    if not any(r["rank"] == args.check_rank for r in rows):
        print(f"note: R={args.check_rank} was not run, no check made")
    elif not failures:
        print(f"OK: at R={args.check_rank} ours is >= {args.min_speedup:g}x faster with an equal or lower "
              "error on every layer")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
