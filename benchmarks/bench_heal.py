#!/usr/bin/env python
"""One healing step of the real SmolLM2-135M-Instruct: the output layer and KL in slices against whole logits.

On the model compressed data-free at ``--rank`` (the time of a step does not depend on the
fit; its parameters frozen except the collaborative tensors healing trains) and ``--windows``
seeded random ``--length``-token windows, in one process:

- the distillation loss of a window with its gradient (a training step: forward and backward
  pass of the compressed model, the original's last hidden states cached as healing caches
  them) and without it (a held-out check), the ways interleaved round by round, ``--repeats``
  rounds after one warm-up: through healing's own loss (the output layer and the KL a slice of
  ``SLICE_ELEMENTS`` floats at a time) and through whole (T, V) log-probabilities of both models;
- the held-out check as healing runs it: from the moments of the original's distributions
  (one pass of the output layer);
- the largest relative difference between the two losses, their gradients, and between the
  check from moments and the sliced loss.

Rows: seconds per window (median) and the median of the per-round ratios to whole logits.

    python scripts/fetch_data.py            # once: SmolLM2
    python benchmarks/bench_heal.py [--threads 2] [--heal-dtype bfloat16] [--json PATH]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from _common import cli, missing, parser, report, smollm2

NAME = "heal"


def _pair(args):
    """(original, compressed) in float32 and eval mode, every parameter frozen except those healing trains."""
    import torch
    import transformers

    from collabcompress.runtime.heal import trainable
    from collabcompress.hf import from_pretrained

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(args.model)).float().eval()
    with tempfile.TemporaryDirectory(prefix="cc-bench-heal-") as tmp:
        cli("compress", args.model, "--out", Path(tmp) / "c", "--rank", str(args.rank))
        model = from_pretrained(Path(tmp) / "c").float().eval()
    for m in (original, model):
        for p in m.parameters():
            p.requires_grad_(False)
    for p in trainable(model).values():
        p.requires_grad_(True)
    return original, model


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=None, help="SmolLM2 directory (default: the data cache)")
    ap.add_argument("--rank", type=int, default=128, help="compress --rank")
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--length", type=int, default=512, help="tokens per window")
    ap.add_argument("--windows", type=int, default=2, help="windows per round")
    ap.add_argument("--heal-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="arithmetic of the passes (torch.autocast), as compress --heal-dtype")
    args = ap.parse_args(argv)
    args.model = args.model or smollm2()
    if not (args.model / "model.safetensors").is_file():
        return missing(f"needs SmolLM2 in {args.model}")
    import torch

    from collabcompress.runtime.heal import SLICE_ELEMENTS, _Targets, trainable
    from collabcompress.commands.bench import interleaved, pair_ratio

    args.slice_elements = SLICE_ELEMENTS
    reference, model = _pair(args)

    params = list(trainable(model).values())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, reference.config.vocab_size, (args.windows, args.length), generator=g)
    compute = torch.bfloat16 if args.heal_dtype == "bfloat16" else torch.float32
    sliced = _Targets(reference, causal=True, model=model, probe=ids[0], compute=compute)
    if not sliced.split:
        raise SystemExit("healing does not slice this model's output layer: its logits are not the output layer "
                         "of its last hidden states")
    for i in range(args.windows):
        sliced(i, ids[i])  # the original's last hidden states, cached as healing caches them
    head = reference.get_output_embeddings()

    def whole_loss(i: int) -> torch.Tensor:  # (T, V) log-probabilities of both models
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the original's targets in float32
            log_p = torch.log_softmax(head(sliced.cache[i][None]).float(), -1)
        log_q = torch.log_softmax(model(input_ids=ids[i][None]).logits.float(), -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    losses = {"whole (T, V) logits": whole_loss, "slices": lambda i: sliced.loss(model, i, ids[i])}
    ratios, worst_loss, worst_grad = {}, 0.0, 0.0

    def arithmetic():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.heal_dtype == "bfloat16")

    def step(loss):
        for i in range(args.windows):
            with arithmetic():
                value = loss(i)
            value.backward()

    def check(loss):
        with torch.no_grad(), arithmetic():
            for i in range(args.windows):
                loss(i)

    judge = "moments (held-out check)"
    losses_of_check = {**losses, judge: lambda i: sliced.judge(model, i, ids[i])}
    for kind, run, ways in (("step", step, losses), ("check", check, losses_of_check)):
        names = list(ways)
        runs = [lambda loss=ways[name], run=run: run(loss) for name in names]
        times = interleaved(*runs, warmup=1, repeats=args.repeats)
        for name, t in zip(names, times):
            ratios.setdefault(name, {"way": name, "step_s": None, "step_ratio": None})
            ratios[name][f"{kind}_s"] = statistics.median(t) / args.windows
            ratios[name][f"{kind}_ratio"] = pair_ratio(times[0], t).median
    worst_judge = 0.0
    for i in range(args.windows):
        with arithmetic():
            got = [loss(i) for loss in losses.values()]
            judged = losses_of_check[judge](i)
        worst_judge = max(worst_judge, abs(float(judged) - float(got[1].detach())) / float(got[1].detach()))
        grads = [torch.autograd.grad(value, params) for value in got]
        worst_loss = max(worst_loss, abs(float(got[0].detach() - got[1].detach())) / float(got[0].detach()))
        for a, b in zip(*grads):
            worst_grad = max(worst_grad, float((a - b).abs().max() / a.abs().max().clamp(min=1e-30)))
    rows = [*ratios.values(), {"max_rel_loss_diff": worst_loss, "max_rel_grad_diff": worst_grad,
                               "max_rel_moments_check_diff": worst_judge}]
    return report(NAME, args, rows)


if __name__ == "__main__":
    sys.exit(main())
