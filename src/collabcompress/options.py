"""The settings of ``compress``, checked in one place (the CLI and the Python API share them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .defaults import DEFAULT_MAX_ITER, DEFAULT_MULTIPLE_OF, DEFAULT_TOL
from .dtypes import COMPUTE_NAMES, OUTPUT_NAMES
from .errors import BadInputError

__all__ = ["CompressOptions"]


@dataclass(frozen=True)
class CompressOptions:
    """Settings of ``compress`` (docs/method.md); validated by :meth:`check`."""

    rank: int | None = None
    energy: float | None = None
    min_rank: int = 1
    max_rank: int | None = None
    multiple_of: int = DEFAULT_MULTIPLE_OF
    method: str = "cp-als"
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    layers: str | None = None
    calibration: str | None = None
    refine_steps: int = 0
    budget: float | None = None
    heal_steps: int = 0
    heal_dtype: str = "auto"
    value_rank: int | None = None
    value_energy: float | None = None
    budget_of: str = "keys"
    force_data_free: bool = False
    stock: bool = False  # exportable by `export --format stock`: one R, one frequency table, r_v = R
    frequency_counts: tuple[int, ...] | None = None  # --stock: the R_j every layer keeps (set by compress)

    @property
    def values(self) -> bool:
        """Whether the values are shared too (docs/method.md, "Shared values")."""
        return self.value_rank is not None or self.value_energy is not None or self.stock or \
            (self.budget is not None and self.budget_of == "kv")

    @property
    def keys_full(self) -> bool:
        """Values only: every layer's keys stay at their full width (exact)."""
        return self.rank is None and self.energy is None and self.budget is None

    def check(self) -> None:
        if self.stock:
            self._check_stock()
        keys = sum(v is not None for v in (self.rank, self.energy, self.budget))
        value_choice = sum(v is not None for v in (self.value_rank, self.value_energy))
        if keys > 1 or (keys == 0 and value_choice == 0):
            raise BadInputError("pass exactly one of --rank and --energy, or --budget alone "
                                "(and --value-rank or --value-energy for shared values)")
        if value_choice > 1:
            raise BadInputError("pass at most one of --value-rank and --value-energy")
        if self.budget_of not in ("keys", "kv"):
            raise BadInputError(f"unknown --budget-of {self.budget_of!r}; choose keys or kv")
        if self.budget_of == "kv" and self.budget is None:
            raise BadInputError("--budget-of kv goes with --budget F (F: the fraction of the key and value cache)")
        if self.budget_of == "kv" and value_choice:
            raise BadInputError("--budget F --budget-of kv chooses the value widths too: drop --value-rank and "
                                "--value-energy")
        if self.value_rank is not None and self.value_rank < 1:
            raise BadInputError(f"--value-rank must be at least 1, got {self.value_rank}")
        if self.value_energy is not None and not (0.0 < self.value_energy <= 1.0):
            raise BadInputError(f"--value-energy must be in (0, 1], got {self.value_energy}")
        if self.budget is not None and not (0.0 < self.budget <= 1.0):
            raise BadInputError(f"--budget must be in (0, 1], got {self.budget}")
        if self.budget is not None and not self.calibration:
            raise BadInputError("--budget allocates by the loss measured on kept calibration sequences: "
                                "pass --calibration statistics made with `calibrate --keep-sequences N`")
        if self.rank is not None and self.rank < 1:
            raise BadInputError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise BadInputError(f"--energy must be in (0, 1], got {self.energy}")
        for name, value in (("--min-rank", self.min_rank), ("--multiple-of", self.multiple_of),
                            ("--max-iter", self.max_iter)):
            if value < 1:
                raise BadInputError(f"{name} must be at least 1, got {value}")
        if self.max_rank is not None and self.max_rank < max(1, self.min_rank):
            raise BadInputError(f"--max-rank {self.max_rank} is below --min-rank {self.min_rank}")
        if not (0.0 <= self.tol < float("inf")):
            raise BadInputError(f"--tol must be a finite number >= 0, got {self.tol}")
        if not (0 <= self.seed < 2**63):
            raise BadInputError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.refine_steps < 0:
            raise BadInputError(f"--refine-steps must be >= 0, got {self.refine_steps}")
        if self.heal_steps < 0:
            raise BadInputError(f"--heal-steps must be >= 0, got {self.heal_steps}")
        if (self.refine_steps or self.heal_steps) and not self.calibration:
            raise BadInputError("--refine-steps and --heal-steps need --calibration statistics made with "
                                "`calibrate --keep-sequences N`")
        if self.heal_dtype != "auto" and self.heal_dtype not in COMPUTE_NAMES:
            raise BadInputError(f"unknown --heal-dtype {self.heal_dtype!r}; choose auto, {', '.join(COMPUTE_NAMES)}")
        if self.method != "cp-als":
            raise BadInputError(f"unknown --method {self.method!r}; available: cp-als")
        if self.dtype != "auto" and self.dtype not in OUTPUT_NAMES:
            raise BadInputError(f"unknown --dtype {self.dtype!r}; choose auto, float32, float16 or bfloat16")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BadInputError(f"unknown --device {self.device!r}; choose cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInputError("--device cuda was asked for but CUDA is not available here")

    def _check_stock(self) -> None:
        """--stock: one width R for every layer (--rank), values of the same width, calibrated."""
        if self.rank is None or self.energy is not None or self.budget is not None:
            raise BadInputError("--stock needs --rank R: the stock export has one width for every layer, which "
                                "--energy and --budget do not give")
        if self.value_energy is not None or self.value_rank not in (None, self.rank):
            raise BadInputError(f"--stock shares the values at the width of the keys (r_v = R = {self.rank}): drop "
                                "--value-rank and --value-energy")
        if self.layers is not None:
            raise BadInputError("--stock compresses every layer: drop --layers")
        if not self.calibration and not self.force_data_free:
            raise BadInputError("--stock needs --calibration statistics (the data-free fit of a rotary model is far "
                                "worse); pass --force-data-free to fit without them anyway")
