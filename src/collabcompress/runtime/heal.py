"""Healing: distil the original model's outputs into the compressed model's new tensors.

After every layer is compressed, a seeded Adam loop trains only the collaborative tensors
(shared keys and mixing; for encoders also the shared queries) so that the compressed
model's next-token distributions (causal LMs: KL(p_original || p_compressed) per token) or
pooled embeddings (encoders: 1 - cosine) match the original's on the calibration
windows. The last few windows are held out: steps that make their loss worse are undone.
The compressed model's passes may run in bfloat16 arithmetic (``torch.autocast``; the
tensors, the optimiser and the reference's targets stay float32): on a CPU with bfloat16
matrix units a step of SmolLM2 takes half the time, and the steps are as good.
Models in, models out; no I/O; deterministic on the CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["HealResult", "heal", "held_out_count"]

TRAINED = ("collab_query", "collab_key", "collab_mixing")  # parameter name prefixes that healing trains
# Adam step size relative to each tensor's RMS. Measured: SmolLM2 (refined rank 128, 40 steps) 33.46 at 1e-3, 33.43
# at 6e-4, 33.46 at 3e-4, and 1e-3 the best over a third to two thirds of the cache; MiniLM (--budget 0.25, 40 steps)
# kept no block at 1e-3 (cosine 0.97505 unchanged), 10 of 40 steps at 3e-4 (0.97595), 25 at 1e-4 (0.97544).
STEP_SIZE = {"causal": 1e-3, "encoder": 3e-4}
# Shared values (collab_value, collab_value_up) train at this fraction of STEP_SIZE: a prototype's value factors
# diverged at the keys' 1e-3 (SmolLM2, values 64 of 192: perplexity 49.7 -> 119.5) and healed at 1e-4 (-> 43.4 in
# 50 steps). Measured here: keys 128 + values 128, --refine-steps 100 --heal-steps 80: 34.27 (+7.0 %), 35 of 80 steps kept.
VALUE_STEP_FRACTION = 0.1
VALUE_TRAINED = ("collab_value", "collab_value_up")
# A causal LM also heals on GENERATED windows of its original's own text: nucleus sampling (TOP_P) continuing the
# first PROMPT_TOKENS tokens of training sentences. Measured (SmolLM2, two thirds of the key cache, refined, 80 steps,
# float32): see docs/rotary.md.
GENERATED, PROMPT_TOKENS, TOP_P = 16, 4, 0.9
HELD_OUT = 4  # windows held out (a quarter of the kept ones when fewer than 16 are kept, at least one)


def held_out_count(kept: int) -> int:
    """How many of ``kept`` (>= 2) kept windows healing holds out: one 512-token window misled
    it (SmolLM2 at half the key cache: its loss kept falling while perplexity rose)."""
    return max(1, min(HELD_OUT, kept // 4))


@dataclass(frozen=True)
class HealResult:
    """What healing did: steps run, steps kept, and the held-out loss before and after."""

    steps: int
    accepted: int
    held_out_before: float
    held_out_after: float
    seconds: float


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The collaborative parameters of ``model`` that healing trains, by state-dict name."""
    from .adapters import collaborative_modules
    from .values import has_shared_values

    out = {}
    for prefix, module in collaborative_modules(model).items():
        names = TRAINED + (VALUE_TRAINED if has_shared_values(module) else ())
        for name, p in module.named_parameters():
            if name.startswith(names):
                out[f"{prefix}.{name}"] = p
    return out


# Tokens per slice of the output layer (:class:`_HeadKL`): a slice's (tokens, V) float32 tensors stay at 16 MB, under
# glibc's 32 MB limit for memory it recycles, so no page is faulted in twice. Measured (SmolLM2, V = 49,152, two
# threads, AMD EPYC): one exp of a (512, V) tensor took 207 ms allocating its result and 14 ms writing into one.
SLICE_ELEMENTS = 1 << 22


