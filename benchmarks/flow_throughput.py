"""Throughput and memory of the flow core: training, evaluation, dense scoring.

    python benchmarks/flow_throughput.py                      # paper-size Glow, batch 64 and 256
    python benchmarks/flow_throughput.py --levers plain bf16 channels_last compile all
    python benchmarks/flow_throughput.py --small --batch-sizes 16 --iters 3   # quick CPU check

Prints one table: per lever and batch size, training images/s (forward +
backward + Adamax step), evaluation images/s (noise-free log p and per-scale
maps), peak memory, optional bits/dim after --bpd-steps training steps on real
CIFAR-10 images, and the speed-up against the plain fp32 path of the same run.
Then dense scoring: frames/s of the Glow's pixel decomposition and of a
per-pixel feature flow at road-scene size. Timings are for the device named in
the header; compare ratios only within one run.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from densead.data.transforms import to_model_input
from densead.flows import FeatureFlow, Glow

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10_test.npz"
LEVERS = ("plain", "bf16", "channels_last", "compile", "all")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB → GiB)


def build(lever: str, small: bool, device: torch.device) -> tuple[Glow, Callable, bool, bool]:
    torch.manual_seed(0)
    model = Glow(3, 3, 4, 64) if small else Glow(3, 3, 32, 512)
    model = model.to(device)
    bf16 = lever in ("bf16", "all")
    channels_last = lever in ("channels_last", "all")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fn = torch.compile(model) if lever in ("compile", "all") else model
    return model, fn, bf16, channels_last


def timed(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    fn()  # warm-up (compilation, cuDNN autotuning, ActNorm init)
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def bench_lever(lever: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    model, fn, bf16, cl = build(lever, args.small, device)
    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, weight_decay=5e-5)
    x = torch.rand(batch, 3, 32, 32, device=device) - 0.5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = -fn(x).log_prob().mean()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fn(x)
            out.log_prob()
            out.scale_pixel_maps()

    model.train()
    t_train = timed(train_step, args.iters, device)
    model.eval()
    t_eval = timed(eval_step, args.iters, device)
    row = {
        "lever": lever,
        "batch": batch,
        "train": batch / t_train,
        "eval": batch / t_eval,
        "peak": peak_gb(device),
    }
    row["bpd"] = bpd_after(lever, batch, args, device) if args.bpd_steps else float("nan")
    return row


def bpd_after(lever: str, batch: int, args: argparse.Namespace, device: torch.device) -> float:
    """Noise-free test bits/dim after --bpd-steps steps on CIFAR-10 test images 0–7999 (test: 8000–9999)."""
    with np.load(CIFAR) as f:
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous().to(device)
    train, test = images[:8000], images[8000:]
    model, fn, bf16, cl = build(lever, args.small, device)
    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, weight_decay=5e-5)
    g = torch.Generator(device=device).manual_seed(0)
    model.train()
    for step in range(args.bpd_steps):
        idx = torch.randint(0, len(train), (batch,), generator=g, device=device)
        x = to_model_input(train[idx], 256, dequantize=True, generator=g)
        for group in opt.param_groups:
            group["lr"] = 5e-4 * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = -fn(x.contiguous(memory_format=torch.channels_last) if cl else x).log_prob().mean()
        loss.backward()
        opt.step()
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(test), 500):
            total += (
                model(to_model_input(test[i : i + 500], 256, dequantize=False)).bits_per_dim().sum().item()
            )
    return total / len(test)


def bench_dense(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, float]]:
    h, w = args.dense_size
    rows = []
    glow = (Glow(3, 3, 4, 64) if args.small else Glow(3, 3, 32, 512)).to(device).eval()
    x = torch.rand(1, 3, h, w, device=device) - 0.5

    @torch.no_grad()
    def glow_map() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dense_bf16):
            glow(x).pixel_map()

    rows.append(("Glow pixel map (all scales)", f"1×3×{h}×{w}", 1 / timed(glow_map, args.iters, device)))
    flow = FeatureFlow(256, n_steps=8, hidden=256).to(device).eval()
    feats = torch.randn(1, 256, h // 8, w // 8, device=device)

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--levers", nargs="+", default=["plain"], choices=LEVERS)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--small", action="store_true", help="K=4, 64 hidden instead of the paper's K=32, 512")
    p.add_argument("--bpd-steps", type=int, default=0, help="also train this many steps on CIFAR-10 per row")
    p.add_argument("--dense-size", type=int, nargs=2, default=None, help="H W of the dense inputs")
    p.add_argument("--dense-bf16", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
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
    n_params = sum(p.numel() for p in (Glow(3, 3, 4, 64) if args.small else Glow(3, 3, 32, 512)).parameters())
    print(
        f"device: {name}; torch {torch.__version__}; Glow {size}, {n_params / 1e6:.1f}M parameters; 32×32×3"
    )
    peak = "peak GB" if device.type == "cuda" else "peak RSS GB"
    print(f"\n| lever | batch | train img/s | eval img/s | {peak} | bpd | train speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base: dict[int, float] = {}
    for batch in args.batch_sizes:
        for lever in args.levers:
            r = bench_lever(lever, batch, args, device)
            base.setdefault(batch, r["train"] if lever == "plain" else math.nan)
            speed = r["train"] / base[batch]
            bpd = "—" if math.isnan(r["bpd"]) else f"{r['bpd']:.3f}"
            print(
                f"| {lever} | {batch} | {r['train']:.1f} | {r['eval']:.1f} | {r['peak']:.2f} | {bpd} | "
                f"{speed:.2f}× |",
                flush=True,
            )
    print("\n| dense scoring | input | frames/s |\n|---|---|---:|")
    for label, shape, fps in bench_dense(args, device):
        print(f"| {label} | {shape} | {fps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
