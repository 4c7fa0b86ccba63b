"""The training loop shared by every Glow: maximum likelihood, optionally with the outlier loss.

Design points:

* The whole training set is one uint8 tensor on the training device; batch
  ``s`` is a pure function of ``(seed, s)`` (permutation per epoch, augmentation
  and dequantization noise from generators seeded by the step). ``--resume``
  therefore continues exactly as an uninterrupted run would, with nothing but
  the step, model and optimizer saved. It continues only a run of the same
  settings (:func:`resume_problems`): a changed learning rate, seed, batch or
  data would make a model of two recipes under a config naming one. Without
  ``resume`` an existing checkpoint is kept unless ``overwrite`` says otherwise.
* One host sync per step: the finiteness of the gradient norm. Only when it is
  not finite are the per-sample log-likelihoods inspected; non-finite samples
  are dropped and the step recomputed on the rest, or skipped when more than
  75% would go (paper S4.3, S4.5).
* On CUDA, ``train.fast: auto`` (default) replays the step from CUDA graphs
  (:class:`GraphedTrainingStep`; by name: ``train.fast: cudagraphs``): the same
  kernels on the same data, without the host's per-kernel launch cost, which
  otherwise bounds a paper-size Glow (eager 1,024 vs graphed 4,535 images/s at
  batch 256 on an H200 with bf16). ``auto`` leaves graphs out under torchrun and
  with SGD (:func:`graphs_supported`), and falls back to eager steps, with a
  warning, if the step cannot be captured.
* Checkpoints hold ``state_dict``s and the resolved config, are written
  atomically and load with ``weights_only=True``.
* Under torchrun, ``train.batch_size`` is the global batch: every rank builds
  the same global batch (augmentation and noise included) and trains on its
  slice through DistributedDataParallel, so a run on N processes sees exactly
  the data of a single-process run, and ``--resume`` works on any N. Only rank 0
  writes files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from densead import distributed as dist
from densead.config import (
    OPTIMIZER_NAMES,
    ConfigChange,
    ConfigError,
    ModelConfig,
    OutlierConfig,
    TrainConfig,
    TrainRunConfig,
    checkpoint_config,
    config_changes,
    from_dict,
    save_config,
    to_dict,
)
from densead.data.images import ImageSet, load_image_set
from densead.data.transforms import augment_batch, to_model_input
from densead.flows import FastPath, FastTraining, Glow, apply_fast_path, resolve_fast_path
from densead.flows.fast import on_side_stream
from densead.io import (
    atomic_torch_save,
    check_output_dir,
    check_overwrite,
    error_line,
    read_checkpoint,
    require_file,
    state_dict_error,
)

__all__ = [
    "CHECKPOINT_NAME",
    "GraphedTrainingStep",
    "StepResult",
    "build_glow",
    "build_optimizer",
    "check_output",
    "learning_rate",
    "load_checkpoint",
    "load_glow",
    "outlier_loss",
    "portable_optimizer_state",
    "resolve_device",
    "resume_changes",
    "resume_problems",
    "set_learning_rate",
    "start_or_resume",
    "step_function",
    "train_glow",
    "training_step",
]

CHECKPOINT_NAME = "checkpoint.pt"

# Paper S4.3: skip the minibatch when more than this fraction of its samples
# has a non-finite log-likelihood.
MAX_DROPPED_FRACTION = 0.75


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(name)``, which must be
    there: a CUDA device this machine lacks is a ValueError naming ``key`` (a config may name
    one for the machine it is meant for, so this is checked where it runs)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}: {name!r} is not a device; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            have = f"{count} CUDA device(s)" if count else "none (torch.cuda.is_available() is False)"
            raise ValueError(f"{key}: {name!r}, but this machine's CUDA devices: {have}; use auto or cpu")
    return device


def build_glow(cfg: ModelConfig) -> Glow:
    return Glow(
        in_channels=cfg.in_channels,
        n_scales=cfg.n_scales,
        n_steps=cfg.n_steps,
        hidden=cfg.hidden,
        kernel_size=cfg.kernel_size,
        n_bins=cfg.n_bins,
    )


# TrainConfig accepts exactly the names of OPTIMIZER_NAMES (and refuses others when it is built).
OPTIMIZERS = dict(zip(OPTIMIZER_NAMES, (torch.optim.Adamax, torch.optim.Adam, torch.optim.SGD), strict=True))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate; in place where it is a tensor (a CUDA graph
    of the optimizer step reads it from there, see :class:`GraphedTrainingStep`)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as a checkpoint keeps it: learning rates as floats, not
    ``capturable``, step counters on the CPU. A run trained with CUDA graphs
    (:class:`GraphedTrainingStep` makes the optimizer capturable) then resumes with or without
    them, on any device; the live optimizer is not changed."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    state["state"] = {
        key: {k: v.cpu() if k == "step" and isinstance(v, Tensor) else v for k, v in value.items()}
        for key, value in state["state"].items()
    }
    return state


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): ``cfg.lr`` scaled to the batch size by
    ``cfg.lr_scaling``, times the linear warm-up factor ``min(1, (step + 1) / warmup_steps)``."""
    # cfg.lr_scaling and cfg.lr_reference_batch are checked when the config is built (TrainConfig).
    ratio = cfg.batch_size / cfg.lr_reference_batch
    lr = cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]
    return lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else lr


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict:
    """Read a densead Glow checkpoint (``weights_only=True``); errors name the file. ``mmap``:
    for reads of its small entries (step, config, history), see :func:`~densead.io.read_checkpoint`."""
    return read_checkpoint(path, ("model", "model_config"), device=device, mmap=mmap)


