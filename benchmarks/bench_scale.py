#!/usr/bin/env python
"""Peak memory and time of `analyze` and `compress` on a Llama-3-8B-shaped checkpoint.

Writes (never commits) a synthetic checkpoint with Llama-3-8B's names and shapes: 32 layers,
d_model 4096, 32 query heads and 8 key/value heads of width 128, intermediate 14336,
vocabulary 128256, untied output layer, bfloat16, about 16 GB in shards of at most 5 GB with a
transformers-style ``model.safetensors.index.json`` and a ``config.json`` (model_type llama,
rope_theta 500000). Each layer's query and key share a low-rank input subspace (plus noise),
so the shared-key fit has structure to find; the other weights are a tiled random block (their
values do not matter: compress copies them). The shards are written tensor by tensor, so this
script holds one tensor at a time.

It also writes calibration statistics in the format of ``collabcompress calibrate`` (whose
run of an 8B model through transformers is too slow here): per layer a positive definite
second moment E[x x^T] = F F^T / m + delta I + mu mu^T (F: d_model x m), the mean mu, and the
query energies E|q_{h,j}|^2 those moments give to the layer's real q_proj, with the source
fingerprint ``compress`` checks. Then it runs, each as a fresh process,

    collabcompress analyze CKPT --json A.json
    collabcompress compress CKPT --out OUT --rank 512 --calibration STATS --json M.json

and reports each one's peak resident memory (``ru_maxrss`` of that child from ``wait4``;
``VmHWM``, ``RssAnon`` and ``RssFile`` polled from ``/proc/PID/status`` say what it was made
of), its wall time and the wall time per layer. Everything is written under a temporary
directory (``--dir``: its parent) and removed afterwards, also on an error, Ctrl-C or SIGTERM,
unless ``--keep``.

    python benchmarks/bench_scale.py                  # the full 16 GB run (about 40 GB of disk)
    python benchmarks/bench_scale.py --small          # 4 layers, d_model 1024: a quick check
    python benchmarks/bench_scale.py --dir /big/disk --json scale.json

Exit code 0 when every command stays within ``--limit-gb`` (default 4), 1 when one does not,
2 when a command failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from _common import check, collabcompress_command, log, parser, report, run_measured, shard_groups

NAME = "scale"
GB = 10**9
SRC = Path(__file__).resolve().parents[1] / "src"  # this checkout's code, for this script and the commands
sys.path.insert(0, str(SRC))


@dataclass(frozen=True)
class Shape:
    """The synthetic model: Llama-3-8B's by default."""

    layers: int = 32
    d_model: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    subspace: int = 512  # rank of the input subspace a layer's query and key share
    moment_rank: int = 256  # m: rank of the synthetic activation second moment, plus delta I


SMALL = Shape(layers=4, d_model=1024, heads=8, kv_heads=2, head_dim=128, intermediate=2816, vocab=8192,
              subspace=128, moment_rank=64)


