"""Default settings that the CLI shows in ``--help`` and the library uses: one home, no torch."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_ITER", "DEFAULT_TOL", "DEFAULT_MULTIPLE_OF", "DEFAULT_ENERGIES", "DEFAULT_SEQ_LEN", "DEFAULT_LM_TOKENS",
           "DEFAULT_LM_WINDOW", "DEFAULT_BENCH_LENGTHS", "DEFAULT_BENCH_BATCH_SIZES", "DEFAULT_BENCH_CONTEXT",
           "DEFAULT_BENCH_DECODE_STEPS", "DEFAULT_BENCH_WARMUP", "DEFAULT_BENCH_REPEATS"]

DEFAULT_MAX_ITER = 30  # CP-ALS sweeps per layer (decompose.cp_als)
DEFAULT_TOL = 1e-6  # CP-ALS stops when the fit changes less than this
DEFAULT_MULTIPLE_OF = 8  # --energy and --budget round a layer's width up to a multiple of this
DEFAULT_ENERGIES = (0.9, 0.95, 0.99)  # analyze's energy thresholds tau
DEFAULT_SEQ_LEN = 128  # report's sequence length N for FLOPs per token
DEFAULT_LM_TOKENS = 2048  # a causal LM's perplexity on the first 2,048 tokens (docs/method.md, lm.py) ...
DEFAULT_LM_WINDOW = 512  # ... in non-overlapping 512-token windows; calibrate's window for a causal LM

# bench (latency.py): forward lengths and batch sizes, decode context and steps, runs per setting
DEFAULT_BENCH_LENGTHS = (32, 128, 512)
DEFAULT_BENCH_BATCH_SIZES = (1, 8)
DEFAULT_BENCH_CONTEXT = 1024
DEFAULT_BENCH_DECODE_STEPS = 32
DEFAULT_BENCH_WARMUP = 2
DEFAULT_BENCH_REPEATS = 10
