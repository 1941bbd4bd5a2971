"""CP decomposition of the per-head bilinear forms of attention, in factored form.

For one attention layer with ``n_head`` heads of width ``head_dim`` over inputs of width
``d_model``, head h scores a query token x against a key token y through the bilinear form
``x^T P_h y`` with ``P_h = W_Q^h^T W_K^h`` (``d_model x d_model``, rank <= ``head_dim``).
Collaborative attention (Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate
Instead of Concatenate", arXiv 2006.16362) shares one query and one key projection of
width ``shared_dim`` between all heads::

    P_h ~= U diag(m_h) V^T        U, V: (d_model, shared_dim)   M: (n_head, shared_dim)

a rank-``shared_dim`` CP (PARAFAC) decomposition of the ``n_head x d_model x d_model``
tensor whose slices are ``P_h``. :func:`cp_als` computes it by alternating least squares
(Kolda & Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009,
section 3.4) without ever forming that tensor: every product with a slice goes through
the thin weights, ``P_h v = W_Q^h^T (W_K^h v)``.

Pure tensors in and out: no files, no printing. Notation in the code: ``a``/``b`` are the
query/key weights ``(n_head*head_dim, d_model)`` (rows of head h: ``W_Q^h``, ``W_K^h``),
``u``/``v`` the factors ``U``/``V`` and ``au = a @ u`` stacks ``W_Q^h U`` over heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..defaults import DEFAULT_MAX_ITER, DEFAULT_TOL

__all__ = [
    "whiten",
    "DEFAULT_MAX_ITER",
    "DEFAULT_RIDGE",
    "DEFAULT_SHRINKAGE",
    "DEFAULT_TOL",
    "CPFactors",
    "concatenated",
    "cp_als",
    "relative_error",
    "whitening_factor",
]

DEFAULT_RIDGE = 1e-10
DEFAULT_SHRINKAGE = 1e-2

# Sweeps run in float32 until they stop improving, then in float64 (see cp_als).
_FAST_DTYPE = torch.float32
_EXACT_DTYPE = torch.float64
# Below this relative error the float32 estimates (noise about 1e-6 of ||P||^2) are too
# coarse to steer the sweeps, which continue in float64.
_FAST_FLOOR = 0.05


@dataclass(frozen=True)
class CPFactors:
    """Factors of one collaborative attention layer: ``P_h ~= query^T diag(mixing[h]) key``.

    Attributes:
        query: ``(shared_dim, d_model)``, ``U^T``; stored as ``M.collab_query.weight``.
        key: ``(shared_dim, d_model)``, ``V^T``; stored as ``M.collab_key.weight``.
        mixing: ``(n_head, shared_dim)``, ``M``; stored as ``M.collab_mixing``.
        relative_error: ``||P - P_hat||_F / ||P||_F`` over all heads, in float64 (in the
            whitened metric when the decomposition was whitened).
        iterations: ALS sweeps done (0 for the exact concatenated solution).
        errors: relative error after each sweep, never increasing, one per sweep.

    Raises:
        ValueError: when the shapes are inconsistent or ``errors`` does not have one entry
            per iteration.
    """

    query: torch.Tensor  # (R, D)
    key: torch.Tensor  # (R, D)
    mixing: torch.Tensor  # (H, R)
    relative_error: float
    iterations: int = 0
    errors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("query", "key", "mixing"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 2:
                raise ValueError(f"CPFactors.{name} must be a 2-D tensor")
        if self.query.shape != self.key.shape:
            raise ValueError(
                f"CPFactors.query {tuple(self.query.shape)} and key {tuple(self.key.shape)} "
                "must have the same shape (shared_dim, d_model)"
            )
        if self.mixing.shape[1] != self.query.shape[0]:
            raise ValueError(
                f"CPFactors.mixing {tuple(self.mixing.shape)} must have one column per shared "
                f"dimension, {self.query.shape[0]} like query {tuple(self.query.shape)}"
            )
        object.__setattr__(self, "errors", tuple(float(e) for e in self.errors))
        if self.iterations < 0 or len(self.errors) != self.iterations:
            raise ValueError(
                f"CPFactors.errors has {len(self.errors)} entries for {self.iterations} iterations"
            )

    @property
    def shared_dim(self) -> int:
        return self.query.shape[0]

    @property
    def n_head(self) -> int:
        return self.mixing.shape[0]

    @property
    def d_model(self) -> int:
        return self.query.shape[1]

    def slices(self) -> torch.Tensor:
        """The dense approximation ``P_hat``, ``(n_head, d_model, d_model)``: small layers, tests."""
        return torch.einsum("rd,hr,re->hde", self.query, self.mixing, self.key)  # (H, D, D)


# --------------------------------------------------------------------------- validation


def _heads(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int) -> tuple[int, int, int]:
    """Check the two projections; return (n_head, head_dim, d_model)."""
    for name, w in (("w_query", w_query), ("w_key", w_key)):
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor (n_head*head_dim, d_model)")
        if not w.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {w.dtype}")
    if w_query.shape != w_key.shape:
        raise ValueError(
            f"w_query {tuple(w_query.shape)} and w_key {tuple(w_key.shape)} must have the same shape"
        )
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"n_head must be a positive integer, got {n_head!r}")
    rows, d_model = w_query.shape
    if rows == 0 or d_model == 0 or rows % n_head:
        raise ValueError(
            f"the projections have {rows} rows, not a positive multiple of n_head={n_head}"
        )
    return n_head, rows // n_head, d_model


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available here")
    return dev


def whiten(
    w: torch.Tensor, factor: torch.Tensor | None, d_model: int, name: str, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (w @ L, L) in float64 on dev, after checking that L is a usable Cholesky factor."""
    w = w.detach().to(device=dev, dtype=_EXACT_DTYPE)  # (H*d, D)
    if factor is None:
        return w, None
    if not isinstance(factor, torch.Tensor) or factor.shape != (d_model, d_model):
        got = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise ValueError(f"{name} must be a ({d_model}, {d_model}) tensor, got {got}")
    lower = factor.detach().to(device=dev, dtype=_EXACT_DTYPE)  # (D, D)
    if not torch.equal(lower, lower.tril()):
        raise ValueError(f"{name} must be lower triangular (a Cholesky factor, see whitening_factor)")
    if not bool(torch.isfinite(lower).all()) or bool((lower.diagonal() == 0).any()):
        raise ValueError(f"{name} must be finite with a non-zero diagonal (invertible)")
    return w @ lower, lower  # (H*d, D)


