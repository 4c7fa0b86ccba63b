"""The fast path of a Glow: which speed levers to pull on which device, and pulling them.

| lever | what it does | effect on ``log p`` |
|---|---|---|
| ``fused`` | ActNorm + invertible 1×1 conv as one 1×1 convolution | float rounding |
| ``channels_last`` | NHWC weights and activations (tensor-core convolutions) | float rounding |
| ``compile`` | ``torch.compile`` of every flow step, in place (inductor; Triton on CUDA) | float rounding |

bf16 autocast is not among them: it changes ``log p`` by more than rounding, so it
stays its own switch (``TrainConfig.amp``, ``GlowScorer(amp=...)``).

A mode string selects levers: ``auto`` pulls every lever the device supports
(all three on CUDA, ``compile`` only where Triton is installed; none on CPU, so a
CPU run is exactly the plain fp32 path), ``on`` all three on any device, ``off``
none, or a comma-separated subset such as ``fused,channels_last``. None of them
changes parameters or ``state_dict`` keys: checkpoints written with and without
the fast path are interchangeable, and the plain path stays the reference the
tests compare against.

``compile`` is regional: each :class:`~densead.flows.glow.FlowStep` is compiled
in place (``nn.Module.compile``), not the whole model. All 3·K steps share one
compiled code object (a few variants: scale shapes, train/eval), so a paper-size
Glow compiles in about the time of one step instead of 96 unrolled ones, the
module keeps its plain ``state_dict`` (no ``_orig_mod.`` prefix), and
DistributedDataParallel wraps it unchanged. The steps hold >99% of the FLOPs;
squeeze, split and prior stay eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from densead.flows.glow import FlowStep, Glow
from densead.flows.layers import ActNorm

__all__ = [
    "FAST_LEVERS",
    "FAST_MODES",
    "FastPath",
    "apply_fast_path",
    "compile_flow_steps",
    "needs_data_init",
    "resolve_fast_path",
]

FAST_LEVERS = ("fused", "channels_last", "compile")
FAST_MODES = ("auto", "on", "off")

# torch.compile backend of the compile lever; tests on CPU swap in "aot_eager"
# (the same graph capture and autograd, without inductor's C++ code generation).
COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class FastPath:
    """Resolved levers (see the module docstring)."""

    fused: bool = False
    channels_last: bool = False
    compile: bool = False

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
    mode: str, device: torch.device | str, allow_compile: bool = True, where: str = "fast"
) -> FastPath:
    """The levers a mode string asks for on ``device``.

    Args:
        mode: ``auto``, ``on``, ``off``, or a comma-separated subset of
            ``fused``, ``channels_last``, ``compile``.
        device: where the model runs; ``auto`` pulls levers only on CUDA.
        allow_compile: ``False`` makes ``auto`` leave ``compile`` off (for short
            runs over many input shapes, where compiling costs more than it
            saves); an explicit ``on`` or ``compile`` still compiles.
        where: the config key, for error messages.
    """
    device = torch.device(device)
    mode = mode.strip()
    if mode == "off":
        return FastPath()
    if mode == "on":
        return FastPath(True, True, True)
    if mode == "auto":
        cuda = device.type == "cuda"
        return FastPath(cuda, cuda, allow_compile and compile_supported(device))
    levers = [part.strip() for part in mode.split(",") if part.strip()]
    unknown = [lever for lever in levers if lever not in FAST_LEVERS]
    if unknown or not levers:
        raise ValueError(
            f"{where}: unknown value {mode!r}; valid: {', '.join(FAST_MODES)} or a comma-separated "
            f"subset of {', '.join(FAST_LEVERS)}"
        )
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
    for step in steps:
        step.compile(backend=backend or COMPILE_BACKEND)
    return len(steps)


def apply_fast_path(model: Glow, fast: FastPath) -> Glow:
    """Switch ``model``'s levers in place and return it.

    Under DistributedDataParallel, apply before wrapping (channels_last
    replaces the parameters' storage). For training from scratch, pull
    ``compile`` only after the first step (:func:`needs_data_init`), as
    ``densead.train.train_glow`` does.
    """
    model.set_fast(fused=fast.fused, channels_last=fast.channels_last)
    if fast.compile:
        compile_flow_steps(model)
    return model
