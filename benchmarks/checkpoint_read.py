"""What reading a checkpoint's small entries costs: a whole read vs a mapped one.

    python benchmarks/checkpoint_read.py                       # the paper-size Glow (K=32, L=3, 512)
    python benchmarks/checkpoint_read.py configs/tinyimagenet_glow.yaml --repeats 5

Resuming, reusing a finished experiment stage, recording the step a stage starts from and
printing the last bits/dim only need a checkpoint's step, flags, config or history. This
writes a checkpoint as ``train_glow`` does (weights, Adam state after one step, config,
history) for the config's model, then reads it in fresh processes, each once: the whole file
(``load_checkpoint(path)``) and mapped (``load_checkpoint(path, mmap=True)``), and prints the
median wall time and how far the read raised the process's peak resident memory (after
importing densead), with ratios to the whole read of the same run (Linux: /proc). The file is
in the page cache after it is written, so the times are those of a warm cache; a cold one only
widens the gap. A mapped read still unpickles every tensor's record (thousands for this model),
which is most of its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from densead.config import TrainRunConfig, load_config, to_dict
from densead.io import atomic_torch_save
from densead.train import build_glow, build_optimizer, portable_optimizer_state

# Peak memory from /proc (VmHWM, in kB), which starts anew with the process image: getrusage's
# ru_maxrss would carry over the writing parent's peak through fork and exec.
READER = """
import json, sys, time
from pathlib import Path
from densead.train import load_checkpoint
def peak_mb():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
before = peak_mb()
start = time.perf_counter()
ckpt = load_checkpoint(sys.argv[1], mmap=sys.argv[2] == "mapped")
step, history = int(ckpt["step"]), ckpt["history"]
seconds = time.perf_counter() - start
print(json.dumps({"s": seconds, "rss_mb": peak_mb() - before, "step": step, "n_history": len(history)}))
"""


def write_checkpoint(config: str, path: Path) -> tuple[int, float]:
    """A checkpoint of ``config``'s model as train_glow writes it; (parameters, file MB)."""
    cfg = load_config(TrainRunConfig, config, [])
    model = build_glow(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    for p in model.parameters():  # one step, so the optimizer holds its moment estimates
        p.grad = torch.zeros_like(p)
    optimizer.step()
    history = [[s, 3.5, 0.0] for s in range(0, cfg.train.steps, cfg.train.log_every)]
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": portable_optimizer_state(optimizer),
            "step": cfg.train.steps,
            "finished": True,
            "history": history,
            "model_config": to_dict(cfg.model),
            "config": to_dict(cfg),
        },
        path,
    )
    return sum(p.numel() for p in model.parameters()), path.stat().st_size / 2**20


def read(path: Path, how: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", READER, str(path), how], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/cifar10_glow.yaml", help="a train_flow.py config")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per way of reading")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        n_params, mb = write_checkpoint(args.config, path)
        print(f"{args.config}: {n_params / 1e6:.1f}M parameters, checkpoint {mb:.0f} MB")
        runs = {how: [read(path, how) for _ in range(args.repeats)] for how in ("whole", "mapped")}
    base = runs["whole"]
    seen = {(r["step"], r["n_history"]) for rs in runs.values() for r in rs}
    if len(seen) != 1:
        raise SystemExit("the two reads disagree on the checkpoint's step or history")
    base_s = statistics.median(r["s"] for r in base)
    base_mb = statistics.median(r["rss_mb"] for r in base)
    print(f"{'read':8} {'median s':>9} {'+peak RSS MB':>12} {'time vs whole':>14} {'RSS vs whole':>13}")
    for how, rs in runs.items():
        s, rss = statistics.median(r["s"] for r in rs), statistics.median(r["rss_mb"] for r in rs)
        print(f"{how:8} {s:9.3f} {rss:12.0f} {s / base_s:14.3f} {rss / base_mb:13.3f}")


if __name__ == "__main__":
    main()
