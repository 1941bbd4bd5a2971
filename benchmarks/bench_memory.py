#!/usr/bin/env python
"""Peak memory of `collabcompress compress` on a generated multi-gigabyte sharded checkpoint.

Generates (never commits) a BERT-style checkpoint with real BERT naming and shapes, by
default BERT-large widths (D = 1024, 16 heads, intermediate 4096, vocabulary 30522) with
48 layers instead of 24, float32: about 2.5 GB, split into shards of about 500 MB with a
transformers-style ``model.safetensors.index.json`` and a ``config.json``. Then runs

    collabcompress compress DIR --out OUT --rank R --max-iter N

as a fresh process and reports its wall time and peak resident memory (the kernel's
high-water mark: ``ru_maxrss`` of that one child from ``wait4``, and ``VmHWM`` polled from
``/proc/PID/status``, split into anonymous and file-backed pages at their peaks), beside
the largest shard. Memory is bounded when the peak is below the largest shard plus 1 GiB:
the tool then holds about one tensor or one shard at a time, not the model. Linux only.

    python benchmarks/bench_memory.py [--json PATH]             # generate in a temp dir, run, remove
    python benchmarks/bench_memory.py --dir /big/disk --keep    # keep the checkpoint for reruns
    python benchmarks/bench_memory.py --layers 8                # a quicker, smaller run
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import check, collabcompress_command, log, parser, report, run_measured, shard_groups

NAME = "memory"
GIB = 1 << 30
MIB = 1 << 20


def _layer_tensors(i: int, d: int, inter: int) -> dict[str, tuple[int, ...]]:
    p = f"bert.encoder.layer.{i}"
    shapes = {}
    for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        shapes[f"{p}.{m}.weight"] = (d, d)
        shapes[f"{p}.{m}.bias"] = (d,)
    shapes[f"{p}.attention.output.LayerNorm.weight"] = (d,)
    shapes[f"{p}.attention.output.LayerNorm.bias"] = (d,)
    shapes[f"{p}.intermediate.dense.weight"] = (inter, d)
    shapes[f"{p}.intermediate.dense.bias"] = (inter,)
    shapes[f"{p}.output.dense.weight"] = (d, inter)
    shapes[f"{p}.output.dense.bias"] = (d,)
    shapes[f"{p}.output.LayerNorm.weight"] = (d,)
    shapes[f"{p}.output.LayerNorm.bias"] = (d,)
    return shapes


def _tensor(name: str, shape: tuple[int, ...], gen):
    import torch

    if "LayerNorm.weight" in name:
        return torch.ones(shape)
    scale = 0.02 if len(shape) == 2 else 0.01
    return torch.randn(shape, generator=gen) * scale


def generate(directory: Path, *, layers: int, d_model: int, heads: int, intermediate: int, vocab: int,
             shard_bytes: int, seed: int = 0) -> dict[str, int]:
    """Write the sharded checkpoint; returns {"total": bytes, "largest_shard": bytes, "shards": n}."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (vocab, d_model),
        "bert.embeddings.position_embeddings.weight": (512, d_model),
        "bert.embeddings.token_type_embeddings.weight": (2, d_model),
        "bert.embeddings.LayerNorm.weight": (d_model,),
        "bert.embeddings.LayerNorm.bias": (d_model,),
    }
    for i in range(layers):
        shapes.update(_layer_tensors(i, d_model, intermediate))
    shapes["bert.pooler.dense.weight"] = (d_model, d_model)
    shapes["bert.pooler.dense.bias"] = (d_model,)

    groups = shard_groups(shapes, shard_bytes, 4)  # float32
    weight_map: dict[str, str] = {}
    total = largest = 0
    for k, names in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _tensor(n, shapes[n], gen) for n in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
        nbytes = (directory / file).stat().st_size
        total += nbytes
        largest = max(largest, nbytes)
        weight_map.update({n: file for n in names})
        log(f"  wrote {file} ({nbytes / MIB:,.0f} MiB)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": d_model,
              "num_attention_heads": heads, "num_hidden_layers": layers, "intermediate_size": intermediate,
              "vocab_size": vocab, "max_position_embeddings": 512, "type_vocab_size": 2}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"total": total, "largest_shard": largest, "shards": len(groups)}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--dir", type=Path, help="where to generate the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the output")
    ap.add_argument("--layers", type=int, default=48, help="encoder layers (48 BERT-large layers = 2.5 GB)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--shard-mb", type=int, default=500, help="shard size in MB")
    ap.add_argument("--rank", type=int, default=256, help="compress --rank")
    ap.add_argument("--max-iter", type=int, default=3, help="compress --max-iter (memory does not depend on it)")
    ap.add_argument("--workers", type=int, default=None, help="compress --workers")
    args = ap.parse_args(argv)

    root = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="cc-bench-memory-"))
    src, out = root / "synthetic-bert", root / "compressed"
    try:
        if (src / "model.safetensors.index.json").is_file() and (src / "config.json").is_file():
            files = sorted(src.glob("*.safetensors"))
            sizes = {"total": sum(f.stat().st_size for f in files),
                     "largest_shard": max(f.stat().st_size for f in files), "shards": len(files)}
            log(f"reusing {src}")
        else:
            log(f"generating {args.layers} layers, D={args.d_model} into {src} ...")
            sizes = generate(src, layers=args.layers, d_model=args.d_model, heads=args.heads,
                             intermediate=args.intermediate, vocab=args.vocab, shard_bytes=args.shard_mb * 10**6)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*collabcompress_command(), "compress", str(src), "--out", str(out), "--rank", str(args.rank),
               "--max-iter", str(args.max_iter)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        log("running: " + " ".join(cmd))
        m = run_measured(cmd, dict(os.environ))
        if m["returncode"] != 0:
            log(f"compress failed ({m['returncode']}):\n{m['stderr']}")
            return m["returncode"]
        peak = max(m["peak_rss"], m["peak_vmhwm"])
        limit = sizes["largest_shard"] + GIB
        row = {"checkpoint_mib": sizes["total"] / MIB, "shards": sizes["shards"],
               "largest_shard_mib": sizes["largest_shard"] / MIB,
               "output_mib": sum(p.stat().st_size for p in out.rglob("*.safetensors")) / MIB,
               "wall_s": m["wall_s"], "peak_rss_mib": peak / MIB, "ru_maxrss_mib": m["peak_rss"] / MIB,
               "vm_hwm_mib": m["peak_vmhwm"] / MIB, "peak_anonymous_mib": m["peak_anon"] / MIB,
               "peak_file_backed_mib": m["peak_file"] / MIB}
        checks = [check("peak resident memory of compress < the largest shard + 1 GiB "
                        f"({limit / MIB:,.0f} MiB)", round(peak / MIB, 1), peak < limit)]
        return report(NAME, args, [row], checks)
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
