"""torchrun / DistributedDataParallel on CPU with gloo: 2 processes against 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import yaml
from sklearn.datasets import load_digits

from densead.config import DataConfig, ModelConfig, TrainConfig, TrainRunConfig, to_dict
from densead.train import load_checkpoint, train_glow

REPO = Path(__file__).resolve().parents[1]
DIGITS = DataConfig(source="sklearn_digits", channels=1, size=8, stop=400, augment="translate")
TINY = ModelConfig(in_channels=1, n_scales=2, n_steps=2, hidden=16, n_bins=17)
# With SGD, parameters after N steps equal the single-process run up to float32
# summation order of the gradient all-reduce (measured: 2e-7 after 4 steps).
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# Adamax's first steps move every parameter by ±lr along sign(gradient), so a
# gradient that is zero up to rounding can flip sign between the two runs: its
# parameter may then differ by up to 2·lr per step; all others stay close.
LR = 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_for(out: Path, steps: int = 4, optimizer: str = "sgd") -> TrainRunConfig:
    tcfg = TrainConfig(steps=steps, batch_size=16, lr=LR, log_every=1, optimizer=optimizer)
    return TrainRunConfig(str(out), DIGITS, TINY, tcfg)


def _worker(rank: int, world: int, port: int, out: str, record: str, optimizer: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import densead.train as train

    writes, models = [], []
    real_save, real_config, real_build = train.atomic_torch_save, train.save_config, train.build_glow
    train.atomic_torch_save = lambda obj, path: (writes.append(str(path)), real_save(obj, path))
    train.save_config = lambda cfg, path: (writes.append(str(path)), real_config(cfg, path))
    train.build_glow = lambda mcfg: models.append(real_build(mcfg)) or models[-1]
    train.train_glow(cfg_for(Path(out), optimizer=optimizer), progress=False)
    torch.save({"writes": writes, "state": models[0].state_dict()}, Path(record) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def spawn_two(tmp_path: Path, optimizer: str) -> tuple[dict, dict]:
    args = (2, free_port(), str(tmp_path / "ddp"), str(tmp_path), optimizer)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    single = load_checkpoint(train_glow(cfg_for(tmp_path / "single"), progress=False))
    r0, r1 = spawn_two(tmp_path, "sgd")
    # Only rank 0 writes files.
    assert r1["writes"] == [] and len(r0["writes"]) >= 2
    # Replicas stay identical (ActNorm's data-dependent init included).
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    actnorm_keys = [k for k in r0["state"] if k.endswith("log_scale") and "prior" not in k]
    assert actnorm_keys and all(
        bool(r0["state"][k.replace("log_scale", "initialized")]) for k in actnorm_keys
    )
    # ... and match the single-process run with the same global batch and data.
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    for key, value in single["model"].items():
        assert torch.allclose(ddp["model"][key], value, **TOLERANCE), key
    for (s1, b1, _), (s2, b2, _) in zip(ddp["history"], single["history"], strict=True):
        assert s1 == s2 and abs(b1 - b2) < 1e-5


def test_two_gloo_processes_with_adamax(tmp_path: Path) -> None:
    steps = 4
    single = load_checkpoint(train_glow(cfg_for(tmp_path / "single", steps, "adamax"), progress=False))
    r0, r1 = spawn_two(tmp_path, "adamax")
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    diffs = torch.cat(
        [(ddp["model"][k] - v).abs().flatten() for k, v in single["model"].items() if v.is_floating_point()]
    )
    assert diffs.max() <= 2 * LR * steps + 1e-6
    # the sign flips feed back through later steps, but most parameters stay within 1% of a step
    assert diffs.median() < 0.01 * LR
    # same data and initialization: the first step's loss agrees to float precision
    assert abs(ddp["history"][0][1] - single["history"][0][1]) < 1e-5


def test_torchrun_cli_and_resume_on_another_world_size(tmp_path: Path) -> None:
    cfg = to_dict(cfg_for(tmp_path / "run", steps=2))  # SGD: resumption comparable at tight tolerance
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    cmd += ["--master_addr=127.0.0.1", "tools/train_flow.py", str(tmp_path / "cfg.yaml"), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    # Resume the 2-process run in one process, to 4 steps: same as 4 steps in one process.
    resumed = train_glow(cfg_for(tmp_path / "run", steps=4), resume=True, progress=False)
    straight = train_glow(cfg_for(tmp_path / "straight", steps=4), progress=False)
    a, b = load_checkpoint(resumed), load_checkpoint(straight)
    for key, value in b["model"].items():
        assert torch.allclose(a["model"][key], value, **TOLERANCE), key


def _score_worker(rank: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from densead import distributed as dist
    from densead.data.images import load_image_set
    from densead.detectors import GlowScorer, get_detector
    from densead.scoring import score_image_set, typical_bits_per_dim
    from densead.train import load_glow

    dist.init_from_env(torch.device("cpu"))
    model, mcfg = load_glow(ckpt)
    images = load_image_set(DataConfig(source="sklearn_digits", channels=1, size=8, stop=37), mcfg.n_bins)
    dets = [get_detector("raw"), get_detector("last_scale")]
    scores = score_image_set(GlowScorer(model), images, dets, batch_size=8, heatmap_dir=Path(out) / "heat")
    # The first 23 images' heat maps: all of rank 0's 19 and 4 of rank 1's, in a batch of 8.
    capped = score_image_set(
        GlowScorer(model), images, dets, 8, heatmap_dir=Path(out) / "heat23", n_heatmaps=23
    )
    assert all(np.array_equal(capped[k], v) for k, v in scores.items())
    scores["typical_bpd"] = np.array([typical_bits_per_dim(model, images, 8)])  # shards: 19 and 18 images
    torch.save({k: torch.from_numpy(v) for k, v in scores.items()}, Path(out) / f"scores{rank}.pt")
    torch.distributed.destroy_process_group()


def test_distributed_scoring_equals_single_process(tmp_path: Path) -> None:
    from densead.data.images import load_image_set
    from densead.detectors import GlowScorer, get_detector
    from densead.scoring import image_names, score_image_set, typical_bits_per_dim
    from densead.train import load_glow

    ckpt = train_glow(cfg_for(tmp_path / "model", steps=1), progress=False)
    model, mcfg = load_glow(ckpt)
    images = load_image_set(DataConfig(source="sklearn_digits", channels=1, size=8, stop=37), mcfg.n_bins)
    dets = [get_detector("raw"), get_detector("last_scale")]
    single = score_image_set(
        GlowScorer(model), images, dets, batch_size=8, heatmap_dir=tmp_path / "one" / "heat"
    )
    (tmp_path / "two").mkdir()
    mp.spawn(_score_worker, args=(free_port(), str(ckpt), str(tmp_path / "two")), nprocs=2, join=True)
    for r in (0, 1):  # every rank gets all scores, in input order
        got = torch.load(tmp_path / "two" / f"scores{r}.pt", weights_only=True)
        for name, values in single.items():
            assert torch.allclose(got[name], torch.from_numpy(values), rtol=1e-6), name
        # typicality's reference: each rank its shard, every rank the mean of all
        want = torch.tensor([typical_bits_per_dim(model, images, 8)], dtype=torch.float64)
        assert torch.allclose(got["typical_bpd"], want, rtol=1e-6)
    one = sorted(p.name for p in (tmp_path / "one" / "heat").iterdir())
    two = sorted(p.name for p in (tmp_path / "two" / "heat").iterdir())
    assert one == two and len(one) == 37 * 2
    capped = score_image_set(
        GlowScorer(model), images, dets, 8, heatmap_dir=tmp_path / "one" / "heat23", n_heatmaps=23
    )
    assert all(np.array_equal(capped[k], v) for k, v in single.items())
    one = sorted(p.name for p in (tmp_path / "one" / "heat23").iterdir())
    two = sorted(p.name for p in (tmp_path / "two" / "heat23").iterdir())
    names = [n.replace("/", "__") for n in image_names(images)[:23]]
    assert one == two == sorted(f"{n}_{d.name}.png" for n in names for d in dets)


def test_torchrun_score_images_writes_the_single_process_csv(tmp_path: Path) -> None:
    ckpt = train_glow(cfg_for(tmp_path / "model", steps=1), progress=False)
    np.savez(tmp_path / "digits.npz", images=load_digits().images[:21].astype(np.uint8))
    args = ["tools/score_images.py", "--checkpoint", str(ckpt), "--detector", "raw,last_scale"]
    args += ["--input", str(tmp_path / "digits.npz"), "--no-progress", "--batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one.csv"), "--heatmaps", str(tmp_path / "heat1")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    cmd += ["--master_addr=127.0.0.1", *args, "--out", str(tmp_path / "two.csv")]
    two = subprocess.run(
        [*cmd, "--heatmaps", str(tmp_path / "heat2")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    # Both ranks wrote their images' heat maps into one staging folder, which replaced heat2 whole.
    one_maps, two_maps = (sorted(p.name for p in (tmp_path / h).iterdir()) for h in ("heat1", "heat2"))
    assert one_maps == two_maps and len(one_maps) == 21 * 2 + 1
    assert (tmp_path / "heat1" / "heatmaps.json").read_text() == (
        tmp_path / "heat2" / "heatmaps.json"
    ).read_text()
    assert not list(tmp_path.glob(".partial-*"))


def _outlier_worker(rank: int, world: int, port: int, record: str) -> None:
    import datetime

    from densead.config import OutlierConfig
    from densead.flows import Glow
    from densead.train import training_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A hang (ranks running different collectives) fails here within a minute instead of forever.
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.manual_seed(0)  # the same models and data on every rank
    model, reference = Glow(1, 2, 2, 16), Glow(1, 2, 2, 16)
    for glow in (model, reference):
        glow.train()(torch.rand(32, 1, 8, 8) - 0.5)
    with torch.no_grad():  # sharper coupling scales, so a far input overflows the trained model only
        for name, p in model.named_parameters():
            if "net.4" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    ocfg = OutlierConfig(DIGITS, "unused")
    results = []
    for far in (False, True):
        x, x_out = torch.rand(8, 1, 8, 8) - 0.5, torch.rand(8, 1, 8, 8) - 0.5
        if far and rank == 1:
            x_out *= 1e4  # every outlier of rank 1: log p = -inf under the trained model
        r = training_step(net, opt, x, x_out, reference, ocfg)
        results.append((bool(r.skipped), int(r.dropped)))
    torch.save(results, Path(record) / f"outlier{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_left_with_and_without_outliers_skip_the_step_together(tmp_path: Path) -> None:
    # Dropping all of one rank's outliers would have it run one DDP forward where the other runs
    # two: each forward broadcasts buffers, so the ranks would wait on each other for good.
    mp.spawn(_outlier_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"outlier{rank}.pt", weights_only=True)
        assert results == [(False, 0), (True, 8)], (rank, results)