def _unwhiten(factor: torch.Tensor, lower: torch.Tensor | None) -> torch.Tensor:
    """Map whitened factors back: U = L^{-T} U'."""
    if lower is None:
        return factor
    return torch.linalg.solve_triangular(lower.mT, factor, upper=True)  # (D, R)


# --------------------------------------------------------------------------- factored algebra


def _norm2(a: torch.Tensor, b: torch.Tensor, n_head: int) -> torch.Tensor:
    """sum_h ||A_h^T B_h||_F^2 = sum_h <A_h A_h^T, B_h B_h^T>, never forming P_h."""
    a3 = a.view(n_head, -1, a.shape[1])  # (H, d, D)
    b3 = b.view(n_head, -1, b.shape[1])  # (H, d, D)
    return ((a3 @ a3.mT) * (b3 @ b3.mT)).sum()


def _fit(au: torch.Tensor, bv: torch.Tensor, n_head: int) -> torch.Tensor:
    """fit[h, r] = u_r^T P_h v_r: column sums of (W_Q^h U) * (W_K^h V) over each head's rows."""
    return (au * bv).view(n_head, -1, au.shape[1]).sum(dim=1)  # (H, R)


def _error2(norm2, mixing, fit, utu, vtv) -> torch.Tensor:
    """||P - P_hat||^2 = ||P||^2 - 2 <P, P_hat> + ||P_hat||^2, all from small matrices, in float64."""
    mixing, fit = mixing.to(_EXACT_DTYPE), fit.to(_EXACT_DTYPE)
    hat2 = ((mixing.mT @ mixing) * utu.to(_EXACT_DTYPE) * vtv.to(_EXACT_DTYPE)).sum()
    return (norm2 - 2.0 * (mixing * fit).sum() + hat2).clamp_min(0.0)


def _ratio(err2: torch.Tensor, norm2: torch.Tensor) -> float:
    if float(norm2) == 0.0:
        return 0.0 if float(err2) == 0.0 else math.inf
    return math.sqrt(float(err2) / float(norm2))


