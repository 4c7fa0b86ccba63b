"""The fast path of a Glow: which speed levers to pull on which device, and pulling them.

| lever | what it does | effect on ``log p`` |
|---|---|---|
| ``fused`` | ActNorm + 1×1 conv as one 1×1 conv (weights of all steps built at once) | float rounding |
| ``channels_last`` | NHWC weights and activations (tensor-core convolutions) | float rounding |
| ``compile`` | ``torch.compile`` of every flow step, in place (inductor; Triton on CUDA) | float rounding |
| ``recompute`` | store only each step's input; recompute its activations in backward | none (same ops) |
| ``cudagraphs`` | the whole training step replayed from CUDA graphs, CUDA only | none (same kernels) |

bf16 autocast is not among them: it changes ``log p`` by more than rounding, so it
stays its own switch (``TrainConfig.amp``, ``GlowScorer(amp=...)``).

A mode string selects levers: ``auto`` pulls every speed lever the device supports
(``fused``, ``channels_last`` and ``compile`` on CUDA, ``compile`` only where Triton
is installed; none on CPU, so a CPU run is exactly the plain fp32 path), plus
``cudagraphs`` where the caller can replay whole steps (the image Glow's trainer
in one process with Adam or Adamax), ``on`` fused, channels_last and compile on
any device, ``off`` none, or a comma-separated list of levers and at most one of
``auto``/``on``, such as ``fused,channels_last`` or ``auto,recompute``.
``recompute`` trades compute for memory (for batches that do not fit otherwise)
and is asked for by name. ``cudagraphs`` removes the host's per-kernel launch
overhead at a fixed batch shape (:class:`densead.train.GraphedTrainingStep`:
forward, backward and optimizer step captured once, replayed every step, in the
image Glow's trainer; :class:`GraphedCall` for
:class:`~densead.detectors.glow.GlowScorer`'s forwards, by name; the road Glow's
trainer refuses it). Why whole steps: on an H200 the paper-size Glow's eager
training step at batch 256 issues about 10,000 kernels and its host time exceeds
its GPU time (session 6: 232 ms wall vs 141 ms of kernels in fp32; 276 vs 77 ms
with bf16, fused and channels_last), and compiling each flow step with
``mode="reduce-overhead"`` fails outright: all 96 steps share one compiled graph,
so each replay overwrites the outputs of the previous step that the backward
pass still needs. Replayed whole, the step is bound by the GPU (session 20, H200,
batch 256, bf16 + fused + channels_last + compile: 62 ms wall, 56 ms of kernels;
4,535 training images/s against 1,024 eager, plain fp32 933;
docs/results_gpu_speed.md). None of the levers changes parameters or
``state_dict`` keys: checkpoints written with and without the fast path are
interchangeable, and the plain path stays the reference the tests compare
against.

``compile`` is regional: each :class:`~densead.flows.glow.FlowStep` is compiled
in place (``nn.Module.compile``), not the whole model. All 3·K steps share one
compiled code object (a few variants: scale shapes, grad modes, train/eval; dynamo's
recompile limit is raised to cover them), so a paper-size
Glow compiles in about the time of one step instead of 96 unrolled ones, the
module keeps its plain ``state_dict`` (no ``_orig_mod.`` prefix), and
DistributedDataParallel wraps it unchanged. The steps hold >99% of the FLOPs;
squeeze, split and prior stay eager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from densead.flows.glow import FlowStep, Glow
from densead.flows.layers import ActNorm

__all__ = [
    "FAST_LEVERS",
    "FAST_MODES",
    "FastPath",
    "FastTraining",
    "GraphedCall",
    "apply_fast_path",
    "compile_flow_steps",
    "needs_data_init",
    "resolve_fast_path",
    "saved_tensor_bytes",
]

FAST_LEVERS = ("fused", "channels_last", "compile", "recompute", "cudagraphs")
FAST_MODES = ("auto", "on", "off")
# What ``on`` (on any device) and ``auto`` (where supported; with ``cudagraphs`` where allowed) pull.
SPEED_LEVERS = ("fused", "channels_last", "compile")

# torch.compile backend of the compile lever; tests on CPU swap in "aot_eager"
# (the same graph capture and autograd, without inductor's C++ code generation).
COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class FastPath:
    """Resolved levers (see the module docstring)."""

    fused: bool = False
    channels_last: bool = False
    compile: bool = False
    recompute: bool = False
    cudagraphs: bool = False  # whole training steps as CUDA graphs (densead.train.GraphedTrainingStep)

    def __str__(self) -> str:
        on = [name for name in FAST_LEVERS if getattr(self, name)]
        return ",".join(on) if on else "off"


def compile_supported(device: torch.device) -> bool:
    """Whether ``torch.compile`` can generate GPU kernels here (CUDA with Triton)."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - very old torch
        return False
    return has_triton()


