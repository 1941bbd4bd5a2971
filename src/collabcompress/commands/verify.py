"""Check how much the attention changed: original vs collaborative scores on probe inputs.

For every compressed layer, seeded probe tokens of realistic scale (a standard normal
pushed through the LayerNorm that feeds the attention, where the family has one; or
drawn from the calibration statistics) go through the original and the collaborative
score functions of docs/method.md. Reported per layer and overall: mean and max
KL(original || collaborative) of the attention distributions, and the relative error
of the row-centred scores (terms constant along keys cancel in the softmax).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files.arch import AttentionSpec, detect, find_family, load_query_key
from ..errors import BadInputError, VerifyThresholdError
from ..files.checkpoint import Checkpoint, open_checkpoint
from ..files.manifest import Manifest, check_source, open_output
from ..maths.scores import attention_kl, collaborative_scores, original_scores
from ..methods import method_for

__all__ = ["verify", "collaborative_scores", "original_scores", "attention_kl"]

_SEED_LIMIT = 2 ** 62

def _norm_fields(module: str) -> dict[str, str]:
    fields: dict[str, str] = {"p": "", "i": "0", "prev": "-1", "g": "0", "j": "0", "side": "encoder"}
    m = re.search(r"^(?P<p>.*?)(?:(?:encoder|decoder|transformer)\.)?(?:layer|layers|block|h|blocks)\.(?P<i>\d+)", module)
    if m:
        fields.update(p=m.group("p"), i=m.group("i"), prev=str(int(m.group("i")) - 1))
    if (s := re.search(r"(?:^|\.)(encoder|decoder)\.", module)) is not None:
        fields["side"] = s.group(1)
        fields["p"] = module[: s.start(1)]
    if (a := re.search(r"albert_layer_groups\.(\d+)\.albert_layers\.(\d+)", module)) is not None:
        fields.update(g=a.group(1), j=a.group(2), p=module[: module.index("encoder.albert")])
    if (t := re.search(r"block\.\d+\.layer\.(\d+)", module)) is not None:
        fields["j"] = t.group(1)
    return fields


def feeding_norm(ckpt: Checkpoint, spec: AttentionSpec) -> str | None:
    """Name (without ``.weight``) of the norm whose output feeds the attention, if found."""
    fields = _norm_fields(spec.module)
    family = find_family(spec.family)
    for template in family.feeding_norms if family is not None else ():
        if "{prev}" in template and fields["prev"] == "-1":
            continue
        name = template.format(**fields)
        if f"{name}.weight" in ckpt and ckpt.shape(f"{name}.weight") == (spec.d_model,):
            return name
    return None


def _probe(ckpt: Checkpoint, spec: AttentionSpec, n_seq: int, n_tokens: int, seed: int,
           moments: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(seed + 1009 * spec.index)
    z = torch.randn(n_seq, n_tokens, spec.d_model, generator=g, dtype=torch.float64)  # (B, N, D)
    if moments is not None:
        mean, second = moments
        cov = second - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        root = evecs * evals.clamp(min=0).sqrt()  # (D, D)
        return mean + z @ root.T, "calibration statistics"
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True, unbiased=False)
    norm = feeding_norm(ckpt, spec)
    if norm is None:
        return z, "unit-variance tokens (no feeding LayerNorm found)"
    weight = ckpt.load(f"{norm}.weight", torch.float64)
    bias = ckpt.load(f"{norm}.bias", torch.float64) if f"{norm}.bias" in ckpt else 0.0
    return z * weight + bias, f"through {norm}"


def _centred(s: torch.Tensor) -> torch.Tensor:
    return s - s.mean(-1, keepdim=True)


@dataclass(frozen=True)
class _Source:
    ckpt: Checkpoint
    specs: dict[str, AttentionSpec]


def resolve_original(manifest: Manifest, original: str | Path | None) -> tuple[_Source, str]:
    """The source checkpoint, found through ``--original`` or ``source.path``, checked to be the one
    the manifest records (sha256 of every source file)."""
    path = Path(original) if original is not None else Path(manifest.source.path)
    if original is None and not path.exists():
        raise BadInputError(f"the original checkpoint {path} is not there any more; pass --original PATH")
    ckpt = open_checkpoint(path)
    try:
        check_source(manifest, ckpt)
    except BadInputError as e:
        ckpt.close()
        hint = "" if original is not None else "; pass --original PATH"
        raise BadInputError(f"{e}{hint}") from e
    kv_heads = manifest.settings.options.get("kv_heads")
    specs = {s.module: s for s in detect(ckpt, heads=manifest.settings.heads, arch=manifest.source.architecture,
                                         kv_heads=kv_heads if isinstance(kv_heads, int) else None)}
    return _Source(ckpt, specs), str(path)


def verify(directory: str | Path, *, original: str | Path | None = None, max_kl: float | None = None,
           n_seq: int = 4, n_tokens: int = 64, seed: int = 0,
           calibration: str | Path | None = None) -> dict[str, Any]:
    """Compare original and collaborative attention of every compressed layer.

    Args:
        directory: output directory of ``compress``.
        original: the source checkpoint (default: the manifest's path, checked by sha256).
        max_kl: gate: raise :class:`VerifyThresholdError` when a layer's mean KL exceeds it.
        n_seq, n_tokens, seed: probe size and seed.
        calibration: activation statistics (``calibrate``) to draw the probes from.

    Returns:
        The verify record (``layers``, ``overall``, ``passed``); docs/json.md gives the keys.
    """
    directory = Path(directory)
    if max_kl is not None and not (max_kl >= 0):
        raise BadInputError(f"--max-kl must be >= 0, got {max_kl}")
    if not (-_SEED_LIMIT <= seed < _SEED_LIMIT):  # torch seeds are 64-bit; each layer adds to it
        raise BadInputError(f"--seed must be between -2**62 and 2**62, got {seed}")
    manifest, out = open_output(directory)
    try:
        source, original_path = resolve_original(manifest, original)
    except BaseException:
        out.close()
        raise
    moments_by_module = {}
    if calibration is not None:
        from ..files.statistics import load_moments

        moments_by_module = load_moments(Path(calibration), source.ckpt, list(source.specs.values()))
    records = []
    kl_sum, rows, kl_max, err_num, err_den = 0.0, 0, 0.0, 0.0, 0.0
    value_num, value_den = 0.0, 0.0
    for layer in manifest.layers:
        spec = source.specs.get(layer.module)
        if spec is None:
            raise BadInputError(f"module {layer.module} of the manifest is not in the original checkpoint")
        if (layer.heads, layer.head_dim, layer.d_model) != (spec.n_head, spec.head_dim, spec.d_model):
            raise BadInputError(f"{directory}: the manifest gives {spec.module} {layer.heads} heads of width "
                                f"{layer.head_dim} over d_model {layer.d_model}, the original checkpoint "
                                f"{spec.n_head} of width {spec.head_dim} over {spec.d_model}")
        qk = load_query_key(source.ckpt, spec)
        r = layer.shared_dim
        x, probe = _probe(source.ckpt, spec, n_seq, n_tokens, seed, moments_by_module.get(spec.module))
        s_orig, s_coll = method_for(layer).scores(directory, out, layer, spec, qk, x, source.ckpt.config)
        kl = attention_kl(s_orig, s_coll)  # (B, H, N)
        num = float((_centred(s_orig) - _centred(s_coll)).pow(2).sum())
        den = float(_centred(s_orig).pow(2).sum())
        records.append({"module": spec.module, "index": layer.index, "shared_dim": r,
                        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                        "relative_score_error": (num / den) ** 0.5 if den > 0 else 0.0, "probe": probe})
        if layer.value_rank is not None:  # shared values: the heads' value outputs on the same probe
            from ..methods.values import VALUES

            v_num, v_den = VALUES.output_error(source.ckpt, spec, out, layer, x)
            records[-1].update(value_rank=layer.value_rank,
                               relative_value_error=(v_num / v_den) ** 0.5 if v_den > 0 else 0.0)
            value_num, value_den = value_num + v_num, value_den + v_den
        kl_sum += float(kl.sum())
        rows += kl.numel()
        kl_max = max(kl_max, float(kl.max()))
        err_num += num
        err_den += den
    out.close()
    result = {
        "directory": str(directory), "original": original_path,
        "probe": {"sequences": n_seq, "tokens": n_tokens, "seed": seed,
                  "calibration": str(calibration) if calibration else None},
        "layers": records,
        "overall": {"kl_mean": kl_sum / max(rows, 1), "kl_max": kl_max,
                    "relative_score_error": (err_num / err_den) ** 0.5 if err_den > 0 else 0.0},
        "max_kl": max_kl,
        "passed": max_kl is None or all(r["kl_mean"] <= max_kl for r in records),
    }
    if any(la.value_rank is not None for la in manifest.layers):
        result["overall"]["relative_value_error"] = (value_num / value_den) ** 0.5 if value_den > 0 else 0.0
    return result


def check_gate(result: dict[str, Any]) -> None:
    """Raise :class:`VerifyThresholdError` (exit 5) when ``--max-kl`` was exceeded."""
    if not result["passed"]:
        worst = max(result["layers"], key=lambda r: r["kl_mean"])
        raise VerifyThresholdError(f"mean KL {worst['kl_mean']:.3g} of layer {worst['index']} ({worst['module']}) "
                                   f"exceeds --max-kl {result['max_kl']:g}")