def _cholesky(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Cholesky factor of gram + lambda I, lambda = ridge * mean(diag), raised until it works."""
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    jitter = ridge
    while jitter <= 1.0:
        chol, info = torch.linalg.cholesky_ex(gram + (jitter * scale) * eye)
        if int(info) == 0:
            return chol
        # Numerically singular (collinear components, zero weights): regularise harder.
        jitter = max(jitter * 100.0, 10.0 * torch.finfo(gram.dtype).eps)
    raise RuntimeError("CP-ALS normal equations are not finite; please report this with the weights")


def _solve(rhs: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares X = rhs (gram + lambda I)^-1 for a few rows of rhs."""
    return torch.cholesky_solve(rhs.mT, _cholesky(gram, ridge)).mT


def _side_gram(a: torch.Tensor, b: torch.Tensor, n_head: int) -> torch.Tensor:
    """G = sum_h A_h^T (B_h B_h^T) A_h = P_A P_A^T for the concatenation P_A = [P_1 ... P_H]."""
    a3 = a.view(n_head, -1, a.shape[1])  # (H, d, D)
    b3 = b.view(n_head, -1, b.shape[1])  # (H, d, D)
    return a.mT @ ((b3 @ b3.mT) @ a3).reshape(a.shape)  # (D, D)


def _leading_eigenvectors(
    gram: torch.Tensor, shared_dim: int, generator: torch.Generator
) -> torch.Tensor:
    """The shared_dim leading eigenvectors of a PSD (D, D) matrix, with fixed signs.

    When shared_dim > D the missing columns are seeded random unit directions.
    """
    d_model = gram.shape[0]
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    vecs = vecs.flip(-1)[:, : min(shared_dim, d_model)]  # (D, min(R, D))
    # Eigenvectors are defined up to sign: make the largest entry of each positive.
    pivot = vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True))  # (1, min(R, D))
    vecs = vecs * torch.where(pivot < 0, -1.0, 1.0)
    if shared_dim > d_model:
        extra = torch.randn(d_model, shared_dim - d_model, generator=generator, dtype=gram.dtype)
        extra = extra.to(gram.device)  # (D, R - D)
        vecs = torch.cat([vecs, extra / extra.norm(dim=0)], dim=1)  # (D, R)
    return vecs


# --------------------------------------------------------------------------- CP-ALS sweeps


class _Iterate(NamedTuple):
    """One ALS iterate. U = A^T zu and V = B^T zv; zu, zv are None for the initial U, V."""

    zu: torch.Tensor | None  # (H*d, R)
    zv: torch.Tensor | None  # (H*d, R)
    mixing: torch.Tensor  # (H, R)
    au: torch.Tensor  # (H*d, R)  A U
    bv: torch.Tensor  # (H*d, R)  B V
    utu: torch.Tensor  # (R, R)  U^T U
    vtv: torch.Tensor  # (R, R)  V^T V


class _Problem(NamedTuple):
    """The layer in one working precision: kernels A A^T, B B^T and ||P||^2 (float64)."""

    kernel_a: torch.Tensor  # (H*d, H*d)
    kernel_b: torch.Tensor  # (H*d, H*d)
    norm2: torch.Tensor  # ()
    n_head: int
    ridge: float


def _half_sweep(other, other_gram, mixing, kernel, n_head, ridge):
    """Least-squares update of one side with the other side and M fixed (Kolda & Bader eq. 3.4).

    For the query side, U = X_(1) (M kr V) (M^T M * V^T V)^-1 and
    X_(1) (M kr V) = A^T (B V * M per head), so U = A^T Z with Z = (B V * M) G^-1:
    A U = (A A^T) Z and U^T U = Z^T (A U) only need the (H*d, H*d) kernel. The new
    columns are scaled to unit norm and their norms moved into M.
    """
    full, rank = other.shape
    rhs = (other.view(n_head, -1, rank) * mixing[:, None, :]).view(full, rank)  # (H*d, R)
    z = rhs @ torch.cholesky_inverse(_cholesky((mixing.mT @ mixing) * other_gram, ridge))  # (H*d, R)
    wz = kernel @ z  # (H*d, R)
    gram = z.mT @ wz  # (R, R)
    norms = gram.diagonal().clamp_min(0.0).sqrt()  # (R,)
    inv = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))
    return z * inv, wz * inv, gram * (inv[:, None] * inv), mixing * norms