def resolve_fast_path(
    mode: str,
    device: torch.device | str,
    allow_compile: bool = True,
    where: str = "fast",
    allow_cudagraphs: bool = False,
) -> FastPath:
    """The levers a mode string asks for on ``device``.

    Args:
        mode: ``auto``, ``on``, ``off``, or a comma-separated list of levers
            (:data:`FAST_LEVERS`), optionally with one of ``auto`` / ``on``:
            ``fused,channels_last``, ``auto,recompute``.
        device: where the model runs; ``auto`` pulls levers only on CUDA.
        allow_compile: ``False`` makes ``auto`` leave ``compile`` off (for short
            runs over many input shapes, where compiling costs more than it
            saves); an explicit ``on`` or ``compile`` still compiles.
        where: the config key, for error messages.
        allow_cudagraphs: ``True`` makes ``auto`` add ``cudagraphs`` on CUDA, for a
            caller that can replay whole steps (the image Glow's trainer in one
            process with Adam or Adamax: :func:`densead.train.graphs_supported`).

    Raises:
        ValueError: an unknown name, or ``cudagraphs`` on a device other than CUDA.
    """
    device = torch.device(device)
    parts = [part.strip() for part in mode.split(",") if part.strip()]
    unknown = [part for part in parts if part not in FAST_LEVERS + FAST_MODES]
    bases = [part for part in parts if part in FAST_MODES]
    if unknown or not parts or len(bases) > 1 or ("off" in bases and len(parts) > 1):
        raise ValueError(
            f"{where}: unknown value {mode!r}; valid: {', '.join(FAST_MODES)} or a comma-separated "
            f"list of {', '.join(FAST_LEVERS)}, optionally with one of auto, on"
        )
    levers = {part for part in parts if part in FAST_LEVERS}
    if bases == ["on"]:
        levers.update(SPEED_LEVERS)
    elif bases == ["auto"] and device.type == "cuda":
        levers.update({"fused", "channels_last"})
        if allow_compile and compile_supported(device):
            levers.add("compile")
        if allow_cudagraphs:
            levers.add("cudagraphs")
    if "cudagraphs" in levers and device.type != "cuda":
        raise ValueError(f"{where}: cudagraphs needs a CUDA device, the model runs on {device}")
    return FastPath(*(lever in levers for lever in FAST_LEVERS))


def needs_data_init(module: nn.Module) -> bool:
    """Whether some ActNorm in ``module`` still waits for its data-dependent init."""
    return any(not m.is_initialized() for m in module.modules() if isinstance(m, ActNorm))


def compile_flow_steps(module: nn.Module, backend: str | None = None) -> int:
    """``torch.compile`` every :class:`FlowStep` inside ``module`` in place; returns how many.

    Compile after ActNorm's data-dependent init (see :func:`needs_data_init`):
    an uninitialized step traces the init, breaks its graph there and is
    compiled again once initialized.
    """
    steps = [m for m in module.modules() if isinstance(m, FlowStep)]
    _raise_recompile_limit(len({step.layers[0].bias.numel() for step in steps}))
    for step in steps:
        step.compile(backend=backend or COMPILE_BACKEND)
    return len(steps)