def _effective(plain: Any, train: Mapping[str, Any] | None = None) -> Any:
    """A plain config as it acts: settings without effect dropped, equal meanings made equal
    (data ``classes`` as sets; ``path`` / ``split`` of the scikit-learn sources, which read
    neither; ``lr_reference_batch`` without ``lr_scaling``; an outlier ``batch_size`` of 0,
    which is the training batch size)."""
    if isinstance(plain, list):
        return [_effective(x, train) for x in plain]
    if not isinstance(plain, Mapping):
        return plain
    out = {k: _effective(v, plain.get("train", train)) for k, v in plain.items()}
    if "source" in out:  # a DataConfig
        for key in ("classes", "exclude_classes"):
            if isinstance(out.get(key), list):
                out[key] = sorted(set(out[key]))
        if str(out["source"]).startswith("sklearn_"):
            out.pop("path", None)
            out.pop("split", None)
    if out.get("lr_scaling") == "none":
        out.pop("lr_reference_batch", None)
    if "reference" in out and out.get("batch_size") == 0 and isinstance(train, Mapping):
        out["batch_size"] = train.get("batch_size", 0)  # an OutlierConfig
    return out


def resume_changes(done: Mapping[str, Any], cfg: Any) -> list[ConfigChange]:
    """The settings checkpoint ``done`` was trained with that a run of ``cfg`` changes, as they
    act (:func:`~densead.config.config_changes`; keys that may change on resume are skipped).
    Empty for a checkpoint without its config."""
    stored = done.get("config")
    if not isinstance(stored, Mapping):
        return []
    return config_changes(_effective(stored), _effective(to_dict(cfg)))


def resume_problems(
    done: Mapping[str, Any], cfg: Any, changes: list[ConfigChange] | None = None
) -> list[str]:
    """Why checkpoint ``done`` cannot be continued, or reused as finished, by a run of ``cfg``
    (a run config with ``train.steps``): the settings it changes (``changes``, by default
    :func:`resume_changes`), and a step beyond ``train.steps``. Empty when it can."""
    changes = resume_changes(done, cfg) if changes is None else changes
    problems = [str(c) for c in changes]
    step = int(done["step"])
    if step > cfg.train.steps:
        problems.append(f"train.steps ({cfg.train.steps} now, but the checkpoint is at step {step})")
    return problems


