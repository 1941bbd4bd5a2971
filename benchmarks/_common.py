"""What the benchmark scripts share: where the real data is and how to run the CLI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def cache_dir() -> Path:
    """The package's data cache (:func:`collabcompress.files.texts.cache_dir`), imported lazily
    so that scripts which only time the CLI do not import torch themselves."""
    from collabcompress.files.texts import cache_dir as package_cache_dir

    return package_cache_dir()


def default_model() -> Path:
    """The real all-MiniLM-L6-v2 fetched by scripts/fetch_data.py."""
    return cache_dir() / "all-MiniLM-L6-v2"


def collabcompress_command() -> list[str]:
    """The console script beside this interpreter (as a user runs it), else ``python -m``."""
    script = Path(sys.executable).with_name("collabcompress")
    if script.is_file():
        return [str(script)]
    found = shutil.which("collabcompress")
    return [found] if found else [sys.executable, "-m", "collabcompress.cli"]


def smollm2_parser(doc: str, *, repeats: int):
    """The options the SmolLM2 healing and prefill benchmarks share (``--model``, ``--rank``,
    ``--repeats``, ``--threads``, ``--json``); each script adds its own."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: SmolLM2 in the data cache")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    return ap


def smollm2_pair(args):
    """(SmolLM2 directory, original, compressed) for the healing and prefill benchmarks, or
    ``None`` (a message printed) when SmolLM2 is not fetched. ``args``: the script's options
    ``model`` (a directory or ``None``: the data cache's), ``rank`` and ``threads`` (torch's,
    set here). The original in float32 and the model compressed data-free at ``rank`` (their
    times do not depend on the fit), both in eval mode with every parameter frozen except the
    collaborative tensors healing trains."""
    import torch

    torch.set_num_threads(args.threads)
    model_dir = args.model or cache_dir() / "smollm2-135m-instruct"
    if not (model_dir / "model.safetensors").is_file():
        print(f"needs SmolLM2 in {model_dir}: run python scripts/fetch_data.py")
        return None
    import tempfile

    import transformers

    from collabcompress import hf
    from collabcompress.commands.compress import CompressOptions, compress
    from collabcompress.runtime.heal import trainable

    transformers.logging.set_verbosity_error()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp:
        compress(model_dir, Path(tmp) / "c", CompressOptions(rank=args.rank))
        model = hf.from_pretrained(Path(tmp) / "c").float().eval()
    for m in (original, model):
        for p in m.parameters():
            p.requires_grad_(False)
    for p in trainable(model).values():
        p.requires_grad_(True)
    return model_dir, original, model
