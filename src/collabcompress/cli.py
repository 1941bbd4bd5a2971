"""The ``collabcompress`` command line: thin Typer commands over the library.

One error boundary (:func:`_errors`) turns the library's :class:`CollabError` into a
plain message on stderr and the exit code of SPEC.md section 3; anything else is a bug
and keeps its traceback. ``--debug`` or ``COLLABCOMPRESS_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import BadInputError, CollabError

app = typer.Typer(
    name="collabcompress",
    help="Compress transformer attention into collaborative multi-head attention (arXiv 2006.16362).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out_console = Console(soft_wrap=False)
err = Console(stderr=True)
_state = {"debug": os.environ.get("COLLABCOMPRESS_DEBUG", "") not in ("", "0")}

CheckpointArg = Annotated[Path, typer.Argument(help="A .safetensors file, a *.safetensors.index.json, or a directory "
                                                    "holding model.safetensors or model.safetensors.index.json.",
                                               show_default=False)]
HeadsOpt = Annotated[Optional[int], typer.Option("--heads", help="Attention heads per layer (default: from config.json).")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture family (default: detected); see `archs`.")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the result as JSON to PATH ('-' = stdout, no table).",
                                                metavar="PATH")]


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where known errors become messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CollabError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            # Safety net: an operating-system error on a path the user gave (too long, not a
            # directory, ...) that no check above turned into a message is still bad input.
            if _state["debug"]:
                raise
            where = f": {e.filename}" if e.filename else ""
            err.print(f"[bold red]error:[/] {escape((e.strerror or str(e)) + where)}", highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            # Temporary outputs are already removed (atomic_directory cleans up on the way out).
            # Exit now rather than wait for worker threads still finishing a layer.
            err.print("interrupted", highlight=False)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    return wrapper


def _write_json(data: dict[str, Any], path: str) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise BadInputError(f"cannot write JSON to {target}: {e}") from e


def _check_json_path(path: str | None) -> None:
    """Refuse an unwritable --json location before any work (and before any output appears)."""
    if path in (None, "-"):
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write JSON to {path}: {parent} is not a writable directory")


def _save_plot(draw: Callable[[Any, Path], None], result: Any, path: Path) -> None:
    try:
        draw(result, path)
    except OSError as e:
        raise BadInputError(f"cannot write plot {path}: {e}") from e


def _progress(description: str, enabled: bool):
    """A transient progress bar on stderr (terminals only) and its ``(name, done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not enabled or not err.is_terminal)
    task = progress.add_task(description, total=None)

    def step(name: str, done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=f"{description} {name}")

    return progress, step


@contextlib.contextmanager
def _warnings_to_stderr():
    """Show the library's warnings as plain ``warning: ...`` lines (no file and line number)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"collabcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Compress transformer attention into collaborative multi-head attention."""
    if debug:
        _state["debug"] = True


