"""Throughput and memory of the flow core: training, evaluation, dense scoring.

    python benchmarks/flow_throughput.py                      # paper-size Glow, batch 64 and 256
    python benchmarks/flow_throughput.py --levers plain bf16 channels_last compile fused recompute all
    python benchmarks/flow_throughput.py --batch-sizes 1024 --levers all all+recompute all+cudagraphs
    python benchmarks/flow_throughput.py --small --batch-sizes 16 --iters 3   # quick CPU check
    python benchmarks/flow_throughput.py --batch-sizes 64 --levers all+cudagraphs \
        --bpd-steps 2000 --bpd-every 250                         # a bits/dim trajectory only

Every lever is a library switch: ``bf16`` is ``TrainConfig.amp`` (autocast),
the others are modes of ``TrainConfig.fast`` (densead/flows/fast.py):
``channels_last``, ``compile`` (each flow step compiled in place), ``fused``
(ActNorm + 1×1 conv as one convolution), ``recompute`` (activations recomputed
in the backward pass: less memory, more compute), ``cudagraphs`` (the whole
training step replayed from CUDA graphs, ``densead.train.GraphedTrainingStep``,
and the evaluation forward from one, ``GraphedCall``; CUDA only, its rows are
skipped elsewhere); ``all`` is ``fast=on`` plus bf16, ``all+X`` adds lever X,
``all-compile+cudagraphs`` is ``all`` without compile, graphed, and ``on+cudagraphs`` is
``train.fast: auto`` on CUDA for the image Glow (fp32 with every speed lever and graphs).
Every row trains with the library's ``training_step`` (gradient norm and its
finiteness check included), as ``train_glow`` does.

Prints one table: per lever and batch size, training images/s (forward +
backward + Adamax step), evaluation images/s (noise-free log p and per-scale
maps), peak memory (CUDA allocator; process RSS on CPU), activation memory
kept for the backward pass per image (saved-tensor hooks, any device),
optional bits/dim after --bpd-steps training steps on real
CIFAR-10 images, the speed-up against the plain fp32 path of the same run, and
the achieved fraction of the GPU's dense peak FLOP/s (convolution and matmul
FLOPs counted with FlopCounterMode; bf16 rows against the bf16 peak, others
against the TF32 peak; "n/a" for devices not in PEAK_FLOPS). Then dense
scoring: frames/s of the Glow's pixel decomposition and of a per-pixel feature
flow at road-scene size. Timings are for the device named in the header;
compare ratios only within one run.

CIFAR-10 comes from --cifar, else $DENSEAD_CIFAR, else ../shared/data/cifar10_test.npz.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from densead.data.transforms import to_model_input
from densead.flows import (
    FastTraining,
    FeatureFlow,
    Glow,
    GraphedCall,
    apply_fast_path,
    resolve_fast_path,
    set_fused,
)
from densead.flows.fast import saved_tensor_bytes
from densead.train import set_learning_rate, step_function

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10_test.npz"
# lever -> (TrainConfig.fast mode, TrainConfig.amp)
LEVERS = {
    "plain": ("off", False),
    "bf16": ("off", True),
    "channels_last": ("channels_last", False),
    "compile": ("compile", False),
    "fused": ("fused", False),
    "recompute": ("recompute", False),
    "cudagraphs": ("cudagraphs", False),
    "all": ("on", True),
    "all+recompute": ("on,recompute", True),
    "all+cudagraphs": ("on,cudagraphs", True),
    # what train.fast: auto gives the image trainer on CUDA (amp off): fp32, fused, channels_last,
    # compile, graphs
    "on+cudagraphs": ("on,cudagraphs", False),
    # all levers but compile, graphed: the fallback if compiled steps do not capture
    "all-compile+cudagraphs": ("fused,channels_last,cudagraphs", True),
}
# Dense (no sparsity) peak FLOP/s as (bf16, tf32), from NVIDIA's data sheets, by device-name substring;
# the first match wins, so the PCIe entry comes before the generic H100 (SXM, "H100 80GB HBM3").
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.7e12),
    ("H200", 989e12, 494.7e12),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a row's peak memory anew: the CUDA allocator's, or (Linux) the process's peak RSS,
    VmHWM, which writing 5 to clear_refs sets to the current RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def release(device: torch.device) -> int:
    """Free what earlier rows left (reference cycles: models, optimizers, CUDA graphs and their memory
    pools) and return the bytes the CUDA allocator still holds (0 elsewhere): a row's peak is counted
    above it. Session 20's table had no such step, and the rows after its graphed rows peaked up to
    3.4 GB above their session-6 values (recompute: 16.86 against 13.42 GB)."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def peak_gb(device: torch.device, base: int = 0) -> float:
    """Peak since :func:`reset_peak`: CUDA allocator (above ``base`` bytes, see :func:`release`), or
    peak RSS (VmHWM; where /proc has none, the process's peak since it started)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**30
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(x for x in status if x.startswith("VmHWM")).split()[1]) / 2**20  # kB → GiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def glow(small: bool) -> Glow:
    return Glow(3, 3, 4, 64) if small else Glow(3, 3, 32, 512)


def build(lever: str, small: bool, device: torch.device, seed: int = 0) -> tuple[Glow, FastTraining, bool]:
    """A new Glow (initialized from ``seed``) with the lever's library switches, as ``train_glow``
    pulls them (compile once ActNorm is initialized: call ``before_step`` before every step)."""
    torch.manual_seed(seed)
    torch._dynamo.reset()  # each row compiles from scratch, within dynamo's recompile limit
    mode, bf16 = LEVERS[lever]
    model = glow(small).to(device)
    return model, FastTraining(model, resolve_fast_path(mode, device)), bf16


def peak_flops(device: torch.device, bf16: bool) -> float:
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    for key, bf16_peak, tf32_peak in PEAK_FLOPS:
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return math.nan


def flops_per_image(small: bool, device: torch.device) -> tuple[float, float]:
    """(train, eval) FLOPs per 32×32 image: convolutions and matmuls of forward (+ backward)."""
    model = glow(small).to(device).eval()  # eval: no ActNorm init, identical FLOPs
    x = torch.rand(1, 3, 32, 32, device=device) - 0.5
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x).log_prob()
    eval_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(x).log_prob().sum().backward()
    return float(counter.get_total_flops()), float(eval_flops)


def saved_mb_per_image(lever: str, small: bool, device: torch.device, batch: int = 8) -> float:
    """MiB per image that autograd keeps from the forward pass for the backward pass (activation
    memory, counted with saved-tensor hooks on an eager model with the lever's switches; the same
    on every device, so CPU runs show the memory levers too)."""
    mode, bf16 = LEVERS[lever]
    fast = resolve_fast_path(mode, device)
    model = glow(small).to(device).set_fast(fast.fused, fast.channels_last, fast.recompute)
    x = torch.rand(batch, 3, 32, 32, device=device) - 0.5
    with torch.no_grad():
        model.train()(x)  # ActNorm init first: fused and recompute wait for it
    with saved_tensor_bytes() as saved, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(x).log_prob().mean()
    return saved.total / batch / 2**20


def timed(fn: Callable[[], None], iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):  # compilation, cuDNN autotuning, ActNorm init, graph capture
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def bench_lever(lever: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    base = release(device)
    model, fast, bf16 = build(lever, args.small, device)
    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, weight_decay=5e-5)
    x = torch.rand(batch, 3, 32, 32, device=device) - 0.5  # Glow.forward converts to channels_last
    reset_peak(device)

    step = step_function(model, opt, fast.fast, amp=bf16)  # as train_glow runs it

    def train_step() -> None:
        fast.before_step()
        step(x)

    graphs = fast.fast.cudagraphs  # GraphedTrainingStep / GraphedCall capture after their warm-ups
    # (autocast's weight cache off, as in the library's steps: graphs must not capture it)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            out = model(x)
            return out.log_prob(), out.scale_pixel_maps()

    graphed = GraphedCall(forward) if graphs else forward

    @torch.no_grad()
    def eval_step() -> None:
        graphed(x)

    model.train()
    # Timed after the graphs' own eager warm-up calls, the capture and one replay.
    t_train = timed(train_step, args.iters, device, warmup=step.warmup + 2 if graphs else 2)
    model.eval()
    t_eval = timed(eval_step, args.iters, device, warmup=graphed.warmup + 2 if graphs else 2)
    row = {
        "lever": lever,
        "batch": batch,
        "fast": str(fast.fast),
        "bf16": bf16,
        "train": batch / t_train,
        "eval": batch / t_eval,
        "peak": peak_gb(device, base),
        "saved": saved_mb_per_image(lever, args.small, device),
    }
    row["bpd"] = bpd_after(lever, batch, args, device) if args.bpd_steps else float("nan")
    return row


def bpd_after(
    lever: str, batch: int, args: argparse.Namespace, device: torch.device, every: int = 0
) -> float:
    """Noise-free test bits/dim after --bpd-steps steps on CIFAR-10 test images 0–7999 (test: 8000–9999).

    With ``every`` > 0, also prints a trajectory row every ``every`` steps (test bits/dim, training
    images/s so far, evaluation excluded), so a run cut short still compares levers step for step.
    """
    with np.load(args.cifar) as f:
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous().to(device)
    train_images, test = images[:8000], images[8000:]
    model, fast, bf16 = build(lever, args.small, device, args.seed)
    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, weight_decay=5e-5)
    g = torch.Generator(device=device).manual_seed(args.seed)  # batches and dequantization noise
    label = lever if args.seed == 0 else f"{lever}, seed {args.seed}"
    plain = glow(args.small).to(device)  # evaluation: an uncompiled fp32 copy without levers

    def test_bpd(own: bool = False) -> float:
        """Test bits/dim through the plain copy, or (``own``) through the lever's own eval path."""
        if own:
            net = model.eval()
        else:
            plain.load_state_dict(model.state_dict())
            net = plain.eval()
        total = 0.0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=own and bf16):
            for i in range(0, len(test), 500):
                x = to_model_input(test[i : i + 500], 256, dequantize=False)
                total += net(x).bits_per_dim().float().sum().item()
        model.train()
        return total / len(test)

    model.train()
    train = step_function(model, opt, fast.fast, amp=bf16)
    train_time, t = 0.0, time.perf_counter()
    for step in range(args.bpd_steps):
        idx = torch.randint(0, len(train_images), (batch,), generator=g, device=device)
        x = to_model_input(train_images[idx], 256, dequantize=True, generator=g)
        set_learning_rate(opt, 5e-4 * min(1.0, (step + 1) / 200))
        fast.before_step()
        train(x)
        if every and (step + 1) % every == 0 and step + 1 < args.bpd_steps:
            sync(device)
            train_time += time.perf_counter() - t
            rate = (step + 1) * batch / train_time
            print(f"| {label} | {batch} | {step + 1} | {test_bpd():.4f} | {rate:.1f} | — |", flush=True)
            t = time.perf_counter()
    sync(device)
    train_time += time.perf_counter() - t
    bpd = test_bpd()
    if every:
        rate = args.bpd_steps * batch / train_time
        own = test_bpd(own=True)
        print(f"| {label} | {batch} | {args.bpd_steps} | {bpd:.4f} | {rate:.1f} | {own:.4f} |", flush=True)
    return bpd


