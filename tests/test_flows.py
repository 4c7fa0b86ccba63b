"""The flow core: every layer against the shared contract, Glow against brute force."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from densead.flows import (
    ActNorm,
    AffineCoupling,
    FeatureFlow,
    FlowSequence,
    Glow,
    InvConv1x1,
    Squeeze,
    flow_step,
    glow_coupling_net,
)
from densead.flows.layers import ACTNORM_EPS

DTYPE = torch.float64


@torch.no_grad()
def randomize(module: nn.Module, std: float, actnorm: bool) -> None:
    """Perturb parameters (of ActNorms, or of everything else) with N(0, std²) noise."""
    for m in module.modules():
        if isinstance(m, ActNorm) == actnorm:
            for p in m.parameters(recurse=False):
                p.add_(std * torch.randn_like(p))


def prepared(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Float64, a generic point: zero-initialized couplings perturbed, ActNorms
    initialized on ``x`` then perturbed too; eval mode."""
    module = module.to(DTYPE)
    randomize(module, 0.1, actnorm=False)
    with torch.no_grad():
        module.train()(x)
    randomize(module, 0.1, actnorm=True)
    return module.eval()


LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "invconv": lambda c: InvConv1x1(c),
    "coupling3x3": lambda c: AffineCoupling(c, glow_coupling_net(8, 3)),
    "coupling1x1": lambda c: AffineCoupling(c, glow_coupling_net(8, 1)),
    "squeeze": lambda c: Squeeze(),
    "step": lambda c: flow_step(c, glow_coupling_net(8, 3)),
    "sequence": lambda c: FlowSequence([flow_step(c, glow_coupling_net(8, 1)) for _ in range(2)]),
}
POINTWISE = ["actnorm", "invconv", "coupling1x1", "sequence"]


def full_jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabsdet


@pytest.mark.parametrize("channels", [4, 5])
@pytest.mark.parametrize("name", LAYERS)
def test_round_trip(name: str, channels: int) -> None:
    x = torch.randn(3, channels, 6, 8, dtype=DTYPE)
    layer = prepared(LAYERS[name](channels), x)
    y, logdet = layer(x)
    assert logdet.shape == (3, y.shape[2], y.shape[3])
    assert logdet.dtype == DTYPE
    assert (layer.inverse(y) - x).abs().max() < 1e-5


@pytest.mark.parametrize("name", LAYERS)
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    x = torch.randn(1, 4, 4, 4, dtype=DTYPE)
    layer = prepared(LAYERS[name](4), x)
    expected = full_jacobian_logdet(lambda v: layer(v)[0], x)
    assert torch.allclose(layer(x)[1].sum(), expected, atol=1e-8)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "squeeze"])
def test_every_parameter_gets_a_gradient(name: str) -> None:
    x = torch.randn(2, 4, 4, 4, dtype=DTYPE)
    layer = prepared(LAYERS[name](4), x).train()
    y, logdet = layer(x)
    ((y**2).sum() - logdet.sum()).backward()
    params = dict(layer.named_parameters())
    assert params
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_round_trip(name: str) -> None:
    x = torch.randn(2, 4, 4, 4, dtype=DTYPE)
    layer = prepared(LAYERS[name](4), x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone = LAYERS[name](4).to(DTYPE)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    # Training mode on new data: a loaded ActNorm must not initialize again.
    clone.train()
    layer.train()
    x2 = 3.0 * torch.randn(2, 4, 4, 4, dtype=DTYPE) + 1.0
    y1, l1 = layer(x2)
    y2, l2 = clone(x2)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


def test_actnorm_initializes_once_to_unit_statistics() -> None:
    x = 3.0 * torch.randn(64, 3, 5, 5, dtype=DTYPE) + 2.0
    layer = ActNorm(3).to(DTYPE).train()
    assert not bool(layer.initialized)
    y, _ = layer(x)
    assert bool(layer.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=DTYPE), atol=1e-8)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=DTYPE), atol=1e-5)
    bias = layer.bias.detach().clone()
    layer(torch.randn(8, 3, 5, 5, dtype=DTYPE))
    assert torch.equal(bias, layer.bias)


@pytest.mark.parametrize("mean, std", [(100.0, 0.01), (-1000.0, 0.1), (10.0, 1e-3)])
def test_actnorm_float32_init_keeps_a_small_spread_next_to_a_large_mean(mean: float, std: float) -> None:
    """E[x²] − mean² in float32 loses every digit of a spread 1e4× below the mean; the init must not
    (raw features, say, whose channels sit far from 0)."""
    x = mean + std * torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    layer = ActNorm(2).train()
    y, _ = layer(x)
    want = x.double().std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.log_scale.exp().double(), 1 / (want + ACTNORM_EPS), rtol=1e-5, atol=0)
    spread = y.double().std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(spread, want / (want + ACTNORM_EPS), rtol=1e-3, atol=0)