@app.command()
@_errors
def analyze(
    checkpoint: CheckpointArg,
    heads: HeadsOpt = None,
    arch: ArchOpt = None,
    energy: Annotated[Optional[list[float]], typer.Option(
        "--energy", help="Energy threshold tau in (0, 1]; repeatable. Default: 0.9, 0.95, 0.99.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the cumulative energy curves to this PNG.",
                                                 metavar="PNG")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Measure how redundant the attention heads of every layer are (spectral analysis)."""
    _check_json_path(json_path)
    from .pipeline import DEFAULT_ENERGIES, analyze as run_analyze, check_energy
    from .tables import analysis_summary, analysis_table, plot_energy, require_matplotlib

    energies = sorted(set(check_energy(t) for t in energy)) if energy else list(DEFAULT_ENERGIES)
    if plot is not None:
        require_matplotlib()
    progress, step = _progress("analyzing", json_path != "-")
    with progress:
        result = run_analyze(checkpoint, heads=heads, arch=arch, energies=energies, progress=step)
    if plot is not None:
        _save_plot(plot_energy, result, plot)
    if json_path:
        _write_json(result.to_dict(), json_path)
    if json_path != "-":
        out_console.print(analysis_table(result, show_module=out_console.width >= 120))
        out_console.print(analysis_summary(result), highlight=False)
        if plot is not None:
            out_console.print(f"plot written to {plot}", highlight=False)


class Method(str, Enum):
    cp_als = "cp-als"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@app.command()
@_errors
def compress(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Option("--out", help="Output directory (created atomically).", show_default=False)],
    rank: Annotated[Optional[int], typer.Option("--rank", help="Shared key/query width R for every layer.")] = None,
    energy: Annotated[Optional[float], typer.Option(
        "--energy", help="Per-layer R: the shared rank needed to keep this spectral energy, in (0, 1].")] = None,
    min_rank: Annotated[int, typer.Option("--min-rank", help="With --energy: at least this width.")] = 1,
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", help="With --energy: at most this width.")] = None,
    multiple_of: Annotated[int, typer.Option("--multiple-of", help="With --energy: round R up to a multiple.")] = 8,
    method: Annotated[Method, typer.Option("--method", help="Decomposition method.")] = Method.cp_als,
    max_iter: Annotated[Optional[int], typer.Option("--max-iter", help="Most ALS sweeps per layer.")] = None,
    tol: Annotated[Optional[float], typer.Option("--tol", help="Stop when the fit changes less than this.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (used only where randomness is needed).")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[DType, typer.Option("--dtype", help="dtype of the new tensors (auto = the source's).")] = DType.auto,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Compress only these layer indices, e.g. 0,2,4-5.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="Activation statistics from `calibrate` for the whitened decomposition.")] = None,
    refine_steps: Annotated[int, typer.Option(
        "--refine-steps", help="Adam steps per layer minimising the attention KL on the kept calibration "
                               "sequences (needs `calibrate --keep-sequences N`).")] = 0,
    heads: HeadsOpt = None,
    arch: ArchOpt = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Layers decomposed in parallel (default: the usable CPU cores).")] = None,
    remote_code: Annotated[bool, typer.Option(
        "--remote-code", help="Also make DIR load with AutoModel.from_pretrained(DIR, trust_remote_code=True) "
                              "(hf extra).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Re-parametrize every attention layer into collaborative attention and save the result."""
    _check_json_path(json_path)
    from .compress import CompressOptions, compress as run_compress
    from .decompose import DEFAULT_MAX_ITER, DEFAULT_TOL
    from .tables import compress_table

    options = CompressOptions(rank=rank, energy=energy, min_rank=min_rank, max_rank=max_rank,
                              multiple_of=multiple_of, method=method.value,
                              max_iter=DEFAULT_MAX_ITER if max_iter is None else max_iter,
                              tol=DEFAULT_TOL if tol is None else tol, seed=seed, device=device, dtype=dtype.value,
                              layers=layers, calibration=str(calibration) if calibration else None,
                              refine_steps=refine_steps)
    progress, step = _progress("compressing", json_path != "-")
    with progress, _warnings_to_stderr():
        manifest = run_compress(checkpoint, out, options, heads=heads, arch=arch, force=force, workers=workers,
                                remote_code=remote_code, progress=step)
    if json_path:
        _write_json(manifest, json_path)
    if json_path != "-":
        out_console.print(compress_table(manifest))
        t = manifest["totals"]
        out_console.print(f"key/query parameters {t['qk_params_before']:,} -> {t['qk_params_after']:,}; "
                          f"model parameters {t['params_before']:,} -> {t['params_after']:,}; written to {out}",
                          highlight=False)


@app.command()
@_errors
def verify(
    directory: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    original: Annotated[Optional[Path], typer.Option(
        "--original", help="The source checkpoint (default: the path in the manifest, checked by sha256).")] = None,
    max_kl: Annotated[Optional[float], typer.Option(
        "--max-kl", help="Fail with exit code 5 when a layer's mean KL divergence exceeds this.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="Draw the probe inputs from these activation statistics.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probe inputs.")] = 0,
    json_path: JsonOpt = None,
) -> None:
    """Compare original and collaborative attention distributions on probe inputs."""
    _check_json_path(json_path)
    from .tables import verify_table
    from .verify import check_gate, verify as run_verify

    result = run_verify(directory, original=original, max_kl=max_kl, seed=seed, calibration=calibration)
    if json_path:
        _write_json(result, json_path)
    if json_path != "-":
        out_console.print(verify_table(result))
    check_gate(result)


@app.command()
@_errors
def calibrate(
    model_dir: Annotated[Path, typer.Argument(help="Directory of the original transformers model (with tokenizer).",
                                              show_default=False)],
    texts: Annotated[Path, typer.Option("--texts", help="UTF-8 text file, one text per line.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Statistics file to write (.safetensors).", show_default=False)],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Stop after this many non-padding tokens.")] = 100_000,
    max_length: Annotated[int, typer.Option(
        "--max-length", help="Split longer texts into windows of at most this many tokens (every token is used).")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 16,
    keep_sequences: Annotated[int, typer.Option(
        "--keep-sequences", help="Also keep the inputs of N seeded windows (for --refine-steps).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing the kept sequences.")] = 0,
    heads: HeadsOpt = None,
    arch: ArchOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing statistics file.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Record activation statistics of the original model on real text (needs the hf extra)."""
    _check_json_path(json_path)
    import warnings

    from .calibration import calibrate as run_calibrate

    progress, step = _progress("calibrating", json_path != "-")
    with progress, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_calibrate(model_dir, texts, out, max_tokens=max_tokens, max_length=max_length,
                                batch_size=batch_size, keep_sequences=keep_sequences, seed=seed, heads=heads,
                                arch=arch, force=force, progress=step)
    if json_path:
        _write_json(summary, json_path)
    if json_path != "-":
        out_console.print(f"{summary['tokens']:,} tokens from {summary['texts']} texts ({summary['windows']} windows of "
                          f"<= {summary['max_length']} tokens) through {len(summary['modules'])} attention modules; "
                          f"statistics written to {out}", highlight=False)


@app.command()
@_errors
def report(
    directory: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    seq_len: Annotated[Optional[list[int]], typer.Option(
        "--seq-len", help="Sequence length N for the FLOPs per token; repeatable. Default: 128.")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw FLOPs per token against sequence length, before and after, to this PNG.",
        metavar="PNG")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Show what was saved: key/query and model parameters, bytes, FLOPs per token, key cache."""
    _check_json_path(json_path)
    from .report import DEFAULT_SEQ_LEN, build_report, plot_flops, report_tables
    from .tables import require_matplotlib

    if plot is not None:
        require_matplotlib()
    result = build_report(directory, seq_len or [DEFAULT_SEQ_LEN])
    if plot is not None:
        _save_plot(plot_flops, result, plot)
    if json_path:
        _write_json(result.to_dict(), json_path)
    if json_path != "-":
        for table in report_tables(result):
            out_console.print(table)
        for note in result.notes():
            out_console.print(note, highlight=False, markup=False)
        if plot is not None:
            out_console.print(f"plot written to {plot}", highlight=False)


@app.command()
@_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Directory for everything the demo writes.")] = Path(
        "collabcompress-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace the directory of an earlier demo.")] = False,
    sample: Annotated[Optional[Path], typer.Option(
        "--sample", help="Use this model directory instead of the bundled sample.", show_default=False)] = None,
    json_path: JsonOpt = None,
) -> None:
    """Analyze, compress, report and verify the bundled sample model (all-MiniLM-L6-v2 attention)."""
    _check_json_path(json_path)
    from .demo import run_demo

    quiet = json_path == "-"
    summary = run_demo(out, force=force, sample=sample,
                       echo=(lambda line: None) if quiet else
                       (lambda line: out_console.print(line, highlight=False, markup=False, soft_wrap=True)))
    if json_path:
        _write_json(summary, json_path)


@app.command()
@_errors
def evaluate(
    original: Annotated[Path, typer.Argument(help="Directory of the original transformers model (with tokenizer).",
                                             show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    texts: Annotated[Optional[Path], typer.Option(
        "--texts", help="UTF-8 text file, one text per line (default: the bundled sample).", show_default=False)] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate each text to this many tokens.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per forward pass.")] = 16,
    json_path: JsonOpt = None,
) -> None:
    """Compare the compressed model's embeddings with the original's on real text (needs the hf extra)."""
    _check_json_path(json_path)
    from .evaluate import evaluate as run_evaluate, evaluation_table, read_texts

    lines = read_texts(texts) if texts is not None else None
    progress, step = _progress("evaluating", json_path != "-")
    with progress:
        result = run_evaluate(original, compressed, lines, max_length=max_length, batch_size=batch_size,
                              texts_name=str(texts) if texts is not None else None, progress=step)
    if json_path:
        _write_json(result, json_path)
    if json_path != "-":
        out_console.print(evaluation_table(result))


@app.command()
@_errors
def archs(json_path: JsonOpt = None) -> None:
    """List the supported architecture families and how their tensors are named."""
    _check_json_path(json_path)
    from rich.table import Table

    from .arch import FAMILIES

    rows = [{"family": f.name, "models": f.models, "query_key_tensors": f.example, "notes": f.note}
            for f in FAMILIES]
    if json_path:
        _write_json({"families": rows, "refused": ["rotary position embeddings", "grouped-query or multi-query "
                                                   "attention", "per-head query/key normalisation"]}, json_path)
    if json_path == "-":
        return
    table = Table(title="Supported architecture families", title_justify="left")
    for col in ("family", "models", "query / key tensors", "notes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["family"], r["models"], r["query_key_tensors"], r["notes"])
    out_console.print(table)
    out_console.print("Refused (exit 4): rotary position embeddings, grouped-query or multi-query attention, "
              "per-head query/key normalisation (q_norm, k_norm).", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
