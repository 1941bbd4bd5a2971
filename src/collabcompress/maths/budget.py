"""Allocation of a key-cache budget across layers by measured loss (pure, no I/O).

Each layer has a loss curve measured on kept calibration sequences at a ladder of candidate
key caches R (:func:`rank_ladder`): for a rotary causal LM the whole model's next-token KL
with only that layer compressed, else the layer's attention KL against the original
(:func:`collabcompress.commands.compress.curve_loss`). :func:`allocate` picks one R per layer so that the sum of R stays within
the budget and the sum of the losses is smallest: a multiple-choice knapsack solved exactly by
dynamic programming over the budget in units of the ladders' common step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["allocate", "rank_ladder"]

LADDER_STEPS = 16  # about this many candidate widths per layer


def rank_ladder(width: int, multiple_of: int, *, even: bool = False, steps: int = LADDER_STEPS) -> list[int]:
    """Candidate key caches of a layer of full width ``width``: multiples of a step (itself a
    multiple of ``multiple_of``, and even for rotary layers) up to and including ``width``,
    about ``steps`` of them.

    Example: width 384, multiple_of 8 -> 24, 48, ..., 384; width 192 (rotary) -> 16, 32, ..., 192;
    width 192, steps 8 -> 24, 48, ..., 192.
    """
    if width < 1 or multiple_of < 1:
        raise ValueError(f"width and multiple_of must be positive, got {width}, {multiple_of}")
    unit = multiple_of * (2 // math.gcd(2, multiple_of)) if even else multiple_of
    step = unit * max(1, math.ceil(width / (steps * unit)))
    ladder = list(range(step, width, step))
    return ladder + [width]


def allocate(curves: Sequence[Mapping[int, float]], total: int) -> list[int]:
    """One width per layer, the sum at most ``total``, minimising the summed loss.

    Args:
        curves: per layer, candidate width -> loss (any finite numbers).
        total: the budget, in the same units as the widths.

    Returns:
        The chosen width of each layer (ties go to the smaller width, earlier layers first).

    Raises:
        ValueError: the smallest candidates of all layers already exceed ``total``.
    """
    if not curves:
        return []
    unit = math.gcd(*[r for c in curves for r in c])
    cap = total // unit
    if sum(min(c) for c in curves) // unit > cap:
        raise ValueError(f"the budget {total} is below the smallest candidates' sum {sum(min(c) for c in curves)}")
    inf = math.inf
    best = [0.0] + [inf] * cap  # best[u]: least loss of the layers so far using exactly u units
    choices: list[list[int]] = []
    for c in curves:
        nxt, pick = [inf] * (cap + 1), [0] * (cap + 1)
        for r in sorted(c):
            cost, loss = r // unit, float(c[r])
            for u in range(cost, cap + 1):
                value = best[u - cost] + loss
                if value < nxt[u]:
                    nxt[u], pick[u] = value, r
        best = nxt
        choices.append(pick)
    u = min(range(cap + 1), key=lambda i: (best[i], i))
    ranks = []
    for pick in reversed(choices):
        ranks.append(pick[u])
        u -= pick[u] // unit
    return ranks[::-1]