def test_actnorm_refuses_to_initialize_from_an_empty_batch() -> None:
    layer = ActNorm(3).train()  # the mean of nothing would make NaN weights that never re-initialize
    for empty in (torch.zeros(0, 3, 4, 4), torch.zeros(2, 3, 0, 4)):
        with pytest.raises(
            ValueError, match=r"non-empty first training batch, got \((0, 3, 4, 4|2, 3, 0, 4)\)"
        ):
            layer(empty)
        assert not bool(layer.initialized)
    layer(torch.randn(2, 3, 4, 4))
    assert bool(layer.initialized) and torch.isfinite(layer.log_scale).all()


def test_actnorm_does_not_initialize_in_eval_mode() -> None:
    layer = ActNorm(3).eval()
    layer(torch.randn(4, 3, 2, 2) * 5)
    assert not bool(layer.initialized)


@pytest.mark.parametrize("name", POINTWISE)
def test_pointwise_layers_logdet_is_local(name: str) -> None:
    """For 1×1 layers, the log-det at (h, w) depends on x at (h, w) only."""
    x = torch.randn(1, 4, 3, 3, dtype=DTYPE)
    layer = prepared(LAYERS[name](4), x)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[1], x)  # (1, 3, 3, 1, 4, 3, 3)
    jac = jac[0, :, :, 0].abs().sum(dim=2)  # (3, 3 [out], 3, 3 [in])
    for h in range(3):
        for w in range(3):
            off = jac[h, w].clone()
            off[h, w] = 0
            assert off.max() == 0, (h, w)


def test_coupling_rejects_even_kernel_and_single_channel() -> None:
    with pytest.raises(ValueError, match="odd"):
        glow_coupling_net(8, 2)
    with pytest.raises(ValueError, match="2 channels"):
        AffineCoupling(1, glow_coupling_net(8, 1))


