#!/usr/bin/env python
"""`collabcompress compress --workers 1` against `--workers N`: wall time and identical bytes.

Compresses a model (default: the real all-MiniLM-L6-v2; ``--synthetic`` builds a BERT-style
checkpoint of ``--layers`` layers of width ``--d-model`` instead) as a fresh process with each
worker count, alternating the runs ``--runs`` times so that a busy machine slows both alike.
Rows: the wall times (start-up included) per worker count, the speed-up of the medians, and a
machine check: how much faster ``--workers`` threads of plain matrix products run than one
after another right now (the most any worker count can give on this machine at that moment).

    python benchmarks/bench_parallel.py [--model DIR] [--rank 192] [--runs 3] [--workers 2] [--json PATH]
    python benchmarks/bench_parallel.py --synthetic --layers 12 --d-model 768 --rank 384
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import check, collabcompress_command, log, minilm, missing, parser, report, timed

NAME = "parallel"

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


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: MiniLM in the data cache)")
    ap.add_argument("--synthetic", action="store_true", help="use a generated BERT-style checkpoint instead")
    ap.add_argument("--layers", type=int, default=12, help="--synthetic: layers")
    ap.add_argument("--d-model", type=int, default=768, help="--synthetic: width D")
    ap.add_argument("--heads", type=int, default=12, help="--synthetic: heads")
    ap.add_argument("--rank", type=int, default=192, help="compress --rank")
    ap.add_argument("--max-iter", type=int, default=None, help="compress --max-iter (default: the tool's)")
    ap.add_argument("--workers", type=int, default=2, help="the parallel worker count to compare with 1")
    ap.add_argument("-n", "--runs", type=int, default=3, help="runs per worker count")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cc-bench-parallel-"))
    try:
        if args.synthetic:
            model = _synthetic(work / "model", args.layers, args.d_model, args.heads)
        else:
            model = args.model = args.model or minilm()
            if not model.exists():
                return missing(f"model not found: {model} (or pass --model / --synthetic)")
        times: dict[int, list[float]] = {1: [], args.workers: []}
        digests: dict[tuple[int, int], dict[str, str]] = {}
        for run in range(args.runs):
            for workers in (1, args.workers):
                out = work / f"out-w{workers}-{run}"
                cmd = [*collabcompress_command(), "compress", model, "--out", out, "--rank", str(args.rank),
                       "--workers", str(workers)]
                if args.max_iter is not None:
                    cmd += ["--max-iter", str(args.max_iter)]
                times[workers].append(timed(cmd))
                digests[(workers, run)] = _weights_digest(out)
                shutil.rmtree(out)
        reference = digests[(1, 0)]
        identical = all(d == reference for d in digests.values())
        rows = [{"workers": w, "runs": len(t), "min_s": min(t), "median_s": statistics.median(t), "max_s": max(t),
                 "speedup_of_median": statistics.median(times[1]) / statistics.median(t)} for w, t in times.items()]
        scaling = _thread_scaling(args.workers)
        rows.append({"threads": args.workers, "machine_thread_scaling": scaling})
        log(f"machine check: {args.workers} threads of plain matrix products ran {scaling:.2f}x faster than one "
            f"after another (the most any --workers {args.workers} can give here now)")
        checks = [check(f"weight files ({', '.join(reference)}) byte-identical across all {len(digests)} runs",
                        identical, identical)]
        return report(NAME, args, rows, checks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
