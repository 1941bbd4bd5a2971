"""Default settings that the CLI shows in ``--help`` and the library uses: one home, no torch."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_ITER", "DEFAULT_TOL", "DEFAULT_ENERGIES", "DEFAULT_SEQ_LEN"]

DEFAULT_MAX_ITER = 30  # CP-ALS sweeps per layer (decompose.cp_als)
DEFAULT_TOL = 1e-6  # CP-ALS stops when the fit changes less than this
DEFAULT_ENERGIES = (0.9, 0.95, 0.99)  # analyze's energy thresholds tau
DEFAULT_SEQ_LEN = 128  # report's sequence length N for FLOPs per token
