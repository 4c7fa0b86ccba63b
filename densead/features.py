"""Frozen feature extractors with named taps, for per-pixel feature flows.

Two ways to get one:

* :meth:`FrozenFeatureExtractor.from_timm` — a timm backbone built with
  ``features_only=True``; channels and strides come from its ``feature_info``
  (``.channels()`` / ``.reduction()``), never from a table.
* :meth:`FrozenFeatureExtractor.from_module` — any ``nn.Module`` (a torchvision
  segmentation net, :class:`densead.segmenter.Segmenter`, ...) tapped at FX node
  names with torchvision's ``create_feature_extractor``; channels and strides are
  read off one probe forward pass.

Frozen is enforced, not requested: the extractor is always in eval mode (``.train()``
is a no-op), its parameters have ``requires_grad=False`` and ``forward`` runs under
``torch.no_grad()``, so a flow trained on its outputs can never move it.

Local weights load with ``torch.load(..., weights_only=True)``; a file that does not
fit the model is an error naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from densead.io import check_archive, load_error, not_a_file

__all__ = ["FrozenFeatureExtractor", "load_state_dict_file", "load_weights"]

# Wrappers a training script may put around a state_dict (timm, Lightning, densead).
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")

# Side of the square probe image that measures the strides of FX taps; divisible by
# every usual output stride (up to 64) so stride = probe / feature size is exact.
DEFAULT_PROBE_SIZE = 256


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict (plain or under ``state_dict`` / ``model``) with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable state_dict, or is corrupt (a CRC mismatch,
            :func:`~densead.io.check_archive`); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path, "weights file"))
    check_archive(path, "weights file", fix="restore it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not a readable weights file ({load_error(err)})") from None
    if isinstance(data, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return dict(data)


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``module``; every parameter and buffer must be in it.

    Extra entries (e.g. the classifier head of a full timm model loaded into its
    ``features_only`` trunk) are ignored; missing or mis-shaped ones are errors.

    Raises:
        ValueError: missing keys or shape mismatches (the message names the file).
    """
    state = load_state_dict_file(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        detail = (f"{len(missing)} missing keys (first: {missing[:3]})" if missing else "") + (
            f"; shape mismatches: {mismatched[:3]}" if mismatched else ""
        )
        raise ValueError(f"{path}: weights do not fit {type(module).__name__}: {detail.strip('; ')}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)


class _ListTaps(nn.Module):
    """Turns a module returning a list of features (timm ``features_only``) into a named dict."""

    def __init__(self, body: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.body = body
        self.names = tuple(names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.body(x), strict=True))


class _RenamedTaps(nn.Module):
    """Maps the outputs of an FX feature extractor (keyed by node) to tap names."""

    def __init__(self, graph: nn.Module, keys: Mapping[str, str]) -> None:
        super().__init__()
        self.graph = graph
        self.keys = dict(keys)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.graph(x)
        return {tap: out[key] for tap, key in self.keys.items()}


def _tap_name(module_name: str) -> str:
    # ModuleDict keys (one flow per tap) may not contain dots.
    return module_name.replace(".", "_")


class FrozenFeatureExtractor(nn.Module):
    """A frozen network whose ``forward`` returns named feature maps.

    Args:
        body: module mapping ``(B, C_in, H, W)`` to ``dict[name, (B, C, h, w)]``.
        channels: channels of every tap.
        strides: output stride (input size / feature size) of every tap.

    Attributes:
        channels: ``{tap: C}``.
        strides: ``{tap: stride}``.
    """

    def __init__(self, body: nn.Module, channels: Mapping[str, int], strides: Mapping[str, int]) -> None:
        super().__init__()
        if set(channels) != set(strides):
            raise ValueError(
                f"channels and strides name different taps: {sorted(channels)} vs {sorted(strides)}"
            )
        self.body = body
        self.channels: dict[str, int] = dict(channels)
        self.strides: dict[str, int] = dict(strides)
        self.body.requires_grad_(False)
        super().train(False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.channels)

    def train(self, mode: bool = True) -> FrozenFeatureExtractor:
        """Stays in eval mode whatever ``mode`` says (BatchNorm statistics never move)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``(B, C_in, H, W)`` → ``{tap: (B, C, ~H/stride, ~W/stride)}``, without gradients."""
        out = self.body(x)
        return {name: out[name] for name in self.channels}

    @classmethod
    def from_timm(
        cls,
        name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        **kwargs: object,
    ) -> FrozenFeatureExtractor:
        """A timm backbone with ``features_only=True``, tapped at ``out_indices``.

        Taps are named after timm's ``feature_info.module_name()`` with dots replaced by
        underscores (``layer3``, ``stages_2``); channels and strides are timm's own
        ``feature_info.channels()`` and ``.reduction()``.

        Args:
            name: timm model name (``resnet18``, ``convnext_atto``, ...).
            out_indices: feature levels to tap; None for timm's default (all).
            pretrained: let timm fetch its weights (needs internet or a filled cache).
            checkpoint: a local state_dict file loaded after construction (a full
                classifier's state_dict works: its head entries are ignored).
            **kwargs: passed to ``timm.create_model``.
        """
        import timm

        extra = dict(kwargs)
        if out_indices is not None:
            extra["out_indices"] = tuple(out_indices)
        model = timm.create_model(name, features_only=True, pretrained=pretrained, **extra)
        if checkpoint:
            load_weights(model, checkpoint)
        info = model.feature_info
        names = [_tap_name(n) for n in info.module_name()]
        if len(set(names)) != len(names):
            raise ValueError(f"timm model {name!r} has duplicate feature module names {names}")
        return cls(
            _ListTaps(model, names),
            dict(zip(names, info.channels(), strict=True)),
            dict(zip(names, info.reduction(), strict=True)),
        )

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        nodes: Mapping[str, str] | Sequence[str],
        in_channels: int = 3,
        probe_size: int = DEFAULT_PROBE_SIZE,
    ) -> FrozenFeatureExtractor:
        """Any module tapped at FX node names (``torchvision...get_graph_node_names``).

        Args:
            module: the network; it is traced in eval mode and shares its parameters
                with the extractor (which freezes them).
            nodes: ``{tap name: node name}``, or node names used as tap names (dots
                become underscores).
            in_channels: input channels of the probe image.
            probe_size: side of the square probe image that measures the strides.

        Raises:
            ValueError: a node that is not a 4-D feature map, or a stride that is not
                a whole number at ``probe_size``.
        """
        from torchvision.models.feature_extraction import create_feature_extractor

        if not isinstance(nodes, Mapping):
            nodes = {_tap_name(n): n for n in nodes}
        for tap in nodes:
            if "." in tap or not tap:
                raise ValueError(f"tap name {tap!r} must be non-empty and contain no dots")
        module.eval()
        # Several taps may read the same node (e.g. the logits for a density and for baselines).
        keys = {node: f"node{i}" for i, node in enumerate(dict.fromkeys(nodes.values()))}
        graph = create_feature_extractor(module, return_nodes=keys)
        body = _RenamedTaps(graph, {tap: keys[node] for tap, node in nodes.items()}).eval()
        param = next(module.parameters(), None)
        probe = torch.zeros(
            1, in_channels, probe_size, probe_size, device=param.device if param is not None else None
        )
        with torch.no_grad():
            out = body(probe)
        channels, strides = {}, {}
        for tap, node in nodes.items():
            f = out[tap]
            if not isinstance(f, Tensor) or f.dim() != 4:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"node {node!r} (tap {tap!r}) is not a (B, C, H, W) feature map: {shape}")
            stride = probe_size / f.shape[-1]
            if stride != int(stride) or probe_size / f.shape[-2] != stride:
                raise ValueError(
                    f"node {node!r}: feature size {tuple(f.shape[-2:])} at probe {probe_size} gives no "
                    "whole stride; choose a probe_size divisible by the network's strides"
                )
            channels[tap], strides[tap] = int(f.shape[1]), int(stride)
        return cls(body, channels, strides)
