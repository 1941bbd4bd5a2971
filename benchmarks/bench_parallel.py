#!/usr/bin/env python
"""`collabcompress compress --workers 1` against `--workers N`: wall time and identical bytes.

Compresses a model (default: all-MiniLM-L6-v2 from the cache of scripts/fetch_data.py;
``--synthetic`` builds a BERT-style checkpoint of ``--layers`` layers of width
``--d-model`` instead) as a fresh process with each worker count, alternating the runs
``-n`` times so that a busy machine slows both alike, and prints the wall times (min and
median), the speed-up of the medians, and whether every output weight file (and the
index) is byte-identical across all runs.

    python benchmarks/bench_parallel.py [--model DIR] [--rank 192] [-n 3] [--workers 2]
    python benchmarks/bench_parallel.py --synthetic --layers 12 --d-model 768 --rank 384

Exit code 0 when the weights are byte-identical, 1 when they differ, 2 when a run failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import default_model as _default_model, collabcompress_command as _collabcompress


def _synthetic(directory: Path, layers: int, d_model: int, heads: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {"embeddings.LayerNorm.weight": torch.ones(d_model), "embeddings.LayerNorm.bias": torch.zeros(d_model)}
    for i in range(layers):
        p = f"encoder.layer.{i}.attention.self"
        for m in ("query", "key", "value"):
            t[f"{p}.{m}.weight"] = torch.randn(d_model, d_model, generator=g) / d_model ** 0.5
            t[f"{p}.{m}.bias"] = 0.02 * torch.randn(d_model, generator=g)
        t[f"encoder.layer.{i}.output.LayerNorm.weight"] = torch.ones(d_model)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(t, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": d_model,
                                                       "num_attention_heads": heads, "num_hidden_layers": layers}))
    return directory


def _thread_scaling(workers: int, seconds: float = 1.0) -> float:
    """How much faster ``workers`` threads of single-threaded matrix products run than one after
    another: close to ``workers`` on an idle machine, about 1 when other work holds the cores."""
    import threading

    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / workers:  # size one job
        a = torch.tanh(a @ a.T / 512)
        n += 1

    def job() -> None:
        x = torch.randn(512, 512)
        for _ in range(n):
            x = torch.tanh(x @ x.T / 512)

    start = time.perf_counter()
    for _ in range(workers):
        job()
    serial = time.perf_counter() - start
    threads = [threading.Thread(target=job) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return serial / (time.perf_counter() - start)


def _weights_digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.name.endswith((".safetensors", ".index.json"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: MiniLM in the cache)")
    ap.add_argument("--synthetic", action="store_true", help="use a generated BERT-style checkpoint instead")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--rank", type=int, default=192, help="compress --rank")
    ap.add_argument("--max-iter", type=int, default=None, help="compress --max-iter (default: the tool's)")
    ap.add_argument("--workers", type=int, default=2, help="the parallel worker count to compare with 1")
    ap.add_argument("-n", type=int, default=3, help="runs per worker count")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cc-bench-parallel-"))
    try:
        if args.synthetic:
            model = _synthetic(work / "model", args.layers, args.d_model, args.heads)
        else:
            model = args.model or _default_model()
            if not model.exists():
                print(f"model not found: {model} (run scripts/fetch_data.py, or pass --model / --synthetic)",
                      file=sys.stderr)
                return 2
        times: dict[int, list[float]] = {1: [], args.workers: []}
        digests: dict[tuple[int, int], dict[str, str]] = {}
        for run in range(args.n):
            for workers in (1, args.workers):
                out = work / f"out-w{workers}-{run}"
                cmd = [*_collabcompress(), "compress", str(model), "--out", str(out), "--rank", str(args.rank),
                       "--workers", str(workers)]
                if args.max_iter is not None:
                    cmd += ["--max-iter", str(args.max_iter)]
                start = time.perf_counter()
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                elapsed = time.perf_counter() - start
                if proc.returncode != 0:
                    print(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}", file=sys.stderr)
                    return 2
                times[workers].append(elapsed)
                digests[(workers, run)] = _weights_digest(out)
                shutil.rmtree(out)
        reference = digests[(1, 0)]
        identical = all(d == reference for d in digests.values())
        med = {w: statistics.median(t) for w, t in times.items()}
        print(f"model: {model}  --rank {args.rank}  ({args.n} runs each, alternating; start-up included)")
        print(f"{'workers':>8}  {'min s':>7}  {'median s':>8}  {'max s':>7}")
        for w, t in times.items():
            print(f"{w:>8}  {min(t):7.2f}  {med[w]:8.2f}  {max(t):7.2f}")
        speedup = med[1] / med[args.workers]
        print(f"speed-up of the median, 1 -> {args.workers} workers: {speedup:.2f}x")
        scaling = _thread_scaling(args.workers)
        print(f"machine check: {args.workers} threads of plain matrix products ran {scaling:.2f}x faster than "
              f"one after another (the most any --workers {args.workers} can give here now)")
        print(f"weight files ({', '.join(reference)}) byte-identical across all {len(digests)} runs: "
              f"{'yes' if identical else 'NO'}")
        if args.json:
            args.json.write_text(json.dumps({"model": str(model), "rank": args.rank,
                                             "times": {str(k): v for k, v in times.items()},
                                             "speedup": speedup, "thread_scaling": scaling,
                                             "identical": identical}, indent=2) + "\n")
        return 0 if identical else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
