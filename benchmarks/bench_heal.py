#!/usr/bin/env python
"""One healing step of the real SmolLM2-135M-Instruct: the output layer in slices against whole logits.

Side by side in one run, on the model compressed data-free at ``--rank`` (the time of a step
does not depend on how good the fit is) and ``--windows`` seeded random ``--length``-token
windows:

- the distillation loss of a window with its gradient (forward and backward pass of the
  compressed model; the original's last hidden states cached, as healing caches them) and
  without (a held-out window's check), ``--repeats`` rounds after one warm-up, the two ways
  interleaved (:func:`collabcompress.commands.bench.interleaved`; medians, and the median of the
  per-round ratios), with
  the loss through :class:`collabcompress.runtime.heal._HeadKL` (slices of
  :data:`collabcompress.runtime.heal.SLICE_ELEMENTS` floats) and through whole (T, V) logits of both
  models, as healing computed it before;
- the held-out check as healing runs it: from the moments of the original's distributions
  (:meth:`collabcompress.runtime.heal._Targets.judge`, one pass of the output layer), interleaved with
  the other two checks;
- the largest relative difference between the two losses and between their gradients, and
  between the check from moments and the sliced loss.

    python scripts/fetch_data.py            # once: SmolLM2
    python benchmarks/bench_heal.py [--threads 2] [--json PATH]
"""

from __future__ import annotations

import json
import statistics

import torch

from _common import smollm2_pair, smollm2_parser


def main() -> int:
    ap = smollm2_parser(__doc__, repeats=3)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--heal-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="arithmetic of the passes (torch.autocast), as compress --heal-dtype")
    args = ap.parse_args()
    loaded = smollm2_pair(args)
    if loaded is None:
        return 2
    model_dir, reference, model = loaded
    from collabcompress.runtime.heal import SLICE_ELEMENTS, _Targets, trainable
    from collabcompress.commands.bench import interleaved, pair_ratio

    params = list(trainable(model).values())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, reference.config.vocab_size, (args.windows, args.length), generator=g)
    compute = torch.bfloat16 if args.heal_dtype == "bfloat16" else torch.float32
    sliced = _Targets(reference, causal=True, model=model, probe=ids[0], compute=compute)
    assert sliced.split, "SmolLM2's logits are its output layer of its last hidden states"
    for i in range(args.windows):
        sliced(i, ids[i])  # the original's last hidden states, cached as healing caches them
    head = reference.get_output_embeddings()

    def whole_loss(i: int) -> torch.Tensor:  # the previous code: (T, V) log-probabilities of both models
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the original's targets in float32
            log_p = torch.log_softmax(head(sliced.cache[i][None]).float(), -1)
        log_q = torch.log_softmax(model(input_ids=ids[i][None]).logits.float(), -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    losses = {"whole (T, V) logits": whole_loss, "slices": lambda i: sliced.loss(model, i, ids[i])}
    rows, worst_loss, worst_grad = {}, 0.0, 0.0

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
        times = interleaved(*[lambda loss=ways[name]: run(loss) for name in names], warmup=1, repeats=args.repeats)
        for name, t in zip(names, times):
            rows.setdefault(name, {})[f"{kind}_s"] = statistics.median(t) / args.windows
            rows[name][f"{kind}_ratio"] = pair_ratio(times[0], t).median
    worst_judge = 0.0
    for i in range(args.windows):
        with arithmetic():
            got = [loss(i) for loss in losses.values()]
            judged = losses_of_check[judge](i)
        worst_judge = max(worst_judge, abs(judged - float(got[1].detach())) / float(got[1].detach()))
        grads = [torch.autograd.grad(value, params) for value in got]
        worst_loss = max(worst_loss, abs(float(got[0].detach() - got[1].detach())) / float(got[0].detach()))
        for a, b in zip(*grads):
            worst_grad = max(worst_grad, float((a - b).abs().max() / a.abs().max().clamp(min=1e-30)))
    result = {"model": str(model_dir), "rank": args.rank, "length": args.length, "threads": args.threads,
              "heal_dtype": args.heal_dtype,
              "slice_elements": SLICE_ELEMENTS, "rows": rows, "max_rel_loss_diff": worst_loss,
              "max_rel_grad_diff": worst_grad, "max_rel_judge_diff": worst_judge}
    print(f"SmolLM2-135M-Instruct, one {args.length}-token window, rank {args.rank}, {args.threads} threads, "
          f"{args.heal_dtype}, median of {args.repeats} over {args.windows} windows")
    print("| output layer and KL | loss + gradient (training step) | loss alone (held-out check) |")
    print("|---|---|---|")
    for name, row in rows.items():
        step_cell = f"{row['step_s']:.2f} s ({row['step_ratio']:.2f}x)" if "step_s" in row else "-"
        print(f"| {name} | {step_cell} | {row['check_s']:.2f} s ({row['check_ratio']:.2f}x) |")
    print(f"largest relative difference: loss {worst_loss:.1e}, gradient {worst_grad:.1e}, "
          f"check from moments against slices {worst_judge:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