def check_output(
    ckpt_path: Path,
    cfg: Any,
    resume: bool,
    overwrite: bool,
    is_protocol: Callable[[str], bool] | None = None,
) -> dict | None:
    """The ``step`` and ``finished`` entries of the checkpoint at ``ckpt_path`` that a run of
    ``cfg`` continues (None: it starts anew). Its weights are not read here.

    Args:
        is_protocol: keys that define the data protocol (which pixels are inliers, anomalies or
            void): a change of one is refused first, as another protocol (label leakage), and
            without the advice to start from the checkpoint's weights.

    Raises:
        FileExistsError: a checkpoint is there, and neither ``resume`` nor ``overwrite``.
        ValueError: ``resume``, and the checkpoint's model or settings differ
            (:func:`resume_problems`).
    """
    if not resume or not ckpt_path.is_file():
        check_overwrite(ckpt_path, overwrite, resumable=True)
        return None
    done = read_checkpoint(ckpt_path, ("model", "model_config", "step", "finished"), mmap=True)
    stored_model, model = done["model_config"], to_dict(cfg.model)
    if stored_model != model:
        changed = config_changes({"model": stored_model}, {"model": model}) or [
            ConfigChange("model", stored_model, model)  # a field only one side has
        ]
        raise ValueError(
            f"{ckpt_path}: cannot resume: it is another model: {'; '.join(map(str, changed))}. "
            "Set them back (--set KEY=VALUE) or train into a new output_dir"
        )
    changes = resume_changes(done, cfg)
    protocol = [str(c) for c in changes if is_protocol is not None and is_protocol(c.key)]
    if protocol:
        raise ValueError(
            f"{ckpt_path}: cannot resume: it was trained under another data protocol: {'; '.join(protocol)}. "
            "Set them back (--set KEY=VALUE) or train into a new output_dir"
        )
    problems = resume_problems(done, cfg, changes)
    if problems:
        raise ValueError(
            f"{ckpt_path}: cannot resume: it was trained with other settings: {'; '.join(problems)}. "
            "Set them back (--set KEY=VALUE), or train into a new output_dir (train.init_from="
            f"{ckpt_path} starts it from these weights)"
        )
    return {"step": int(done["step"]), "finished": bool(done["finished"])}


def start_or_resume(
    mcfg: ModelConfig, tcfg: TrainConfig, ckpt_path: Path, resume: bool, device: torch.device
) -> tuple[Glow, torch.optim.Optimizer, int, list]:
    """A Glow and its optimizer: continued from ``ckpt_path`` (``resume``), initialized from
    ``tcfg.init_from`` (finetuning), or new. Returns (model, optimizer, step, history)."""
    model = build_glow(mcfg).to(device)
    optimizer = build_optimizer(model, tcfg)
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return model, optimizer, int(ckpt["step"]), list(ckpt["history"])
    if tcfg.init_from:
        init, init_cfg = load_glow(tcfg.init_from, device)
        if to_dict(init_cfg) != to_dict(mcfg):
            raise ValueError(f"{tcfg.init_from}: model config {init_cfg} differs from {mcfg}")
        model.load_state_dict(init.state_dict())
    return model, optimizer, 0, []


def load_glow(path: str | Path, device: torch.device | str = "cpu") -> tuple[Glow, ModelConfig]:
    """A Glow in eval mode from a checkpoint, with its model config."""
    ckpt = load_checkpoint(path, device)
    cfg = from_dict(ModelConfig, ckpt["model_config"], f"{path} (model_config)")
    model = build_glow(cfg).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        what = state_dict_error(err)
        raise ValueError(f"{path}: weights do not fit the stored model config: {what}") from None
    return model.eval(), cfg


def outlier_loss(log_prob: Tensor, ref_log_prob: Tensor, weight: float, temperature: float) -> Tensor:
    """Per-sample ``−λ·log σ((log p_ref(x_o) − log p(x_o)) / T)`` (paper S4.3).

    Small when the trained model gives the outlier a lower likelihood than the
    reference model does. ``−log σ(a) = softplus(−a)``, computed stably.
    """
    return weight * F.softplus((log_prob - ref_log_prob) / temperature)


@dataclass(frozen=True)
class StepResult:
    """What one optimization step did (tensors stay on the device until logged)."""

    nll: Tensor  # mean −log p(x) of the in-distribution batch, nats per image
    outlier: Tensor  # mean outlier loss (0 without outliers)
    skipped: bool
    dropped: int  # samples dropped for non-finite log-likelihoods