def _sweep(problem: _Problem, start: _Iterate) -> tuple[_Iterate, float]:
    """One ALS sweep (U, then V, then M) from start; returns the iterate and its relative error."""
    n_head, ridge = problem.n_head, problem.ridge
    zu, au, utu, mixing = _half_sweep(start.bv, start.vtv, start.mixing, problem.kernel_a, n_head, ridge)
    zv, bv, vtv, mixing = _half_sweep(au, utu, mixing, problem.kernel_b, n_head, ridge)
    fit = _fit(au, bv, n_head)  # (H, R)
    mixing = _solve(fit, utu * vtv, ridge)  # (H, R)
    error = _ratio(_error2(problem.norm2, mixing, fit, utu, vtv), problem.norm2)
    return _Iterate(zu, zv, mixing, au, bv, utu, vtv), error


def _extrapolate(before: _Iterate, after: _Iterate, weight: float) -> _Iterate:
    """after + weight * (after - before) on the V side and M, the only inputs of the next sweep.

    B V is linear in zv, so the extrapolated B V costs nothing; only V^T V is recomputed.
    """
    zv = torch.lerp(before.zv, after.zv, 1.0 + weight)  # (H*d, R)
    bv = torch.lerp(before.bv, after.bv, 1.0 + weight)  # (H*d, R)
    mixing = torch.lerp(before.mixing, after.mixing, 1.0 + weight)  # (H, R)
    return after._replace(zv=zv, bv=bv, mixing=mixing, vtv=zv.mT @ bv)


def _run(
    problem: _Problem,
    start: _Iterate,
    start_error: float,
    sweeps: int,
    tol: float,
    floor: float,
    errors: list[float],
) -> tuple[_Iterate, bool]:
    """ALS sweeps with Nesterov momentum and restart; appends one entry to errors per sweep.

    Momentum (Mitchell, Ye & De Sterck, "Nesterov acceleration of alternating least squares
    for canonical tensor decomposition", Numer. Linear Algebra Appl. 27(4), 2020): the next
    sweep starts from x_k + (k-1)/(k+2) (x_k - x_{k-1}). A sweep that does not get below the
    last recorded error is discarded (its entry repeats that error) and the momentum
    restarts from the best iterate; when a sweep without momentum fails too, this precision
    is exhausted. So errors never increases.

    Returns (best iterate, whether it stopped before the budget: converged to tol, exhausted,
    or below floor, under which float32 estimates are too coarse to steer by).
    """
    best, previous = start, None
    launch, momentum_step = start, 1
    for _ in range(sweeps):
        level = errors[-1] if errors else start_error
        candidate, error = _sweep(problem, launch)
        if error <= level:
            previous, best = best, candidate
            errors.append(error)
            if level - error <= tol * error or error <= floor:
                return best, True
            weight = (momentum_step - 1) / (momentum_step + 2)
            momentum_step += 1
            usable = previous.zv is not None and weight > 0.0
            launch = _extrapolate(previous, best, weight) if usable else best
        else:
            errors.append(level)
            if launch is best:
                return best, True
            launch, momentum_step = best, 1
    return best, False


def _problem(a: torch.Tensor, b: torch.Tensor, norm2: torch.Tensor, n_head: int, ridge: float) -> _Problem:
    return _Problem(a @ a.mT, b @ b.mT, norm2, n_head, ridge)


def _retype(problem: _Problem, it: _Iterate) -> _Iterate:
    """Re-evaluate a (float32) iterate exactly in the problem's precision; M is refitted."""
    dtype, ridge = problem.kernel_a.dtype, problem.ridge
    zu, zv = it.zu.to(dtype), it.zv.to(dtype)  # (H*d, R)
    au, bv = problem.kernel_a @ zu, problem.kernel_b @ zv  # (H*d, R)
    utu, vtv = zu.mT @ au, zv.mT @ bv  # (R, R)
    mixing = _solve(_fit(au, bv, problem.n_head), utu * vtv, ridge)  # (H, R)
    return _Iterate(zu, zv, mixing, au, bv, utu, vtv)


# --------------------------------------------------------------------------- public API


