"""Rich tables and matplotlib plots for the commands' results (presentation only).

Imports neither torch nor the library's computing modules, so that commands which only
print (``archs``) stay fast; the results arrive as records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from .extras import require_matplotlib

if TYPE_CHECKING:
    import torch

    from .commands.analyze import AnalysisResult
    from .commands.report import Report

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: torch.Tensor, width: int = 16) -> str:
    """Compact picture of a descending spectrum, ``width`` characters, relative to its maximum."""
    import torch

    if values.numel() == 0 or float(values.max()) <= 0:
        return _BLOCKS[0] * width
    idx = torch.linspace(0, values.numel() - 1, min(width, values.numel())).round().long()
    rel = (values[idx] / values.max()).clamp(0, 1)
    return "".join(_BLOCKS[min(int(r * (len(_BLOCKS) - 1) + 0.5), len(_BLOCKS) - 1)] for r in rel)


def analysis_table(result: AnalysisResult, *, show_module: bool = False) -> Table:
    """One row per layer: H, d, D, shared rank needed at each tau, redundancy, spectrum sparkline."""
    from .methods import method_of_layers

    mid = result.energies[len(result.energies) // 2]
    method = method_of_layers(la.spec for la in result.layers)
    table = Table(title=f"Head redundancy: {result.checkpoint} ({result.architecture})", title_justify="left",
                  box=box.SIMPLE_HEAD, caption=method.analysis_caption, caption_justify="left")
    table.add_column("layer", justify="right")
    if show_module:
        table.add_column("module")
    for col in ("H", *method.analysis_columns, "d", "D"):
        table.add_column(col, justify="right")
    for tau in result.energies:
        table.add_column(f"r@{tau:g}", justify="right")
    table.add_column(f"red@{mid:g}", justify="right")
    values = any(la.value_sv is not None for la in result.layers)
    if values:  # the value latent r_v needed at the middle tau, of the value width G*d
        table.add_column(f"values@{mid:g}", justify="right")
        table.caption = ((table.caption + "\n") if table.caption else "") + (
            f"values@{mid:g}: the shared value latent r_v that keeps {mid:g} of the value energy (data-free, "
            "W_O,h W_V,h), of G×d.")
    table.add_column("spectrum", no_wrap=True)
    for la in result.layers:
        sp = la.spectrum
        value_cell = [f"{la.value_rank_at(mid)}/{la.value_width}" if la.value_sv is not None else "-"] if values else []
        table.add_row(str(la.spec.index), *([la.spec.module] if show_module else []),
                      str(sp.n_head), *method.analysis_cells(la.spec), str(sp.head_dim), str(sp.d_model),
                      *[str(sp.rank_at(t)) for t in result.energies],
                      f"{sp.redundancy(mid):.0%}", *value_cell, sparkline(sp.sv_query, 12))
    return table


def analysis_summary(result: AnalysisResult) -> str:
    from .methods import method_of_layers

    s = result.summary()
    parts = [f"{s['total_rank_at'][k]}/{s['total_width']} at {k} ({s['redundancy'][k]:.0%} redundant)"
             for k in s["total_rank_at"]]
    what = method_of_layers(la.spec for la in result.layers).needed
    line = f"{s['layers']} attention layers; {what}: " + ", ".join(parts)
    if "total_value_rank_at" in s:
        width = s["total_value_width"]
        line += "; shared value latent needed: " + ", ".join(
            f"{v}/{width} at {k}" for k, v in s["total_value_rank_at"].items())
    return line


_LEGEND_LAYERS = 10  # more lines than the default colour cycle's 10 colours get a colormap instead


def _layer_colours(plt, indices: Sequence[int]) -> list[Any]:
    """One colour per layer: the default cycle for a few layers, else viridis by layer index."""
    if len(indices) <= _LEGEND_LAYERS:
        return [f"C{i}" for i in range(len(indices))]
    cmap, lo, hi = plt.get_cmap("viridis"), min(indices), max(indices)
    return [cmap((n - lo) / max(hi - lo, 1)) for n in indices]


def _layer_key(plt, fig, axes: Sequence[Any], indices: Sequence[int]) -> None:
    """Which line is which layer, outside the axes: a legend for a few layers, a colorbar for many."""
    if len(indices) <= _LEGEND_LAYERS:
        axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        return
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(min(indices), max(indices)), cmap="viridis")
    fig.colorbar(mappable, ax=list(axes), label="layer index", pad=0.02, aspect=30)


def plot_energy(result: AnalysisResult, path: Path, name: str | None = None) -> None:
    """Cumulative energy curves of every layer, query and key side, with the thresholds; for
    rotary layers the weighted key energy of each frequency (summed over components) instead.
    Lines are coloured by layer (a colormap and a colorbar beyond 10 layers). ``name`` stands
    for the checkpoint's path in the title."""
    from .methods import method_of_layers

    plt = require_matplotlib()
    title = f"{name or result.checkpoint} ({result.architecture})"
    plot = {"frequency": _plot_frequency_energy, "query_key": _plot_side_energy}
    plot[method_of_layers(la.spec for la in result.layers).energy_plot](plt, result, title, path)


