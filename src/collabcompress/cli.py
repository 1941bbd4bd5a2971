"""The ``collabcompress`` command line: thin Typer commands over the library.

One error boundary (:class:`_Boundary`, the command group every command runs in) turns
the library's :class:`CollabError` into a plain ``error: ...`` line on stderr and the exit
code of docs/method.md, an ``OSError`` on a named file into exit 3, Ctrl-C into exit
130, SIGTERM into exit 143 and SIGHUP into exit 129 (temporary outputs are removed on the
way out), a closed stdout (``| head``) into a quiet exit 141, and anything else into exit 1
with a short "internal error" line. ``--debug`` or ``COLLABCOMPRESS_DEBUG=1`` shows tracebacks.
Everything printed that comes from a file is escaped (:mod:`collabcompress.display`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .defaults import (DEFAULT_MULTIPLE_OF, DEFAULT_BENCH_BATCH_SIZES, DEFAULT_BENCH_CONTEXT, DEFAULT_BENCH_DECODE_STEPS,
                       DEFAULT_BENCH_LENGTHS, DEFAULT_BENCH_REPEATS, DEFAULT_BENCH_WARMUP, DEFAULT_ENERGIES,
                       DEFAULT_LM_TOKENS, DEFAULT_LM_WINDOW, DEFAULT_MAX_ITER, DEFAULT_SEQ_LEN, DEFAULT_TOL)
from .display import safe_renderable, safe_text
from .dtypes import COMPUTE_NAMES
from .errors import BadInputError, CollabError


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that it unwinds like Ctrl-C (cleanup included)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(message: str, code: int) -> None:
    # Temporary outputs are already removed (atomic_directory cleans up on the way out).
    # Exit now rather than wait for worker threads still finishing a layer.
    _err().print(message, highlight=False, markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _no_placeholder(option: Any) -> Any:
    # typer shows every flag with a "<bool>" value placeholder, as if it took a value
    if option is not None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    """A command whose ``--help`` flag is shown without a placeholder (see :func:`_flag`)."""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_placeholder(super().get_help_option(ctx))


class _Boundary(TyperGroup):
    """The one place where exceptions become messages and exit codes."""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_placeholder(super().get_help_option(ctx))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.exceptions.TyperException, typer.Exit, typer.Abort):  # usage errors, --help, exits
            raise
        except _Terminated as e:
            _stop("hung up" if e.signum == signal.SIGHUP else "terminated", 128 + e.signum)
        except KeyboardInterrupt:
            _stop("interrupted", 130)
        except CollabError as e:
            _fail(str(e), e.exit_code)
        except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as a pipeline's writer does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            raise typer.Exit(141) from None
        except OSError as e:
            if not e.filename:  # not about a file the user named: a bug
                _internal(e)
            _fail(f"{e.strerror or e}: {e.filename}", 3)
        except Exception as e:  # noqa: BLE001 - the boundary: anything else is a bug
            _internal(e)


def _fail(message: str, code: int) -> None:
    if _state["debug"]:
        raise
    text = Text("error: ", style="bold red")
    text.append(safe_text(message))
    _err().print(text, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _internal(e: BaseException) -> None:
    if _state["debug"]:
        raise
    _fail(f"internal error ({type(e).__name__}: {str(e)[:200]}); please report it with the output of "
          "`collabcompress --debug ...`", 1)


app = typer.Typer(
    name="collabcompress",
    cls=_Boundary,
    help="Compress transformer attention into collaborative multi-head attention (arXiv 2006.16362).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": os.environ.get("COLLABCOMPRESS_DEBUG", "") not in ("", "0")}
_NOT_A_TERMINAL_WIDTH = 100_000  # a file or pipe gets every column and every digit


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich would exit 1 (a bug's code): the error boundary's exit 141 instead
        raise BrokenPipeError


def _console(stderr: bool = False) -> Console:
    """A console for stdout or stderr as it is now (CliRunner swaps them): no markup, and no
    width limit when it is not a terminal."""
    console = _Console(stderr=stderr, markup=False, highlight=False, emoji=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = _NOT_A_TERMINAL_WIDTH
    return console


def _err() -> Console:
    return _console(stderr=True)


def _show(*renderables: Any) -> None:
    """Print tables and lines to stdout, every string escaped (see collabcompress.display)."""
    out = _console()
    for r in renderables:
        out.print(safe_renderable(r))


def _int(option: str) -> Callable[[Any], int]:
    """The parser of an integer option: an out-of-range or absurdly long number is bad input
    (exit 3) rather than an overflow deep inside the library."""

    def parse(value: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError(f"{safe_text(text[:40])!r} is not an integer")
        if len(text.lstrip("+-")) > 19 or abs(int(text)) >= 2 ** 63:
            raise BadInputError(f"{option} {text[:24]}{'...' if len(text) > 24 else ''} is out of range "
                                "(at most 2**63 - 1)")
        return int(text)

    return parse
CheckpointArg = Annotated[Path, typer.Argument(help="A .safetensors file, a *.safetensors.index.json, or a directory "
                                                    "holding model.safetensors or model.safetensors.index.json.",
                                               show_default=False)]
HeadsOpt = Annotated[Optional[int], typer.Option("--heads", parser=_int("--heads"),
                                                 help="Attention heads per layer (default: from config.json).")]
KvHeadsOpt = Annotated[Optional[int], typer.Option(
    "--kv-heads", parser=_int("--kv-heads"),
    help="Key/value heads per layer of a grouped-query rotary model (default: from config.json, else from the "
         "key rows).")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture family (default: detected); see `archs`.")]


def _flag(*names: str, **kwargs: Any) -> Any:
    """A boolean option that takes no value, shown in --help without typer's "<bool>" placeholder."""
    return typer.Option(*names, metavar="", **kwargs)


JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the result as JSON to PATH ('-' = stdout, no table).",
                                                metavar="PATH")]
PLOT_FORMATS = (".png", ".pdf", ".svg")
PLOT_METAVAR = "FILE.png|pdf|svg"


def _check_targets(inputs: Iterable[Path | str | None], json_path: str | None = None,
                   plot: Path | None = None, files: Iterable[Path | str | None] = ()) -> None:
    """Refuse bad --json / --plot targets before any work (see collabcompress.files.output).

    ``inputs`` are checkpoints and directories (a checkpoint file brings its directory),
    ``files`` plain files the command reads or writes (texts, statistics)."""
    from .files.output import check_output_file, input_paths

    paths = input_paths(*inputs, files=files)
    if json_path is not None:
        check_output_file(json_path, paths, option="--json", stdout=True)
    if plot is not None:
        if plot.suffix.lower() not in PLOT_FORMATS:
            raise BadInputError(f"--plot {plot}: unknown file type {plot.suffix or '(none)'!r}; "
                                f"give a name ending in {', '.join(PLOT_FORMATS)}")
        check_output_file(plot, paths, option="--plot")


def _emit(result: dict[str, Any], json_path: str | None, show: Callable[[], Iterable[Any]]) -> None:
    """Write ``result`` as JSON to ``json_path`` when given; print ``show()`` unless it is ``-``."""
    if json_path:
        from .files.output import write_json

        write_json(result, json_path)
    if json_path != "-":
        _show(*show())


def _save_plot(draw: Callable[[Any, Path], None], result: Any, path: Path) -> None:
    try:
        draw(result, path)
    except OSError as e:
        raise BadInputError(f"cannot write plot {path}: {e.strerror or e}") from e


Stage = Callable[[str, int], Optional[tuple[str, str]]]  # (progress name, total) -> (stage key, line) or None