def _per_sample_losses(
    model: Glow,
    x: Tensor,
    x_out: Tensor | None,
    ref_log_prob: Tensor | None,
    ocfg: OutlierConfig | None,
    amp: bool,
) -> tuple[Tensor, Tensor | None]:
    # Autocast's weight cache stays off, in every step: a CUDA graph must not capture it, and
    # warm-up and capture run the same autocast state (a compiled flow step guarding on it would
    # otherwise recompile during capture).
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
        nll = -model(x).log_prob(discrete=True)
        lo = None
        if x_out is not None:
            lp_out = model(x_out).log_prob(discrete=True)
            lo = outlier_loss(lp_out, ref_log_prob, ocfg.weight, ocfg.temperature)
            # Outliers without a finite likelihood are dropped (paper S4.5): training_step drops
            # the samples whose loss is not finite when the gradient is not. Under the model
            # (log p = −inf: loss 0) the gradient is not finite by itself; under the reference the
            # loss is infinite but its gradient saturates at a finite λ/T, so a term lp_out·NaN
            # (0 elsewhere) makes it NaN.
            bad_ref = ~torch.isfinite(ref_log_prob)
            lo = lo.masked_fill(bad_ref, 0.0) + lp_out * torch.where(bad_ref, math.nan, 0.0)
            lo = lo.masked_fill(~torch.isfinite(lp_out), math.nan)
    return nll, lo


def _reference_log_prob(reference: Glow, x_out: Tensor, amp: bool) -> Tensor:
    with (
        torch.no_grad(),
        torch.autocast(x_out.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False),
    ):
        return reference(x_out).log_prob(discrete=True)