def _plot_frequency_energy(plt, result: AnalysisResult, title: str, path: Path) -> None:
    """Per layer, the weighted key energy of each rotary frequency (summed over components)."""
    indices = [la.spec.index for la in result.layers]
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for la, colour in zip(result.layers, _layer_colours(plt, indices)):
        per_freq = la.spectrum.frequency_energy().sum(1).numpy()  # (d/2,)
        ax.plot(range(len(per_freq)), per_freq, label=f"layer {la.spec.index}", lw=1.2, color=colour)
    ax.set_xlabel("frequency index j (theta_j decreasing)")
    ax.set_ylabel("share of the weighted key energy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _layer_key(plt, fig, [ax], indices)
    save_figure(plt, fig, f"{title}: per-frequency key energy", path)


def _plot_side_energy(plt, result: AnalysisResult, title: str, path: Path) -> None:
    """Per layer, the cumulative energy of the query and the key side, with the thresholds."""
    indices = [la.spec.index for la in result.layers]
    colours = _layer_colours(plt, indices)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for ax, side in zip(axes, ("query", "key")):
        for la, colour in zip(result.layers, colours):
            energy = (la.spectrum.energy_query if side == "query" else la.spectrum.energy_key).numpy()
            ax.plot(range(1, len(energy) + 1), energy, label=f"layer {la.spec.index}", lw=1.4, color=colour)
        for tau in result.energies:
            ax.axhline(tau, color="grey", lw=0.7, ls="--")
        ax.set_title(f"{side} side: P_{'Q' if side == 'query' else 'K'}")
        ax.set_xlabel("shared width r")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative energy")
    _layer_key(plt, fig, axes, indices)
    save_figure(plt, fig, title, path)


def save_figure(plt, fig, title: str, path: Path) -> None:
    """Title, lay out (unless the figure has its own layout engine), write and release a figure."""
    fig.suptitle(title, fontsize=10)
    if fig.get_layout_engine() is None:
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
    from .methods import method_for, method_of_layers

    layers = manifest["layers"]
    whitened = bool(manifest["settings"].get("calibration"))
    refined = any(la.get("refine") for la in layers)
    table = Table(title=f"Compressed {manifest['source']['path']} ({manifest['source']['architecture']})",
                  title_justify="left", box=box.SIMPLE_HEAD)
    columns = ["layer", method_of_layers(layers).width_label, "R", "energy@R", "rel. error"]
    columns += ["rel. error (whitened)"] * whitened + ["KL before refine", "KL after refine"] * refined
    for col in (*columns, "sweeps", "seconds"):
        table.add_column(col, justify="right")
    for layer in layers:
        plain = layer.get("relative_error_plain", layer["relative_error"]) if whitened else layer["relative_error"]
        method = method_for(layer)
        row = [str(layer["index"]), str(method.key_width(layer)), str(layer["shared_dim"]),
               f"{layer['energy_spectral']:.3f}", f"{plain:.4f}"]
        if whitened:
            row.append(f"{layer['relative_error']:.4f}")
        if refined:
            r = layer.get("refine") or {}
            row += [f"{r['kl_before']:.3g}" if r else "", f"{r['kl_after']:.3g}" if r else ""]
        table.add_row(*row, method.sweeps(layer), f"{layer['seconds']:.2f}")
    return table


def compress_notes(manifest: dict) -> list[str]:
    """Lines printed under the compress table: what the method of the layers adds (rotary: what R
    means, and the data-free warning)."""
    from .methods import method_of_layers

    return method_of_layers(manifest["layers"]).compress_notes(manifest)


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


# ---- report ------------------------------------------------------------------------------

def _change(before: int, after: int) -> str:
    if before == 0:
        return ""
    c = (after - before) / before
    return f"{c:+.1%}".replace("-", "−")


def _nstar(x: float | None) -> str:
    if x is None:
        return "none"
    return "always" if x <= 0 else f"{x:,.1f}"


def _table(title: str, headers: Sequence[str], sections: Sequence[Sequence[Sequence[str]]], caption: str) -> Table:
    """A right-aligned table whose columns are never narrower than their widest cell (headers wrap)."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD)
    rows = [r for section in sections for r in section]
    for i, header in enumerate(headers):
        widest = max((len(r[i]) for r in rows), default=1)
        table.add_column(header, justify="left" if i == 0 else "right", min_width=widest)
    for k, section in enumerate(sections):
        if k:
            table.add_section()
        for r in section:
            table.add_row(*r)
    return table


def report_tables(report: Report) -> list[Table]:
    """The rich tables of ``collabcompress report``: the key/query side per layer, its FLOPs per
    token per layer, and the whole model."""
    from .files.manifest import MANIFEST_NAME  # imports io (torch): only where a report exists already
    from .methods import method_for, method_of_layers

    d = report.to_dict()
    q, m = d["qk_total"], d["model"]

    values = any(la["value_rank"] is not None for la in d["layers"])  # shared values: V-cache columns

    def params_row(label: str, shape: tuple[str, str, str], rec: dict[str, Any]) -> list[str]:
        return [label, *shape, f"{rec['qk_params_before']:,}", f"{rec['qk_params_after']:,}",
                f"{rec['qk_params_saved_fraction']:.1%}", f"{rec['key_cache_elements_per_token_before']:,}",
                f"{rec['key_cache_elements_per_token_after']:,}",
                *([f"{rec['value_cache_elements_per_token_before']:,}",
                   f"{rec['value_cache_elements_per_token_after']:,}"] if values else [])]

    method = method_of_layers(d["layers"])
    per_n = ", ".join(f"{n:,} tokens: {n * q['key_cache_bytes_per_token_before']:,} → "
                      f"{n * q['key_cache_bytes_per_token_after']:,} bytes" for n in report.seq_lens)

    t1 = _table(
        f"Key/query side per layer: {report.directory}",
        ("layer", method.width_label.replace("*", "×"), "R", "rel. error", "params before", "params after", "saved",
         "K-cache before",
         "K-cache after", *(("V-cache before", "V-cache after") if values else ())),
        [[params_row(str(la["index"]), (str(method_for(la).key_width(la)), str(la["shared_dim"]),
                                        f"{la['relative_error']:.4f}"), la) for la in d["layers"]],
         [params_row("all", ("", "", ""), q)]],
        f"K-cache: key-cache elements per token ({method.key_cache_text}); "
        f"{q['key_cache_bytes_per_token_before']:,} → {q['key_cache_bytes_per_token_after']:,} bytes per token "
        f"over these layers ({report.dtype_before} → {report.dtype_after})." + method.report_caption(per_n)
        + (f"\nV-cache: value-cache elements per token (G×d before, the shared value latent r_v after); "
           f"KV cache {q['kv_cache_bytes_per_token_before']:,} → {q['kv_cache_bytes_per_token_after']:,} bytes "
           "per token over these layers." if values else ""))

    def flops_rows(label: str, rec: dict[str, Any]) -> list[list[str]]:
        rows = []
        for k, n in enumerate(report.seq_lens):
            a = rec["at_seq_len"][str(n)]
            b, f = a["qk_flops_per_token_before"], a["qk_flops_per_token_after"]
            head = ([label, f"{rec['qk_proj_flops_per_token_before']:,}", f"{rec['qk_proj_flops_per_token_after']:,}",
                     _nstar(rec["crossover_seq_len"])] if k == 0 else ["", "", "", ""])
            rows.append(head + [f"{n:,}", f"{b:,}", f"{f:,}", _change(b, f)])
        return rows

    t2 = _table("Key/query FLOP model: FLOPs per token (projections + scores at sequence length N)",
                ("layer", "proj before", "proj after", "N*", "N", "total before", "total after", "change"),
                [[r for la in d["layers"] for r in flops_rows(str(la["index"]), la)], flops_rows("all", q)],
                "N*: above it the compressed layer needs more FLOPs per token; none: never. FLOPs are a model, "
                "not a time (`collabcompress bench` measures one).")

    def row(label: str, before: int, after: int) -> list[str]:
        return [label, f"{before:,}", f"{after:,}", _change(before, after)]

    rows = [row("parameters", m["params_before"], m["params_after"]),
            row(f"bytes, weights ({len(report.weights_before)} → {len(report.weights_after)} files)",
                m["weights_bytes_before"], m["weights_bytes_after"]),
            row(f"bytes, all files ({len(report.files_before)} → {len(report.files_after)})",
                m["files_bytes_before"], m["files_bytes_after"])]
    for n in report.seq_lens:
        a = m["at_seq_len"][str(n)]
        rows.append(row(f"FLOPs per token, N={n:,}", a["flops_per_token_before"], a["flops_per_token_after"]))
    rows.append(["needs more FLOPs above N*", "", _nstar(m["crossover_seq_len"]), ""])
    rows.append(row("key cache per token, elements", m["key_cache_elements_per_token_before"],
                    m["key_cache_elements_per_token_after"]))
    rows.append(row("key cache per token, bytes", m["key_cache_bytes_per_token_before"],
                    m["key_cache_bytes_per_token_after"]))
    for what, key in (("value cache", "value_cache"), ("KV cache (keys + values)", "kv_cache")):
        for unit in ("elements", "bytes"):
            rows.append(row(f"{what} per token, {unit}", m[f"{key}_{unit}_per_token_before"],
                            m[f"{key}_{unit}_per_token_after"]))
    where = "on disk" if report.source_used else "as recorded in the manifest"
    t3 = _table(f"Whole model ({m['compressed_layers']} of {m['attention_layers']} attention layers compressed)",
                ("", "before", "after", "change"), [rows],
                f"bytes before: the source files compress read or copied ({where}); after: every file "
                f"of the output, {MANIFEST_NAME} included.")
    measured = d.get("measured")
    return [t1, t2, t3, *([measured_table(measured)] if measured else [])]


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def measured_table(measured: dict[str, Any]) -> Table:
    """``report --measured``: the measured latency ratios of a bench record beside the FLOP model's."""
    rows = [[f"{r['seq_len']:,}", str(r["batch_size"]), _ratio(r["ratio"]),
             f"{_ratio(r['ratio_q1'])}-{_ratio(r['ratio_q3'])}" if r["ratio_q1"] is not None else "-",
             _ratio(r["flop_model_ratio"])] for r in measured["forward"]]
    cross = measured["crossover"]
    found = ", ".join(f"B={b}: {'none' if n is None else n}" for b, n in (cross["measured"] or {}).items())
    decode = measured["decode"]
    tail = ""
    if decode:
        tail = (f"\nDecode at a {decode['context']:,}-token context: tokens per second compressed / original "
                f"{_ratio(decode['tokens_per_second_ratio'])}; key cache bytes compressed / original "
                f"{_ratio(decode['key_cache_ratio'])}, KV cache bytes {_ratio(decode.get('kv_cache_ratio'))} "
                "(measured).")
    return _table(f"Measured latency beside the FLOP model ({measured['file']}: level {measured['level']}, "
                  f"{measured['device']}, {measured['threads']} thread(s), {measured['dtype']})",
                  ("N", "batch", "measured ratio", "IQR", "FLOP-model ratio"), [rows],
                  "Ratios are compressed / original: measured = median of interleaved wall-time pairs (above 1: "
                  "slower), FLOP model = FLOPs per token. Crossover (first N no slower): measured "
                  f"{found or 'none'}; FLOP model N* {_nstar(cross['flop_model'])}." + tail)


# ---- bench ---------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.1f}"


def _per_token(decode: dict[str, Any], what: str) -> str:
    o, c = (decode.get(f"{what}_cache_bytes_per_token_{side}") for side in ("original", "compressed"))
    return "" if o is None else f"; per token {o:,.1f} → {c:,.1f}"


def bench_tables(result: dict[str, Any]) -> list[Any]:
    """The tables of ``collabcompress bench``: forward latency and memory per (N, batch), and decoding."""
    rows = []
    for r in result["forward"]:
        o, c, q = r["original"], r["compressed"], r["ratio"]
        rows.append([f"{r['seq_len']:,}", str(r["batch_size"]), _ms(o["median_s"]),
                     f"{_ms(o['q1_s'])}-{_ms(o['q3_s'])}", _ms(c["median_s"]), f"{_ms(c['q1_s'])}-{_ms(c['q3_s'])}",
                     _ratio(q["median"]), f"{_ratio(q['q1'])}-{_ratio(q['q3'])}", _ratio(r["flop_model_ratio"]),
                     _mib(r["peak_memory_bytes_original"]), _mib(r["peak_memory_bytes_compressed"])])
    what = ("every compressed attention layer on its own (projections and attention, output projection left out)"
            if result["level"] == "module" else "the whole model")
    cross = result["crossover"]
    found = ", ".join(f"B={b}: {'none' if n is None else n}" for b, n in cross["measured"].items())
    memory = f"peak memory: {result['memory_method']}." if result["memory_method"] else "peak memory not measured."
    forward = _table(
        f"Forward latency: {result['compressed']} vs {result['original']} ({result['level']} level, "
        f"{result['device']}, {result['threads']} thread(s), {result['dtype']})",
        ("N", "batch", "original ms", "IQR", "compressed ms", "IQR", "ratio", "ratio IQR", "FLOP model",
         "peak MiB orig.", "peak MiB comp."), [rows],
        f"Timed: {what}; median and interquartile range of {result['repeats']} interleaved runs each after "
        f"{result['warmup']} warm-up pairs. ratio = compressed / original, median of the per-pair ratios (above 1: "
        f"slower); FLOP model = the same ratio of FLOPs per token (docs/method.md). {memory}\n"
        f"Crossover (first N where the compressed forward is no slower): {found or 'none'}; FLOP model N* "
        f"{_nstar(cross['flop_model'])}.")
    out: list[Any] = [forward]
    d = result["decode"]
    if d:
        o, c = d["original"], d["compressed"]
        table = _figure_table(f"Decoding at a {d['context']:,}-token context (batch 1, {d['steps']} steps, "
                              "DynamicCache)")
        table.add_row("tokens per second, original", f"{o['tokens_per_second']:,.1f}",
                      f"median step {_ms(o['median_s'])} ms (IQR {_ms(o['q1_s'])}-{_ms(o['q3_s'])})")
        table.add_row("tokens per second, compressed", f"{c['tokens_per_second']:,.1f}",
                      f"median step {_ms(c['median_s'])} ms (IQR {_ms(c['q1_s'])}-{_ms(c['q3_s'])})")
        table.add_row("step time ratio", _ratio(d["ratio"]["median"]),
                      "compressed / original, median of interleaved step pairs")
        table.add_row("key cache bytes", f"{d['key_cache_bytes_original']:,} → {d['key_cache_bytes_compressed']:,}",
                      f"ratio {_ratio(d['key_cache_ratio'])}; summed from the cache tensors after the prefill"
                      + _per_token(d, "key"))
        table.add_row("value cache bytes", f"{d['value_cache_bytes_original']:,} → "
                      f"{d['value_cache_bytes_compressed']:,}",
                      f"ratio {_ratio(d.get('value_cache_ratio'))}" + _per_token(d, "value"))
        if "kv_cache_bytes_original" in d:
            table.add_row("KV cache bytes", f"{d['kv_cache_bytes_original']:,} → {d['kv_cache_bytes_compressed']:,}",
                          f"ratio {_ratio(d['kv_cache_ratio'])}; keys + values" + _per_token(d, "kv"))
        out.append(table)
    out.extend(f"note: {n}" for n in result["notes"])
    return out


def plot_bench(result: dict[str, Any], path: str | Path) -> None:
    """Measured latency ratio against N, one line per batch size, the FLOP model's ratio dashed."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for b in sorted({r["batch_size"] for r in result["forward"]}):
        rows = sorted((r for r in result["forward"] if r["batch_size"] == b), key=lambda r: r["seq_len"])
        n = [r["seq_len"] for r in rows]
        line = ax.plot(n, [r["ratio"]["median"] for r in rows], "o-", lw=1.6, label=f"measured, batch {b}")[0]
        ax.fill_between(n, [r["ratio"]["q1"] for r in rows], [r["ratio"]["q3"] for r in rows],
                        color=line.get_color(), alpha=0.15)
    flops = sorted({(r["seq_len"], r["flop_model_ratio"]) for r in result["forward"]})  # per token: any batch
    ax.plot([n for n, _ in flops], [f for _, f in flops], "--", color="black", lw=1.2, label="FLOP model")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("compressed / original")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, f"{result['compressed']}: forward latency ratio ({result['level']} level, "
                          f"{result['device']}, {result['threads']} thread(s))", path)


def plot_flops(report: Report, path: str | Path, name: str | None = None) -> None:
    """FLOPs per token against sequence length, before and after, for the key/query side and
    the whole model, with the crossover N* marked and the requested lengths as dots. ``name``
    stands for the directory's path in the title."""
    plt = require_matplotlib()
    marks = [x for x in (report.qk_crossover, report.model_crossover) if x is not None and x > 0]
    top = max([*report.seq_lens, *(2 * x for x in marks), 64])
    grid = sorted({int(round(top * 1.15 * i / 200)) for i in range(201)})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "key/query side (projections + scores)", report.qk_flops, report.qk_crossover),
              (axes[1], "whole model", report.model_flops, report.model_crossover))
    for ax, title, fn, n_star in panels:
        for after, label, style in ((False, "original", "-"), (True, "collaborative", "--")):
            ax.plot(grid, [fn(n, after) for n in grid], style, lw=1.6, label=label)
            ax.plot(report.seq_lens, [fn(n, after) for n in report.seq_lens], "o", ms=4,
                    color=ax.lines[-1].get_color())
        if n_star is not None and n_star > 0:
            ax.axvline(n_star, color="grey", lw=0.8, ls=":")
            ax.annotate(f"N* = {n_star:.1f}", (n_star, ax.get_ylim()[0]), xytext=(4, 8),
                        textcoords="offset points", fontsize=8, color="dimgrey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sequence length N (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FLOPs per token")
    axes[0].legend(fontsize=8, loc="upper left")
    save_figure(plt, fig, f"{name or report.directory} ({report.architecture})", path)


