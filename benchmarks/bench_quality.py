#!/usr/bin/env python
"""Embedding quality of the compressed real all-MiniLM-L6-v2: data-free, calibrated, refined.

One run compresses the model several ways and evaluates every result the same way:

- data-free: the default method (factored CP-ALS, spectral initialisation) at ``--ranks``;
- the paper's code path (Cordonnier et al., github.com/epfml/collaborative-attention,
  ``swap_to_collaborative``): tensorly ``parafac(init="random", tol=1e-6)`` with the pytorch
  backend, float32, on the dense tensor ``einsum("hdq,hdk->qhk")`` (D x H x D) of every
  layer, at ``--parafac-rank``; its factors overwrite the collab tensors of our own output
  at that rank (content bias, value and every other tensor are identical), so both rows
  are loaded and evaluated the same way (``--skip-parafac`` saves about two minutes);
- calibrated: ``calibrate`` on ``lee_background.cor`` (300 news documents, the calibration
  set; ``--keep-sequences`` of them kept for refinement), timed once, then ``compress``
  with those statistics at ``--calibrated-ranks`` and with ``--refine-steps`` at
  ``--refine-ranks``;
- with ``--sequential``: an experiment, calibrated layer by layer on the inputs produced by
  the already-compressed earlier layers (see :func:`sequential_compress`), at
  ``--sequential-ranks``.

Every result is evaluated with ``collabcompress.commands.evaluate.evaluate`` on text that is NOT in
the calibration set: the bundled sample texts (the acceptance figure of ``evaluate``) and
the 50 Lee documents ``lee.cor`` (not in ``lee_background.cor``): cosine of the pooled
embeddings to the original's (mean, min), nearest-neighbour agreement, largest
hidden-state difference; plus the Lee 50-document Spearman correlation with the human
ratings. ``--in-sample N`` adds the mean cosine on the first N documents of the
calibration set itself, in a column marked in-sample (not a held-out figure).

The final checklist states each acceptance target (issue 6) and whether it is met.

    python scripts/fetch_data.py                 # once: MiniLM and the Lee corpus
    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py [--skip-parafac] [--sequential] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import cache_dir as _cache


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_corpus(path: Path) -> list[str]:
    """One document per non-empty line; the Lee files are latin-1."""
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


# --------------------------------------------------------------------------- the paper's code path

def parafac_factors(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int, rank: int,
                    seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """The paper's decomposition of one layer -> ({query, key, mixing}, relative error)."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    d_model = w_query.shape[1]
    wq = w_query.float().view(n_head, -1, d_model)  # (H, d, D)
    wk = w_key.float().view(n_head, -1, d_model)  # (H, d, D)
    dense = torch.einsum("hdq,hdk->qhk", wq, wk)  # (D, H, D), slice h = P_h
    weights, (u, mixing, v) = parafac(dense, rank, init="random", tol=1e-6, random_state=seed)
    mixing = mixing * weights  # (H, R); weights are ones unless normalised
    approx = torch.einsum("qr,hr,kr->qhk", u, mixing, v)
    error = float((dense - approx).norm() / dense.norm())
    return {"query": u.T.contiguous(), "key": v.T.contiguous(), "mixing": mixing.contiguous()}, error