def _seed(seed: int, *parts: object) -> torch.Generator:
    """A generator of its own for each tensor: the values do not depend on the writing order."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Synthetic:
    """The tensors of the synthetic checkpoint, made on demand; the query energies of each
    layer are recorded when its q_proj is made (they need the layer's moments)."""

    def __init__(self, shape: Shape, seed: int) -> None:
        self.shape, self.seed = shape, seed
        self.query_energy: dict[int, torch.Tensor] = {}  # layer -> (H, d/2) float64
        self._block = torch.randn(1 << 22, generator=_seed(seed, "filler")).mul_(0.02).to(torch.bfloat16)

    def names(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in transformers' state-dict order (which its shard split follows)."""
        s = self.shape
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        out = {"model.embed_tokens.weight": (s.vocab, s.d_model)}
        for i in range(s.layers):
            p = f"model.layers.{i}"
            out.update({f"{p}.self_attn.q_proj.weight": (q, s.d_model), f"{p}.self_attn.k_proj.weight": (kv, s.d_model),
                        f"{p}.self_attn.v_proj.weight": (kv, s.d_model), f"{p}.self_attn.o_proj.weight": (s.d_model, q),
                        f"{p}.mlp.gate_proj.weight": (s.intermediate, s.d_model),
                        f"{p}.mlp.up_proj.weight": (s.intermediate, s.d_model),
                        f"{p}.mlp.down_proj.weight": (s.d_model, s.intermediate),
                        f"{p}.input_layernorm.weight": (s.d_model,),
                        f"{p}.post_attention_layernorm.weight": (s.d_model,)})
        out["model.norm.weight"] = (s.d_model,)
        out["lm_head.weight"] = (s.vocab, s.d_model)
        return out

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return self._query_key(name, shape)
        n = math.prod(shape)  # a tiled random block: compress only copies these
        reps = -(-n // self._block.numel())
        return self._block.repeat(reps)[:n].reshape(shape)

    def _query_key(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """W = C S + noise: the rows of a layer's query and key mostly lie in one random
        ``subspace``-dimensional input subspace S, with decaying weights on its directions."""
        s = self.shape
        layer = int(name.split(".")[2])
        basis = torch.linalg.qr(torch.randn(s.d_model, s.subspace, generator=_seed(self.seed, "basis", layer)))[0]
        decay = torch.logspace(0, -1.5, s.subspace)  # (subspace,) from 1 down to 0.03
        g = _seed(self.seed, name)
        coef = torch.randn(shape[0], s.subspace, generator=g) * decay  # (rows, subspace)
        w = coef @ basis.T + 0.05 * torch.randn(shape, generator=g)  # (rows, D)
        w *= 0.02 / w.square().mean().sqrt()  # Llama-like scale
        w = w.to(torch.bfloat16)
        if name.endswith("q_proj.weight"):
            self.query_energy[layer] = self._query_energy(layer, w)
        return w

    def moments(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F (D, m) float64, delta, mean (D,)) of the layer's activations: E[x x^T] = F F^T + delta I + mu mu^T."""
        s = self.shape
        g = _seed(self.seed, "moments", layer)
        f = torch.randn(s.d_model, s.moment_rank, generator=g, dtype=torch.float64)
        f *= torch.logspace(0, -1, s.moment_rank, dtype=torch.float64) / math.sqrt(s.moment_rank)
        mean = 0.1 * torch.randn(s.d_model, generator=g, dtype=torch.float64)
        return f, 0.01, mean

    def second_moment(self, layer: int) -> torch.Tensor:
        f, delta, mean = self.moments(layer)
        c = f @ f.T  # (D, D)
        c.diagonal().add_(delta)
        return c.addr_(mean, mean)

    def _query_energy(self, layer: int, w_query: torch.Tensor) -> torch.Tensor:
        """E|q_{h,j}|^2 = E|q_{h*d+j}|^2 + E|q_{h*d+j+d/2}|^2, with E q_i^2 = w_i^T E[x x^T] w_i."""
        s = self.shape
        f, delta, mean = self.moments(layer)
        w = w_query.double()  # (H*d, D)
        per_row = (w @ f).square().sum(1) + delta * w.square().sum(1) + (w @ mean).square()  # (H*d,)
        half = per_row.reshape(s.heads, 2, s.head_dim // 2)  # (H, 2, d/2): dims j and j + d/2
        return half.sum(1)  # (H, d/2)


def write_checkpoint(directory: Path, synth: Synthetic, shard_bytes: int) -> dict[str, int]:
    """The sharded checkpoint, one tensor in memory at a time; -> sizes."""
    from collabcompress.files.output import write_safetensors

    s = synth.shape
    directory.mkdir(parents=True)
    shapes = synth.names()
    groups = shard_groups(shapes, shard_bytes, 2)  # bfloat16
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        entries = [(n, shapes[n], torch.bfloat16, lambda n=n: synth.tensor(n, shapes[n])) for n in names]
        total += write_safetensors(directory / file, entries, {"format": "pt"})
        weight_map.update({n: file for n in names})
        log(f"  wrote {file} ({(directory / file).stat().st_size / GB:.2f} GB)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.d_model,
              "intermediate_size": s.intermediate, "num_attention_heads": s.heads,
              "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "num_hidden_layers": s.layers,
              "vocab_size": s.vocab, "max_position_embeddings": 8192, "rope_theta": 500000.0,
              "rope_scaling": None, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
              "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
              "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = sorted(directory.glob("*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files),
            "largest_shard": max(f.stat().st_size for f in files),
            "largest_tensor": 2 * max(math.prod(v) for v in shapes.values())}


def write_statistics(path: Path, checkpoint: Path, synth: Synthetic) -> int:
    """A statistics file as ``collabcompress calibrate`` writes it for this checkpoint (the
    tensor names, dtypes and metadata of :mod:`collabcompress.files.statistics`), one second moment
    in memory at a time; -> its bytes."""
    from collabcompress import __version__
    from collabcompress.files.arch import detect
    from collabcompress.files.statistics import STATS_FORMAT, source_sha256
    from collabcompress.files.checkpoint import open_checkpoint
    from collabcompress.files.output import write_safetensors

    ckpt = open_checkpoint(checkpoint)
    specs = detect(ckpt)
    s = synth.shape
    entries = []
    for spec in specs:
        i, m = spec.index, spec.module
        entries += [(f"{m}.second_moment", (s.d_model, s.d_model), torch.float64, lambda i=i: synth.second_moment(i)),
                    (f"{m}.mean", (s.d_model,), torch.float64, lambda i=i: synth.moments(i)[2]),
                    (f"{m}.query_energy", (s.heads, s.head_dim // 2), torch.float64,
                     lambda i=i: synth.query_energy[i])]
    tokens = 100_000
    metadata = {"format": STATS_FORMAT, "tool_version": __version__, "source_sha256": source_sha256(ckpt),
                "texts_sha256": hashlib.sha256(b"synthetic moments").hexdigest(), "tokens": str(tokens),
                "texts": "1", "windows": str(tokens // 512), "max_length": "512",
                "modules": json.dumps([spec.module for spec in specs]), "architecture": specs[0].family}
    ckpt.close()
    write_safetensors(path, entries, metadata)
    return path.stat().st_size


def _parser() -> argparse.ArgumentParser:
    ap = parser(__doc__)
    ap.add_argument("--small", action="store_true", help="4 layers, d_model 1024, 8/2 heads: a quick check")
    ap.add_argument("--layers", type=int, help="decoder layers (default 32; --small: 4)")
    ap.add_argument("--shard-gb", type=float, help="largest shard in GB (default 5; --small: 0.05)")
    ap.add_argument("--rank", type=int, help="compress --rank: key cache per layer (default 512 of G*d = 1024; "
                                             "--small: 128 of 256)")
    ap.add_argument("--workers", type=int, help="compress --workers (default: the tool's, the usable cores)")
    ap.add_argument("--limit-gb", type=float, default=4.0, help="peak RSS target per command, GB")
    ap.add_argument("--dir", type=Path, help="parent of the temporary directory (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint, statistics and output")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the checkpoint is removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shape = SMALL if args.small else Shape()
    if args.layers is not None:
        shape = Shape(**{**asdict(shape), "layers": args.layers})
    shard_bytes = int((args.shard_gb if args.shard_gb is not None else 0.05 if args.small else 5.0) * GB)
    rank = args.rank if args.rank is not None else (128 if args.small else 512)
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="cc-bench-scale-", dir=args.dir))
    ckpt, stats, out = root / "llama", root / "stats.safetensors", root / "compressed"
    try:
        log(f"writing a {shape.layers}-layer Llama-shaped checkpoint (D={shape.d_model}) into {ckpt} ...")
        t0 = time.perf_counter()
        synth = Synthetic(shape, args.seed)
        sizes = write_checkpoint(ckpt, synth, shard_bytes)
        stats_bytes = write_statistics(stats, ckpt, synth)
        log(f"  {sizes['bytes'] / GB:.2f} GB in {sizes['shards']} shards, statistics {stats_bytes / GB:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s)")
        cc = collabcompress_command()
        commands = {
            "analyze": [*cc, "analyze", str(ckpt), "--json", str(root / "analyze.json")],
            "compress": [*cc, "compress", str(ckpt), "--out", str(out), "--rank", str(rank),
                         "--calibration", str(stats), "--json", str(root / "compress.json")]
                        + (["--workers", str(args.workers)] if args.workers else []),
        }
        rows = {}
        for name, cmd in commands.items():
            log("running: " + " ".join(cmd))
            m = run_measured(cmd, {**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))})
            if m["returncode"] != 0:
                print(f"{name} failed ({m['returncode']}):\n{m['stderr']}", file=sys.stderr)
                return 2
            result = json.loads((root / f"{name}.json").read_text())
            layers = len(result["layers"])
            if layers != shape.layers:
                print(f"{name} saw {layers} attention layers, expected {shape.layers}", file=sys.stderr)
                return 2
            rows[name] = {"command": " ".join(["collabcompress", *cmd[len(cc):]]).replace(str(root), "$TMP"),
                          "layers": layers, **{k: v for k, v in m.items() if k not in ("stderr", "returncode")},
                          "s_per_layer": m["wall_s"] / layers}
            if name == "compress":
                rows[name]["fit_s_per_layer"] = sum(la["seconds"] for la in result["layers"]) / layers
                rows[name]["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        log(f"checkpoint {sizes['bytes'] / GB:.2f} GB in {sizes['shards']} shards (largest "
            f"{sizes['largest_shard'] / GB:.2f} GB; largest tensor {sizes['largest_tensor'] / GB:.2f} GB); "
            f"peak RSS: the kernel's high-water mark of each process, anon / file: the polled peaks of "
            f"its heap and of its file-backed pages")
        table = [{"command": name, "layers": r["layers"], "peak_rss_gb": r["peak_rss"] / GB,
                  "peak_anon_gb": r["peak_anon"] / GB, "peak_file_gb": r["peak_file"] / GB, "wall_s": r["wall_s"],
                  "s_per_layer": r["s_per_layer"], "run": r["command"]} for name, r in rows.items()]
        checks = [check(f"{name}: peak RSS <= {args.limit_gb:g} GB", round(r["peak_rss"] / GB, 3),
                        r["peak_rss"] <= args.limit_gb * GB) for name, r in rows.items()]
        args.checkpoint_bytes, args.shards, args.statistics_bytes, args.rank_used = \
            sizes["bytes"], sizes["shards"], stats_bytes, rank
        return report(NAME, args, table, checks)
    except KeyboardInterrupt:
        print("interrupted; removing the checkpoint", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