def _figure_table(title: str) -> Table:
    """An empty figure / value / meaning table (the evaluate commands)."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("meaning", overflow="fold")
    return table


def evaluation_table(result: dict[str, Any]) -> Table:
    """A rich table of :func:`collabcompress.commands.evaluate.evaluate`'s figures."""
    t = result["texts"]
    table = _figure_table(f"{result['compressed']} vs {result['original']} ({t['count']} texts, {t['source']}, "
                          f"<= {t['max_length']} tokens)")
    table.add_row("cosine, mean", f"{result['cosine_mean']:.5f}", "pooled embedding, compressed vs original")
    table.add_row("cosine, min", f"{result['cosine_min']:.5f}", "worst text")
    nn = result["nn_agreement"]
    table.add_row("nearest neighbour agreement", "-" if nn is None else f"{nn:.1%}",
                  "same most similar other text in both models")
    table.add_row("max |hidden difference|", f"{result['max_abs_diff']:.3g}", "last hidden states, real tokens")
    lee = result["lee"]
    if lee is None:
        table.add_row("Lee Spearman", "-", "Lee corpus not in the cache (scripts/fetch_data.py)")
    else:
        table.add_row("Lee Spearman, original", f"{lee['spearman_original']:.4f}",
                      f"{lee['documents']} documents, {lee['pairs']} human-rated pairs")
        table.add_row("Lee Spearman, compressed", f"{lee['spearman_compressed']:.4f}", "")
    return table


