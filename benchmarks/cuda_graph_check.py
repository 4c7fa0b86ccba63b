"""Do the CUDA-graph levers compute what the eager path computes? A one-minute check on a GPU.

    python benchmarks/cuda_graph_check.py                 # paper-size Glow, batch 64, 6 steps per case
    python benchmarks/cuda_graph_check.py --small         # K=4, 64 hidden: seconds

Per case (levers of benchmarks/flow_throughput.py without and with ``cudagraphs``): two copies of
one Glow train on the same batches with the same learning-rate schedule, one with the library's
eager ``training_step``, one with ``GraphedTrainingStep`` (3 eager warm-up steps, then capture and
replays); a batch with a NaN sample and a smaller last batch take the graphed path's eager
fallbacks. Printed per case: the largest per-step difference of the mean −log p (relative), the
parameters' relative difference at the end, whether skips and dropped samples agree, then
``GraphedCall`` against the eager forward (log p and per-scale maps). The graphs replay the eager
kernels on the same data, so differences come only from cuDNN's nondeterministic algorithms:
expect about 1e-6 relative in fp32 and 1e-3 in bf16 after a few steps. Exits 1 when a case fails
(tolerances: --tol-fp32, --tol-bf16), 2 without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from flow_throughput import LEVERS, glow  # benchmarks/ is on sys.path

from densead.flows import FastTraining, GraphedCall, resolve_fast_path
from densead.train import GraphedTrainingStep, set_learning_rate, training_step


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()).clamp_min(1e-30))


def check_case(lever: str, args: argparse.Namespace, device: torch.device) -> tuple[bool, str]:
    mode, bf16 = LEVERS[lever]
    fast = resolve_fast_path(mode, device)
    torch.manual_seed(0)
    initial = glow(args.small).to(device)
    models = [copy.deepcopy(initial), copy.deepcopy(initial)]
    prepared = [FastTraining(m, fast) for m in models]  # the same levers on both copies
    opts = [torch.optim.Adamax(m.parameters(), lr=5e-4, weight_decay=5e-5) for m in models]
    graphed = GraphedTrainingStep(models[1], opts[1], amp=bf16, max_grad_norm=100.0)
    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.rand(args.batch, 3, 32, 32, device=device, generator=g) - 0.5 for _ in range(args.steps)]
    batches[-2] = batches[-2].clone()
    batches[-2][1] = float("nan")  # dropped by both paths (the graphed one through its fallback)
    batches.append(torch.rand(args.batch // 2, 3, 32, 32, device=device, generator=g) - 0.5)  # other shape
    worst, agree = 0.0, True
    for step, x in enumerate(batches):
        for opt in opts:
            set_learning_rate(opt, 5e-4 * (step + 1) / len(batches))
        for p in prepared:
            p.before_step()
        want = training_step(models[0], opts[0], x, amp=bf16, max_grad_norm=100.0)
        got = graphed(x)
        agree &= (got.skipped, got.dropped) == (want.skipped, want.dropped)
        worst = max(worst, relative(got.nll.float(), want.nll.float()))
    params = relative(
        torch.cat([p.detach().flatten() for p in models[1].parameters()]),
        torch.cat([p.detach().flatten() for p in models[0].parameters()]),
    )
    captured = graphed.replays is not None

    model = models[1].eval()

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            out = model(x)
            return out.log_prob(), out.scale_pixel_maps()

    call = GraphedCall(forward)
    evals = []
    with torch.no_grad():
        for _ in range(4):  # 2 warm-ups, capture, replay
            x = torch.rand(args.batch, 3, 32, 32, device=device, generator=g) - 0.5
            lp, maps = call(x)
            ref_lp, ref_maps = forward(x)
            evals.append(
                max([relative(lp, ref_lp)] + [relative(a, b) for a, b in zip(maps, ref_maps, strict=True)])
            )
    tol = args.tol_bf16 if bf16 else args.tol_fp32
    ok = captured and agree and worst < tol and params < tol and max(evals) < tol and call.graph is not None
    row = (
        f"| {lever} | {fast} | {captured} | {agree} | {worst:.2e} | {params:.2e} | {max(evals):.2e} | "
        f"{'pass' if ok else 'FAIL'} |"
    )
    return ok, row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(  # on+cudagraphs: train.fast: auto on CUDA (fp32)
        "--levers", nargs="+", default=["cudagraphs", "on+cudagraphs", "all+cudagraphs"], choices=list(LEVERS)
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="full batches per case (one has a NaN sample)")
    p.add_argument("--small", action="store_true", help="K=4, 64 hidden instead of the paper's K=32, 512")
    p.add_argument("--tol-fp32", type=float, default=1e-4)
    p.add_argument("--tol-bf16", type=float, default=3e-2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("cuda_graph_check: needs a CUDA device (CUDA graphs); none here", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; batch {args.batch}")
    print(
        "\n| lever | fast | captured | skips/drops agree | mean −log p, worst step (rel.) "
        "| parameters (rel.) | eval graph (rel.) | result |\n|---|---|---|---|---:|---:|---:|---|"
    )
    failed = False
    for lever in args.levers:
        try:
            ok, row = check_case(lever, args, device)
        except Exception as err:  # noqa: BLE001 - a capture error is this check's finding
            ok, row = False, f"| {lever} | error: {' '.join(f'{type(err).__name__}: {err}'.split())[:200]} |"
        print(row, flush=True)
        failed |= not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
