"""The CLI runner and the assertions shared by the tests."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _command():
    """The click command of the CLI, built once (typer's runner rebuilds it at every call: 50 ms)."""
    import typer.main

    from collabcompress.cli import app

    return typer.main.get_command(app)


def run_cli(*args: object):
    """Invoke the CLI in-process with click's CliRunner; returns its Result (stdout, stderr, exit_code)."""
    from click.testing import CliRunner

    return CliRunner().invoke(_command(), [str(a) for a in args])


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file directly in ``directory``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


# A stage line of a long command whose stderr is not a terminal ("compress: fitting 30 layers"):
# progress, printed once real work has begun, so it may precede an error that comes later.
STAGE_LINE = re.compile(r"(compress|calibrate|evaluate|bench): ")


def split_stage_lines(stderr: str) -> tuple[list[str], list[str]]:
    """(the stage lines stderr starts with, the non-empty lines after them)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    n = next((i for i, line in enumerate(lines) if not STAGE_LINE.match(line)), len(lines))
    return lines[:n], lines[n:]


def assert_clean_failure(result, code: int, *needles: str) -> str:
    """Exit ``code``; the error is one or two plain lines on stderr, the first ``error: ...``,
    holding every needle (after only the stage lines of work already begun); no traceback."""
    where = f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == code, where
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr, where
    _, lines = split_stage_lines(result.stderr)
    assert 1 <= len(lines) <= 2, where
    assert lines[0].startswith("error: "), where
    for needle in needles:
        assert needle.lower() in result.stderr.lower(), (needle, where)
    return result.stderr


def write_stats(model_dir: Path, path: Path, n_tokens: int, /, **meta_changes: str) -> Path:
    """A calibration statistics file for the checkpoint in ``model_dir``, from seeded random
    activations (valid unless ``meta_changes`` break its metadata)."""
    import json

    import torch

    from collabcompress.files.arch import detect
    from collabcompress.files.statistics import STATS_FORMAT, source_sha256
    from collabcompress.files.checkpoint import open_checkpoint
    from collabcompress.files.output import write_safetensors

    ckpt = open_checkpoint(model_dir)
    specs = detect(ckpt)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for s in specs:
        x = torch.randn(n_tokens, s.d_model, generator=g, dtype=torch.float64)
        tensors[f"{s.module}.second_moment"] = x.T @ x / n_tokens
        tensors[f"{s.module}.mean"] = x.mean(0)
    meta = {"format": STATS_FORMAT, "source_sha256": source_sha256(ckpt), "tokens": str(n_tokens),
            "modules": json.dumps([s.module for s in specs]), **meta_changes}
    write_safetensors(path, [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()], meta)
    return path


def rerecord_outputs(directory: Path) -> None:
    """Record the current sha256 and size of every output in the manifest (a deleted one is
    dropped): a directory edited after compress then passes the hash check, so the checks
    behind it can be tested."""
    import dataclasses

    from collabcompress.files import manifest as mf
    from collabcompress.files.output import write_manifest
    from collabcompress.files.output import file_record

    m = mf.read(directory)
    outputs = tuple(mf.FileRecord(**file_record(directory / o.name, directory)) for o in m.outputs
                    if (directory / o.name).is_file())
    write_manifest(directory, dataclasses.replace(m, outputs=outputs))


def stored_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in ``directory/model.safetensors`` (headers only)."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def stored_tensor(directory: Path, name: str):
    """One tensor of ``directory/model.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def budget_losses(manifest: dict, fraction: float) -> list[tuple[dict, dict[int, float]]]:
    """Check that a ``--budget fraction`` manifest keeps at most that fraction of the full key
    cache; (layer record, its allocation curve R -> loss) per layer."""
    layers = manifest["layers"]
    full = sum(layer["kv_heads"] * layer["head_dim"] for layer in layers)
    assert sum(layer["shared_dim"] for layer in layers) <= fraction * full
    return [(layer, {int(r): v for r, v in layer["allocation"]["losses"].items()}) for layer in layers]


def write_shards(tensors: dict, directory: Path, in_first: Callable[[str], bool]) -> Path:
    """Two shards and an index as transformers writes them: the tensors ``in_first`` names go to
    the first shard, the rest to the second. Returns the index."""
    from safetensors.torch import save_file

    first = {k: v for k, v in tensors.items() if in_first(k)}
    parts = (first, {k: v for k, v in tensors.items() if k not in first})
    assert all(parts)
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(dict(sorted(part.items())), str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                indent=2))
    return index
