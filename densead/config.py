"""Configs: frozen dataclasses mirrored field by field by YAML files.

Unknown or mistyped keys are errors that name the key and the file. The
resolved config (every field, defaults filled in) is saved next to every
checkpoint, so a run can always be rebuilt from its own folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from densead.io import atomic_write_text, not_a_file

__all__ = [
    "ConfigChange",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OutlierConfig",
    "TrainConfig",
    "TrainRunConfig",
    "apply_overrides",
    "checkpoint_config",
    "config_changes",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match its dataclass."""


class FieldError(ConfigError):
    """A field's value out of its range, raised by a config's ``__post_init__``.

    The message starts with the field's name; read from a file, the error names the whole
    key (``general_train.steps``) and the file.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


def require(cfg: Any, minimum: float, *names: str, strict: bool = False) -> None:
    """Raise :class:`FieldError` unless every field ``names`` of ``cfg`` is ``>= minimum``
    (``> minimum`` with ``strict``)."""
    for name in names:
        value = getattr(cfg, name)
        if not math.isfinite(value):  # NaN passes every comparison below
            raise FieldError(name, f"must be a finite number, got {value}")
        if value < minimum or (strict and value == minimum):
            raise FieldError(name, f"must be {'>' if strict else '>='} {minimum}, got {value}")


# Quantization levels a model can use: the data are 8-bit images at most.
MAX_BINS = 256


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A multi-scale Glow (see :class:`densead.flows.Glow`); paper defaults."""

    in_channels: int = 3
    n_scales: int = 3
    n_steps: int = 32
    hidden: int = 512
    kernel_size: int = 3
    n_bins: int = 256

    def __post_init__(self) -> None:
        require(self, 1, "in_channels", "n_scales", "n_steps", "hidden", "kernel_size")
        if self.kernel_size % 2 != 1:
            raise FieldError("kernel_size", f"must be odd, got {self.kernel_size}")
        if not 2 <= self.n_bins <= MAX_BINS:
            raise FieldError("n_bins", f"must be 2 ... {MAX_BINS} (levels of 8-bit data), got {self.n_bins}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """An image set, reduced to uint8 images of ``channels × size × size``.

    Attributes:
        source: ``npz`` (``images`` uint8 N×H×W[×C], optional ``labels``),
            ``folder`` (image files, optionally one sub-folder per class),
            torchvision ``cifar10`` / ``cifar100`` / ``svhn`` / ``mnist`` /
            ``fashion_mnist``, or the scikit-learn sets ``sklearn_digits`` and
            ``sklearn_photo_patches`` (ship with scikit-learn, offline).
        path: the npz file, folder, or torchvision root.
        split: ``train`` or ``test`` for torchvision sets.
        download: let torchvision download the set into ``path``.
        classes: keep only these labels (empty: keep all).
        exclude_classes: drop these labels.
        start, stop: keep items ``[start:stop]`` of the set, before class
            filtering (``stop`` 0: to the end).
        channels: 1 converts RGB to greyscale (0.2989 R + 0.5870 G + 0.1140 B);
            3 repeats greyscale to RGB.
        size: output height and width; 0 keeps the images' own size.
        resize: ``pad`` (zero-pad centred, e.g. 28 → 32), ``resize`` (area or
            bilinear interpolation) or ``none`` (sizes must already match).
        augment: ``none``, ``flip_translate`` (CIFAR-like: horizontal flip and
            translation ≤ 10%, at least a pixel), ``translate`` (digits, SVHN) or ``flip``;
            of the whole set, ``mix`` included (the parts' own ``augment`` is not read).
        n_patches, patch_size: for ``sklearn_photo_patches``: how many random
            patches of ``patch_size`` pixels (before resizing to ``size``).
        seed: for random patches.
        rotations: also add the 90°/180°/270° rotations and their mirror
            images of every image (8× the set); used to make a broader
            "general" set out of a small one.
        mix: further sets appended to this one, each shaped by its own keys
            (channels and size must agree); e.g. a general distribution made of
            photo patches and transformed digits.
    """

    source: str = "npz"
    path: str = ""
    split: str = "train"
    download: bool = False
    classes: tuple[int, ...] = ()
    exclude_classes: tuple[int, ...] = ()
    start: int = 0
    stop: int = 0
    channels: int = 3
    size: int = 32
    resize: str = "pad"
    augment: str = "none"
    n_patches: int = 0
    patch_size: int = 0
    seed: int = 0
    rotations: bool = False
    mix: tuple[DataConfig, ...] = ()


@dataclasses.dataclass(frozen=True)
class OutlierConfig:
    """Outlier loss ``−λ·log σ((log p_ref(x_o) − log p(x_o)) / T)`` (paper S4.3).

    The model being trained is pushed to give the outlier samples ``x_o`` a
    lower likelihood than the frozen reference model does.

    Attributes:
        data: the outlier samples (general-distribution images when training
            the in-distribution model; in-distribution images for Diff†'s
            general model).
        reference: checkpoint of the frozen reference model.
        weight: λ.
        temperature: T.
        batch_size: outlier samples per step (0: the training batch size).
    """

    data: DataConfig
    reference: str
    weight: float = 6000.0
    temperature: float = 1000.0
    batch_size: int = 0

    def __post_init__(self) -> None:
        require(self, 0, "weight", "batch_size")
        require(self, 0, "temperature", strict=True)


# train.lr_scaling: how lr follows the batch size (TrainConfig).
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization. Defaults are the paper's (Adamax, lr 5e-4, weight decay 5e-5).

    ``batch_size`` is the global batch (split over processes under torchrun);
    ``optimizer`` is ``adamax``, ``adam`` or ``sgd``.

    ``amp`` runs the coupling networks under bf16 autocast (log-dets, the LU
    1×1 conv, its inverse and the prior stay fp32); it changes ``log p`` by more
    than rounding (~0.02% on a tiny Glow, tested below 1%), so ``fast`` never
    turns it on.

    ``fast`` selects the speed levers of :mod:`densead.flows.fast`, all of which
    give the plain path's results up to float rounding: ``fused`` (ActNorm + 1×1
    conv as one convolution), ``channels_last`` (NHWC memory format),
    ``compile`` (``torch.compile`` of the model) and ``cudagraphs`` (whole
    training steps replayed from CUDA graphs: ``densead.train.GraphedTrainingStep``).
    ``auto`` (default) pulls the first three on CUDA (``compile`` only with
    Triton), and ``cudagraphs`` too where the image Glow's trainer can replay
    its steps (one process, Adam or Adamax; eager steps after a warning if the
    capture fails), and none on CPU, so CPU runs are the plain fp32 path;
    ``on`` / ``off`` force fused, channels_last and compile, or none; a
    comma-separated list picks levers (``fused,channels_last``, or
    ``auto,recompute`` to add activation recomputation for batches that do not
    fit otherwise; ``cudagraphs`` by name fails if the capture does).
    Checkpoints are the same with any value. Both training loops read it
    (images: ``densead.train``; road scenes: ``densead.dense``, without
    ``cudagraphs``).

    ``lr_scaling`` adapts ``lr`` to the batch size for large-batch runs:
    ``none`` (``lr`` as given), ``linear`` (``lr · batch_size / lr_reference_batch``)
    or ``sqrt`` (``lr · sqrt(batch_size / lr_reference_batch)``, the usual rule for
    Adam-type optimizers); ``lr`` is then the rate tuned at ``lr_reference_batch``.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    lr_scaling: str = "none"
    lr_reference_batch: int = 64
    weight_decay: float = 5e-5
    warmup_steps: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    fast: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    max_grad_norm: float = 0.0
    init_from: str = ""
    optimizer: str = "adamax"

    def __post_init__(self) -> None:
        if self.lr_scaling not in LR_SCALINGS:
            raise FieldError("lr_scaling", f"unknown {self.lr_scaling!r}; valid: {', '.join(LR_SCALINGS)}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise FieldError("optimizer", f"unknown {self.optimizer!r}; valid: {', '.join(OPTIMIZER_NAMES)}")
        # steps 0: a stage not trained (ExperimentConfig.outlier_train); the trainers refuse it.
        require(self, 0, "steps", "warmup_steps", "weight_decay", "max_grad_norm")
        require(self, 1, "batch_size", "lr_reference_batch", "checkpoint_every", "log_every")
        require(self, 0, "lr", strict=True)
        check_device(self.device)


# train.optimizer: the optimizers densead.train builds.
OPTIMIZER_NAMES = ("adamax", "adam", "sgd")


def check_device(name: str, field: str = "device") -> None:
    """``auto`` or a device string torch understands (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise FieldError(
            field, f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:<index>, ..."
        ) from None


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """Everything ``tools/train_flow.py`` needs to train one Glow."""

    output_dir: str
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    outlier: OutlierConfig | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """An image-level experiment: general, in-distribution and Diff† models, then evaluation.

    Attributes:
        output_dir: models, scores and the report go here.
        model: the architecture shared by every Glow of the experiment.
        general: training data of the general-distribution model.
        in_dist: training data of the in-distribution model.
        in_dist_test: held-out in-distribution images (the negatives).
        anomalies: named anomaly sets (the positives), evaluated one by one.
        general_train: optimization of the general model.
        in_dist_train: optimization of the in-distribution model (finetuned
            from the general model, as in the paper).
        outlier_train: optimization of the two Diff† models (each finetuned
            from its plain counterpart with the outlier loss); ``steps: 0``
            skips Diff†.
        outlier_weight, outlier_temperature: λ and T of the outlier loss.
        general_test: held-out general-distribution images, for the general
            model's bits/dim and the likelihood correlations (optional).
        n_heatmaps: pixel-map overlays written per test set.
        eval_batch_size: batch size of scoring.
        bootstrap: resamples of the report's intervals (every number, and each detector's
            paired difference to raw likelihood); 0 leaves them out.
    """

    output_dir: str
    model: ModelConfig
    general: DataConfig
    in_dist: DataConfig
    in_dist_test: DataConfig
    anomalies: dict[str, DataConfig]
    general_train: TrainConfig = TrainConfig()
    in_dist_train: TrainConfig = TrainConfig()
    outlier_train: TrainConfig = TrainConfig(steps=0)
    outlier_weight: float = 6000.0
    outlier_temperature: float = 1000.0
    general_test: DataConfig | None = None
    n_heatmaps: int = 8
    eval_batch_size: int = 256
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        require(self, 0, "outlier_weight")
        require(self, 0, "outlier_temperature", strict=True)


# --------------------------------------------------------------------------- (de)serialization


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists → tuples, dicts → dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_mapping(tp, value, where)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_convert(k, key_tp, where): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        at = f"{where}: " if where else ""
        raise ConfigError(
            f"{at}unknown key {unknown[0]!r} for {cls.__name__} (valid keys: {', '.join(fields)})"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where or cls.__name__}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except FieldError as err:  # a value out of range: name the whole key
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build the dataclass ``cls`` from plain data; errors name ``source`` and the key."""
    try:
        return _from_mapping(cls, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars) of a config dataclass, for YAML and checkpoints."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# Keys a resumed run may change: where it writes, where it runs, how often it logs and saves, how
# far it trains, the fast path (the same math: densead.flows.fast), and the checkpoints it started
# from or compares against (its weights come from its own checkpoint; a copied run names the
# copies; run_experiment checks those files by their SHA-256). Leaves named ``download`` never
# matter.
RESUMABLE_KEYS = frozenset(
    {
        "output_dir",
        "train.steps",
        "train.checkpoint_every",
        "train.log_every",
        "train.device",
        "train.fast",
        "train.init_from",
        "outlier.reference",
    }
)
# Data leaves that name files or folders: equal when they are the same file (a relative and an
# absolute spelling of one path) or when the stored one, absolute, is gone (the data moved).
_PATH_LEAVES = frozenset({"path", "root"})
# Leaves a checkpoint stores absolute (checkpoint_config): the data, and the checkpoints a run
# started from or taps, named from the folder it ran in, so that they mean the same files when
# the checkpoint is read from another folder.
_FILE_LEAVES = _PATH_LEAVES | {"init_from", "reference", "segmenter", "backbone_checkpoint"}


def checkpoint_config(cfg: Any) -> dict[str, Any]:
    """:func:`to_dict` of ``cfg`` for a checkpoint: file and folder leaves (``path``, ``root``,
    ``init_from``, ``reference``, ``segmenter``, ``backbone_checkpoint``) made absolute against
    the working directory. Read from another folder, such a config still names the files it was
    trained on: a resume compares its data with them, and scoring finds them."""

    def walk(v: Any, key: str = "") -> Any:
        if isinstance(v, Mapping):
            return {k: walk(x, str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, key) for x in v]
        if key in _FILE_LEAVES and isinstance(v, str) and v:
            return os.path.abspath(v)
        return v

    return walk(to_dict(cfg))


def _same_file(stored: object, current: object) -> bool:
    if stored == current:
        return True
    old, new = Path(str(stored)), Path(str(current))
    if not old.exists():
        # Gone: the data moved, where the checkpoint names it absolute (checkpoint_config). A
        # relative name (a checkpoint of densead before that) meant the folder training ran in,
        # unknown here: it cannot be checked, so it does not match.
        return old.is_absolute()
    try:
        return old.samefile(new)
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    """One setting in which a stored config and the current one differ."""

    key: str  # dotted, e.g. ``train.lr`` or ``data.mix[0].stop``
    stored: Any
    current: Any

    def __str__(self) -> str:
        sections = isinstance(self.stored, Mapping) != isinstance(self.current, Mapping)

        def show(v: Any) -> str:  # a section added or removed: not its whole content
            return "a section" if sections and isinstance(v, Mapping) else repr(v)

        return f"{self.key} ({show(self.stored)} in the checkpoint, {show(self.current)} now)"


def config_changes(
    stored: Mapping[str, Any], current: Mapping[str, Any], may_change: frozenset[str] = RESUMABLE_KEYS
) -> list[ConfigChange]:
    """The settings in which two plain configs (:func:`to_dict`) differ, in field order; each
    reads ``key (<stored> in the checkpoint, <current> now)`` as a string.

    Keys in ``may_change`` and leaves named ``download`` are skipped; data file and folder
    leaves (``path``, ``root``) compare as files (a relative current one from the working
    directory), and match when the stored one, absolute, no longer exists (the data moved); a
    stored relative one that is not there from here cannot be checked and does not match. A
    key only one side has (a field added or removed by another densead version) is not compared.
    """
    changes: list[ConfigChange] = []

    def walk(key: str, a: Any, b: Any) -> None:
        if key in may_change or key.rsplit(".", 1)[-1] == "download":
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in b:
                if k in a:
                    walk(f"{key}.{k}" if key else str(k), a[k], b[k])
            return
        if key.rsplit(".", 1)[-1] in _PATH_LEAVES and _same_file(a, b):
            return
        if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
            if all(isinstance(x, Mapping) for x in (*a, *b)):
                for i, (x, y) in enumerate(zip(a, b, strict=True)):
                    walk(f"{key}[{i}]", x, y)
                return
            a, b = list(a), list(b)
        if a != b:
            changes.append(ConfigChange(key, a, b))

    walk("", stored, current)
    return changes


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config writer means it (the YAML 1.2 core schema): ``5e-4`` is a float, ``010``
    the integer 10, only ``true`` / ``false`` are booleans, and a key given twice is an error.
    PyYAML follows YAML 1.1, which reads ``5e-4`` and ``2024-01-01`` as a string and a date,
    ``010`` as octal 8, ``1:30`` as 90 (base 60), ``on`` / ``off`` / ``yes`` / ``no`` as booleans
    (``train.fast: off``), and keeps the last of repeated keys silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                what = f"duplicate key {key!r} (the first would be silently ignored)"
                raise yaml.constructor.ConstructorError(None, None, what, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_decimal_int(self, node: yaml.ScalarNode) -> int:
        return int(self.construct_scalar(node).replace("_", ""))


_YAML_TAG = "tag:yaml.org,2002:"
# YAML 1.1 resolvers replaced (bool, int, float) or dropped (timestamp: dates; value: "=").
_REPLACED_TAGS = ("bool", "int", "float", "timestamp", "value")
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.removeprefix(_YAML_TAG) not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    f"{_YAML_TAG}bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ConfigLoader.add_implicit_resolver(
    f"{_YAML_TAG}int", re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789")
)
_ConfigLoader.add_implicit_resolver(
    f"{_YAML_TAG}float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_ConfigLoader.add_constructor(f"{_YAML_TAG}int", _ConfigLoader.construct_decimal_int)


class _ConfigDumper(yaml.SafeDumper):
    """Writes what :class:`_ConfigLoader` reads back as written: a string that the loader would
    take for a number or a boolean (``"1e5"``, ``"010"``) is quoted."""


_ConfigDumper.yaml_implicit_resolvers = _ConfigLoader.yaml_implicit_resolvers


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader


def _yaml_error(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what, and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{what}" + (f" ({context})" if context else "")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_error(err)}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to nested plain data."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file into ``cls``, after ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path, "config file"))
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, apply_overrides(data, overrides), str(path))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.dump(to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False))