def lm_evaluation_table(result: dict[str, Any]) -> Table:
    """A rich table of :func:`collabcompress.commands.evaluate.evaluate_causal`'s figures (a causal LM)."""
    t, ppl, gen = result["texts"], result["perplexity"], result["generation"]
    table = _figure_table(f"{result['compressed']} vs {result['original']} ({t['source']}: {t['tokens']:,} predicted "
                          f"tokens in {t['windows']} windows of <= {t['window']})")
    table.add_row("perplexity, original", f"{ppl['original']:.4f}", "exp of the mean next-token NLL")
    table.add_row("perplexity, compressed", f"{ppl['compressed']:.4f}", f"{ppl['change']:+.2%} against the original")
    table.add_row("top-1 agreement", f"{result['top1_agreement']:.1%}", "same most likely next token")
    table.add_row("KL, mean", f"{result['kl_mean']:.4g}", "KL(original || compressed) of the next token, nats")
    table.add_row("KL, max", f"{result['kl_max']:.4g}", "worst position")
    table.add_row("max |logit difference|", f"{result['max_abs_logit_diff']:.3g}", "over every position and token")
    if gen["prompts"]:
        first = ", ".join("-" if d is None else str(d) for d in gen["first_divergence"])
        table.add_row("greedy generation", f"{gen['identical']}/{gen['prompts']} identical",
                      f"{gen['new_tokens']} new tokens per prompt; first divergence at: {first}")
        table.add_row("agreed tokens, mean", f"{gen['mean_agreed_tokens']:.1f}", "before the first divergence")
    return table


def archs_table(families: Sequence[dict[str, str]]) -> Table:
    """The supported families of ``collabcompress archs``, one row each."""
    table = Table(title="Supported architecture families", title_justify="left")
    for col in ("family", "models", "query / key tensors", "notes"):
        table.add_column(col, overflow="fold")
    for r in families:
        table.add_row(r["family"], r["models"], r["query_key_tensors"], r["notes"])
    return table
