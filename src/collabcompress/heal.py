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
# A causal LM also heals on GENERATED windows of its original's own text: nucleus sampling (TOP_P) continuing the
# first PROMPT_TOKENS tokens of training sentences. Measured (SmolLM2, two thirds of the key cache, refined, 80 steps,
# float32): see README "Seventh round".
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
    from .hf import collaborative_modules

    out = {}
    for prefix, module in collaborative_modules(model).items():
        for name, p in module.named_parameters():
            if name.startswith(TRAINED):
                out[f"{prefix}.{name}"] = p
    return out


def _loss(model: torch.nn.Module, ids: torch.Tensor, length: int, causal: bool, target: torch.Tensor) -> torch.Tensor:
    """The distillation loss of one window against the reference's ``target`` (:class:`_Targets`)."""
    x = ids[:length][None]  # (1, T)
    if causal:
        log_q = torch.log_softmax(model(input_ids=x).logits.float(), -1)
        return (target.exp() * (target - log_q)).sum(-1).mean()
    pooled = model(input_ids=x).last_hidden_state.float().mean(1)
    return 1.0 - torch.nn.functional.cosine_similarity(pooled, target).mean()


class _Targets:
    """The reference's targets per training window, computed once: for a causal LM its last
    hidden states (T, D), turned into next-token log-probabilities by its output layer at each
    use (a (T, V) table per window would take 100 MB at SmolLM2's vocabulary), else the pooled
    embedding."""

    def __init__(self, reference: torch.nn.Module, causal: bool) -> None:
        self.reference, self.causal, self.cache = reference, causal, {}
        head, body = reference.get_output_embeddings(), getattr(reference, "base_model", None)
        self.split = causal and head is not None and body is not None and body is not reference

    @torch.no_grad()
    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            if i not in self.cache:
                self.cache[i] = self.reference(input_ids=x[None]).last_hidden_state.float().mean(1)  # (1, D)
            return self.cache[i]
        if not self.split:
            return torch.log_softmax(self.reference(input_ids=x[None]).logits.float(), -1)
        if i not in self.cache:
            self.cache[i] = self.reference.base_model(input_ids=x[None]).last_hidden_state  # (1, T, D)
        return torch.log_softmax(self.reference.get_output_embeddings()(self.cache[i]).float(), -1)  # (1, T, V)


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
    params = list(trainable(model).values())
    if not params:
        raise ValueError("the model has no collaborative tensors to heal")
    reference.eval()
    model.eval()  # no dropout: distillation of the deterministic forward
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    lr = STEP_SIZE["causal" if causal else "encoder"] if lr is None else lr
    opt = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().float().pow(2).mean().sqrt().clamp(min=1e-8))}
                            for p in params])
    n_train = ids.shape[0] - held_out
    targets = _Targets(reference, causal)
    device = params[0].device.type

    def arithmetic():
        if compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device, dtype=compute)

    with torch.no_grad():
        held = [(i, int(lengths[i])) for i in range(n_train, ids.shape[0])]  # never training windows
        held_targets = [targets(i, ids[i, :n]) for i, n in held]
        weights = [n / sum(n for _, n in held) for _, n in held]

        def held_out_loss() -> float:
            with arithmetic():
                return sum(w * float(_loss(model, ids[i], n, causal, t))
                           for (i, n), t, w in zip(held, held_targets, weights))

        best = before = held_out_loss()
    accepted, pending = 0, 0
    kept = [p.detach().clone() for p in params]  # the tensors at the best held-out loss so far
    order = torch.cat([torch.randperm(n_train, generator=g) for _ in range(steps // n_train + 1)])
    for step in range(steps):
        i = int(order[step])
        opt.zero_grad(set_to_none=True)
        target_i = targets(i, ids[i, : int(lengths[i])])
        with arithmetic():
            loss = _loss(model, ids[i], int(lengths[i]), causal, target_i)
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