def _overwrite_factors(out: Path, factors_by_module: dict[str, dict[str, torch.Tensor]],
                       errors_by_module: dict[str, float] | None, method: str | None) -> None:
    """Replace collab query/key/mixing tensors of the output directory ``out`` (unsharded)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    manifest_path = out / "collab_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    weights_file = out / "model.safetensors"
    tensors = load_file(str(weights_file))
    with safe_open(str(weights_file), "pt") as f:
        metadata = f.metadata()
    for layer in manifest["layers"]:
        factors = factors_by_module.get(layer["module"])
        if factors is None:
            continue
        for key, name in layer["tensors"].items():
            if key in factors:
                tensors[name] = factors[key].to(tensors[name].dtype).contiguous()
        if errors_by_module is not None:
            layer["relative_error"] = errors_by_module[layer["module"]]
    save_file(tensors, str(weights_file), metadata=metadata)
    if method:
        manifest["settings"]["method"] = method
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def overwrite_with_parafac(out: Path, source: Path, rank: int, seed: int) -> tuple[float, list[float]]:
    """Replace the collab tensors of the output directory ``out`` by parafac factors; -> (seconds, errors)."""
    from collabcompress.files.arch import detect, load_query_key
    from collabcompress.files.checkpoint import open_checkpoint

    manifest = json.loads((out / "collab_manifest.json").read_text())
    ckpt = open_checkpoint(source)
    specs = {s.module: s for s in detect(ckpt)}
    start, factors, errors = time.perf_counter(), {}, {}
    for layer in manifest["layers"]:
        spec = specs[layer["module"]]
        qk = load_query_key(ckpt, spec, torch.float32)
        factors[spec.module], errors[spec.module] = parafac_factors(qk.w_query, qk.w_key, spec.n_head, rank, seed)
        _log(f"  parafac {layer['module']}: relative error {errors[spec.module]:.4f}")
    seconds = time.perf_counter() - start
    ckpt.close()
    _overwrite_factors(out, factors, errors, "tensorly-parafac (bench_quality.py)")
    return seconds, list(errors.values())


# --------------------------------------------------------------------------- sequential calibration (experiment)

class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has seen its input."""


