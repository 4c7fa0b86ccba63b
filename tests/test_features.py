"""Frozen feature extractors: timm feature_info, FX node taps, freezing, local checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from densead.features import FrozenFeatureExtractor, load_weights
from densead.segmenter import Segmenter

# Small timm models of three families (residual, inverted-residual, ConvNeXt).
TIMM_MODELS = ["resnet18", "mobilenetv3_small_050", "convnext_atto"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_channels_and_strides_are_feature_info(name: str) -> None:
    reference = timm.create_model(name, features_only=True, pretrained=False).feature_info
    extractor = FrozenFeatureExtractor.from_timm(name)
    assert list(extractor.channels.values()) == reference.channels()
    assert list(extractor.strides.values()) == reference.reduction()
    assert list(extractor.names) == [m.replace(".", "_") for m in reference.module_name()]
    out = extractor(torch.rand(1, 3, 64, 96))
    for tap, f in out.items():
        s = extractor.strides[tap]
        assert f.shape == (1, extractor.channels[tap], 64 // s, 96 // s), tap


def test_timm_out_indices_select_levels() -> None:
    extractor = FrozenFeatureExtractor.from_timm("resnet18", out_indices=(2, 4))
    assert extractor.channels == {"layer2": 128, "layer4": 512}
    assert extractor.strides == {"layer2": 8, "layer4": 32}


def test_torchvision_model_via_node_names() -> None:
    model = torchvision.models.resnet18(weights=None)
    nodes = {"c2": "layer2", "c3": "layer3", "c4": "layer4", "pre": "layer3.1.add"}
    extractor = FrozenFeatureExtractor.from_module(model, nodes)
    assert extractor.channels == {"c2": 128, "c3": 256, "c4": 512, "pre": 256}
    assert extractor.strides == {"c2": 8, "c3": 16, "c4": 32, "pre": 16}
    out = extractor(torch.rand(2, 3, 64, 64))
    assert out["c4"].shape == (2, 512, 2, 2) and out["pre"].shape == (2, 256, 4, 4)
    # The last residual sum of layer3 is that stage's output before its ReLU.
    assert torch.equal(out["pre"].clamp_min(0), out["c3"])


def test_segmenter_taps_match_its_backbone() -> None:
    seg = Segmenter("resnet18", num_classes=5, decoder_channels=16)
    info = seg.backbone.feature_info
    extractor = FrozenFeatureExtractor.from_module(
        seg, {"layer3": "backbone.layer3", "fuse": "fuse.1", "logits": "classifier"}
    )
    assert (
        extractor.channels["layer3"] == info.channels()[2]
        and extractor.strides["layer3"] == info.reduction()[2]
    )
    assert extractor.channels == {"layer3": 256, "fuse": 16, "logits": 5}
    assert extractor.strides == {"layer3": 16, "fuse": 4, "logits": 4}
    x = torch.rand(1, 3, 64, 96)
    # The segmenter's output is its stride-4 logits, bilinearly upsampled.
    up = F.interpolate(extractor(x)["logits"], size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(up, seg(x), atol=1e-6)
    # Two taps may read one node.
    twice = FrozenFeatureExtractor.from_module(seg, {"cls": "classifier", "logits": "classifier"})
    out = twice(x)
    assert twice.channels == {"cls": 5, "logits": 5} and torch.equal(out["cls"], out["logits"])


def test_non_feature_node_is_rejected() -> None:
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="'fc'"):
        FrozenFeatureExtractor.from_module(model, {"logits": "fc"})


def test_frozen_stays_eval_and_gets_no_gradient() -> None:
    extractor = FrozenFeatureExtractor.from_timm("resnet18", out_indices=(1, 2))
    bn = extractor.body.body.bn1
    running = bn.running_mean.clone()
    assert extractor.train() is extractor
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = extractor(x)
    assert not out["layer2"].requires_grad
    # A trainable head on the features trains; the extractor does not move.
    head = torch.nn.Conv2d(128, 1, 1)
    head(out["layer2"]).square().mean().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in extractor.parameters())
    assert torch.equal(bn.running_mean, running)  # BatchNorm statistics untouched (eval mode)


def test_local_checkpoint_loads(tmp_path: Path) -> None:
    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False)  # a classifier: its fc.* entries are extra
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    extractor = FrozenFeatureExtractor.from_timm("resnet18", checkpoint=path)
    loaded = extractor.body.body.layer3[0].conv1.weight
    assert torch.equal(loaded, full.layer3[0].conv1.weight)
    fresh = FrozenFeatureExtractor.from_timm("resnet18")
    assert not torch.equal(fresh.body.body.layer3[0].conv1.weight, loaded)
    # Wrapped under "state_dict" as training scripts save it.
    torch.save({"state_dict": full.state_dict()}, tmp_path / "wrapped.pth")
    wrapped = FrozenFeatureExtractor.from_timm("resnet18", checkpoint=tmp_path / "wrapped.pth")
    assert torch.equal(wrapped.body.body.layer3[0].conv1.weight, loaded)


def test_wrong_checkpoint_names_the_file(tmp_path: Path) -> None:
    other = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), other)
    with pytest.raises(ValueError, match="mobilenet.pth"):
        FrozenFeatureExtractor.from_timm("resnet18", checkpoint=other)
    resnet34 = tmp_path / "resnet34_shapes.pth"
    state = timm.create_model("resnet18", features_only=True).state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, resnet34)
    with pytest.raises(ValueError, match="resnet34_shapes.pth.*conv1.weight"):
        FrozenFeatureExtractor.from_timm("resnet18", checkpoint=resnet34)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_weights(torch.nn.Linear(2, 2), garbage)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        FrozenFeatureExtractor.from_timm("resnet18", checkpoint=tmp_path / "absent.pth")