def _backward(
    model: Glow,
    params: list[Tensor],
    x: Tensor,
    x_out: Tensor | None,
    ref_log_prob: Tensor | None,
    ocfg: OutlierConfig | None,
    amp: bool,
    max_grad_norm: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Loss, backward and gradient norm (clipped when ``max_grad_norm`` > 0) of one step, on
    gradients that start at zero or None: the per-sample ``−log p(x)``, outlier losses and the
    norm. The eager step and the CUDA graph of :class:`GraphedTrainingStep` both run this."""
    nll, lo = _per_sample_losses(model, x, x_out, ref_log_prob, ocfg, amp)
    outlier = lo.mean() if lo is not None else nll.new_zeros(())
    (nll.mean() + outlier).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    return nll, lo, norm


def training_step(
    model: Glow,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    x_out: Tensor | None = None,
    reference: Glow | None = None,
    ocfg: OutlierConfig | None = None,
    amp: bool = False,
    max_grad_norm: float = 0.0,
) -> StepResult:
    """One step on model inputs ``x`` (and outliers ``x_out`` with a frozen ``reference``).

    Samples whose log-likelihood is not finite are dropped from the batch; the
    step is skipped when more than 75% would go, or when the gradient is still
    not finite.
    """
    ref_lp = _reference_log_prob(reference, x_out, amp) if x_out is not None else None
    params = [p for p in model.parameters() if p.requires_grad]

    def attempt(xi: Tensor, xo: Tensor | None, rlp: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        return _backward(model, params, xi, xo, rlp, ocfg, amp, max_grad_norm)

    nll, lo, norm = attempt(x, x_out, ref_lp)
    dropped = 0
    # The step's one host sync. Under DDP the norm is of the all-reduced
    # gradient, so every rank takes the same branch.
    if not torch.isfinite(norm):
        keep_in = torch.isfinite(nll.detach())
        keep_out = torch.isfinite(lo.detach()) if lo is not None else None
        n_out = keep_out.numel() if keep_out is not None else 0
        kept_out = int(keep_out.sum()) if keep_out is not None else 0
        # Decided jointly over ranks: dropped, total, ranks without a finite in-dist sample, ranks
        # left without an outlier. Some ranks without outliers would run one forward of the DDP
        # model where the others run two (each broadcasts buffers): they would wait on each other.
        local = [keep_in.numel() + n_out - int(keep_in.sum()) - kept_out, keep_in.numel() + n_out]
        local += [int(not bool(keep_in.any())), int(keep_out is not None and kept_out == 0)]
        dropped, total, empty, no_out = (
            int(v) for v in dist.all_reduce_sum(torch.tensor(local, device=x.device))
        )
        uneven = 0 < no_out < dist.world_size()
        if dropped == 0 or dropped > MAX_DROPPED_FRACTION * total or empty or uneven:
            optimizer.zero_grad(set_to_none=True)
            return StepResult(nll.detach().mean(), _mean(lo), True, dropped)
        xo = x_out[keep_out] if keep_out is not None and keep_out.any() else None
        rlp = ref_lp[keep_out] if xo is not None else None
        nll, lo, norm = attempt(x[keep_in], xo, rlp)
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return StepResult(nll.detach().mean(), _mean(lo), True, dropped)
    optimizer.step()
    return StepResult(nll.detach().mean(), _mean(lo), False, dropped)


def _mean(t: Tensor | None) -> Tensor:
    """The logged mean of per-sample outlier losses; NaN marks a sample the model gives no finite
    likelihood (:func:`_per_sample_losses`), left out where its gradient was finite all the same."""
    return t.detach().nanmean() if t is not None else torch.zeros(())


# Optimizers whose step can be captured in a CUDA graph (``capturable``, learning rate as a tensor).
GRAPH_OPTIMIZERS = (torch.optim.Adam, torch.optim.Adamax)


def graphs_supported(tcfg: TrainConfig) -> bool:
    """Whether ``train.fast: auto`` replays this run's steps from CUDA graphs (on CUDA, which
    :func:`~densead.flows.fast.resolve_fast_path` checks): one process, and an optimizer whose
    step can be captured (:data:`GRAPH_OPTIMIZERS`)."""
    names = {o.__name__.lower() for o in GRAPH_OPTIMIZERS}
    return tcfg.optimizer in names and not dist.is_distributed()


class GraphedTrainingStep:
    """:func:`training_step` replayed from CUDA graphs at a fixed batch shape.

    A paper-size Glow's eager step launches about 10,000 kernels, and on an H200
    the host takes longer to launch them than the GPU takes to run them. Here the
    first ``warmup`` calls run the eager step on a side stream (cuDNN autotuning,
    compilation and the optimizer's state happen outside capture); the next call
    captures two graphs in one memory pool: **A**, forward, backward and the
    gradient norm (clipping included); **B**, the optimizer step. Every call then
    copies its batch into A's static inputs, replays A, reads the norm (the step's
    one host sync, as in the eager step) and replays B when the norm is finite.
    A non-finite norm, or a batch of another shape, takes the eager
    :func:`training_step` (dropping non-finite samples as it does); the gradients
    then point back to the graphs' tensors.

    The graphs run the kernels the eager step runs, on the same data, so the
    results are the eager step's up to the nondeterminism of cuDNN's algorithms.
    The optimizer (Adam or Adamax) is switched to ``capturable`` with its
    learning rate as a device tensor: set it with :func:`set_learning_rate`.
    One process only (no DistributedDataParallel) and CUDA only.

    A capture that fails raises, naming the batch shape; with ``fallback`` (graphs
    that ``train.fast: auto`` chose, not the user) it warns once and every step
    from then on is the eager :func:`training_step`.
    """

    def __init__(
        self,
        model: Glow,
        optimizer: torch.optim.Optimizer,
        reference: Glow | None = None,
        ocfg: OutlierConfig | None = None,
        amp: bool = False,
        max_grad_norm: float = 0.0,
        warmup: int = 3,
        fallback: bool = False,
    ) -> None:
        device = next(model.parameters()).device
        if not isinstance(optimizer, GRAPH_OPTIMIZERS):
            names = ", ".join(o.__name__.lower() for o in GRAPH_OPTIMIZERS)
            given = type(optimizer).__name__.lower()
            raise ValueError(f"train.fast: cudagraphs needs train.optimizer {names}, not {given}")
        self._check_device(device)
        if warmup < 1:
            raise ValueError(f"GraphedTrainingStep: warmup must be at least 1, got {warmup}")
        self.model, self.optimizer, self.reference, self.ocfg = model, optimizer, reference, ocfg
        self.amp, self.max_grad_norm, self.warmup, self.fallback = amp, max_grad_norm, warmup, fallback
        self.eager_only = False  # a capture failed under fallback: eager steps from then on
        self.params = [p for p in model.parameters() if p.requires_grad]
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self._make_capturable(device)
        self.calls = 0
        self.replays: tuple[Callable[[], None], Callable[[], None]] | None = None
        self.shapes: tuple | None = None
        self.grads: list[Tensor] | None = None

    # The CUDA mechanics, one method each (a CPU test stands in for them to check the rest).
    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"train.fast: cudagraphs needs a CUDA device, the model is on {device}")
        if dist.is_distributed():
            raise ValueError("train.fast: cudagraphs runs in one process; drop it under torchrun")

    def _make_capturable(self, device: torch.device) -> None:
        for group in self.optimizer.param_groups:
            group["capturable"] = True
        for state in self.optimizer.state.values():  # resumed state: step counters move to the GPU
            if "step" in state:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)

    def _on_side_stream(self, fn: Callable[[], StepResult]) -> StepResult:
        return on_side_stream(fn)

    def _record(self, body: Callable[[], None], pool: object) -> Callable[[], None]:
        """Capture ``body`` (its kernels are recorded, not run) and return the replay. A failed
        capture leaves the caller's stream current again (``torch.cuda.graph`` leaves its capture
        stream current when ending the capture raises)."""
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=pool):
                body()
        except BaseException:
            torch.cuda.set_stream(stream)
            raise
        return graph.replay

    def _new_pool(self) -> object:
        torch.cuda.synchronize()
        return torch.cuda.graph_pool_handle()

    def _forward_backward(self) -> None:
        """Graph A's body: gradients overwritten (not accumulated) on every run."""
        self.optimizer.zero_grad(set_to_none=False)  # none at capture: backward allocates them there
        x_out, ref_lp = self.static_x_out, None
        if x_out is not None:
            ref_lp = _reference_log_prob(self.reference, x_out, self.amp)
        nll, lo, self.norm = _backward(
            self.model,
            self.params,
            self.static_x,
            x_out,
            ref_lp,
            self.ocfg,
            self.amp,
            self.max_grad_norm,
        )
        self.nll = nll.detach().mean()
        self.outlier = _mean(lo) if lo is not None else nll.new_zeros(())

    def _eager(self, x: Tensor, x_out: Tensor | None) -> StepResult:
        return training_step(
            self.model, self.optimizer, x, x_out, self.reference, self.ocfg, self.amp, self.max_grad_norm
        )

    def __call__(self, x: Tensor, x_out: Tensor | None = None) -> StepResult:
        """One training step on model inputs ``x`` (and outliers ``x_out``), as :func:`training_step`."""
        shapes = (tuple(x.shape), None if x_out is None else tuple(x_out.shape))
        self.calls += 1
        if self.eager_only:
            return self._eager(x, x_out)
        if self.replays is None and self.calls <= self.warmup:
            return self._on_side_stream(lambda: self._eager(x, x_out))
        if self.replays is None:
            self.static_x = x.clone()
            self.static_x_out = x_out.clone() if x_out is not None else None
            self.shapes = shapes
            self.optimizer.zero_grad(set_to_none=True)
            pool = self._new_pool()
            try:
                self.replays = (
                    self._record(self._forward_backward, pool),
                    self._record(self.optimizer.step, pool),
                )
            except Exception as err:  # noqa: BLE001 - auto's fallback takes any failure; by name: RuntimeError
                if not self.fallback and not isinstance(err, RuntimeError):
                    raise
                first = err.__context__  # ending a broken capture raises anew: the cause came first
                cause = f"{error_line(first)}; then {error_line(err)}" if first else error_line(err)
                what = f"could not capture the training step of a batch of shape {tuple(x.shape)} ({cause})"
                if not self.fallback:
                    raise RuntimeError(f"train.fast: cudagraphs {what}; train without cudagraphs") from err
                warnings.warn(f"train.fast: auto: CUDA graphs {what}; eager steps from now on", stacklevel=2)
                # Nothing of the failed capture is kept (the eager step sets the gradients anew).
                self.eager_only, self.replays, self.shapes = True, None, None
                self.static_x = self.static_x_out = self.norm = self.nll = self.outlier = None
                return self._eager(x, x_out)
        if shapes != self.shapes:
            return self._restoring_grads(x, x_out)
        self.static_x.copy_(x)
        if x_out is not None:
            self.static_x_out.copy_(x_out)
        forward_backward, update = self.replays
        forward_backward()
        if self.grads is None:  # the tensors graph A writes the gradients into
            self.grads = [p.grad for p in self.params]
        if not torch.isfinite(self.norm):
            return self._restoring_grads(x, x_out)
        update()
        return StepResult(self.nll.clone(), self.outlier.clone(), False, 0)

    def _restoring_grads(self, x: Tensor, x_out: Tensor | None) -> StepResult:
        result = self._eager(x, x_out)
        if self.grads is not None:
            for p, g in zip(self.params, self.grads, strict=True):
                p.grad = g
        return result