def sequential_compress(source: Path, out: Path, texts: list[str], rank: int, *, max_length: int,
                        max_tokens: int, batch_size: int = 16, seed: int = 0,
                        check_stats: Path | None = None) -> dict[str, float]:
    """Compress layer by layer, each calibrated on the inputs the compressed earlier layers produce.

    ``out`` must already hold a complete ``compress`` output at ``rank`` (every layer).
    For layer i the moments E[x x^T] and E[x] of layer i's attention input are collected
    (over non-padding tokens, the same texts, windows, batching and token budget as
    ``calibrate``) from the model in ``out`` whose layers 0..i-1 already carry the
    sequential factors (the forward pass stops at layer i, so layers >= i do not matter);
    layer i is then decomposed exactly as ``compress --calibration`` does (the whitened,
    head-energy-weighted CP-ALS, query side whitened with the second moment, key side
    with the covariance) and its factors put into the model. At the end the factors are
    written into ``out``. Returns ``{"seconds", "stats_max_rel_diff_layer0"}`` (the
    latter: layer 0's moments against ``check_stats``, which must agree, as layer 0 sees
    the embeddings either way).
    """
    import transformers

    from collabcompress import hf
    from collabcompress.runtime import adapters
    from collabcompress.files.arch import detect, load_query_key
    from collabcompress.commands.calibrate import windows
    from collabcompress.commands.compress import CompressOptions, _calibrated_cp_als, _head_weights
    from collabcompress.maths.cp import relative_error, whitening_factor
    from collabcompress.files.checkpoint import open_checkpoint

    start = time.perf_counter()
    ckpt = open_checkpoint(source)
    specs = detect(ckpt)
    model = hf.from_pretrained(out)
    modules = adapters.collaborative_modules(model)
    manifest = json.loads((out / "collab_manifest.json").read_text())
    memory_name = {}
    for layer in manifest["layers"]:  # file module name -> in-memory module (by layer index)
        hits = [n for n in modules if n == layer["module"]] or [
            n for n in modules if str(layer["index"]) in n.split(".")]
        if len(hits) != 1:
            raise RuntimeError(f"cannot map {layer['module']} to one in-memory module: {hits}")
        memory_name[layer["module"]] = hits[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    batches, tokens = [], 0
    for _, ids, mask in windows(tokenizer, texts, max_length, batch_size):  # as calibrate
        batches.append((ids, mask))
        tokens += int(mask.sum())
        if tokens >= max_tokens:
            break
    opts = CompressOptions(rank=rank, seed=seed)
    factors_out, errors_out, whitened_errors, check = {}, {}, {}, float("nan")
    for spec in specs:
        module = modules[memory_name[spec.module]]
        second = torch.zeros(spec.d_model, spec.d_model, dtype=torch.float64)
        total = torch.zeros(spec.d_model, dtype=torch.float64)
        count = 0
        state = {"mask": None}

        def hook(_m, args, kwargs):
            nonlocal second, total, count
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            x = x[state["mask"].bool()].double()  # (n, D)
            second += x.T @ x
            total += x.sum(0)
            count += x.shape[0]
            raise _Stop

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                for ids, mask in batches:
                    state["mask"] = mask
                    try:
                        model(input_ids=ids, attention_mask=mask)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        second, mean = second / count, total / count
        if spec.index == 0 and check_stats is not None:
            from safetensors import safe_open

            with safe_open(str(check_stats), "pt") as f:
                ref = f.get_tensor(f"{spec.module}.second_moment").double()
            check = float((second - ref).norm() / ref.norm())
        whiten = (whitening_factor(second), whitening_factor(second - torch.outer(mean, mean)))
        qk = load_query_key(ckpt, spec)
        factors = _calibrated_cp_als(spec, qk.w_query, qk.w_key, rank, whiten, _head_weights(ckpt, spec, whiten[0]), opts)
        with torch.no_grad():
            module.collab_query.weight.copy_(factors.query)
            module.collab_key.weight.copy_(factors.key)
            module.collab_mixing.copy_(factors.mixing)
        factors_out[spec.module] = {"query": factors.query, "key": factors.key, "mixing": factors.mixing}
        whitened_errors[spec.module] = factors.relative_error
        errors_out[spec.module] = relative_error(qk.w_query, qk.w_key, spec.n_head, factors)
        _log(f"  sequential R={rank} {spec.module}: {count} tokens, plain rel. error {errors_out[spec.module]:.4f}")
    ckpt.close()
    _overwrite_factors(out, factors_out, whitened_errors, "cp-als, calibrated sequentially (bench_quality.py)")
    return {"seconds": time.perf_counter() - start, "stats_max_rel_diff_layer0": check}


# --------------------------------------------------------------------------- evaluation

def plain_errors(source: Path, out: Path) -> list[float]:
    """||P - P_hat||_F / ||P||_F per layer from the output tensors (comparable across methods)."""
    from safetensors.torch import load_file

    from collabcompress.files.arch import detect, load_query_key
    from collabcompress.maths.cp import CPFactors, relative_error
    from collabcompress.files.checkpoint import open_checkpoint

    manifest = json.loads((out / "collab_manifest.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    ckpt = open_checkpoint(source)
    specs = {s.module: s for s in detect(ckpt)}
    errors = []
    for layer in manifest["layers"]:
        spec, names = specs[layer["module"]], layer["tensors"]
        qk = load_query_key(ckpt, spec)
        f = CPFactors(query=tensors[names["query"]].double(), key=tensors[names["key"]].double(),
                      mixing=tensors[names["mixing"]].double(), relative_error=0.0)
        errors.append(relative_error(qk.w_query, qk.w_key, spec.n_head, f))
    ckpt.close()
    return errors


def measure(source: Path, out: Path, lee: Path, lee_docs: list[str], in_sample: list[str],
            in_sample_length: int) -> dict:
    from collabcompress.commands.evaluate import evaluate

    manifest = json.loads((out / "collab_manifest.json").read_text())
    reported = [layer["relative_error"] for layer in manifest["layers"]]
    plain = plain_errors(source, out)
    bundled = evaluate(source, out, None, lee=lee)  # the bundled texts + Lee Spearman on lee.cor
    held = evaluate(source, out, lee_docs, lee=False, texts_name="lee.cor")
    row = {"relative_error_reported": sum(reported) / len(reported), "relative_error_plain": sum(plain) / len(plain),
           "bundled": {k: bundled[k] for k in ("cosine_mean", "cosine_min", "nn_agreement", "max_abs_diff")},
           "lee_cor": {k: held[k] for k in ("cosine_mean", "cosine_min", "nn_agreement", "max_abs_diff")},
           "lee_spearman": bundled["lee"]["spearman_compressed"],
           "lee_spearman_original": bundled["lee"]["spearman_original"],
           "bundled_texts": bundled["texts"]["count"], "lee_texts": held["texts"]["count"],
           "max_length": bundled["texts"]["max_length"]}
    if in_sample:
        ins = evaluate(source, out, in_sample, lee=False, max_length=in_sample_length,
                       texts_name="lee_background.cor (calibration set)")
        row["in_sample_cosine_mean"] = ins["cosine_mean"]
    return row


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="*", default=[96, 192, 288], help="data-free ranks")
    parser.add_argument("--parafac-rank", type=int, default=192)
    parser.add_argument("--skip-parafac", "--no-parafac", dest="skip_parafac", action="store_true",
                        help="skip the paper's code path (about two minutes)")
    parser.add_argument("--calibrated-ranks", type=int, nargs="*", default=[96, 192, 288])
    parser.add_argument("--refine-ranks", type=int, nargs="*", default=[96, 192])
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--keep-sequences", type=int, default=64, help="calibrate --keep-sequences")
    parser.add_argument("--calib-max-length", type=int, default=128, help="calibrate --max-length (window)")
    parser.add_argument("--calib-max-tokens", type=int, default=None, help="calibrate --max-tokens (default: its own)")
    parser.add_argument("--sequential", action="store_true",
                        help="also run the experiment: layers calibrated in order on the compressed earlier layers")
    parser.add_argument("--sequential-ranks", type=int, nargs="*", default=[96, 192])
    parser.add_argument("--in-sample", type=int, default=0, metavar="N",
                        help="also report the mean cosine on the first N lee_background documents (IN-SAMPLE: "
                             "they are the calibration set)")
    parser.add_argument("--in-sample-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    import transformers
    from rich.console import Console
    from rich.table import Table

    from collabcompress.commands.calibrate import calibrate
    from collabcompress.commands.compress import CompressOptions, compress

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source, lee = _cache() / "all-MiniLM-L6-v2", _cache() / "lee"
    if not (source / "model.safetensors").is_file() or not all(
            (lee / n).is_file() for n in ("lee_background.cor", "lee.cor", "similarities0-1.txt")):
        _log("needs the real MiniLM and the Lee corpus: run `python scripts/fetch_data.py`")
        return 3
    background = _read_corpus(lee / "lee_background.cor")
    lee_docs = _read_corpus(lee / "lee.cor")
    overlap = set(background) & set(lee_docs)
    if overlap:
        _log(f"warning: {len(overlap)} lee.cor documents are also in lee_background.cor")
    in_sample = background[: args.in_sample]
    load_before = os.getloadavg()
    started = time.perf_counter()

    rows: list[dict] = []
    calib_info: dict = {}

    def run(method: str, kind: str, rank: int, out: Path, seconds: float, extra: dict | None = None) -> dict:
        row = {"method": method, "kind": kind, "rank": rank, "seconds": round(seconds, 2), **(extra or {}),
               **measure(source, out, lee, lee_docs, in_sample, args.in_sample_length)}
        rows.append(row)
        _log(f"done: {method} R={rank}: {seconds:.1f} s, bundled cos {row['bundled']['cosine_mean']:.4f}, "
             f"lee.cor cos {row['lee_cor']['cosine_mean']:.4f}")
        return row

    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp_name:
        tmp = Path(tmp_name)
        # ---- data-free
        for rank in args.ranks:
            out = tmp / f"cpals-{rank}"
            t0 = time.perf_counter()
            compress(source, out, CompressOptions(rank=rank, seed=args.seed))
            run("cp-als data-free", "data-free", rank, out, time.perf_counter() - t0)
        if not args.skip_parafac:
            rank = args.parafac_rank
            out = tmp / f"parafac-{rank}"
            compress(source, out, CompressOptions(rank=rank, seed=args.seed))
            seconds, _ = overwrite_with_parafac(out, source, rank, args.seed)
            run("parafac (paper) data-free", "parafac", rank, out, seconds)

        # ---- calibrated
        if args.calibrated_ranks or args.refine_ranks or args.sequential:
            texts_file = tmp / "lee_background.txt"  # calibrate wants UTF-8
            texts_file.write_text("\n".join(background) + "\n", encoding="utf-8")
            stats = tmp / "stats.safetensors"
            kw = {} if args.calib_max_tokens is None else {"max_tokens": args.calib_max_tokens}
            t0 = time.perf_counter()
            summary = calibrate(source, texts_file, stats, max_length=args.calib_max_length,
                                keep_sequences=args.keep_sequences, seed=args.seed, **kw)
            calib_info = {"seconds": round(time.perf_counter() - t0, 2), "tokens": summary["tokens"],
                          "texts": summary["texts"], "windows": summary["windows"],
                          "kept_sequences": summary["kept_sequences"],
                          "max_length": args.calib_max_length, "bytes": stats.stat().st_size}
            _log(f"calibrate: {calib_info}")
            for rank in args.calibrated_ranks:
                out = tmp / f"calibrated-{rank}"
                t0 = time.perf_counter()
                compress(source, out, CompressOptions(rank=rank, seed=args.seed, calibration=str(stats)))
                run("cp-als calibrated", "calibrated", rank, out, time.perf_counter() - t0)
            for rank in args.refine_ranks:
                out = tmp / f"refined-{rank}"
                t0 = time.perf_counter()
                manifest = compress(source, out, CompressOptions(rank=rank, seed=args.seed, calibration=str(stats),
                                                                 refine_steps=args.refine_steps))
                kl = [(layer["refine"]["kl_before"], layer["refine"]["kl_after"]) for layer in manifest["layers"]]
                run(f"calibrated + refine {args.refine_steps}", "refined", rank, out,
                    time.perf_counter() - t0, {"refine_kl": kl})
            if args.sequential:
                max_tokens = args.calib_max_tokens or 100_000
                for rank in args.sequential_ranks:
                    out = tmp / f"sequential-{rank}"
                    t0 = time.perf_counter()
                    compress(source, out, CompressOptions(rank=rank, seed=args.seed, calibration=str(stats)))
                    info = sequential_compress(source, out, background, rank, max_length=args.calib_max_length,
                                               max_tokens=max_tokens, seed=args.seed, check_stats=stats)
                    _log(f"  layer-0 moments vs calibrate: relative difference {info['stats_max_rel_diff_layer0']:.2e}")
                    run("sequential calib. (exp.)", "sequential", rank, out,
                        time.perf_counter() - t0, {"layer0_moment_check": info["stats_max_rel_diff_layer0"]})

    total = time.perf_counter() - started
    load_after = os.getloadavg()
    first = rows[0]
    console = Console(soft_wrap=False, width=200)
    title = (f"all-MiniLM-L6-v2 (H*d = 384), held-out evaluation: bundled sample ({first['bundled_texts']} texts) and "
             f"lee.cor ({first['lee_texts']} docs, not in the calibration set), <= {first['max_length']} tokens; "
             f"Lee Spearman of the original: {first['lee_spearman_original']:.4f}")
    table = Table(title=title, title_justify="left")
    cols = ["method", "R", "time s", "err rep", "err plain",
            "B cos", "B min", "B NN", "B max|d|", "L cos", "L min", "L NN", "L max|d|", "Lee rho"]
    if in_sample:
        cols.append("IN-SAMPLE cos")
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right", overflow="fold")
    for r in rows:
        b, h = r["bundled"], r["lee_cor"]
        cells = [r["method"], str(r["rank"]), f"{r['seconds']:.1f}", f"{r['relative_error_reported']:.3f}",
                 f"{r['relative_error_plain']:.3f}",
                 f"{b['cosine_mean']:.4f}", f"{b['cosine_min']:.4f}", f"{b['nn_agreement']:.1%}",
                 f"{b['max_abs_diff']:.3f}",
                 f"{h['cosine_mean']:.4f}", f"{h['cosine_min']:.4f}", f"{h['nn_agreement']:.1%}",
                 f"{h['max_abs_diff']:.3f}", f"{r['lee_spearman']:.4f}"]
        if in_sample:
            cells.append(f"{r['in_sample_cosine_mean']:.4f}")
        table.add_row(*cells)
    console.print(table)
    notes = ["B = held-out bundled sample texts, L = held-out lee.cor documents: cos = mean embedding cosine "
             "to the original, min = worst text, NN = nearest-neighbour agreement, max|d| = largest last-hidden-state "
             "difference; Lee rho = Spearman of the 50 x 50 lee.cor similarities with the human ratings.",
             "time s: compress (data-free, calibrated, refined: the whole `compress` call; parafac: the "
             "decompositions only; sequential: compress + the layer-by-layer recalibration)."]
    if calib_info:
        notes.append(f"calibrate (once, shared by every calibrated row): {calib_info['seconds']:.1f} s, "
                     f"{calib_info['tokens']} tokens from {calib_info['texts']} lee_background documents "
                     f"in {calib_info['windows']} windows of <= {calib_info['max_length']} tokens, "
                     f"{calib_info['kept_sequences']} windows kept, "
                     f"{calib_info['bytes'] / 1e6:.0f} MB.")
    notes.append("err rep: the manifest's per-layer error, mean over layers; for calibrated rows it is the "
                 "error of the whitened, head-weighted slices. err plain: ||P - P_hat||_F / ||P||_F from the "
                 "output tensors, the same measure for every row.")
    if in_sample:
        notes.append(f"IN-SAMPLE: first {len(in_sample)} lee_background documents (<= {args.in_sample_length} "
                     "tokens), the calibration set itself: not a held-out figure.")
    for note in notes:
        console.print(note)

    def find(kind: str, rank: int) -> dict | None:
        return next((r for r in rows if r["kind"] == kind and r["rank"] == rank), None)

    checks = []
    for kind, rank, target, label in (("calibrated", 192, 0.985, "calibrated R=192"),
                                      ("calibrated", 96, 0.96, "calibrated R=96"),
                                      ("refined", 192, 0.99, f"refined ({args.refine_steps} steps) R=192")):
        r = find(kind, rank)
        if r is None:
            checks.append(f"[ -- ] {label} mean cosine >= {target}: not run")
            continue
        ok = r["bundled"]["cosine_mean"] >= target
        checks.append(f"[{'PASS' if ok else 'FAIL'}] {label} mean cosine >= {target} on the held-out bundled texts: "
                      f"{r['bundled']['cosine_mean']:.4f} (lee.cor: {r['lee_cor']['cosine_mean']:.4f}, "
                      f"{'>=' if r['lee_cor']['cosine_mean'] >= target else '<'} {target})")
    r = find("calibrated", 192)
    if r is None or not calib_info:
        checks.append("[ -- ] calibrate + compress at R=192 without refinement < 60 s: not run")
    else:
        t = calib_info["seconds"] + r["seconds"]
        checks.append(f"[{'PASS' if t < 60 else 'FAIL'}] calibrate + compress at R=192 without refinement < 60 s: "
                      f"{calib_info['seconds']:.1f} + {r['seconds']:.1f} = {t:.1f} s "
                      f"(calibrate kept {calib_info['kept_sequences']} sequences for refinement)")
    console.print("Checklist (issue 6):")
    for c in checks:
        console.print("  " + c, markup=False)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    console.print(f"total {total:.0f} s; OMP_NUM_THREADS={threads}, torch threads {torch.get_num_threads()}; "
                  f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min), "
                  f"{os.cpu_count()} CPUs", markup=False)
    if args.json:
        args.json.write_text(json.dumps({"calibrate": calib_info, "rows": rows, "checklist": checks,
                                         "seconds_total": total, "load_before": load_before,
                                         "load_after": load_after}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
