"""Shared fixtures: seeded RNG, paths to the real data in ../shared/data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; on a shared 2-core machine extra threads only wait.
    A module takes it for all its tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    """The real datasets (CIFAR-10 test, CamVid, ...); CI has them beside the repo."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"real test data expected at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture
def compile_spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Flow steps compile through ``aot_eager`` (graph capture and autograd without inductor's slow
    C++ code generation on CPU); returns a list that gets, per ``compile_flow_steps`` call, whether
    some ActNorm still waited for its data-dependent init."""
    import densead.flows.fast as fast_module
    from densead.flows import needs_data_init

    calls: list[bool] = []
    real = fast_module.compile_flow_steps

    def spy(module, backend=None):
        calls.append(needs_data_init(module))
        return real(module, backend)

    monkeypatch.setattr(fast_module, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(fast_module, "compile_flow_steps", spy)
    torch._dynamo.reset()
    return calls