def relative_error(
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    n_head: int,
    factors: CPFactors,
    *,
    whiten_query: torch.Tensor | None = None,
    whiten_key: torch.Tensor | None = None,
) -> float:
    """Relative error ``||P - P_hat||_F / ||P||_F`` of factors, without forming any slice.

    ``||P - P_hat||^2 = ||P||^2 - 2 <P, P_hat> + ||P_hat||^2`` with ``||P||^2 =
    sum_h <W_Q^h W_Q^h^T, W_K^h W_K^h^T>``, ``<P, P_hat> = sum_hr m_hr u_r^T P_h v_r`` and
    ``||P_hat||^2 = sum(M^T M * U^T U * V^T V)``; cost ``O(H*d*D*R + D*R^2)``, float64.
    Being a difference of squares, it bottoms out near 1e-8, the square root of the
    float64 precision.

    Args:
        w_query: ``(n_head*head_dim, d_model)`` query weight, nn.Linear layout.
        w_key: ``(n_head*head_dim, d_model)`` key weight.
        n_head: number of heads H.
        factors: the approximation ``P_hat_h = query^T diag(mixing[h]) key``.
        whiten_query, whiten_key: optional lower-triangular ``(d_model, d_model)`` factors
            ``L_q``, ``L_k``; the error is then that of ``L_q^T P_h L_k``.

    Returns:
        The relative Frobenius error over all heads (0.0 when ``P`` and ``P_hat`` are 0).

    Raises:
        ValueError: when the weights, factors or whitening factors do not fit together.
    """
    n_head, _, d_model = _heads(w_query, w_key, n_head)
    if factors.d_model != d_model or factors.n_head != n_head:
        raise ValueError(
            f"factors are for n_head={factors.n_head}, d_model={factors.d_model}; "
            f"the weights have n_head={n_head}, d_model={d_model}"
        )
    cpu = torch.device("cpu")
    a, lower_q = whiten(w_query, whiten_query, d_model, "whiten_query", cpu)  # (H*d, D)
    b, lower_k = whiten(w_key, whiten_key, d_model, "whiten_key", cpu)  # (H*d, D)
    u = factors.query.detach().to(cpu, _EXACT_DTYPE).mT  # (D, R)
    v = factors.key.detach().to(cpu, _EXACT_DTYPE).mT  # (D, R)
    if lower_q is not None:
        u = lower_q.mT @ u  # (D, R)
    if lower_k is not None:
        v = lower_k.mT @ v  # (D, R)
    mixing = factors.mixing.detach().to(cpu, _EXACT_DTYPE)  # (H, R)
    norm2 = _norm2(a, b, n_head)
    err2 = _error2(norm2, mixing, _fit(a @ u, b @ v, n_head), u.mT @ u, v.mT @ v)
    return _ratio(err2, norm2)


def concatenated(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int) -> CPFactors:
    """The exact collaborative form with ``shared_dim = n_head * head_dim``.

    ``U = [W_Q^1^T ... W_Q^H^T]``, ``V = [W_K^1^T ... W_K^H^T]`` and ``M`` block one-hot
    (row h is 1 on columns ``h*head_dim:(h+1)*head_dim``), so that ``U diag(m_h) V^T = P_h``
    exactly (Cordonnier, Loukas, Jaggi, arXiv 2006.16362, section 3).

    Args:
        w_query: ``(n_head*head_dim, d_model)`` query weight, nn.Linear layout.
        w_key: ``(n_head*head_dim, d_model)`` key weight.
        n_head: number of heads H.

    Returns:
        float64 CPU factors with ``iterations == 0``; ``relative_error`` is computed in
        factored form and is zero up to rounding (about 1e-8, see :func:`relative_error`).

    Raises:
        ValueError: on inconsistent shapes.
    """
    n_head, head_dim, _ = _heads(w_query, w_key, n_head)
    cpu = torch.device("cpu")
    query = w_query.detach().to(cpu, _EXACT_DTYPE).contiguous()  # (H*d, D) = U^T
    key = w_key.detach().to(cpu, _EXACT_DTYPE).contiguous()  # (H*d, D) = V^T
    mixing = torch.eye(n_head, dtype=_EXACT_DTYPE).repeat_interleave(head_dim, dim=1)  # (H, H*d)
    factors = CPFactors(query=query, key=key, mixing=mixing, relative_error=0.0)
    error = relative_error(query, key, n_head, factors)
    return CPFactors(query=query, key=key, mixing=mixing, relative_error=error)