def _raise_recompile_limit(widths: int) -> None:
    """Let dynamo compile every variant of the flow step a model with ``widths`` step widths needs.

    All flow steps share one code object, and each input shape in each grad mode and train/eval
    state is a variant of it: a 4-scale Glow's training, then outlier training (its frozen
    reference runs the steps without gradients), needs 9 to 11 (counted on CPU), more than
    dynamo's default limit of 8, past which steps run eagerly with only a log warning; compiled
    scoring in the same process adds more (a batch of one is a shape of its own). The limit is
    process-wide: it is raised here, never lowered.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 8 * widths + 8))


def apply_fast_path(model: Glow, fast: FastPath) -> Glow:
    """Switch ``model``'s levers in place and return it.

    For a model with initialized ActNorms (scoring, finetuning). To train a
    model from any state use :class:`FastTraining`, which compiles only once
    ActNorm's data-dependent init has run.
    """
    model.set_fast(fused=fast.fused, channels_last=fast.channels_last, recompute=fast.recompute)
    if fast.compile:
        compile_flow_steps(model)
    return model


class FastTraining:
    """The fast path of a model about to be trained from any state.

    Pulls ``fused``, ``channels_last`` and ``recompute`` at once (before
    DistributedDataParallel registers the parameters: channels_last replaces
    their storage) and ``compile`` in :meth:`before_step`, once ActNorm's
    data-dependent init has run, so each flow step is traced once. Compiling
    is in place: ``model.state_dict()`` keeps its plain keys.
    """

    def __init__(self, model: Glow, fast: FastPath) -> None:
        self.model, self.fast = model, fast
        model.set_fast(fused=fast.fused, channels_last=fast.channels_last, recompute=fast.recompute)
        self.compile_pending = fast.compile

    def before_step(self) -> None:
        """Call before every training step (cheap: a host-side check once compiled)."""
        if self.compile_pending and not needs_data_init(self.model):
            compile_flow_steps(self.model)
            self.compile_pending = False


class saved_tensor_bytes:  # noqa: N801 — used like a function: ``with saved_tensor_bytes() as saved:``
    """Count the bytes autograd keeps from the forward pass for the backward pass.

    The activation memory of a training step, read with saved-tensor hooks: the same on every
    device, so a CPU run shows what the memory levers (bf16, ``recompute``) save on a GPU::

        with saved_tensor_bytes() as saved:
            loss = -model(x).log_prob().mean()
        saved.total  # bytes
    """

    def __init__(self) -> None:
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self) -> saved_tensor_bytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def on_side_stream(fn: Callable[[], object]) -> object:
    """``fn()`` on a new CUDA stream, ordered after and before the current one: warm-up runs
    before a capture go there, so lazy initializations (cuDNN/cuBLAS handles, autotuning, the
    caching allocator) happen off the stream the graph will be captured on."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


class GraphedCall:
    """``fn`` on fixed-shape CUDA tensors, captured once as a CUDA graph and replayed.

    For inference (``fn`` runs under ``torch.no_grad``): the graph is of the first call's
    inputs (shapes, dtypes, devices; a data set's first batch is a full one). The first
    ``warmup`` calls of those run ``fn`` eagerly on a side stream, the next captures it, and
    every call after copies its inputs into the graph's static inputs and replays. The
    returned outputs are the graph's static tensors: they are overwritten by the next call
    (clone what you keep). Inputs of another shape (a last, partial batch) run ``fn`` eagerly.
    CUDA only.
    """

    def __init__(self, fn: Callable[..., object], warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"GraphedCall: warmup must be at least 1, got {warmup}")
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.signature: list[tuple] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, *inputs: torch.Tensor) -> object:
        if any(t.device.type != "cuda" for t in inputs):
            raise ValueError(
                f"GraphedCall: inputs must be CUDA tensors, got {[str(t.device) for t in inputs]}"
            )
        signature = [(t.shape, t.dtype, t.device) for t in inputs]
        if self.signature is None:
            self.signature = signature
        with torch.no_grad():
            if signature != self.signature:
                return self.fn(*inputs)
            self.calls += 1
            if self.graph is None and self.calls <= self.warmup:
                return on_side_stream(lambda: self.fn(*inputs))
            if self.graph is None:
                self.static_inputs = [t.clone() for t in inputs]
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.static_out = self.fn(*self.static_inputs)
            for static, t in zip(self.static_inputs, inputs, strict=True):
                static.copy_(t)
            self.graph.replay()
            return self.static_out