class _HeadKL(torch.autograd.Function):
    """Mean over the T tokens of KL(p_t || q_t), where q_t = softmax(W h_t + b) is the compressed
    model's next-token distribution from its last hidden state h_t and p_t the original's from
    its own (g_t, W', b'): formed a slice of tokens at a time, so no (T, V) tensor exists. The
    output layers are frozen, so the gradient w.r.t. h is formed with the loss and only scaled
    in the backward pass. ``compute``: the dtype of the compressed model's output layer under
    ``torch.autocast`` (cast once, not once per slice: autocast re-casts a frozen weight at
    every use), or ``None``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, compute):  # (T, D), (V, D), (V,) | None
        tokens, vocab = hidden.shape[0], weight.shape[0]
        if compute is not None:
            weight, bias = weight.to(compute), None if bias is None else bias.to(compute)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32)
        step = max(1, SLICE_ELEMENTS // vocab)
        for s in range(0, tokens, step):
            rows = slice(s, s + step)
            with torch.autocast(hidden.device.type, enabled=False):  # the original's targets stay float32
                log_p = torch.log_softmax(torch.nn.functional.linear(ref_hidden[rows], ref_weight, ref_bias), -1)
            log_q = torch.log_softmax(torch.nn.functional.linear(hidden[rows], weight, bias).float(), -1)
            p = log_p.exp()
            total += log_p.sub_(log_q).mul_(p).sum()
            if grad is not None:  # d KL / d logits = (q - p) / T
                grad[rows] = (log_q.exp_().sub_(p).div_(tokens)).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / tokens

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream, None, None, None, None, None, None


@torch.no_grad()
def _kl_moments(ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
                weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a held-out check needs of the original's next-token distributions p_t = softmax(W' g_t + b'):
    a_t = W^T p_t (T, D) and c_t = sum_v p_t log p_t - p_t . b (T,) for the compressed model's output
    layer (W, b), so that for any last hidden state h_t

        KL(p_t || softmax(W h_t + b)) = c_t - a_t . h_t + logsumexp(W h_t + b)

    (:func:`_kl_from_moments`): one pass of the output layer per check instead of two, and no
    log-softmax or exp of either. The original's logits in float32 as :class:`_HeadKL` forms them,
    a slice of tokens at a time; the distributions, a and c in float64: a_t . h_t and the
    log-normaliser are tens of nats, and with p_t summing to 1 only to float32 rounding the KL of
    a SmolLM2 window (0.95) came out 2e-5 off, in float64 6e-8 off (the two-pass float32 KL 9e-7)."""
    tokens, vocab = ref_hidden.shape[0], ref_weight.shape[0]
    a, c = torch.empty(tokens, weight.shape[1], dtype=torch.float64), torch.empty(tokens, dtype=torch.float64)
    weight, bias = weight.double(), None if bias is None else bias.double()
    step = max(1, SLICE_ELEMENTS // vocab)
    with torch.autocast(ref_hidden.device.type, enabled=False):
        for s in range(0, tokens, step):
            rows = slice(s, s + step)
            log_p = torch.log_softmax(torch.nn.functional.linear(ref_hidden[rows], ref_weight, ref_bias).double(), -1)
            p = log_p.exp()
            a[rows] = p @ weight
            c[rows] = log_p.mul_(p).sum(-1) - (0.0 if bias is None else p @ bias)
    return a, c


def _kl_from_moments(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     a: torch.Tensor, c: torch.Tensor, compute: torch.dtype | None) -> float:
    """Mean over the T tokens of KL(p_t || softmax(W h_t + b)) from the moments (a, c) of the p_t
    (:func:`_kl_moments`); the output layer in ``compute`` (as :class:`_HeadKL`), the rest in float64."""
    if compute is not None:
        weight, bias = weight.to(compute), None if bias is None else bias.to(compute)
    step = max(1, SLICE_ELEMENTS // weight.shape[0])
    lse = torch.cat([torch.logsumexp(torch.nn.functional.linear(hidden[s:s + step], weight, bias).float(), -1)
                     for s in range(0, hidden.shape[0], step)])
    return float((c - (a * hidden.double()).sum(-1) + lse.double()).mean())


def _splits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s logits are its output layer (a linear map) of its body's last hidden states."""
    head, body = model.get_output_embeddings(), getattr(model, "base_model", None)
    return isinstance(head, torch.nn.Linear) and body is not None and body is not model


class _Targets:
    """The reference's targets per window, computed once, and the distillation loss against them.

    For a causal LM whose logits are its output layer of its last hidden states (checked on the
    first window's first tokens), the target is those hidden states (T, D) and the loss
    (:class:`_HeadKL`) forms the next-token distributions a slice at a time: a (T, V) table per
    window would take 100 MB at SmolLM2's vocabulary, and making one costs more than its
    arithmetic. A held-out window, judged at every check, keeps instead the moments of the
    original's distributions that the KL needs (:meth:`judge`). Else the next-token
    log-probabilities (T, V), computed at each use; for an encoder the pooled embedding (1, D)."""

    def __init__(self, reference: torch.nn.Module, causal: bool, model: torch.nn.Module | None = None,
                 probe: torch.Tensor | None = None, compute: torch.dtype = torch.float32) -> None:
        self.reference, self.causal, self.cache, self.moments = reference, causal, {}, {}
        self.compute = None if compute == torch.float32 else compute
        self.split = causal and _splits(reference) and (model is None or _splits(model))
        if self.split and model is not None and probe is not None:
            self.split = all(self._logits_are_head_of_body(m, probe[:8]) for m in (reference, model))

    @staticmethod
    @torch.no_grad()
    def _logits_are_head_of_body(model: torch.nn.Module, x: torch.Tensor) -> bool:
        logits = model(input_ids=x[None]).logits.float()
        split = model.get_output_embeddings()(model.base_model(input_ids=x[None]).last_hidden_state).float()
        return torch.allclose(logits, split, rtol=1e-4, atol=1e-4)

    @torch.no_grad()
    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            if i not in self.cache:
                self.cache[i] = self.reference(input_ids=x[None]).last_hidden_state.float().mean(1)  # (1, D)
            return self.cache[i]
        if not self.split:
            return torch.log_softmax(self.reference(input_ids=x[None]).logits.float(), -1)[0]  # (T, V)
        if i not in self.cache:
            self.cache[i] = self.reference.base_model(input_ids=x[None]).last_hidden_state[0]  # (T, D)
        return self.cache[i]

    def loss(self, model: torch.nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        """The distillation loss of window ``i`` (``x``: its (T,) token ids) for ``model``."""
        target = self(i, x)
        if not self.causal:
            pooled = model(input_ids=x[None]).last_hidden_state.float().mean(1)
            return 1.0 - torch.nn.functional.cosine_similarity(pooled, target).mean()
        if not self.split:
            log_q = torch.log_softmax(model(input_ids=x[None]).logits.float(), -1)[0]
            return (target.exp() * (target - log_q)).sum(-1).mean()
        head, ref_head = model.get_output_embeddings(), self.reference.get_output_embeddings()
        hidden = model.base_model(input_ids=x[None]).last_hidden_state[0]  # (T, D)
        return _HeadKL.apply(hidden, head.weight, head.bias, target, ref_head.weight, ref_head.bias, self.compute)

    @torch.no_grad()
    def judge(self, model: torch.nn.Module, i: int, x: torch.Tensor) -> float:
        """The loss of held-out window ``i`` without its gradient, as :meth:`loss` gives it; for a
        causal LM whose logits are its output layer of its body, from the moments of the original's
        distributions on the window (:func:`_kl_moments`, computed once; its hidden states not kept),
        so a check runs the output layer once, for the compressed model's log-normaliser."""
        if not self.split:
            return float(self.loss(model, i, x))
        head = model.get_output_embeddings()
        if i not in self.moments:
            ref_head = self.reference.get_output_embeddings()
            ref_hidden = self.cache.get(i)
            if ref_hidden is None:
                ref_hidden = self.reference.base_model(input_ids=x[None]).last_hidden_state[0]
            self.moments[i] = _kl_moments(ref_hidden, ref_head.weight, ref_head.bias, head.weight, head.bias)
        hidden = model.base_model(input_ids=x[None]).last_hidden_state[0]  # (T, D)
        return _kl_from_moments(hidden, head.weight, head.bias, *self.moments[i], self.compute)


def heal(reference: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, *,
         steps: int, causal: bool, lr: float | None = None, seed: int = 0, check_every: int = 5, held_out: int = 1,
         compute: torch.dtype = torch.float32,
         progress: Callable[[int, int, float], None] | None = None) -> HealResult:
    """Distil ``reference`` into the collaborative tensors of ``model`` (changed in place).

    Args:
        reference: the original model (not changed).
        model: the compressed model (``collabcompress.hf.from_pretrained``).
        ids, lengths: calibration windows, (N, T) token ids and (N,) lengths; the last
            ``held_out`` are held out, at least one is left to train on.
        steps: Adam steps, one training window each (seeded order).
        causal: next-token KL (causal LM) or 1 - cosine of mean-pooled hidden states (encoder).
        lr: Adam step size relative to each tensor's RMS; default :data:`STEP_SIZE` of the kind of model.
        check_every: steps between held-out checks; the steps since the last check are undone
            together when the held-out loss is worse than the best so far (one noisy window per
            step can worsen it alone while a few steps together improve it).
        held_out: windows held out; their loss is the token-weighted mean of their losses.
        progress: called with (step, steps, best held-out loss) after each step.

    Returns:
        A :class:`HealResult`.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if held_out < 1 or ids.shape[0] <= held_out:
        raise ValueError(f"healing holds {held_out} window(s) out and needs one more to train on, got {ids.shape[0]}")
    if compute not in (torch.float32, torch.bfloat16):
        raise ValueError(f"healing computes in float32 or bfloat16, not {compute}")
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    named = trainable(model)
    params = list(named.values())
    if not params:
        raise ValueError("the model has no collaborative tensors to heal")
    reference.eval()
    model.eval()  # no dropout: distillation of the deterministic forward
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    lr = STEP_SIZE["causal" if causal else "encoder"] if lr is None else lr
    opt = torch.optim.Adam([{"params": [p], "lr": lr * (VALUE_STEP_FRACTION if ".collab_value" in name else 1.0)
                             * float(p.detach().float().pow(2).mean().sqrt().clamp(min=1e-8))}
                            for name, p in named.items()])
    n_train = ids.shape[0] - held_out
    targets = _Targets(reference, causal, model, ids[-1, : int(lengths[-1])], compute)
    device = params[0].device.type

    def arithmetic():
        if compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device, dtype=compute)

    with torch.no_grad():
        held = [(i, int(lengths[i])) for i in range(n_train, ids.shape[0])]  # never training windows
        weights = [n / sum(n for _, n in held) for _, n in held]

        def held_out_loss() -> float:
            with arithmetic():
                return sum(w * targets.judge(model, i, ids[i, :n]) for (i, n), w in zip(held, weights))

        best = before = held_out_loss()
    accepted, pending = 0, 0
    kept = [p.detach().clone() for p in params]  # the tensors at the best held-out loss so far
    order = torch.cat([torch.randperm(n_train, generator=g) for _ in range(steps // n_train + 1)])
    for step in range(steps):
        i = int(order[step])
        opt.zero_grad(set_to_none=True)
        with arithmetic():
            loss = targets.loss(model, i, ids[i, : int(lengths[i])])
        loss.backward()
        opt.step()
        pending += 1
        if pending == check_every or step + 1 == steps:
            with torch.no_grad():
                now = held_out_loss()
                if now <= best:
                    best, accepted = now, accepted + pending
                    for k, p in zip(kept, params):
                        k.copy_(p)
                else:  # these steps hurt held-out data: undo them
                    for p, k in zip(params, kept):
                        p.copy_(k)
            pending = 0
        if progress:
            progress(step + 1, steps, best)
    for p in params:
        p.requires_grad_(False)
    return HealResult(steps, accepted, before, best, time.perf_counter() - start)