def cp_als(
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    n_head: int,
    shared_dim: int,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    whiten_query: torch.Tensor | None = None,
    whiten_key: torch.Tensor | None = None,
) -> CPFactors:
    """Rank-``shared_dim`` CP decomposition of the slices ``P_h = W_Q^h^T W_K^h``.

    CP-ALS (Kolda & Bader, SIAM Review 2009, section 3.4) in factored form, for
    collaborative multi-head attention (Cordonnier, Loukas, Jaggi, arXiv 2006.16362). The
    ``n_head x d_model x d_model`` tensor is never built: the products with the slices go
    through the weights, so a sweep costs ``O((H*d)^2*R + H*d*R^2 + R^3)`` after an
    ``O(H*d*D^2 + D^3)`` start.

    * Start (deterministic): ``U`` and ``V`` are the leading eigenvectors of
      ``G_Q = sum_h W_Q^h^T (W_K^h W_K^h^T) W_Q^h`` and of its key-side twin ``G_K``
      (the left singular vectors of ``[P_1 ... P_H]`` and of ``[P_1^T ... P_H^T]``), ``M``
      the least-squares fit to them. When ``shared_dim > d_model`` the missing columns
      are random unit vectors drawn from ``seed``.
    * Sweeps solve for ``U``, ``V`` and ``M`` in turn. The normal equations (Hadamard
      products of ``R x R`` Grams) get a ridge ``ridge * mean(diag)`` and are solved by
      Cholesky; ``U`` and ``V`` keep unit-norm columns, the scale lives in ``M``.
    * Nesterov momentum with restart (Mitchell, Ye & De Sterck 2020) starts each sweep
      from an extrapolation of the last two iterates; a sweep that does not lower the error
      is discarded (the entry in ``errors`` repeats) and the momentum restarts.
    * Sweeps run in float32, twice as fast as float64 on CPUs, while they improve; when
      they stop improving before ``max_iter`` (the float32 rounding floor or ``tol``), the
      remaining sweeps continue in float64 from the best iterate. The returned factors are
      float64 with ``M`` refitted in float64 and ``relative_error`` is computed in float64;
      it is also the last entry of ``errors``, whose earlier float32 entries are estimates
      good to about 1e-5 relative.
    * Stops after ``max_iter`` sweeps, when a sweep improves the error by at most ``tol``
      times the error, or when even a sweep without momentum does not improve it in float64.

    Defaults ``max_iter=30``, ``tol=1e-6``: on every layer of all-MiniLM-L6-v2 at
    ``shared_dim`` 192 and 96 this gives a lower error than tensorly's ``parafac`` (random
    start, ``tol=1e-6``, 100 sweeps on the dense tensor) about 0.2 s per layer at 192 on
    one CPU core, some 60-100 times faster (layer 0 at 192: 0.2535 against 0.308;
    ``benchmarks/bench_decompose.py``). ``tol`` rarely binds there: the error still drops
    by about 1e-3 relative per sweep, so raise ``max_iter`` for a lower error.

    Args:
        w_query: ``(n_head*head_dim, d_model)`` query weight, nn.Linear layout (out x in).
        w_key: ``(n_head*head_dim, d_model)`` key weight.
        n_head: number of heads H.
        shared_dim: the shared width R, ``1 <= R <= n_head*head_dim``. At
            ``R == n_head*head_dim`` the exact :func:`concatenated` solution is returned.
        max_iter: most ALS sweeps (0 returns the start).
        tol: stop when a sweep improves the relative error by at most ``tol`` relative.
        ridge: relative Tikhonov term of the normal equations.
        seed: seeds the random directions used only when ``shared_dim > d_model``.
        device: where to compute (``"cpu"``, ``"cuda"``, ``"cuda:1"``); results are on the CPU.
        whiten_query, whiten_key: optional lower-triangular ``(d_model, d_model)`` factors
            ``L_q``, ``L_k`` (see :func:`whitening_factor`). The whitened slices
            ``L_q^T P_h L_k`` are decomposed and the factors mapped back,
            ``U = L_q^{-T} U'``, ``V = L_k^{-T} V'``; ``relative_error`` and ``errors`` are
            then those of the whitened slices (the data-weighted error), not of ``P_h``.

    Returns:
        :class:`CPFactors`, float64 CPU tensors. Same inputs and options give bitwise
        identical factors on the same machine.

    Raises:
        ValueError: on inconsistent shapes, ``shared_dim`` outside ``[1, n_head*head_dim]``,
            negative options, bad whitening factors or an unavailable device.
    """
    n_head, head_dim, d_model = _heads(w_query, w_key, n_head)
    full = n_head * head_dim
    if isinstance(shared_dim, bool) or not isinstance(shared_dim, int) or shared_dim < 1:
        raise ValueError(f"shared_dim must be a positive integer, got {shared_dim!r}")
    if shared_dim > full:
        raise ValueError(
            f"shared_dim={shared_dim} exceeds n_head*head_dim={full}: a shared width above "
            "the concatenated one compresses nothing"
        )
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"tol must be a finite non-negative number, got {tol!r}")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0.0):
        raise ValueError(f"ridge must be a finite non-negative number, got {ridge!r}")
    dev = _device(device)
    a, lower_q = whiten(w_query, whiten_query, d_model, "whiten_query", dev)  # (H*d, D)
    b, lower_k = whiten(w_key, whiten_key, d_model, "whiten_key", dev)  # (H*d, D)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("the query/key weights (after whitening) contain NaN or infinity")
    if shared_dim == full:
        # Exact; a whitening would cancel out (U' = L_q^T W_Q^T maps back to W_Q^T).
        return concatenated(w_query, w_key, n_head)

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    errors: list[float] = []
    # Relative errors and U, V do not depend on the scale of the weights; unit scale keeps
    # the float32 sweeps away from overflow and underflow.
    scale_a, scale_b = a.norm(), b.norm()
    if float(scale_a) > 0.0 and float(scale_b) > 0.0:
        u, v = _sweeps(a / scale_a, b / scale_b, n_head, shared_dim, max_iter, tol, ridge, generator, errors)
    else:
        u = _leading_eigenvectors(_side_gram(a, b, n_head), shared_dim, generator)  # (D, R)
        v = _leading_eigenvectors(_side_gram(b, a, n_head), shared_dim, generator)  # (D, R)
    # Final M: the float64 least-squares fit to the returned U and V.
    norm2 = _norm2(a, b, n_head)
    au, bv = a @ u, b @ v  # (H*d, R)
    utu, vtv = u.mT @ u, v.mT @ v  # (R, R)
    fit = _fit(au, bv, n_head)  # (H, R)
    mixing = _solve(fit, utu * vtv, ridge) if float(norm2) > 0.0 else torch.zeros_like(fit)
    error = _ratio(_error2(norm2, mixing, fit, utu, vtv), norm2)
    _settle(errors, error)
    cpu = torch.device("cpu")
    return CPFactors(
        query=_unwhiten(u, lower_q).mT.contiguous().to(cpu),  # (R, D)
        key=_unwhiten(v, lower_k).mT.contiguous().to(cpu),  # (R, D)
        mixing=mixing.contiguous().to(cpu),  # (H, R)
        relative_error=error,
        iterations=len(errors),
        errors=tuple(errors),
    )