def bench_dense(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, float]]:
    """Frames/s of dense maps; --dense-fast picks the levers (ActNorms initialized on the input
    first, so ``fused`` is taken)."""
    h, w = args.dense_size
    fast = resolve_fast_path(args.dense_fast, device, allow_compile=False)
    rows = []
    model = glow(args.small).to(device)
    x = torch.rand(1, 3, h, w, device=device) - 0.5
    with torch.no_grad():
        model.train()(x)
    apply_fast_path(model.eval(), fast)

    @torch.no_grad()
    def glow_map() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dense_bf16):
            model(x).pixel_map()

    rows.append(("Glow pixel map (all scales)", f"1×3×{h}×{w}", 1 / timed(glow_map, args.iters, device)))
    flow = FeatureFlow(256, n_steps=8, hidden=256).to(device)
    feats = torch.randn(1, 256, h // 8, w // 8, device=device)
    with torch.no_grad():
        flow.train()(feats)
    flow.eval()
    set_fused(flow, fast.fused)  # FeatureFlow has no channels_last switch

    @torch.no_grad()
    def feature_map() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dense_bf16):
            flow.log_prob_map(feats)

    rows.append(
        (
            "feature flow (8 steps, 256-d)",
            f"1×256×{h // 8}×{w // 8}",
            1 / timed(feature_map, args.iters, device),
        )
    )
    return rows


def percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[64, 256], help="none: dense table only")
    p.add_argument("--levers", nargs="+", default=["plain"], choices=list(LEVERS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--small", action="store_true", help="K=4, 64 hidden instead of the paper's K=32, 512")
    p.add_argument("--bpd-steps", type=int, default=0, help="also train this many steps on CIFAR-10 per row")
    p.add_argument(
        "--bpd-every",
        type=int,
        default=0,
        help="trajectory only: per batch size and lever, train --bpd-steps steps and print the test "
        "bits/dim every this many steps (no throughput table, no dense table)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="bits/dim runs: seed of the model's initialization, the batches and the dequantization "
        "noise (a second seed of the same lever measures run-to-run noise)",
    )
    p.add_argument("--cifar", type=Path, default=Path(os.environ.get("DENSEAD_CIFAR", CIFAR)))
    p.add_argument("--dense-size", type=int, nargs=2, default=None, help="H W of the dense inputs")
    p.add_argument("--dense-bf16", action="store_true")
    p.add_argument("--dense-fast", default="off", help="TrainConfig.fast mode for dense scoring (no compile)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-scoring table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.bpd_steps and not args.cifar.is_file():
        p.error(f"--bpd-steps needs CIFAR-10: {args.cifar} not found (set --cifar or DENSEAD_CIFAR)")
    if args.dense_size is None:
        args.dense_size = (1024, 2048) if device.type == "cuda" else (128, 256)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    size = "K=4, 64 hidden (small)" if args.small else "K=32, L=3, 512 hidden (paper)"
    n_params = sum(p.numel() for p in glow(args.small).parameters())
    if args.bpd_every:
        if not args.bpd_steps:
            p.error("--bpd-every needs --bpd-steps")
        print(f"device: {name}; torch {torch.__version__}; Glow {size}, {n_params / 1e6:.1f}M parameters")
        print(
            "\n| lever | batch | step | test bpd | train img/s (incl. compile) | bpd, lever's eval path |"
            "\n|---|---:|---:|---:|---:|---:|"
        )
        for batch in args.batch_sizes:
            for lever in args.levers:
                bpd_after(lever, batch, args, device, every=args.bpd_every)
        return
    train_flops, eval_flops = flops_per_image(args.small, device)
    print(
        f"device: {name}; torch {torch.__version__}; Glow {size}, {n_params / 1e6:.1f}M parameters; 32×32×3; "
        f"{train_flops / 1e9:.2f} GFLOP/img train, {eval_flops / 1e9:.2f} GFLOP/img eval"
    )
    peak = "peak GB" if device.type == "cuda" else "peak RSS GB"
    if args.batch_sizes:
        print(
            f"\n| lever | fast | batch | train img/s | eval img/s | {peak} | saved MiB/img | bpd "
            "| train speed-up | train % of peak | eval % of peak |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base: dict[int, float] = {}  # plain's train img/s per batch: each row's speed-up is against it
    levers = sorted(args.levers, key=lambda lever: lever != "plain")  # plain first, when asked for
    for batch in args.batch_sizes:
        for lever in levers:
            try:
                resolve_fast_path(LEVERS[lever][0], device)
            except ValueError as err:  # cudagraphs off CUDA
                print(f"| {lever} | skipped: {err} | {batch} |" + " — |" * 8, flush=True)
                continue
            try:
                r = bench_lever(lever, batch, args, device)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # out of memory, a compile failure
                msg = " ".join(f"{type(err).__name__}: {err}".split())[:160]
                print(f"| {lever} | failed: {msg} | {batch} |" + " — |" * 8, flush=True)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if lever == "plain":
                base[batch] = r["train"]
            speed = f"{r['train'] / base[batch]:.2f}×" if batch in base else "—"  # no plain row: no ratio
            bpd = "—" if math.isnan(r["bpd"]) else f"{r['bpd']:.3f}"
            peak_fl = peak_flops(device, r["bf16"])
            fast = r["fast"] + (" +bf16" if r["bf16"] else "")
            print(
                f"| {lever} | {fast} | {batch} | {r['train']:.1f} | {r['eval']:.1f} | {r['peak']:.2f} | "
                f"{r['saved']:.2f} | "
                f"{bpd} | {speed} | {percent(r['train'] * train_flops / peak_fl)} | "
                f"{percent(r['eval'] * eval_flops / peak_fl)} |",
                flush=True,
            )
    if args.no_dense:
        return
    dense_fast = str(resolve_fast_path(args.dense_fast, device, allow_compile=False))
    print(f"\n| dense scoring (fast: {dense_fast}, bf16: {args.dense_bf16}) | input | frames/s |")
    print("|---|---|---:|")
    for label, shape, fps in bench_dense(args, device):
        print(f"| {label} | {shape} | {fps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