def test_invconv_weight_and_logdet_stay_fp32_under_autocast() -> None:
    layer = InvConv1x1(6)
    x = torch.randn(2, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.weight().dtype == torch.float32
        _, logdet = layer(x)
    assert logdet.dtype == torch.float32
    assert torch.allclose(logdet[0, 0], torch.linalg.slogdet(layer.weight())[1], atol=1e-5)


# --------------------------------------------------------------------------- Glow


def tiny_glow(x: torch.Tensor, **kwargs) -> Glow:
    """A perturbed small Glow, ActNorms initialized on a batch shaped like ``x``."""
    args = dict(in_channels=x.shape[1], n_scales=2, n_steps=2, hidden=8)
    args.update(kwargs)
    init_batch = torch.rand(16, *x.shape[1:], dtype=DTYPE) - 0.5
    return prepared(Glow(**args), init_batch)


def test_glow_log_prob_matches_brute_force_jacobian() -> None:
    x = torch.rand(1, 1, 4, 4, dtype=DTYPE) - 0.5
    glow = tiny_glow(x)
    out = glow(x)

    def all_latents(v):
        return torch.cat([z.flatten() for z in glow(v).latents])

    logdet = full_jacobian_logdet(all_latents, x)
    prior = sum(
        (
            -0.5 * (((z - s.prior.loc.view(1, -1, 1, 1)) / s.prior.log_scale.exp().view(1, -1, 1, 1)) ** 2)
            - 0.5 * math.log(2 * math.pi)
            - s.prior.log_scale.view(1, -1, 1, 1)
        ).sum()
        for z, s in zip(out.latents, glow.scales, strict=True)
    )
    assert torch.allclose(out.log_prob(discrete=False)[0], prior + logdet, atol=1e-8)


def test_glow_shapes_and_conservation() -> None:
    x = torch.rand(3, 3, 16, 24, dtype=DTYPE) - 0.5
    glow = tiny_glow(x, n_scales=3)
    out = glow(x)
    assert [tuple(c.shape) for c in out.contributions] == [(3, 8, 12), (3, 4, 6), (3, 2, 3)]
    assert [z.shape[1] for z in out.latents] == [6, 12, 48]
    assert [tuple(z.shape) for z in out.latents] == glow.latent_shapes(3, 16, 24)
    assert sum(math.prod(s[1:]) for s in Glow.latent_shapes_of(3, 3, 16, 24)) == 3 * 16 * 24
    total = out.log_prob(discrete=False)
    # Per-scale contributions sum to log p(x).
    assert torch.allclose(out.scale_log_probs().sum(dim=1), total, atol=1e-9)
    # Each scale's pixel map conserves that scale's contribution.
    for c, m in zip(out.contributions, out.scale_pixel_maps(), strict=True):
        assert m.shape == (3, 16, 24)
        assert torch.allclose(m.sum(dim=(1, 2)), c.sum(dim=(1, 2)), atol=1e-9)
    # The pixel map sums to log p(x), continuous and discrete.
    assert torch.allclose(out.pixel_map(discrete=False).sum(dim=(1, 2)), total, atol=1e-9)
    discrete = out.log_prob(discrete=True)
    assert torch.allclose(discrete, total - 3 * 16 * 24 * math.log(256), atol=1e-9)
    assert torch.allclose(out.pixel_map(discrete=True).sum(dim=(1, 2)), discrete, atol=1e-8)
    bpd = -discrete / (3 * 16 * 24 * math.log(2))
    assert torch.allclose(out.bits_per_dim(), bpd)
    assert (glow.inverse(out.latents) - x).abs().max() < 1e-5


def test_glow_pixel_map_spreads_scale_evenly() -> None:
    """A scale-2 position covers exactly a 4×4 block, each pixel getting 1/16."""
    x = torch.rand(1, 1, 8, 8, dtype=DTYPE) - 0.5
    out = tiny_glow(x)(x)
    coarse = out.contributions[1]  # (1, 2, 2)
    fine = out.scale_pixel_maps()[1]
    assert torch.allclose(fine[0, :4, :4], coarse[0, 0, 0].expand(4, 4) / 16)
    assert torch.allclose(fine[0, 4:, :4], coarse[0, 1, 0].expand(4, 4) / 16)


def test_glow_is_fully_convolutional_and_checks_input() -> None:
    glow = Glow(in_channels=3, n_scales=3, n_steps=1, hidden=8).eval()
    x = torch.rand(1, 3, 64, 128) - 0.5
    out = glow(x)
    assert out.contributions[-1].shape == (1, 8, 16)
    assert out.pixel_map().shape == (1, 64, 128)
    with pytest.raises(ValueError, match=r"divisible by 8.*\(1, 3, 36, 32\)"):
        glow(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        glow(torch.zeros(1, 1, 32, 32))
    for empty in ((1, 3, 0, 8), (1, 3, 8, 0)):  # 0 is divisible by 8, but no image
        with pytest.raises(ValueError, match=r"positive and divisible by 8.*\(1, 3, (0, 8|8, 0)\)"):
            glow(torch.zeros(empty))


def test_glow_sampling_inverts_prior_samples() -> None:
    x = torch.rand(4, 3, 8, 8, dtype=DTYPE) - 0.5
    glow = tiny_glow(x)
    g = torch.Generator().manual_seed(1)
    cold = glow.sample(4, 8, 8, temperature=0.0, generator=g)
    assert cold.shape == (4, 3, 8, 8)
    # Temperature 0 gives the prior mode for every sample: identical images.
    assert torch.allclose(cold[0], cold[3])
    warm = glow.sample(4, 8, 8, temperature=0.7, generator=g)
    assert not torch.allclose(warm[0], warm[1])
    re = glow(warm)
    assert torch.allclose(glow.inverse(re.latents), warm, atol=1e-8)


def test_glow_logdets_fp32_under_bf16_autocast() -> None:
    glow = Glow(in_channels=3, n_scales=2, n_steps=2, hidden=16).train()
    x = torch.rand(4, 3, 8, 8) - 0.5
    glow(x)  # ActNorm init in fp32
    glow.eval()
    ref = glow(x).log_prob()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = glow(x)
    assert all(c.dtype == torch.float32 for c in out.contributions)
    # bf16 coupling nets: relative error of log p well under 1%.
    assert ((out.log_prob() - ref).abs() / ref.abs()).max() < 1e-2


# --------------------------------------------------------------------------- feature flow


def test_feature_flow_density_equals_pixel_by_pixel() -> None:
    feats = torch.randn(2, 6, 5, 7, dtype=DTYPE)
    flow = prepared(FeatureFlow(6, n_steps=3, hidden=16), feats)
    dense = flow.log_prob_map(feats)
    assert dense.shape == (2, 5, 7)
    for b in range(2):
        for h in range(5):
            for w in range(7):
                single = flow.log_prob_map(feats[b : b + 1, :, h : h + 1, w : w + 1])
                assert torch.allclose(single[0, 0, 0], dense[b, h, w], atol=1e-10)


def test_feature_flow_is_a_normalized_density() -> None:
    """Brute-force Jacobian on one 3-dim vector: log p = prior + log|det J|."""
    feats = torch.randn(1, 3, 1, 1, dtype=DTYPE)
    flow = prepared(FeatureFlow(3, n_steps=2, hidden=8), torch.randn(16, 3, 2, 2, dtype=DTYPE))
    z, lp = flow(feats)
    logdet = full_jacobian_logdet(lambda v: flow(v)[0], feats)
    assert torch.allclose(lp[0, 0, 0], flow.prior.log_prob_map(z)[0, 0, 0] + logdet, atol=1e-9)
    assert (flow.inverse(z) - feats).abs().max() < 1e-8


def test_feature_flow_checks_channels() -> None:
    with pytest.raises(ValueError, match=r"\(B, 6, H, W\).*\(1, 5, 2, 2\)"):
        FeatureFlow(6, n_steps=1, hidden=4)(torch.zeros(1, 5, 2, 2))