def _settle(errors: list[float], exact: float) -> None:
    """Make the last entry the exact float64 error of the iterate it describes.

    Earlier float32 entries are estimates; any that fall below the exact value are raised
    to it, so the list stays non-increasing.
    """
    if errors:
        errors[:] = [max(e, exact) for e in errors[:-1]] + [exact]


def _sweeps(a, b, n_head, shared_dim, max_iter, tol, ridge, generator, errors):
    """Start and sweeps for unit-scale float64 weights; returns float64 (U, V), fills errors."""
    norm2 = _norm2(a, b, n_head)
    a_fast, b_fast = a.to(_FAST_DTYPE), b.to(_FAST_DTYPE)  # (H*d, D)
    # The start needs no float64 accuracy; the sweeps refine it.
    u0 = _leading_eigenvectors(_side_gram(a_fast, b_fast, n_head), shared_dim, generator)  # (D, R)
    v0 = _leading_eigenvectors(_side_gram(b_fast, a_fast, n_head), shared_dim, generator)  # (D, R)
    u0, v0 = u0.to(_EXACT_DTYPE), v0.to(_EXACT_DTYPE)
    if max_iter == 0:
        return u0, v0
    u, v = u0.to(_FAST_DTYPE), v0.to(_FAST_DTYPE)  # (D, R)
    au, bv = a_fast @ u, b_fast @ v  # (H*d, R)
    utu, vtv = u.mT @ u, v.mT @ v  # (R, R)
    fit = _fit(au, bv, n_head)  # (H, R)
    mixing = _solve(fit, utu * vtv, ridge)  # (H, R)
    start = _Iterate(None, None, mixing, au, bv, utu, vtv)
    start_error = _ratio(_error2(norm2, mixing, fit, utu, vtv), norm2)
    fast = _problem(a_fast, b_fast, norm2, n_head, ridge)
    best, stopped = _run(fast, start, start_error, max_iter, tol, _FAST_FLOOR, errors)
    left = max_iter - len(errors)
    if stopped and left > 0 and best.zu is not None:
        # float32 has stopped resolving the error: go on in float64 from the best iterate.
        exact = _problem(a, b, norm2, n_head, ridge)
        best = _retype(exact, best)
        fit = _fit(best.au, best.bv, n_head)  # (H, R)
        start_error = _ratio(_error2(norm2, best.mixing, fit, best.utu, best.vtv), norm2)
        _settle(errors, start_error)
        best, _ = _run(exact, best, start_error, left, tol, 0.0, errors)
    if best.zu is None:
        return u0, v0
    return a.mT @ best.zu.to(_EXACT_DTYPE), b.mT @ best.zv.to(_EXACT_DTYPE)  # (D, R)


