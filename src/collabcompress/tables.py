"""Rich tables and matplotlib plots for the commands' results (presentation only)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich import box
from rich.table import Table

from .errors import MissingExtraError
from .pipeline import AnalysisResult

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: torch.Tensor, width: int = 16) -> str:
    """Compact picture of a descending spectrum, ``width`` characters, relative to its maximum."""
    if values.numel() == 0 or float(values.max()) <= 0:
        return _BLOCKS[0] * width
    idx = torch.linspace(0, values.numel() - 1, min(width, values.numel())).round().long()
    rel = (values[idx] / values.max()).clamp(0, 1)
    return "".join(_BLOCKS[min(int(r * (len(_BLOCKS) - 1) + 0.5), len(_BLOCKS) - 1)] for r in rel)


def analysis_table(result: AnalysisResult, *, show_module: bool = False) -> Table:
    """One row per layer: H, d, D, shared rank needed at each tau, redundancy, spectrum sparkline."""
    mid = result.energies[len(result.energies) // 2]
    table = Table(title=f"Head redundancy: {result.checkpoint} ({result.architecture})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    if show_module:
        table.add_column("module")
    for col in ("H", "d", "D"):
        table.add_column(col, justify="right")
    for tau in result.energies:
        table.add_column(f"r@{tau:g}", justify="right")
    table.add_column(f"red@{mid:g}", justify="right")
    table.add_column("spectrum", no_wrap=True)
    for la in result.layers:
        sp = la.spectrum
        table.add_row(str(la.spec.index), *([la.spec.module] if show_module else []),
                      str(sp.n_head), str(sp.head_dim), str(sp.d_model),
                      *[str(sp.rank_at(t)) for t in result.energies],
                      f"{sp.redundancy(mid):.0%}", sparkline(sp.sv_query, 12))
    return table


def analysis_summary(result: AnalysisResult) -> str:
    s = result.summary()
    parts = [f"{s['total_rank_at'][k]}/{s['total_width']} at {k} ({s['redundancy'][k]:.0%} redundant)"
             for k in s["total_rank_at"]]
    return f"{s['layers']} attention layers; shared width needed: " + ", ".join(parts)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise MissingExtraError("plotting needs matplotlib: pip install 'collabcompress[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_energy(result: AnalysisResult, path: Path) -> None:
    """Cumulative energy curves of every layer, query and key side, with the thresholds."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, side in zip(axes, ("query", "key")):
        for la in result.layers:
            energy = (la.spectrum.energy_query if side == "query" else la.spectrum.energy_key).numpy()
            ax.plot(range(1, len(energy) + 1), energy, label=f"layer {la.spec.index}", lw=1.4)
        for tau in result.energies:
            ax.axhline(tau, color="grey", lw=0.7, ls="--")
        ax.set_title(f"{side} side: P_{'Q' if side == 'query' else 'K'}")
        ax.set_xlabel("shared width r")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative energy")
    axes[1].legend(fontsize=8, loc="lower right")
    save_figure(plt, fig, f"{result.checkpoint} ({result.architecture})", path)


def save_figure(plt, fig, title: str, path: Path) -> None:
    """Title, lay out, write as PNG and release a figure."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compress_table(manifest: dict) -> Table:
    """Per compressed layer: shared width, key/query parameters, relative error, sweeps, seconds.

    With calibration statistics the decomposition minimises the whitened error: "rel. error"
    is then the plain error of the products P_h and "rel. error (whitened)" the one that was
    minimised. With ``--refine-steps`` the attention KL before and after refinement is shown
    (refinement lowers the KL and may raise either error).
    """
    layers = manifest["layers"]
    whitened = bool(manifest["settings"].get("calibration"))
    refined = any(la.get("refine") for la in layers)
    table = Table(title=f"Compressed {manifest['source']['path']} ({manifest['source']['architecture']})",
                  title_justify="left", box=box.SIMPLE_HEAD)
    columns = ["layer", "H*d", "R", "energy@R", "rel. error"]
    columns += ["rel. error (whitened)"] * whitened + ["KL before refine", "KL after refine"] * refined
    for col in (*columns, "sweeps", "seconds"):
        table.add_column(col, justify="right")
    for layer in layers:
        plain = layer.get("relative_error_plain", layer["relative_error"]) if whitened else layer["relative_error"]
        row = [str(layer["index"]), str(layer["heads"] * layer["head_dim"]), str(layer["shared_dim"]),
               f"{layer['energy_spectral']:.3f}", f"{plain:.4f}"]
        if whitened:
            row.append(f"{layer['relative_error']:.4f}")
        if refined:
            r = layer.get("refine") or {}
            row += [f"{r['kl_before']:.3g}" if r else "", f"{r['kl_after']:.3g}" if r else ""]
        table.add_row(*row, str(layer["iterations"]), f"{layer['seconds']:.2f}")
    return table


def verify_table(result: dict) -> Table:
    """Per layer and overall: mean / max KL and the relative score error."""
    table = Table(title=f"Attention change: {result['directory']} vs {result['original']}", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("layer", "R", "mean KL", "max KL", "rel. score error"):
        table.add_column(col, justify="right")
    for r in result["layers"]:
        table.add_row(str(r["index"]), str(r["shared_dim"]), f"{r['kl_mean']:.3g}", f"{r['kl_max']:.3g}",
                      f"{r['relative_score_error']:.3g}")
    o = result["overall"]
    table.add_section()
    table.add_row("all", "", f"{o['kl_mean']:.3g}", f"{o['kl_max']:.3g}", f"{o['relative_score_error']:.3g}")
    probes = {r["probe"] for r in result["layers"]}
    if len(probes) == 1:
        table.caption = f"probe: {probes.pop()}"
    elif probes:
        table.caption = "probe: tokens through each layer's feeding norm (names in --json)"
    return table
