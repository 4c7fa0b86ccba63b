"""The fast path (fused ActNorm + 1×1 conv, channels_last, torch.compile, bf16) against the plain path.

The plain path is the reference: every lever must give its ``log p``, latents
and log-det maps up to float rounding (bf16 autocast up to a stated tolerance),
leave checkpoints unchanged, and stay off on CPU unless asked for.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import densead.flows.glow as glow_module
from densead.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainRunConfig,
    from_dict,
    to_dict,
)
from densead.detectors.glow import GlowScorer, get_detector
from densead.flows import (
    ActNorm,
    FastPath,
    FlowSequence,
    FlowStep,
    FlowSteps,
    Glow,
    GraphedCall,
    apply_fast_path,
    compile_flow_steps,
    flow_step,
    glow_coupling_net,
    needs_data_init,
    resolve_fast_path,
)
from densead.flows.fast import compile_supported, saved_tensor_bytes
from densead.flows.layers import fused_parameters
from densead.train import load_checkpoint, load_glow, train_glow

# Relative tolerance of fused vs plain: the fused weight W·diag(s) and bias W·diag(s)·b are
# rounded once more than the two-pass plain path, a few ulps per activation (fp32 ulp ≈ 6e-8)
# compounded over the steps of a tiny Glow.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@torch.no_grad()
def perturbed(module: nn.Module, x: torch.Tensor, std: float = 0.05) -> nn.Module:
    """ActNorms initialized on ``x``, then every parameter perturbed (zero-initialized couplings
    would make the coupling a no-op); eval mode."""
    module.train()(x)
    for p in module.parameters():
        p.add_(std * torch.randn_like(p))
    return module.eval()


def tiny_glow(dtype: torch.dtype, x: torch.Tensor, **kwargs) -> Glow:
    return perturbed(Glow(3, n_scales=2, n_steps=2, hidden=16, **kwargs).to(dtype), x)


def images(dtype: torch.dtype, batch: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, dtype=dtype) - 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_matches_plain_step(dtype: torch.dtype) -> None:
    x = torch.randn(3, 6, 8, 8, dtype=dtype)
    step = perturbed(flow_step(6, glow_coupling_net(16, 3)).to(dtype), x, std=0.1)
    y_plain, ld_plain = step(x)
    step.fused = True
    y_fused, ld_fused = step(x)
    assert ld_fused.shape == ld_plain.shape == (3, 8, 8) and ld_fused.dtype == dtype
    assert rel_err(y_fused, y_plain) < RTOL[dtype]
    assert rel_err(ld_fused, ld_plain) < RTOL[dtype]
    assert (step.inverse(y_fused) - x).abs().max() < (1e-4 if dtype == torch.float32 else 1e-10)


def test_fused_step_logdet_matches_autograd_jacobian() -> None:
    """The fused map's own Jacobian, not only agreement with the plain path."""
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    step = perturbed(flow_step(4, glow_coupling_net(8, 3)).double(), x, std=0.1)
    step.fused = True
    jac = torch.autograd.functional.jacobian(lambda v: step(v.view_as(x))[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    assert torch.allclose(step(x)[1].sum(), logabsdet, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_glow_matches_plain_glow(dtype: torch.dtype) -> None:
    x = images(dtype)
    model = tiny_glow(dtype, x)
    plain = model(x)
    fused = model.set_fast(fused=True, channels_last=False)(x)
    assert model.fused
    assert rel_err(fused.log_prob(), plain.log_prob()) < RTOL[dtype]
    for name in ("latents", "contributions"):
        for a, b in zip(getattr(fused, name), getattr(plain, name), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert rel_err(a, b) < RTOL[dtype], name
    # the log-det maps alone: contribution minus the prior term of the same latents
    for scale, z, c_f, c_p in zip(
        model.scales, plain.latents, fused.contributions, plain.contributions, strict=True
    ):
        prior = scale.prior.log_prob_map(z)
        assert rel_err(c_f - prior, c_p - prior) < 10 * RTOL[dtype]


def test_fused_glow_inverse_round_trip() -> None:
    x = images(torch.float64)
    model = tiny_glow(torch.float64, x, fused=True)
    out = model(x)
    assert (model.inverse(out.latents) - x).abs().max() < 1e-10
    assert torch.isfinite(model.sample(2, 16, 16)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_parameters_of_many_steps_are_each_steps_own(dtype: torch.dtype) -> None:
    """The batched build of K steps' fused weights, biases and log-dets against the formulas of
    each step on its own (W' = W·diag(exp(log_scale)), c = W'·b, Σ log_scale + Σ log_s), values
    and gradients of every parameter."""
    x = torch.randn(3, 6, 4, 4, dtype=dtype)
    steps = [perturbed(flow_step(6, glow_coupling_net(8, 3)).to(dtype), x, std=0.1) for _ in range(3)]
    actnorms, invconvs = [s.layers[0] for s in steps], [s.layers[1] for s in steps]
    params = fused_parameters(actnorms, invconvs)
    tol = RTOL[dtype]
    for (w, c, logdet), actnorm, invconv in zip(params, actnorms, invconvs, strict=True):
        w_ref = invconv.weight() * actnorm.log_scale.exp()[None, :]
        assert w.shape == (6, 6) and c.shape == (6,) and logdet.shape == () and w.dtype == dtype
        assert rel_err(w, w_ref) < tol and rel_err(c, w_ref @ actnorm.bias) < tol
        assert rel_err(logdet, actnorm.log_scale.sum() + invconv.log_s.sum()) < tol
    assert len({float(w.detach().sum()) for w, _, _ in params}) == 3, "each step gets its own parameters"

    probes = [torch.randn(6, 6, dtype=dtype), torch.randn(6, dtype=dtype), torch.randn((), dtype=dtype)]

    def loss(per_step: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return sum((t * probe).sum() for triple in per_step for t, probe in zip(triple, probes, strict=True))

    modules = [m for s in steps for m in s.layers[:2]]
    batched = torch.autograd.grad(loss(params), [p for m in modules for p in m.parameters()])
    single = [fused_parameters([a], [i])[0] for a, i in zip(actnorms, invconvs, strict=True)]
    one_by_one = torch.autograd.grad(loss(single), [p for m in modules for p in m.parameters()])
    for g_b, g_s in zip(batched, one_by_one, strict=True):
        assert g_s.abs().sum() > 0 and rel_err(g_b, g_s) < 10 * tol


def test_flow_steps_build_all_fused_parameters_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused Glow builds the fused parameters once per scale for all its steps, with the
    per-step path's result; one step off the fused path sends the scale back to step by step."""
    calls: list[int] = []
    real = glow_module.fused_parameters
    monkeypatch.setattr(glow_module, "fused_parameters", lambda a, i: calls.append(len(a)) or real(a, i))
    x = images(torch.float32)
    model = perturbed(Glow(3, n_scales=2, n_steps=3, hidden=16), x).set_fast(fused=True, channels_last=False)
    assert all(isinstance(scale.steps, FlowSteps) for scale in model.scales)
    batched = model(x)
    assert calls == [3, 3], "one batched build per scale"
    for scale in model.scales:  # the same steps, each building its own fused parameters
        monkeypatch.setattr(scale.steps, "forward", lambda h, seq=scale.steps: FlowSequence.forward(seq, h))
    step_by_step = model(x)
    assert calls == [3, 3], "no batched build: each step builds its own in fused_actnorm_invconv"
    assert rel_err(batched.log_prob(), step_by_step.log_prob()) < RTOL[torch.float32]
    for a, b in zip(batched.contributions, step_by_step.contributions, strict=True):
        assert rel_err(a, b) < RTOL[torch.float32]
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(glow_module, "fused_parameters", lambda a, i: calls.append(len(a)) or real(a, i))
    model.scales[0].steps.layers[1].fused = False
    model(x)
    assert calls == [3], "scale 1 goes step by step (its fused steps build their own), scale 2 batched"


def test_fused_before_actnorm_init_falls_back_and_initializes_identically(monkeypatch) -> None:
    calls = []
    real = glow_module.fused_actnorm_invconv
    monkeypatch.setattr(glow_module, "fused_actnorm_invconv", lambda *a: calls.append(1) or real(*a))
    plain = Glow(3, n_scales=2, n_steps=2, hidden=16)
    fused = copy.deepcopy(plain).set_fast(fused=True, channels_last=False)
    x = images(torch.float32)
    assert needs_data_init(fused)
    out_plain, out_fused = plain.train()(x), fused.train()(x)
    assert not calls, "an uninitialized ActNorm must take the plain path"
    assert not needs_data_init(fused)
    for (name, a), (_, b) in zip(plain.state_dict().items(), fused.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(out_fused.log_prob(), out_plain.log_prob())
    fused(x)
    assert len(calls) == 4, "every initialized step fuses"


def test_initialized_flag_is_reread_after_loading_a_state_dict() -> None:
    model = Glow(3, n_scales=2, n_steps=1, hidden=8)
    fresh = copy.deepcopy(model.state_dict())  # state_dict() shares storage with the buffers
    model.train()(images(torch.float32))
    assert not needs_data_init(model)
    model.load_state_dict(fresh)
    assert needs_data_init(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_gradients_match_plain_gradients(dtype: torch.dtype) -> None:
    x = images(dtype)
    model = tiny_glow(dtype, x).train()

    def grads(fused: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.set_fast(fused=fused, channels_last=False)
        (-model(x).log_prob().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, fused = grads(False), grads(True)
    assert plain.keys() == fused.keys()
    # Per tensor, relative to its norm: fp32 gradients sum thousands of rounded terms.
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, g in plain.items():
        assert torch.linalg.norm(fused[name] - g) <= tol * torch.linalg.norm(g) + 1e-12, name
    actnorm_bias = [n for n in plain if n.endswith("layers.0.bias")]
    assert actnorm_bias and all(plain[n].abs().sum() > 0 for n in actnorm_bias)


@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_matches_contiguous(fused: bool) -> None:
    x = images(torch.float32)
    model = tiny_glow(torch.float32, x)
    plain = model(x)
    keys = list(model.state_dict())
    assert rel_err(model(x.contiguous(memory_format=torch.channels_last)).log_prob(), plain.log_prob()) < 1e-6
    model.set_fast(fused=fused, channels_last=True)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    out = model(x)
    assert rel_err(out.log_prob(), plain.log_prob()) < 1e-5
    for a, b in zip(out.contributions, plain.contributions, strict=True):
        assert rel_err(a, b) < 1e-5
    assert (model.inverse(out.latents) - x).abs().max() < 1e-4
    assert list(model.state_dict()) == keys
    model.set_fast(fused=False, channels_last=False)
    assert all(w.is_contiguous() for w in convs)


def compiled_graphs() -> int:
    """Graphs dynamo compiled since the last reset (0 means everything fell back to eager)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_compile_matches_eager() -> None:
    """Inductor on CPU (gcc), a tiny Glow with every lever: the same log p as the plain eager model.

    Deliberately tiny (1 channel, 8×8, L=1, K=1, 4 hidden): inductor's C++ code
    generation takes ~15 s for it on a cold cache on a loaded 2-core CPU, more
    per extra scale. Splits and backward go through ``torch.compile`` in the
    ``aot_eager`` tests below.
    """
    torch._dynamo.reset()
    x = torch.rand(2, 1, 8, 8) - 0.5
    model = perturbed(Glow(1, n_scales=1, n_steps=1, hidden=4), x)
    reference = model(x)
    keys = list(model.state_dict())
    assert apply_fast_path(model, FastPath(fused=True, channels_last=True, compile=True)) is model
    with torch.no_grad():
        out = model(x)
    assert compiled_graphs() >= 1
    assert rel_err(out.log_prob(), reference.log_prob()) < 1e-5
    for a, b in zip(out.contributions, reference.contributions, strict=True):
        assert rel_err(a, b) < 1e-5
    assert list(model.state_dict()) == keys, "compiling in place keeps plain state_dict keys"


def test_compiled_steps_see_the_batched_fused_weights_with_static_sizes() -> None:
    """The fused weights built for all steps at once reach each compiled step as inputs. At the
    second scale's width dynamo would make their sizes symbolic, which inductor cannot lower for a
    channels_last convolution ("cannot determine truth value of Relational: 1 < s27"): they must
    stay static, as parameters do. A recording backend sees what inductor would be given."""
    torch._dynamo.reset()
    seen: list[torch.Tensor] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        for node in gm.graph.find_nodes(op="placeholder"):  # traced inputs, sizes as dynamo sees them
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                seen.append(value)
        return gm.forward

    x = images(torch.float32)
    model = tiny_glow(torch.float32, x).set_fast(fused=True, channels_last=True)
    reference = model(x).log_prob()
    compile_flow_steps(model, backend=recording_backend)
    with torch.no_grad():
        out = model(x)
    matrices = [t for t in seen if t.dim() == 2]
    symbolic = [tuple(t.shape) for t in matrices if not all(isinstance(d, int) for d in t.shape)]
    assert not symbolic, f"symbolic weight sizes: {symbolic}"
    assert {t.shape[0] for t in matrices} == {12, 24}, "both scales' weights reached the compiled steps"
    assert rel_err(out.log_prob(), reference) < 1e-5


def test_compiled_training_step_matches_eager_gradients() -> None:
    """Forward and backward through compiled flow steps (backend ``aot_eager``: inductor's graph
    capture and autograd without its slow C++ code generation on CPU), fused, two scales."""
    torch._dynamo.reset()
    x = images(torch.float32)
    model = tiny_glow(torch.float32, x).train()
    model.set_fast(fused=True, channels_last=False)
    (-model(x).log_prob().mean()).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert compile_flow_steps(model, backend="aot_eager") == 4
    (-model(x).log_prob().mean()).backward()
    assert compiled_graphs() >= 1
    for name, p in model.named_parameters():
        assert torch.linalg.norm(p.grad - eager[name]) <= 1e-5 * torch.linalg.norm(eager[name]) + 1e-12, name


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_log_p_within_tolerance(fused: bool) -> None:
    """bf16 keeps 8 significant bits (relative rounding ≤ 2^-9 ≈ 0.2%, ~0.4% per
    activation after a conv's accumulation); only the coupling networks and the
    1×1 convs run in it, while log-dets, the LU weight and the prior stay fp32, so
    per-activation errors average out in the summed ``log p``. 1% of ``log p``
    (≈ 0.015 bits/dim on 8-bit images) bounds it with a wide margin: this tiny
    Glow lands near 0.02%."""
    x = images(torch.float32)
    model = tiny_glow(torch.float32, x).set_fast(fused=fused, channels_last=False)
    with torch.no_grad():
        reference = model(x).log_prob()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.log_prob().dtype == torch.float32
    assert all(c.dtype == torch.float32 for c in out.contributions)
    err = ((out.log_prob() - reference) / reference).abs().max()
    assert 0 < err < 0.01, "bf16 must differ a little (it ran) and not much"


def test_auto_mode_is_plain_on_cpu_and_all_levers_on_cuda() -> None:
    assert resolve_fast_path("auto", "cpu") == FastPath()
    assert resolve_fast_path("auto", torch.device("cpu")) == FastPath(False, False, False)
    cuda = resolve_fast_path("auto", torch.device("cuda"))
    assert cuda.fused and cuda.channels_last and cuda.compile == compile_supported(torch.device("cuda"))
    assert not resolve_fast_path("auto", "cuda", allow_compile=False).compile
    assert resolve_fast_path("on", "cpu") == FastPath(True, True, True)
    assert resolve_fast_path("off", "cuda") == FastPath()
    assert resolve_fast_path("fused, channels_last", "cpu") == FastPath(True, True, False)
    assert str(resolve_fast_path("compile", "cpu")) == "compile"
    with pytest.raises(ValueError, match=r"train\.fast: unknown value 'fuse'"):
        resolve_fast_path("fuse", "cpu", where="train.fast")
    assert TrainConfig().fast == "auto"
    assert from_dict(TrainConfig, {"fast": "fused,compile"}).fast == "fused,compile"
    with pytest.raises(ConfigError, match="'fastpath'"):
        from_dict(TrainConfig, {"fastpath": "on"})


def test_scorer_auto_is_plain_on_cpu_and_fused_scores_match() -> None:
    x = images(torch.float32)
    model = tiny_glow(torch.float32, x)
    dets = [get_detector("raw"), get_detector("last_scale")]
    plain = GlowScorer(model).score(x, dets)
    assert not model.fused and not model.channels_last
    expected = -model(x).log_prob()
    assert torch.equal(plain["raw"], expected.detach())
    fast = GlowScorer(model, fast="fused,channels_last").score(x, dets)
    assert model.fused and model.channels_last
    for name in plain:
        assert rel_err(fast[name], plain[name]) < 1e-5


def test_checkpoint_of_compiled_fused_training_loads_into_plain_glow(tmp_path: Path, compile_spy) -> None:
    """``train_glow`` with every lever but bf16 (compile through ``aot_eager``, see above): compile
    waits for ActNorm's init, and the checkpoint has plain keys and loads with ``weights_only=True``
    into a Glow built without levers."""
    mcfg = ModelConfig(in_channels=1, n_scales=2, n_steps=1, hidden=8, n_bins=17)
    data = DataConfig(source="sklearn_digits", channels=1, size=8, stop=64)
    tcfg = TrainConfig(steps=3, batch_size=16, log_every=1, fast="on")
    ckpt_path = train_glow(TrainRunConfig(str(tmp_path), data, mcfg, tcfg), progress=False)
    assert compile_spy == [False], "compiled once, after the data-dependent init"
    assert compiled_graphs() >= 1
    raw = torch.load(ckpt_path, weights_only=True)
    assert not any("_orig_mod" in k for k in raw["model"])
    plain = Glow(1, n_scales=2, n_steps=1, hidden=8, n_bins=17)
    plain.load_state_dict(raw["model"])
    assert not needs_data_init(plain)
    loaded, _ = load_glow(ckpt_path)
    assert load_checkpoint(ckpt_path)["step"] == 3
    x = torch.rand(4, 1, 8, 8) - 0.5
    assert not loaded.fused and not loaded.channels_last
    with torch.no_grad():
        ref = plain.eval()(x).log_prob()
        assert torch.equal(loaded(x).log_prob(), ref)
        fast = loaded.set_fast(fused=True, channels_last=True)(x).log_prob()
    assert rel_err(fast, ref) < 1e-5


def test_flow_step_is_a_flow_step_with_plain_state_dict_keys() -> None:
    step = flow_step(4, glow_coupling_net(8, 3))
    assert isinstance(step, FlowStep) and isinstance(step.layers[0], ActNorm)
    assert list(step.state_dict())[:3] == ["layers.0.bias", "layers.0.log_scale", "layers.0.initialized"]


# --------------------------------------------------------------------------- recompute, cudagraphs, lr rule


def saved_bytes(model: Glow, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for the backward pass of ``−mean log p`` (and the loss)."""
    with saved_tensor_bytes() as saved:
        loss = -model(x).log_prob().mean()
    return saved.total, loss


def test_recompute_gives_identical_gradients_and_keeps_less_for_backward() -> None:
    """Recomputation runs the same operations again: the same loss and gradients to the last
    bit, each coupling network evaluated twice per training step, and a fraction of the
    activation memory kept between forward and backward (counted with saved-tensor hooks)."""
    x = images(torch.float32, batch=8)
    model = tiny_glow(torch.float32, x).train()
    plain_bytes, loss = saved_bytes(model, x)
    loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    calls = []
    hooks = [
        m.register_forward_hook(lambda *_: calls.append(1))
        for m in model.modules()
        if isinstance(m, FlowStep)
    ]
    model.set_fast(fused=False, channels_last=False, recompute=True)
    recompute_bytes, loss_r = saved_bytes(model, x)
    n_forward = len(calls)
    loss_r.backward()
    for h in hooks:
        h.remove()
    assert torch.equal(loss_r, loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, plain_grads[name]), name
    assert n_forward == 4 and len(calls) == 4, "the hooks see the step module once per forward"
    assert recompute_bytes < 0.5 * plain_bytes, (recompute_bytes, plain_bytes)
    with torch.no_grad():  # no gradients recorded: nothing to recompute, same values
        assert torch.equal(model.eval()(x).log_prob(), loss.new_tensor(0) + model(x).log_prob())


def test_recompute_runs_the_coupling_network_again_in_backward() -> None:
    x = images(torch.float32)
    model = tiny_glow(torch.float32, x).train().set_fast(fused=True, channels_last=False, recompute=True)
    nets = [m.layers[2] for m in model.modules() if isinstance(m, FlowStep)]
    calls = []
    for net in nets:  # a pre-hook: recomputation stops early, once the tensors it needs exist
        net.register_forward_pre_hook(lambda *_: calls.append(1))
    loss = -model(x).log_prob().mean()
    assert len(calls) == len(nets)
    loss.backward()
    assert len(calls) == 2 * len(nets)


def test_recompute_waits_for_actnorm_init_and_initializes_identically() -> None:
    x = images(torch.float32)
    torch.manual_seed(3)
    plain = Glow(3, n_scales=2, n_steps=2, hidden=16).train()
    torch.manual_seed(3)
    fast = Glow(3, n_scales=2, n_steps=2, hidden=16, recompute=True).train()
    (-plain(x).log_prob().mean()).backward()
    (-fast(x).log_prob().mean()).backward()
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_recompute_under_compile_matches_eager_gradients() -> None:
    torch._dynamo.reset()
    x = images(torch.float32)
    model = tiny_glow(torch.float32, x).train()
    (-model(x).log_prob().mean()).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_fast(fused=True, channels_last=False, recompute=True)
    compile_flow_steps(model, backend="aot_eager")
    (-model(x).log_prob().mean()).backward()
    assert compiled_graphs() >= 1
    for name, p in model.named_parameters():
        assert torch.linalg.norm(p.grad - eager[name]) <= 1e-5 * torch.linalg.norm(eager[name]) + 1e-12, name


def test_compiled_outlier_training_stays_within_dynamos_recompile_limit(
    compile_spy, caplog: pytest.LogCaptureFixture
) -> None:
    """All flow steps share one compiled code object, so every scale's shape and every grad mode is
    a variant of it: plain training (a variant per scale, and one for the first step, whose input
    needs no gradient), then outlier training, whose frozen reference runs the steps without
    gradients: at least 2L + 1 variants, 9 for a 4-scale Glow, more than dynamo's default limit of
    8. Past the limit the steps run eagerly with only a log warning; compile_flow_steps raises the
    limit to what the model needs."""
    with torch._dynamo.config.patch(recompile_limit=8):  # the default, whatever ran before
        compile_outlier_stages()
    assert compiled_graphs() >= 9, "a variant per scale and grad mode, and the first step's"
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


def compile_outlier_stages() -> None:
    """An experiment's plain and outlier training stages, compiled (aot_eager), in one process."""
    from densead.config import OutlierConfig
    from densead.flows import FastTraining
    from densead.train import training_step

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) - 0.5
    ocfg = OutlierConfig(data=DataConfig(source="sklearn_digits"), reference="r.pt")
    reference = perturbed(Glow(3, n_scales=4, n_steps=2, hidden=8), x).requires_grad_(False).eval()
    apply_fast_path(reference, FastPath(True, True, True))
    for outliers in (False, True):  # an experiment's stages, one process
        model = Glow(3, n_scales=4, n_steps=2, hidden=8)
        prepared = FastTraining(model, FastPath(True, True, True))
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        for _ in range(2):
            prepared.before_step()
            x_out = torch.rand(4, 3, 16, 16) - 0.5 if outliers else None
            training_step(model, opt, x, x_out, reference if outliers else None, ocfg if outliers else None)


def test_lever_lists_combine_with_auto_and_cudagraphs_need_cuda() -> None:
    assert resolve_fast_path("auto,recompute", "cpu") == FastPath(recompute=True)
    cuda = resolve_fast_path("auto, recompute", "cuda")
    assert cuda.fused and cuda.channels_last and cuda.recompute and not cuda.cudagraphs
    assert resolve_fast_path("on,recompute", "cpu") == FastPath(True, True, True, True)
    assert resolve_fast_path("on", "cpu") == FastPath(True, True, True), "on: the speed levers only"
    graphs = resolve_fast_path("fused,cudagraphs", "cuda")
    assert graphs == FastPath(fused=True, cudagraphs=True), "whole-step graphs: compile stays separate"
    assert str(graphs) == "fused,cudagraphs"
    with pytest.raises(ValueError, match=r"train\.fast: cudagraphs needs a CUDA device.*cpu"):
        resolve_fast_path("cudagraphs", "cpu", where="train.fast")
    # auto adds whole-step graphs only where the caller can replay them, and only on CUDA
    assert resolve_fast_path("auto", "cuda", allow_cudagraphs=True).cudagraphs
    assert resolve_fast_path("auto,recompute", "cuda", allow_cudagraphs=True).cudagraphs
    assert resolve_fast_path("auto", "cpu", allow_cudagraphs=True) == FastPath(), "CPU stays the plain path"
    assert not resolve_fast_path("on", "cuda", allow_cudagraphs=True).cudagraphs
    assert not resolve_fast_path("fused", "cuda", allow_cudagraphs=True).cudagraphs
    for bad in ("auto,on", "off,fused", "auto,recompte", ""):
        with pytest.raises(ValueError, match="train.fast: unknown value"):
            resolve_fast_path(bad, "cpu", where="train.fast")


def test_graphed_steps_refuse_what_they_cannot_capture() -> None:
    from densead.train import GraphedTrainingStep

    model = Glow(1, 2, 1, 8)
    with pytest.raises(
        ValueError, match=r"train\.fast: cudagraphs needs train\.optimizer adam, adamax, not sgd"
    ):
        GraphedTrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"train\.fast: cudagraphs needs a CUDA device, the model is on cpu"):
        GraphedTrainingStep(model, torch.optim.Adamax(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"GraphedCall: inputs must be CUDA tensors, got \['cpu'\]"):
        GraphedCall(model)(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="warmup must be at least 1, got 0"):
        GraphedCall(model, warmup=0)
    with pytest.raises(ValueError, match="fast: cudagraphs needs a CUDA device, the model runs on cpu"):
        GlowScorer(model, fast="cudagraphs")


class EagerGraphs:
    """Stands in for GraphedTrainingStep's CUDA mechanics on the CPU: recording returns the body,
    so a "replay" runs the recorded Python again (as a graph runs its kernels again), warm-up runs
    on the current stream and the optimizer stays as it is (capturable is CUDA only). Everything
    else, the control flow around the graphs, is the library's."""

    @staticmethod
    def subclass():  # noqa: ANN205 - a test helper
        from densead.train import GraphedTrainingStep

        class Eager(GraphedTrainingStep):
            recorded: list[str] = []

            def _check_device(self, device: torch.device) -> None:
                pass

            def _make_capturable(self, device: torch.device) -> None:
                pass

            def _on_side_stream(self, fn):  # noqa: ANN001, ANN202
                return fn()

            def _record(self, body, pool):  # noqa: ANN001, ANN202
                self.recorded.append(body.__name__)
                return body

            def _new_pool(self) -> None:
                return None

        return Eager


def test_graphed_training_steps_follow_the_eager_steps_through_capture_nan_and_odd_batches() -> None:
    """Warm-up, capture, replays, a batch with a non-finite sample (dropped by the eager fallback)
    and a smaller last batch (eager): the same losses, skips and parameters as training_step, and
    the gradients point back to the graph's tensors after each fallback."""
    from densead.train import set_learning_rate, training_step

    torch.manual_seed(0)
    initial = Glow(1, 2, 2, 16)
    eager_model, graph_model = copy.deepcopy(initial), copy.deepcopy(initial)
    eager_opt = torch.optim.Adamax(eager_model.parameters(), lr=1e-3, weight_decay=5e-5)
    graph_opt = torch.optim.Adamax(graph_model.parameters(), lr=1e-3, weight_decay=5e-5)
    graphed = EagerGraphs.subclass()(graph_model, graph_opt, max_grad_norm=1.0, warmup=2)
    batches = [torch.rand(8, 1, 8, 8) - 0.5 for _ in range(8)] + [torch.rand(5, 1, 8, 8) - 0.5]
    batches[5][3] = float("nan")
    kinds = []
    for step, x in enumerate(batches):
        set_learning_rate(eager_opt, 1e-3 * (step + 1) / 4)
        set_learning_rate(graph_opt, 1e-3 * (step + 1) / 4)
        want = training_step(eager_model, eager_opt, x, max_grad_norm=1.0)
        got = graphed(x)
        assert (got.skipped, got.dropped) == (want.skipped, want.dropped), step
        torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-5)
        kinds.append(got.dropped)
        if graphed.grads is not None:
            assert all(p.grad is g for p, g in zip(graphed.params, graphed.grads, strict=True)), step
    assert kinds[5] == 1, "the non-finite sample was dropped"
    assert graphed.calls == len(batches)
    assert graphed.recorded == ["_forward_backward", "step"], "captured once, after the warm-up"
    for a, b in zip(eager_model.parameters(), graph_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    moved = [
        not torch.equal(a, b) for a, b in zip(graph_model.parameters(), initial.parameters(), strict=True)
    ]
    assert all(moved)


def test_a_failed_capture_says_what_failed_and_what_to_do() -> None:
    class Refusing(EagerGraphs.subclass()):
        def _record(self, body, pool):  # noqa: ANN001, ANN202
            raise RuntimeError("operation not permitted when stream is capturing")

    model = Glow(1, 2, 1, 8)
    graphed = Refusing(model, torch.optim.Adamax(model.parameters(), lr=1e-3), warmup=1)
    graphed(torch.rand(4, 1, 8, 8) - 0.5)  # warm-up, eager
    with pytest.raises(
        RuntimeError, match=r"cudagraphs could not capture .* shape \(4, 1, 8, 8\) \(operation not"
    ):
        graphed(torch.rand(4, 1, 8, 8) - 0.5)


def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch, stand_in: type) -> list[bool]:
    """train_glow as on CUDA: its ``auto`` gets whole-step graphs where train_glow allows them (the
    CUDA check of resolve_fast_path aside), with the stand-in for GraphedTrainingStep's mechanics.
    Returns the allow_cudagraphs that train_glow passed, one per run."""
    import densead.train as train_module

    allowed = []

    def resolve(mode, device, allow_compile=True, where="fast", allow_cudagraphs=False):  # noqa: ANN001, ANN202
        allowed.append(allow_cudagraphs)
        if "cudagraphs" in mode:
            return FastPath(cudagraphs=True)
        return replace(resolve_fast_path(mode, device, allow_compile, where), cudagraphs=allow_cudagraphs)

    monkeypatch.setattr(train_module, "resolve_fast_path", resolve)
    monkeypatch.setattr(train_module, "GraphedTrainingStep", stand_in)
    return allowed


def test_auto_trains_with_whole_step_graphs_and_falls_back_when_a_capture_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.fast: auto`` runs train_glow's steps through GraphedTrainingStep where it can (Adamax,
    one process) and gives the eager run's model; if the capture fails it warns and trains on
    eagerly to the same model; asked for by name, a failed capture stops the run; with SGD auto
    takes no graphs."""
    mcfg = ModelConfig(in_channels=1, n_scales=2, n_steps=1, hidden=8, n_bins=17)
    data = DataConfig(source="sklearn_digits", channels=1, size=8, stop=64)

    def run(name: str, **train: object) -> dict[str, torch.Tensor]:
        tcfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, log_every=1, warmup_steps=2, **train)
        return load_checkpoint(train_glow(TrainRunConfig(str(tmp_path / name), data, mcfg, tcfg), False))[
            "model"
        ]

    eager = run("eager", fast="off")
    graphed = EagerGraphs.subclass()
    allowed = graphs_on_cpu(monkeypatch, graphed)
    auto = run("auto")
    assert graphed.recorded == ["_forward_backward", "step"], "auto captured the step once"
    for key in eager:
        torch.testing.assert_close(auto[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)

    class Refusing(EagerGraphs.subclass()):
        def _record(self, body, pool):  # noqa: ANN001, ANN202
            self.recorded.append(body.__name__)
            try:  # a capture broken inside the step; ending it raises anew
                raise RuntimeError("operation not permitted when stream is capturing")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error") from None

    graphs_on_cpu(monkeypatch, Refusing)
    with pytest.warns(
        UserWarning,
        match=r"auto: CUDA graphs could not capture .*\(16, 1, 8, 8\) \(operation not permitted when stream "
        r"is capturing; then CUDA error: operation failed .*\); eager steps",
    ):
        fell_back = run("fallback")
    assert Refusing.recorded == ["_forward_backward"], "one failed capture, not one per step"
    for key in eager:
        torch.testing.assert_close(fell_back[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)
    with pytest.raises(RuntimeError, match="cudagraphs could not capture .* train without cudagraphs"):
        run("by_name", fast="cudagraphs")

    class Failing(Refusing):  # not a RuntimeError (say, a compiler's): auto falls back all the same
        def _record(self, body, pool):  # noqa: ANN001, ANN202
            raise AssertionError("a compiler's internal check")

    graphs_on_cpu(monkeypatch, Failing)
    with pytest.warns(UserWarning, match=r"\(a compiler's internal check\); eager steps"):
        run("fallback2")
    with pytest.raises(AssertionError, match="a compiler's internal check"):
        run("by_name2", fast="cudagraphs")
    assert allowed == [True], "the first graphs_on_cpu's run"
    sgd_allowed = graphs_on_cpu(monkeypatch, Refusing)
    run("sgd", optimizer="sgd")
    assert sgd_allowed == [False]


def test_auto_takes_graphs_only_in_one_process_with_a_capturable_optimizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import densead.distributed
    from densead.train import graphs_supported

    assert graphs_supported(TrainConfig()) and graphs_supported(TrainConfig(optimizer="adam"))
    assert not graphs_supported(TrainConfig(optimizer="sgd"))
    monkeypatch.setattr(densead.distributed, "is_distributed", lambda: True)
    assert not graphs_supported(TrainConfig()), "under torchrun"


def test_a_graphed_runs_optimizer_state_resumes_without_graphs(tmp_path: Path) -> None:
    """GraphedTrainingStep turns the optimizer capturable with a tensor learning rate; the
    checkpointed state has neither, so a resume without graphs (here on the CPU, where a
    capturable Adamax refuses to step) trains on; the live optimizer keeps its settings."""
    from densead.train import portable_optimizer_state

    model = Glow(1, 2, 1, 8)
    x = torch.rand(4, 1, 8, 8) - 0.5
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    (-model(x).log_prob().mean()).backward()
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(2e-3)  # what GraphedTrainingStep sets (on the GPU)
    opt.param_groups[0]["capturable"] = True
    torch.save(portable_optimizer_state(opt), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    group = state["param_groups"][0]
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(2e-3) and group["capturable"] is False
    assert all(s["step"].device.type == "cpu" for s in state["state"].values())
    assert opt.param_groups[0]["capturable"] and isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    resumed = copy.deepcopy(model)
    fresh = torch.optim.Adamax(resumed.parameters(), lr=1.0)
    fresh.load_state_dict(state)
    before = [p.detach().clone() for p in resumed.parameters()]
    fresh.zero_grad()
    (-resumed(x).log_prob().mean()).backward()
    fresh.step()
    assert float(fresh.state[next(iter(resumed.parameters()))]["step"]) == 2.0
    assert any(not torch.equal(a, b) for a, b in zip(before, resumed.parameters(), strict=True))


def test_a_learning_rate_tensor_is_set_in_place_and_steps_as_the_float_does() -> None:
    """The optimizer graph of GraphedTrainingStep reads the learning rate from one tensor:
    set_learning_rate must fill that tensor (not replace it), and a tensor rate must update the
    parameters exactly as the float rate does."""
    from densead.train import set_learning_rate

    torch.manual_seed(0)
    initial = Glow(1, 2, 1, 8)
    models = [copy.deepcopy(initial), copy.deepcopy(initial)]
    as_float = torch.optim.Adamax(models[0].parameters(), lr=1e-3, weight_decay=5e-5)
    as_tensor = torch.optim.Adamax(models[1].parameters(), lr=torch.tensor(1e-3), weight_decay=5e-5)
    rate = as_tensor.param_groups[0]["lr"]
    x = torch.rand(4, 1, 8, 8) - 0.5
    for step in range(4):
        for model, opt in zip(models, (as_float, as_tensor), strict=True):
            set_learning_rate(opt, 1e-3 * (step + 1))
            opt.zero_grad()
            (-model(x).log_prob().mean()).backward()
            opt.step()
    assert as_tensor.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(4e-3)
    assert as_float.param_groups[0]["lr"] == pytest.approx(4e-3)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = [not torch.equal(a, b) for a, b in zip(models[1].parameters(), initial.parameters(), strict=True)]
    assert all(moved), "every parameter took the steps"


def test_learning_rate_scales_with_the_batch_and_warms_up() -> None:
    from densead.train import learning_rate

    base = TrainConfig(lr=1e-3, batch_size=256, lr_reference_batch=64)
    assert learning_rate(base, 0) == 1e-3
    assert learning_rate(replace(base, lr_scaling="linear"), 5) == pytest.approx(4e-3)
    assert learning_rate(replace(base, lr_scaling="sqrt"), 5) == pytest.approx(2e-3)
    warm = replace(base, lr_scaling="sqrt", warmup_steps=10)
    assert learning_rate(warm, 4) == pytest.approx(2e-3 * 5 / 10)
    assert learning_rate(warm, 50) == pytest.approx(2e-3)
    # Bad values are refused when the config is built, so a run fails before it starts; from a
    # file, the error names it.
    with pytest.raises(ConfigError, match="^lr_scaling: unknown 'square'; valid: none, linear, sqrt"):
        TrainConfig(lr_scaling="square")
    with pytest.raises(ConfigError, match="^lr_reference_batch: must be >= 1, got 0"):
        replace(base, lr_reference_batch=0)
    data = to_dict(TrainRunConfig("x", DataConfig(source="sklearn_digits"), ModelConfig(), base))
    data["train"]["lr_scaling"] = "cubic"
    with pytest.raises(ConfigError, match=r"^run.yaml: train.lr_scaling: unknown 'cubic'"):
        from_dict(TrainRunConfig, data, "run.yaml")


def test_train_glow_applies_the_scaled_learning_rate(tmp_path: Path) -> None:
    mcfg = ModelConfig(in_channels=1, n_scales=1, n_steps=1, hidden=8, n_bins=17)
    data = DataConfig(source="sklearn_digits", channels=1, size=8, stop=64)
    seen = []
    tcfg = TrainConfig(
        steps=2, batch_size=32, lr=1e-3, lr_scaling="linear", lr_reference_batch=8, log_every=1
    )
    cfg = TrainRunConfig(str(tmp_path), data, mcfg, tcfg)
    real_step = torch.optim.Adamax.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adamax, "step", spy)
        train_glow(cfg, progress=False)
    assert seen == [pytest.approx(4e-3)] * 2


def test_the_gpu_graph_check_script_compares_graphed_and_eager_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/cuda_graph_check.py, run with the CPU stand-ins for CUDA's mechanics, passes on
    the plain and fused levers and fails when the graphed step diverges (a doubled learning rate)."""
    import argparse

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cuda_graph_check as check

    class Call:
        def __init__(self, fn) -> None:  # noqa: ANN001
            self.fn, self.graph = fn, object()

        def __call__(self, *inputs: torch.Tensor):  # noqa: ANN204
            return self.fn(*inputs)

    monkeypatch.setattr(check, "GraphedTrainingStep", EagerGraphs.subclass())
    monkeypatch.setattr(check, "GraphedCall", Call)
    args = argparse.Namespace(small=True, batch=4, steps=3, tol_fp32=1e-4, tol_bf16=3e-2)
    for lever in ("plain", "fused"):
        ok, row = check.check_case(lever, args, torch.device("cpu"))
        assert ok and row.endswith("| pass |"), row

    class Diverging(EagerGraphs.subclass()):
        def __call__(self, x, x_out=None):  # noqa: ANN001, ANN204
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * 2
            return super().__call__(x, x_out)

    monkeypatch.setattr(check, "GraphedTrainingStep", Diverging)
    ok, row = check.check_case("plain", args, torch.device("cpu"))
    assert not ok and row.endswith("| FAIL |"), row
