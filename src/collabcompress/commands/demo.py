"""``collabcompress demo``: analyze, compress, report and verify the bundled sample model.

The sample is the attention of the real all-MiniLM-L6-v2 (6 layers, D = 384, 12 heads of
width 32) in float16, ``sample_models/all-MiniLM-L6-v2-attention`` at the root of the
source repository. Everything is written into one demo directory, built beside its
final place and renamed into it when complete::

    OUT/analysis.json     analyze, energies 0.9 / 0.95 / 0.99
    OUT/model/            compress --energy 0.95 (the compressed checkpoint and its manifest)
    OUT/report.json       report --seq-len 128 --seq-len 512
    OUT/verify.json       verify
    OUT/demo.json         what the demo did, with its timings (marks the directory as a demo's)
    OUT/energy.png, OUT/flops.png   when matplotlib is installed
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BadInputError

__all__ = ["run_demo", "find_sample", "SAMPLE_NAME", "DEMO_ENERGY", "DEMO_SEQ_LENS"]

SAMPLE_NAME = "all-MiniLM-L6-v2-attention"
DEMO_ENERGY = 0.95
DEMO_SEQ_LENS = (128, 512)
_MARKER = "demo.json"


def find_sample(sample: str | Path | None = None) -> Path:
    """The sample model directory: ``sample`` if given, else the bundled one.

    Looked for inside the package (``collabcompress/data/``), in the source checkout the
    package was imported from (``<repo>/sample_models/``) and under the current directory.

    Raises:
        BadInputError: not found, or ``sample`` holds no ``model.safetensors``.
    """
    if sample is not None:
        path = Path(sample)
        if not (path / "model.safetensors").is_file():
            raise BadInputError(f"--sample {path} is not a model directory (no model.safetensors in it)")
        return path
    package = Path(__file__).resolve().parents[1]  # collabcompress/
    for candidate in (package / "data" / SAMPLE_NAME,
                      package.parents[1] / "sample_models" / SAMPLE_NAME,  # src/collabcompress -> repository root
                      Path.cwd() / "sample_models" / SAMPLE_NAME):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise BadInputError(f"the bundled sample model sample_models/{SAMPLE_NAME} is not installed with this copy of "
                        "collabcompress; install it from the source repository with `pip install -e .`, run the "
                        "demo from the repository root, or pass --sample DIR")


def _check_out(out: str | Path, sample: Path, force: bool) -> None:
    from ..files.output import check_output_dir

    check_output_dir(out, [sample], force=force)


def _dump(data: dict[str, Any], path: Path) -> None:
    from ..files.output import write_json

    write_json(data, path)


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it (shorter lines)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _range(values: list[int | float], fmt: str = "{}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)} to {fmt.format(hi)}"


def run_demo(out: str | Path = "collabcompress-demo", *, force: bool = False, sample: str | Path | None = None,
             echo: Callable[[str], None] = print, plots: bool = True) -> dict[str, Any]:
    """Run analyze, compress (``--energy 0.95``), report and verify on the sample model.

    Args:
        out: the demo directory; refused if it exists unless ``force`` (and then only when it
            is an earlier demo's directory or empty).
        sample: another model directory to use instead of the bundled sample.
        echo: receives the account of each step, one line at a time.
        plots: also draw energy.png and flops.png when matplotlib is installed.

    Returns:
        The summary written to ``OUT/demo.json``.

    Raises:
        BadInputError: no sample model, or ``out`` exists (see above).
    """
    from .compress import CompressOptions, compress
    from ..files.output import atomic_directory
    from .analyze import analyze
    from .report import build_report
    from .verify import verify

    source = find_sample(sample)
    _check_out(out, source, force)  # the raw value: an empty --out is refused as such
    out = Path(out)
    matplotlib_ok = plots and importlib.util.find_spec("matplotlib") is not None
    summary: dict[str, Any] = {"sample": str(source), "out": str(out), "steps": {}}
    start = time.perf_counter()
    with atomic_directory(out, force=force) as tmp:
        # 1. analyze
        t0 = time.perf_counter()
        analysis = analyze(source, energies=(0.9, DEMO_ENERGY, 0.99))
        _dump(analysis.to_dict(), tmp / "analysis.json")
        key = f"{DEMO_ENERGY:g}"
        s = analysis.summary()
        first = analysis.layers[0].spectrum
        ranks = [la.spectrum.rank_at(DEMO_ENERGY) for la in analysis.layers]
        echo(f"1. analyze {_shown(source)}")
        echo(f"   {s['layers']} attention layers, {first.n_head} heads of width {first.head_dim} "
             f"(H*d = {first.width}, D = {first.d_model}), {analysis.architecture} family")
        echo(f"   shared width needed to keep {DEMO_ENERGY:.0%} of the spectral energy: {_range(ranks)} of "
             f"{first.width} per layer; {s['redundancy'][key]:.0%} of the key/query width is redundant")
        summary["steps"]["analyze"] = {"seconds": round(time.perf_counter() - t0, 2), "rank_at_0.95": ranks,
                                       "redundancy_0.95": s["redundancy"][key]}
        echo(f"   ({time.perf_counter() - t0:.1f} s) -> analysis.json")

        # 2. compress
        t0 = time.perf_counter()
        options = CompressOptions(energy=DEMO_ENERGY)
        manifest = compress(source, tmp / "model", options)
        tot = manifest["totals"]
        widths = [la["shared_dim"] for la in manifest["layers"]]
        errors = [la["relative_error"] for la in manifest["layers"]]
        echo(f"2. compress --energy {DEMO_ENERGY:g} (CP-ALS, {options.max_iter} sweeps per layer at most)")
        echo(f"   shared width R per layer: {', '.join(map(str, widths))} (rounded up to a multiple of 8)")
        echo(f"   key/query parameters {tot['qk_params_before']:,} -> {tot['qk_params_after']:,} "
             f"({(tot['qk_params_before'] - tot['qk_params_after']) / tot['qk_params_before']:.0%} fewer); "
             f"relative error of the products P_h: {_range(errors, '{:.3f}')}")
        summary["steps"]["compress"] = {"seconds": round(time.perf_counter() - t0, 2), "shared_dim": widths,
                                        "relative_error": errors, "qk_params_before": tot["qk_params_before"],
                                        "qk_params_after": tot["qk_params_after"]}
        echo(f"   ({time.perf_counter() - t0:.1f} s) -> model/")

        # 3. report
        t0 = time.perf_counter()
        report = build_report(tmp / "model", DEMO_SEQ_LENS)
        rep = report.to_dict()
        rep["directory"] = str(out / "model")
        _dump(rep, tmp / "report.json")
        q, m = rep["qk_total"], rep["model"]
        crossovers = [la["crossover_seq_len"] for la in rep["layers"] if la["crossover_seq_len"] is not None]
        echo(f"3. report --seq-len {' --seq-len '.join(map(str, DEMO_SEQ_LENS))}")
        echo(f"   weights on disk {m['weights_bytes_before']:,} -> {m['weights_bytes_after']:,} bytes "
             f"({m['weights_bytes_saved_fraction']:.0%} smaller); key cache per token "
             f"{m['key_cache_elements_per_token_before']:,} -> {m['key_cache_elements_per_token_after']:,} elements")
        flops = []
        for n in DEMO_SEQ_LENS:
            at = q["at_seq_len"][str(n)]
            b, a = at["qk_flops_per_token_before"], at["qk_flops_per_token_after"]
            flops.append(f"N={n}: {b:,} -> {a:,} ({(a - b) / b:+.0%}{', MORE' if a > b else ''})")
        echo(f"   key/query FLOPs per token, {'; '.join(flops)}")
        if crossovers:
            echo(f"   crossover N*: {_range(crossovers, '{:.1f}')} tokens: longer sequences cost more than the "
                 "original, because R > d makes every score cost 2*R instead of 2*d FLOPs per head")
        summary["steps"]["report"] = {"seconds": round(time.perf_counter() - t0, 2),
                                      "weights_bytes_before": m["weights_bytes_before"],
                                      "weights_bytes_after": m["weights_bytes_after"],
                                      "crossover_seq_len": crossovers}
        echo(f"   ({time.perf_counter() - t0:.1f} s) -> report.json")

        # 4. verify
        t0 = time.perf_counter()
        result = verify(tmp / "model")
        result["directory"] = str(out / "model")
        _dump(result, tmp / "verify.json")
        o = result["overall"]
        echo("4. verify (original vs collaborative attention on seeded probe tokens)")
        echo(f"   mean KL {o['kl_mean']:.3g} (max {o['kl_max']:.3g}); relative error of the row-centred scores "
             f"{o['relative_score_error']:.3f}; probe: {result['layers'][0]['probe']}")
        summary["steps"]["verify"] = {"seconds": round(time.perf_counter() - t0, 2), "kl_mean": o["kl_mean"],
                                      "relative_score_error": o["relative_score_error"]}
        echo(f"   ({time.perf_counter() - t0:.1f} s) -> verify.json")

        if matplotlib_ok:
            from ..tables import plot_energy, plot_flops

            # titled by the model's name: the paths here are the sample's and the temporary directory's
            plot_energy(analysis, tmp / "energy.png", name=source.resolve().name)
            plot_flops(report, tmp / "flops.png", name=source.resolve().name)
            summary["plots"] = ["energy.png", "flops.png"]
        summary["seconds"] = round(time.perf_counter() - start, 2)
        _dump(summary, tmp / _MARKER)
    pictures = " energy.png, flops.png," if matplotlib_ok else ""
    if plots and not matplotlib_ok:
        echo("Plots skipped: matplotlib is not installed; pip install 'collabcompress[plot]' adds energy.png and "
             "flops.png.")
    echo(f"Done in {summary['seconds']:.1f} s. {out}/ holds model/, analysis.json, report.json, verify.json,"
         f"{pictures} demo.json.")
    echo(f"Next: collabcompress report {out / 'model'} --seq-len 64 --seq-len 1024")
    return summary