def _progress(description: str, enabled: bool, command: str | None = None, stage: Stage | None = None):
    """A transient progress bar on stderr and its ``(name, done, total)`` callback.

    On a terminal the bar; elsewhere (a log file, CI) one plain line per stage, ``command:
    what``, from ``stage`` on the stage's first report: after real work has begun, so that
    an early error stays the only thing on stderr. Neither when ``enabled`` is false
    (``--json -``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = _err()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not enabled or not err.is_terminal)
    task = progress.add_task(description, total=None)
    lines = enabled and not err.is_terminal and stage is not None
    said: set[str] = set()

    def step(name: str, done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=f"{description} {safe_text(name)}")
        if lines:
            found = stage(name, total)
            if found is not None and found[0] not in said:
                said.add(found[0])
                err.print(f"{command}: {found[1]}", highlight=False, markup=False, soft_wrap=True)

    return progress, step


def _compress_stage(name: str, total: int) -> tuple[str, str]:
    if name.startswith("loss curve"):
        return "curves", f"measuring the loss curves of {total} layers"
    if name.startswith("healing:"):
        return "sampling", "healing: sampling the original model's text"
    if name.startswith("healing"):
        return "healing", f"healing {total:,} steps"
    return "fitting", f"fitting {total} layers"


def _calibrate_stage(name: str, total: int) -> tuple[str, str]:
    return "run", f"running the model on up to {total:,} tokens"


def _bench_stage(name: str, total: int) -> tuple[str, str] | None:
    return ("forward", f"timing {total} settings") if name != "decode" else None  # decode reports once, when done


def _evaluate_stage(name: str, total: int) -> tuple[str, str]:
    lines = {"original": "running the original model on the texts",
             "compressed": "running the compressed model on the texts",
             "Lee original": "running the original model on the Lee corpus",
             "Lee compressed": "running the compressed model on the Lee corpus",
             "windows": "comparing next-token predictions window by window",
             "generation": "generating from the prompts with both models"}
    return name, lines.get(name, name)


@contextlib.contextmanager
def _warnings_to_stderr():
    """Show warnings as plain ``warning: ...`` lines (no file and line number).

    ResourceWarning stays hidden, as Python hides it by default: it speaks to developers, and a
    signal landing between ``open`` and ``with`` leaves a file to the collector, not to the user.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            yield
        finally:
            err = _err()
            for w in caught:
                text = Text("warning: ", style="yellow")
                text.append(safe_text(w.message))
                err.print(text, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"collabcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, _flag("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, _flag("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Compress transformer attention into collaborative multi-head attention."""
    if debug:
        _state["debug"] = True


@app.command(cls=_Command)
def analyze(
    checkpoint: CheckpointArg,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    arch: ArchOpt = None,
    energy: Annotated[Optional[list[float]], typer.Option(
        "--energy", help="Energy threshold tau in (0, 1]; repeatable. Default: "
                         f"{', '.join(map(str, DEFAULT_ENERGIES))}.")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw the cumulative energy curves to this file (.png, .pdf or .svg).",
        metavar=PLOT_METAVAR)] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="Also measure the loss curves --budget allocates by (rotary causal LMs: the "
                              "model's next-token KL with one layer compressed; else attention KL; on the kept "
                              "calibration windows at a ladder of key caches).")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Measure how redundant the attention heads of every layer are (spectral analysis)."""
    _check_targets([checkpoint], json_path, plot, files=[calibration])
    from .commands.analyze import analyze as run_analyze, check_energy
    from .extras import require_matplotlib
    from .tables import analysis_summary, analysis_table, plot_energy

    energies = sorted(set(check_energy(t) for t in energy)) if energy else list(DEFAULT_ENERGIES)
    if plot is not None:
        require_matplotlib()
    progress, step = _progress("analyzing", json_path != "-")
    with progress:
        result = run_analyze(checkpoint, heads=heads, arch=arch, energies=energies, progress=step, kv_heads=kv_heads,
                             calibration=calibration)
    if plot is not None:
        _save_plot(plot_energy, result, plot)
    names = {"next_token_kl": "next-token KL", "attention_kl": "attention KL"}
    curves = [f"layer {la.spec.index} {names[la.curve_loss]} at key cache R: "
              + ", ".join(f"{r}: {v:.4g}" for r, v in sorted(la.loss_curve.items()))
              for la in result.layers if la.loss_curve is not None]
    _emit(result.to_dict(), json_path, lambda: [analysis_table(result, show_module=_console().width >= 120),
                                                analysis_summary(result), *curves,
                                                *([f"plot written to {plot}"] if plot is not None else [])])


class Method(str, Enum):
    cp_als = "cp-als"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


HealDType = Enum("HealDType", {name: name for name in ("auto", *COMPUTE_NAMES)}, type=str)  # compress --heal-dtype
BudgetOf = Enum("BudgetOf", {name: name for name in ("keys", "kv")}, type=str)  # compress --budget-of


@app.command(cls=_Command)
def compress(
    checkpoint: CheckpointArg,
    out: Annotated[str, typer.Option("--out", help="Output directory (created atomically).", show_default=False)],
    rank: Annotated[Optional[int], typer.Option("--rank", parser=_int("--rank"), help="Shared key/query width R for every layer.")] = None,
    energy: Annotated[Optional[float], typer.Option(
        "--energy", help="Per-layer R: the shared rank needed to keep this spectral energy, in (0, 1].")] = None,
    min_rank: Annotated[int, typer.Option("--min-rank", parser=_int("--min-rank"), help="With --energy: at least this width.")] = 1,
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", parser=_int("--max-rank"), help="With --energy: at most this width.")] = None,
    multiple_of: Annotated[int, typer.Option("--multiple-of", parser=_int("--multiple-of"), help="With --energy: round R up to a multiple.")] = DEFAULT_MULTIPLE_OF,
    method: Annotated[Method, typer.Option("--method", help="Decomposition method.")] = Method.cp_als,
    max_iter: Annotated[int, typer.Option("--max-iter", parser=_int("--max-iter"), help="Most ALS sweeps per layer.")] = DEFAULT_MAX_ITER,
    tol: Annotated[float, typer.Option("--tol", help="Stop when the fit changes less than this.")] = DEFAULT_TOL,
    seed: Annotated[int, typer.Option("--seed", parser=_int("--seed"), help="Random seed (used only where randomness is needed).")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[DType, typer.Option("--dtype", help="dtype of the new tensors (auto = the source's).")] = DType.auto,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Compress only these layer indices, e.g. 0,2,4-5.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="Activation statistics from `calibrate` for the whitened decomposition.")] = None,
    refine_steps: Annotated[int, typer.Option("--refine-steps", parser=_int("--refine-steps"), help="Adam steps per layer minimising the attention KL on the kept calibration "
                               "sequences (needs `calibrate --keep-sequences N`).")] = 0,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help="Total key cache over all layers as a fraction of the original's, in (0, 1]: allocated "
                         "across layers by a loss measured on the kept calibration sequences (rotary causal LMs: "
                         "the model's next-token KL with one layer compressed at a time; else attention KL) "
                         "(needs --calibration with `calibrate --keep-sequences N`).")] = None,
    budget_of: Annotated[BudgetOf, typer.Option(
        "--budget-of", help="What --budget counts: keys (the key cache) or kv (the key and value cache, allocated "
                            "across layers and between keys and values by the same loss).")] = BudgetOf.keys,
    value_rank: Annotated[Optional[int], typer.Option(
        "--value-rank", parser=_int("--value-rank"), help="Shared values: a value latent of this width r_v per "
                                                          "layer (the value cache per token), all heads sharing it.")] = None,
    value_energy: Annotated[Optional[float], typer.Option(
        "--value-energy", help="Shared values: per-layer r_v keeping this energy of the value fit, in (0, 1].")] = None,
    force_data_free: Annotated[bool, _flag(
        "--force-data-free", help="Fit a causal LM's shared values without --calibration (far worse).")] = False,
    stock: Annotated[bool, _flag("--stock", help="Make an output `export --format stock` can write: --rank R in every layer, one frequency table, values of width R (needs --calibration).")] = False,
    heal_steps: Annotated[int, typer.Option("--heal-steps", parser=_int("--heal-steps"), help="After compressing: Adam steps distilling the original model's outputs "
                             "(next-token distributions; embeddings for encoders) on the calibration windows (causal "
                             "LMs: also on the same sentences shuffled), a few held out, into the new tensors "
                             "(needs --calibration; hf extra).")] = 0,
    heal_dtype: Annotated[HealDType, typer.Option("--heal-dtype", help="Arithmetic of healing's passes (auto: bfloat16 on "
                             "a CPU with bfloat16 matrix units, AVX512-BF16 or AMX, where a step takes half the time; "
                             "else float32). The tensors and the optimiser stay float32.")] = HealDType.auto,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    arch: ArchOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", parser=_int("--workers"), help="Layers decomposed in parallel (default: the usable CPU cores).")] = None,
    remote_code: Annotated[bool, _flag(
        "--remote-code", help="Also make DIR load with AutoModel.from_pretrained(DIR, trust_remote_code=True) "
                              "(hf extra).")] = False,
    force: Annotated[bool, _flag("--force", help="Replace an existing output directory.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Re-parametrize every attention layer into collaborative attention and save the result."""
    from .files.output import check_output_dir, input_paths

    check_output_dir(out, input_paths(checkpoint, files=[calibration]), force=force)
    _check_targets([checkpoint, out], json_path, files=[calibration])
    from .commands.compress import CompressOptions, compress as run_compress
    from .tables import compress_notes, compress_table

    options = CompressOptions(rank=rank, energy=energy, min_rank=min_rank, max_rank=max_rank,
                              multiple_of=multiple_of, method=method.value,
                              max_iter=max_iter, tol=tol, seed=seed, device=device, dtype=dtype.value,
                              layers=layers, calibration=str(calibration) if calibration else None,
                              refine_steps=refine_steps, budget=budget, heal_steps=heal_steps,
                              heal_dtype=heal_dtype.value, value_rank=value_rank, value_energy=value_energy,
                              budget_of=budget_of.value, force_data_free=force_data_free, stock=stock)
    progress, step = _progress("compressing", json_path != "-", "compress", _compress_stage)
    with progress, _warnings_to_stderr():
        manifest = run_compress(checkpoint, out, options, heads=heads, arch=arch, force=force, workers=workers,
                                remote_code=remote_code, progress=step, kv_heads=kv_heads)
    t = manifest["totals"]
    _emit(manifest, json_path, lambda: [
        compress_table(manifest), *compress_notes(manifest),
        f"key/query parameters {t['qk_params_before']:,} -> {t['qk_params_after']:,}; "
        f"model parameters {t['params_before']:,} -> {t['params_after']:,}; written to {out}"])


@app.command(cls=_Command)
def export(
    directory: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    out: Annotated[str, typer.Option("--out", help="Directory of the exported model (created atomically).", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="stock: a plain transformers model with one key/value head of size R (served by vLLM as is).")] = "stock",
    force: Annotated[bool, _flag("--force", help="Replace an earlier export (never another directory).")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Write a compressed rotary decoder as a plain transformers checkpoint (multi-query attention)."""
    _check_targets([directory, out], json_path)
    from .commands.export import export as run_export

    with _warnings_to_stderr():
        record = run_export(directory, out, fmt=fmt, force=force)
    s = record["stock"]
    _emit(record, json_path, lambda: [f"{s['layers']} layers as multi-query attention of head size {s['head_dim']}: KV cache "
                                      f"{s['kv_cache_per_token_and_layer']} of {s['kv_cache_before']} per token and layer; written to {out}"])


@app.command(cls=_Command)
def verify(
    directory: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    original: Annotated[Optional[Path], typer.Option(
        "--original", help="The source checkpoint (default: the path in the manifest, checked by sha256).")] = None,
    max_kl: Annotated[Optional[float], typer.Option(
        "--max-kl", help="Fail with exit code 5 when a layer's mean KL divergence exceeds this.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="Draw the probe inputs from these activation statistics.")] = None,
    seed: Annotated[int, typer.Option("--seed", parser=_int("--seed"), help="Seed of the probe inputs.")] = 0,
    json_path: JsonOpt = None,
) -> None:
    """Compare original and collaborative attention distributions on probe inputs."""
    _check_targets([directory, original], json_path, files=[calibration])
    from .tables import verify_table
    from .commands.verify import check_gate, verify as run_verify

    result = run_verify(directory, original=original, max_kl=max_kl, seed=seed, calibration=calibration)
    _emit(result, json_path, lambda: [verify_table(result)])
    check_gate(result)


@app.command(cls=_Command)
def calibrate(
    model_dir: Annotated[Path, typer.Argument(help="Directory of the original transformers model (with tokenizer).",
                                              show_default=False)],
    texts: Annotated[Path, typer.Option("--texts", help="UTF-8 text file, one text per line.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Statistics file to write (.safetensors).", show_default=False)],
    max_tokens: Annotated[int, typer.Option("--max-tokens", parser=_int("--max-tokens"), help="Stop after this many non-padding tokens.")] = 100_000,
    max_length: Annotated[Optional[int], typer.Option("--max-length", parser=_int("--max-length"), help="Split longer texts into windows of at most this many tokens (every token is used). "
                                                      f"Default: 128; {DEFAULT_LM_WINDOW} for a causal LM (llama, mistral, qwen2), whose texts are read as one stream.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", parser=_int("--batch-size"), help="Windows per forward pass.")] = 16,
    keep_sequences: Annotated[int, typer.Option("--keep-sequences", parser=_int("--keep-sequences"), help="Also keep the inputs of N seeded windows (and every window's token ids): needed by compress --refine-steps, --budget and --heal-steps, and by analyze --calibration.")] = 0,
    seed: Annotated[int, typer.Option("--seed", parser=_int("--seed"), help="Seed for choosing the kept sequences.")] = 0,
    heads: HeadsOpt = None,
    arch: ArchOpt = None,
    force: Annotated[bool, _flag("--force", help="Replace an existing statistics file.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Record activation statistics of the original model on real text (needs the hf extra)."""
    _check_targets([model_dir], json_path, files=[texts, out])
    from .commands.calibrate import calibrate as run_calibrate

    progress, step = _progress("calibrating", json_path != "-", "calibrate", _calibrate_stage)
    with progress, _warnings_to_stderr():
        summary = run_calibrate(model_dir, texts, out, max_tokens=max_tokens, max_length=max_length,
                                batch_size=batch_size, keep_sequences=keep_sequences, seed=seed, heads=heads,
                                arch=arch, force=force, progress=step)
    _emit(summary, json_path, lambda: [
        f"{summary['tokens']:,} tokens from {summary['texts']} texts ({summary['windows']} windows of "
        f"<= {summary['max_length']} tokens) through {len(summary['modules'])} attention modules; "
        f"statistics written to {out}"])


@app.command(cls=_Command)
def report(
    directory: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    seq_len: Annotated[Optional[list[int]], typer.Option("--seq-len", parser=_int("--seq-len"), help=f"Sequence length N for the FLOPs per token; repeatable. Default: {DEFAULT_SEQ_LEN}.")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw FLOPs per token against sequence length, before and after, to this file (.png, .pdf "
                      "or .svg).", metavar=PLOT_METAVAR)] = None,
    measured: Annotated[Optional[Path], typer.Option(
        "--measured", help="A `bench --json` file of this directory: its measured latency ratios beside the FLOP "
                           "model's.", metavar="BENCH.json")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Show what was saved: key/query and model parameters, bytes, the FLOP model per token, key cache."""
    _check_targets([directory], json_path, plot, files=[measured])
    from .extras import require_matplotlib
    from .commands.report import build_report
    from .tables import plot_flops, report_tables

    if plot is not None:
        require_matplotlib()
    result = build_report(directory, seq_len or [DEFAULT_SEQ_LEN], measured=measured)
    if plot is not None:
        _save_plot(plot_flops, result, plot)
    _emit(result.to_dict(), json_path, lambda: [*report_tables(result), *result.notes(),
                                                *([f"plot written to {plot}"] if plot is not None else [])])


def _int_list(option: str, text: str) -> list[int]:
    """``32,128,512`` -> [32, 128, 512]; anything else is bad input (exit 3)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,9}", p) and int(p) > 0 for p in parts):
        raise BadInputError(f"{option} {safe_text(text[:40])!r}: give positive integers separated by commas, "
                            "e.g. 32,128,512")
    return [int(p) for p in parts]


class Level(str, Enum):
    auto = "auto"
    module = "module"
    model = "model"


@app.command(cls=_Command)
def bench(
    original: Annotated[Path, typer.Argument(help="The source checkpoint or model directory that was compressed "
                                                  "(checked against the manifest by sha256).", show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    level: Annotated[Level, typer.Option(
        "--level", help="module: each compressed attention layer alone (no hf extra needed); model: the whole "
                        "transformers model (hf extra); auto: model when it loads, else module.")] = Level.auto,
    lengths: Annotated[str, typer.Option("--lengths", help="Forward sequence lengths N, comma-separated.")] =
        ",".join(map(str, DEFAULT_BENCH_LENGTHS)),
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Forward batch sizes, comma-separated.")] =
        ",".join(map(str, DEFAULT_BENCH_BATCH_SIZES)),
    threads: Annotated[Optional[int], typer.Option("--threads", parser=_int("--threads"), help="torch intra-op threads while measuring, at most the usable cores (default: torch's current setting).", show_default=False)] = None,
    warmup: Annotated[int, typer.Option("--warmup", parser=_int("--warmup"), help="Untimed runs of each model before timing (decode: steps).")] = DEFAULT_BENCH_WARMUP,
    repeats: Annotated[int, typer.Option("--repeats", parser=_int("--repeats"), help="Timed runs of each model per setting, interleaved original/compressed.")] = DEFAULT_BENCH_REPEATS,
    context: Annotated[int, typer.Option("--context", parser=_int("--context"), help="Causal decoders: decode after a prefill of this many tokens (capped at the model's positions).")] = DEFAULT_BENCH_CONTEXT,
    decode_steps: Annotated[int, typer.Option("--decode-steps", parser=_int("--decode-steps"), help="Causal decoders: timed one-token decode steps.")] = DEFAULT_BENCH_DECODE_STEPS,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw the latency ratio against N per batch size, with the FLOP model's ratio dashed, to this "
                      "file (.png, .pdf or .svg).", metavar=PLOT_METAVAR)] = None,
    json_path: JsonOpt = None,
) -> None:
    """Measure forward latency, peak memory and (causal decoders) decode speed and cache bytes of the
    compressed model against the original, beside the FLOP model."""
    _check_targets([original, compressed], json_path, plot)
    from .extras import require_matplotlib
    from .commands.bench import bench as run_bench
    from .tables import bench_tables, plot_bench

    n_values, b_values = _int_list("--lengths", lengths), _int_list("--batch-sizes", batch_sizes)
    if plot is not None:
        require_matplotlib()
    progress, step = _progress("measuring", json_path != "-", "bench", _bench_stage)
    with progress, _warnings_to_stderr():
        result = run_bench(original, compressed, level=None if level is Level.auto else level.value,
                           lengths=n_values, batch_sizes=b_values, threads=threads, warmup=warmup, repeats=repeats,
                           context=context, decode_steps=decode_steps, device=device, progress=step)
    if plot is not None:
        _save_plot(plot_bench, result, plot)
    _emit(result, json_path, lambda: [*bench_tables(result), *([f"plot written to {plot}"] if plot is not None
                                                               else [])])


@app.command(cls=_Command)
def demo(
    out: Annotated[str, typer.Option("--out", help="Directory for everything the demo writes.")] = "collabcompress-demo",
    force: Annotated[bool, _flag("--force", help="Replace the directory of an earlier demo.")] = False,
    sample: Annotated[Optional[Path], typer.Option(
        "--sample", help="Use this model directory instead of the bundled sample.", show_default=False)] = None,
    json_path: JsonOpt = None,
) -> None:
    """Analyze, compress, report and verify the bundled sample model (all-MiniLM-L6-v2 attention)."""
    from .commands.demo import run_demo

    _check_targets([sample, out], json_path)
    summary = run_demo(out, force=force, sample=sample,
                       echo=(lambda line: None) if json_path == "-" else _show)
    _emit(summary, json_path, list)


@app.command(cls=_Command)
def evaluate(
    original: Annotated[Path, typer.Argument(help="Directory of the original transformers model (with tokenizer).",
                                             show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="Output directory of `compress`.", show_default=False)],
    texts: Annotated[Optional[Path], typer.Option(
        "--texts", help="UTF-8 text file, one text per line (default: the bundled sample).", show_default=False)] = None,
    max_length: Annotated[int, typer.Option("--max-length", parser=_int("--max-length"), help="Embeddings: truncate each text to this many tokens.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", parser=_int("--batch-size"), help="Texts per forward pass.")] = 16,
    max_tokens: Annotated[int, typer.Option("--max-tokens", parser=_int("--max-tokens"), help="Causal LM: perplexity on the first N tokens of the texts, read as one stream.")] = DEFAULT_LM_TOKENS,
    window: Annotated[int, typer.Option("--window", parser=_int("--window"), help="Causal LM: tokens per perplexity window (each from an empty context).")] = DEFAULT_LM_WINDOW,
    prompts: Annotated[int, typer.Option("--prompts", parser=_int("--prompts"), help="Causal LM: greedy generation from the start of this many texts.")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", parser=_int("--new-tokens"), help="Causal LM: tokens generated per prompt (the prompt and these must fit the model's positions).")] = 32,
    json_path: JsonOpt = None,
) -> None:
    """Compare the compressed model with the original on real text: embeddings, or for a causal LM
    perplexity, next-token agreement and KL, greedy generation (needs the hf extra)."""
    _check_targets([original, compressed], json_path, files=[texts])
    from .commands.evaluate import evaluate as run_evaluate, read_texts
    from .tables import evaluation_table, lm_evaluation_table

    lines = read_texts(texts) if texts is not None else None
    progress, step = _progress("evaluating", json_path != "-", "evaluate", _evaluate_stage)
    with progress:
        result = run_evaluate(original, compressed, lines, max_length=max_length, batch_size=batch_size,
                              texts_name=str(texts) if texts is not None else None, progress=step,
                              max_tokens=max_tokens, window=window, prompts=prompts, new_tokens=new_tokens)
    _emit(result, json_path, lambda: [lm_evaluation_table(result) if "perplexity" in result
                                      else evaluation_table(result)])


@app.command(cls=_Command)
def archs(json_path: JsonOpt = None) -> None:
    """List the supported architecture families and how their tensors are named."""
    _check_targets([], json_path)
    from .files.families import FAMILIES
    from .tables import archs_table

    rows = [{"family": f.name, "models": f.models, "query_key_tensors": f.example, "notes": f.note}
            for f in FAMILIES]
    result = {"families": rows, "refused": [
        "rotary position embeddings outside the rotary families (llama, mistral, qwen2)",
        "partial rotary (partial_rotary_factor < 1) and interleaved rotary pair layouts",
        "grouped-query or multi-query attention outside the rotary families",
        "per-head query/key normalisation (q_norm, k_norm: Qwen3, Gemma 3, OLMo 2)"]}
    _emit(result, json_path, lambda: [archs_table(rows), "Refused (exit 4): " + "; ".join(result["refused"]) + "."])


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def main() -> None:
    """Console-script entry point: SIGTERM and SIGHUP (the terminal closed) unwind like Ctrl-C (exit 143
    and 129, outputs cleaned up); a SIGHUP ignored by the parent (``nohup``) stays ignored."""
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminate)
    app()


if __name__ == "__main__":
    main()