def step_function(
    model: Glow,
    optimizer: torch.optim.Optimizer,
    fast: FastPath,
    reference: Glow | None = None,
    ocfg: OutlierConfig | None = None,
    amp: bool = False,
    max_grad_norm: float = 0.0,
    net: torch.nn.Module | None = None,
    graph_fallback: bool = False,
) -> Callable[..., StepResult]:
    """The step ``train_glow`` runs, called ``step(x, x_out=None)``: a :class:`GraphedTrainingStep`
    with ``fast.cudagraphs`` (eager after a failed capture with ``graph_fallback``), else
    :func:`training_step` on ``net`` (``model`` or its DistributedDataParallel wrapper)."""
    if fast.cudagraphs:
        return GraphedTrainingStep(
            model, optimizer, reference, ocfg, amp, max_grad_norm, fallback=graph_fallback
        )
    net = model if net is None else net

    def step(x: Tensor, x_out: Tensor | None = None) -> StepResult:
        return training_step(net, optimizer, x, x_out, reference, ocfg, amp, max_grad_norm)

    return step


# --------------------------------------------------------------------------- batches


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 8 + stream) % (2**62)


class _Batches:
    """Batch ``s`` of a uint8 image set as a pure function of ``(seed, s)``."""

    def __init__(self, images: Tensor, batch_size: int, seed: int, stream: int) -> None:
        self.images = images
        self.batch = min(batch_size, len(images))
        self.per_epoch = len(images) // self.batch
        self.seed, self.stream = seed, stream
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_step_seed(self.seed, epoch, self.stream))
            self._perm = torch.randperm(len(self.images), generator=g)
            self._epoch = epoch
        return self._perm[i * self.batch : (i + 1) * self.batch]

    def model_input(self, step: int, augment: str, n_bins: int) -> Tensor:
        device = self.images.device
        g = torch.Generator(device=device).manual_seed(_step_seed(self.seed, step, self.stream + 4))
        batch = self.images[self.indices(step).to(device)]
        return to_model_input(augment_batch(batch, augment, g), n_bins, dequantize=True, generator=g)


