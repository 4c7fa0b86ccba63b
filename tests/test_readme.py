"""The README's Python block runs as written, against checkpoints of the demo's layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from densead.config import DataConfig, ModelConfig, to_dict
from densead.data.images import load_image_set
from densead.data.transforms import to_model_input
from densead.io import atomic_torch_save
from densead.train import build_glow

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def demo_checkpoint(path: Path, seed: int) -> None:
    """A Glow of the digits demo's shape, its ActNorms initialized on digits 1-9, its coupling
    networks random (a trained model's weights are not zero either), saved as training saves."""
    mcfg = ModelConfig(in_channels=1, n_scales=2, n_steps=4, hidden=64, kernel_size=3, n_bins=17)
    torch.manual_seed(seed)
    model = build_glow(mcfg)
    digits = load_image_set(DataConfig(source="sklearn_digits", channels=1, size=8, stop=256), 17)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.train()(to_model_input(digits.images, 17, dequantize=True))
    path.parent.mkdir(parents=True)
    atomic_torch_save({"model": model.state_dict(), "model_config": to_dict(mcfg)}, path)


def test_the_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 1, f"expected one python block in {README}, found {len(blocks)}"
    paths = re.findall(r'load_glow\("([^"]+)"\)', blocks[0])
    assert paths == ["runs/digits_demo/in_dist/checkpoint.pt", "runs/digits_demo/general/checkpoint.pt"]
    for seed, path in enumerate(paths):
        demo_checkpoint(tmp_path / path, seed)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], f"{README}:python block", "exec"), namespace)  # noqa: S102 - our own README

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["raw", "ratio", "last_scale"]
    n_in, n_out = len(namespace["inliers"]), len(namespace["zeros"])
    target = load_digits().target  # held-out digits 1-9 (from image 1300 on) and every 0
    assert (n_in, n_out) == ((target[1300:] != 0).sum(), (target == 0).sum())
    for name, scores in namespace["scores_in"].items():
        metrics = namespace["image_metrics"](
            np.r_[scores, namespace["scores_out"][name]], namespace["labels"]
        )
        assert set(metrics) == {"auroc", "ap", "fpr95"} and 0 <= metrics["auroc"] <= 1
        assert scores.shape == (n_in,) and np.isfinite(scores).all()
    assert namespace["maps"].shape == (4, 8, 8)
    bits = namespace["out"].bits_per_dim()
    torch.testing.assert_close(bits, -namespace["out"].log_prob() / (64 * np.log(2)))
