"""Where a training step's time goes: host (launching kernels) or GPU (running them).

    python benchmarks/profile_step.py                                   # paper-size Glow, batch 256
    python benchmarks/profile_step.py --levers plain all all+cudagraphs --batch 256 --top 12
    python benchmarks/profile_step.py --small --batch 8 --steps 2       # quick CPU check

Per lever of benchmarks/flow_throughput.py (the same library switches and the library's training
step), a few steps after warm-up under ``torch.profiler``: wall time per step, the time the GPU
spent in kernels per step, kernels launched per step, ATen operators dispatched per step (nested
calls counted too: the host's work, measurable on a CPU as well), the operators that reach a backend
per eager step (views and metadata excluded: about one kernel each; none depends on the device, so a
CPU run counts what a GPU step dispatches; not for compiled or graphed steps, which bypass the
dispatcher), the scalar reads to the host among them, counted apart (no kernel: one per parameter
for Adamax's step counters, on the CPU in a CUDA run, and the norm check, the step's one sync) and
the ratio of the two times. Wall time
far above kernel time means the step is bound by the host (Python, dispatch, launches), which
only fewer launches (compile, CUDA graphs) cure; the reverse means the kernels themselves need
to get faster. Then the top kernels by GPU time, per lever. Session 6 (H200, torch 2.11) found
the eager step host-bound: plain fp32 at batch 256, 232 ms wall (unprofiled) for 141 ms of
kernels; bf16 + fused + channels_last, 276 ms for 77 ms; about 10,000 launches per step.

The profiler adds host time per launch, so wall times here are above the unprofiled ones of
flow_throughput.py; compare kernel times and launch counts, and wall times only within this table.
"""

from __future__ import annotations

import argparse
import time

import torch
from flow_throughput import LEVERS, build  # benchmarks/ is on sys.path
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from densead.train import step_function


class CountOps(TorchDispatchMode):
    """Counts the operators that reach a backend (forward, backward and optimizer), views and
    metadata-only operators excluded: about the kernels an eager step asks a device for (a CUDA
    convolution with a bias launches a few). Scalar reads to the host (``.item()``, ``bool(t)``)
    are counted apart, in ``reads``: they launch no kernel, and all but one of a step's are the
    Adamax step counters, which in a CUDA run (not ``capturable``) live on the CPU; the one left
    is the norm check, the step's one host sync. Meant for CPU runs: whether the mode also sees
    the backward pass in CUDA's autograd worker threads is not checked."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch API
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.reads += 1
        elif not func.is_view and name not in METADATA_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


# Operators that launch no kernel (besides views, which ``func.is_view`` names).
METADATA_OPS = {"detach", "empty", "empty_strided", "empty_like", "set_", "resize_"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", nargs="+", default=["plain", "all", "all+cudagraphs"], choices=list(LEVERS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per lever (after 5 warm-up steps)")
    p.add_argument("--top", type=int, default=8, help="kernels listed per lever")
    p.add_argument("--small", action="store_true", help="K=4, 64 hidden instead of the paper's K=32, 512")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; {args.steps} profiled steps")
    # Each row is printed when its lever is done (a run cut short keeps them), the kernels after the table.
    print(
        "\n| lever | wall ms/step (profiled) | GPU kernel ms/step | kernels/step | aten ops/step (nested) "
        "| backend ops/step (no views) | scalar reads/step | wall / kernel |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    tops = []
    for lever in args.levers:
        try:
            model, fast, bf16 = build(lever, args.small, device)
            # foreach on every device, as PyTorch picks on CUDA: the counts of a CPU run then match
            opt = torch.optim.Adamax(model.parameters(), lr=5e-4, weight_decay=5e-5, foreach=True)
            step = step_function(model, opt, fast.fast, amp=bf16)
        except ValueError as err:  # cudagraphs off CUDA
            print(f"| {lever} | skipped: {err} | — | — | — | — | — | — |", flush=True)
            continue
        x = torch.rand(args.batch, 3, 32, 32, device=device) - 0.5
        model.train()
        for _ in range(5):  # ActNorm init, compile, cuDNN autotuning, graph capture
            fast.before_step()
            step(x)
        ops = reads = "—"  # compiled code and graph replays bypass the dispatcher
        if not (fast.fast.compile or fast.fast.cudagraphs):
            with CountOps() as counter:
                step(x)
            ops, reads = str(counter.count), str(counter.reads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                fast.before_step()
                step(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = (time.perf_counter() - t) / args.steps
        events = prof.events()
        # device activity (kernels, copies), without user annotations' spans (Optimizer.step#...)
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        aten = sum(e.device_type == DeviceType.CPU and e.name.startswith("aten::") for e in events)
        gpu = sum(e.self_device_time_total for e in kernels) / 1e6 / args.steps  # µs → s
        ratio = f"{wall / gpu:.2f}" if gpu else "—"
        print(
            f"| {lever} | {1e3 * wall:.1f} | {1e3 * gpu:.1f} | {len(kernels) / args.steps:.0f} | "
            f"{aten / args.steps:.0f} | {ops} | {reads} | {ratio} |",
            flush=True,
        )
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            entry = by_name.setdefault(e.name[:90], [0.0, 0])
            entry[0] += e.self_device_time_total / 1e3 / args.steps
            entry[1] += 1 / args.steps
        tops.append((lever, sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]))
    for lever, top in tops:
        print(f"\n| {lever}: kernel | ms/step | launches/step |\n|---|---:|---:|")
        for kernel, (ms, count) in top:
            print(f"| `{kernel}` | {ms:.2f} | {count:.0f} |")


if __name__ == "__main__":
    main()