# --------------------------------------------------------------------------- the loop


def _check_channels(data: ImageSet, cfg: ModelConfig, where: str) -> None:
    if data.images.shape[1] != cfg.in_channels:
        raise ValueError(
            f"{where}: images have {data.images.shape[1]} channels but model.in_channels is "
            f"{cfg.in_channels} (set data.channels)"
        )


def train_glow(
    cfg: TrainRunConfig,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, StepResult], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train one Glow as ``cfg`` says; returns the checkpoint path.

    The checkpoint ``<output_dir>/checkpoint.pt`` is written every
    ``train.checkpoint_every`` steps and at the end. An existing one is continued with
    ``resume`` (a finished one is returned as it is; one of other settings is refused:
    :func:`check_output`), replaced with ``overwrite``, and refused otherwise.
    """
    tcfg, mcfg, ocfg = cfg.train, cfg.model, cfg.outlier
    if tcfg.steps < 1:
        raise ConfigError(f"train.steps must be >= 1 to train, got {tcfg.steps}")
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    device = dist.init_from_env(resolve_device(tcfg.device, "train.device"))
    check_output_dir(out_dir, files=(CHECKPOINT_NAME, "config.yaml"))
    done = check_output(ckpt_path, cfg, resume, overwrite)
    if done is not None and done["finished"] and done["step"] >= tcfg.steps:
        return ckpt_path
    if done is None and tcfg.init_from:  # files named by the config: before the data is read
        require_file(tcfg.init_from, "train.init_from")
    if ocfg is not None:
        require_file(ocfg.reference, "outlier.reference")
    torch.manual_seed(tcfg.seed)  # initial weights (InvConv rotations) only

    data = load_image_set(cfg.data, mcfg.n_bins, name="data")
    _check_channels(data, mcfg, "data")
    batches = _Batches(data.images.to(device), tcfg.batch_size, tcfg.seed, stream=0)
    out_batches, reference = None, None
    if ocfg is not None:
        odata = load_image_set(ocfg.data, mcfg.n_bins, name="outlier.data")
        _check_channels(odata, mcfg, "outlier.data")
        out_batches = _Batches(
            odata.images.to(device), ocfg.batch_size or tcfg.batch_size, tcfg.seed, stream=1
        )
        reference, ref_cfg = load_glow(ocfg.reference, device)
        if ref_cfg.n_bins != mcfg.n_bins or ref_cfg.in_channels != mcfg.in_channels:
            raise ValueError(f"{ocfg.reference}: reference model's data format differs from model config")
        reference.requires_grad_(False)

    model, optimizer, step, history = start_or_resume(mcfg, tcfg, ckpt_path, resume, device)
    if history and history[-1][0] % tcfg.log_every and step < tcfg.steps:
        history.pop()  # the end of a shorter run, off the log_every grid: a run this long never logs it
    fast = resolve_fast_path(tcfg.fast, device, where="train.fast", allow_cudagraphs=graphs_supported(tcfg))
    graphs_by_name = "cudagraphs" in (part.strip() for part in tcfg.fast.split(","))
    fast_training = FastTraining(model, fast)  # before DDP registers the parameters
    net = model
    if dist.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    train_step = step_function(
        model,
        optimizer,
        fast,
        reference,
        ocfg,
        tcfg.amp,
        tcfg.max_grad_norm,
        net=net,
        graph_fallback=not graphs_by_name,
    )
    if reference is not None:
        apply_fast_path(reference, fast)

    def save(finished: bool) -> None:
        if not dist.is_main():
            return
        # ``model`` is the Glow under any DDP wrapper; compiling in place keeps its keys plain.
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": portable_optimizer_state(optimizer),
                "step": step,
                "finished": finished,
                "history": history,
                "model_config": to_dict(mcfg),
                "config": checkpoint_config(cfg),
            },
            ckpt_path,
        )
        # With the checkpoint, not before: a run stopped before its first checkpoint leaves an
        # earlier run's checkpoint and config.yaml as they were, a matching pair.
        save_config(cfg, out_dir / "config.yaml")

    n_dims = math.prod(data.images.shape[1:])
    model.train()
    show = progress and dist.is_main()
    bar = tqdm(total=tcfg.steps, initial=step, desc=f"train {out_dir.name}", disable=not show, leave=False)
    while step < tcfg.steps:
        set_learning_rate(optimizer, learning_rate(tcfg, step))
        x = dist.shard(batches.model_input(step, cfg.data.augment, mcfg.n_bins))
        x_out = None
        if ocfg is not None:
            x_out = dist.shard(out_batches.model_input(step, ocfg.data.augment, mcfg.n_bins))
        fast_training.before_step()
        result = train_step(x, x_out)
        step += 1
        if on_step is not None:
            on_step(step, result)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            logged = dist.all_reduce_mean(
                torch.stack([result.nll.float(), result.outlier.float().to(device)])
            )
            bpd = float(logged[0]) / (n_dims * math.log(2))
            history.append([step, bpd, float(logged[1])])
            bar.set_postfix(bpd=f"{bpd:.3f}", outlier=f"{float(logged[1]):.1f}")
        bar.update(1)
        if step % tcfg.checkpoint_every == 0 and step < tcfg.steps:
            save(finished=False)
    bar.close()
    save(finished=True)
    dist.barrier()  # the checkpoint is complete before any rank returns its path
    return ckpt_path