def whitening_factor(second_moment: torch.Tensor, *, shrinkage: float = DEFAULT_SHRINKAGE) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of the shrunk second moment ``(1-a) C + a (tr(C)/D) I``.

    With ``C = E[x x^T]`` of a layer's inputs, ``E[(x^T (P - P_hat) y)^2] =
    ||L_q^T (P - P_hat) L_k||_F^2`` for independent x and y, so decomposing the whitened
    slices minimises the error that the data sees (:func:`cp_als` ``whiten_query`` /
    ``whiten_key``). Shrinkage towards a multiple of the identity (Ledoit & Wolf 2004)
    keeps directions that the calibration data rarely visits in the metric.

    Never fails on a finite symmetric input: if the Cholesky factorisation of the shrunk
    matrix fails (rank deficient, not quite positive semi-definite), its eigenvalues are
    clipped to a small positive floor and the factor is taken from a QR decomposition; a
    zero matrix gives the identity.

    Args:
        second_moment: ``(d_model, d_model)`` symmetric matrix ``C`` (symmetrised here).
        shrinkage: ``a`` in ``[0, 1]``; default 0.01.

    Returns:
        ``(d_model, d_model)`` float64 lower-triangular ``L`` with a positive diagonal and
        ``L L^T`` the shrunk moment.

    Raises:
        ValueError: when the input is not a finite square matrix or ``a`` is outside [0, 1].
    """
    if not isinstance(second_moment, torch.Tensor) or second_moment.ndim != 2 or (
        second_moment.shape[0] != second_moment.shape[1]
    ) or second_moment.shape[0] == 0:
        got = tuple(second_moment.shape) if isinstance(second_moment, torch.Tensor) else second_moment
        raise ValueError(f"second_moment must be a square (d_model, d_model) tensor, got {got!r}")
    if not (isinstance(shrinkage, (int, float)) and 0.0 <= shrinkage <= 1.0):
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
    moment = second_moment.detach().to(torch.device("cpu"), _EXACT_DTYPE)  # (D, D)
    if not bool(torch.isfinite(moment).all()):
        raise ValueError("second_moment contains NaN or infinity")
    d_model = moment.shape[0]
    moment = 0.5 * (moment + moment.mT)
    mean_eig = float(moment.diagonal().sum()) / d_model
    if not mean_eig > 0.0:
        return torch.eye(d_model, dtype=_EXACT_DTYPE)
    eye = torch.eye(d_model, dtype=_EXACT_DTYPE)
    shrunk = (1.0 - shrinkage) * moment + (shrinkage * mean_eig) * eye  # (D, D)
    chol, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) == 0 and bool((chol.diagonal() > 0).all()):
        return chol
    # Clip the spectrum to a floor that keeps every direction, then L from a QR of sqrt.
    vals, vecs = torch.linalg.eigh(shrunk)  # (D,), (D, D)
    floor = max(float(vals.abs().max()), mean_eig) * d_model * torch.finfo(_EXACT_DTYPE).eps
    root = vecs * vals.clamp_min(floor).sqrt()  # (D, D), root @ root.T = clipped moment
    _, upper = torch.linalg.qr(root.mT)  # root.T = Q R  =>  root root.T = R^T R
    lower = upper.mT  # (D, D)
    signs = torch.where(lower.diagonal() < 0, -1.0, 1.0).to(_EXACT_DTYPE)
    return lower * signs  # flip columns so the diagonal is positive
