"""Detectors on cases with known answers; every score is the sum of its map."""

from __future__ import annotations

import math

import pytest
import torch

from densead.detectors import MIN_LOG_PROB, GlowScorer, get_detector
from densead.flows import Glow, GlowOutput
from densead.metrics import auroc


def output(contributions: list[torch.Tensor], channels: int = 1) -> GlowOutput:
    """A GlowOutput with given contribution maps (scale i on a grid 2^i smaller than 8×8)."""
    b = contributions[0].shape[0]
    latents = tuple(torch.zeros(b, 1, *c.shape[1:]) for c in contributions)
    return GlowOutput(latents, tuple(contributions), (channels, 8, 8), 256)


def two_scale(c1: float, c2: float, b: int = 2) -> GlowOutput:
    return output([torch.full((b, 4, 4), c1 / 16), torch.full((b, 2, 2), c2 / 4)])


CONST = 64 * math.log(256)  # the discrete term of an 8×8×1 image


def test_raw_ratio_and_scale_scores_have_known_values() -> None:
    o_in, o_g = two_scale(-100.0, -50.0), two_scale(-80.0, -90.0)
    assert torch.allclose(get_detector("raw").score_from(o_in), torch.full((2,), 150.0 + CONST))
    assert torch.allclose(get_detector("last_scale").score_from(o_in), torch.full((2,), 50.0))
    assert torch.allclose(get_detector("scale1").score_from(o_in), torch.full((2,), 100.0))
    # Diff: log p_g − log p_in = −170 − (−150) = −20 (constants cancel)
    assert torch.allclose(get_detector("ratio").score_from(o_in, o_g), torch.full((2,), -20.0), atol=1e-6)
    assert torch.allclose(get_detector("ratio_last_scale").score_from(o_in, o_g), torch.full((2,), -40.0))
    assert torch.allclose(get_detector("ratio_scale1").score_from(o_in, o_g), torch.full((2,), 20.0))


def test_typicality_flags_too_likely_and_too_unlikely_images_alike() -> None:
    """|bits/dim − b̄|, Nalisnick et al.'s typicality test of one image; its map sums to it."""
    bits = 64 * math.log(2)  # nats per bit/dim of an 8×8×1 image
    likely = output([torch.full((1, 4, 4), -1.0 * bits / 16 + CONST / 16), torch.zeros(1, 2, 2)])
    unlikely = output([torch.full((1, 4, 4), -5.0 * bits / 16 + CONST / 16), torch.zeros(1, 2, 2)])
    det = get_detector("typicality")
    for out, bpd in ((likely, 1.0), (unlikely, 5.0)):
        assert out.bits_per_dim().item() == pytest.approx(bpd)
        assert det.score_from(out, typical_bpd=3.0).item() == pytest.approx(2.0)  # 2 bits/dim off, either way
        pixel_map = det.map_from(out, typical_bpd=3.0)
        assert pixel_map.sum().item() == pytest.approx(2.0)
    # pixels of a too-likely image: the likelier, the more anomalous (the sign of its deviation)
    mixed = output(
        [torch.linspace(-2.0, 0.0, 16).reshape(1, 4, 4) * bits / 16 + CONST / 16, torch.zeros(1, 2, 2)]
    )
    m = det.map_from(mixed, typical_bpd=3.0)[0]
    assert m.sum().item() == pytest.approx(det.score_from(mixed, typical_bpd=3.0).item())
    assert m[7, 7] == m.max() > m[0, 0] == m.min()  # the likeliest pixels score highest
    with pytest.raises(ValueError, match=r"'typicality' needs the model's mean bits/dim .* got None"):
        det.score_from(likely)
    model = Glow(1, n_scales=2, n_steps=1, hidden=8)
    with pytest.raises(ValueError, match=r"'typicality' needs .*GlowScorer\(typical_bpd=\.\.\.\)"):
        GlowScorer(model).score(torch.zeros(1, 1, 8, 8), [det])
    assert GlowScorer(model, typical_bpd=2.0).score(torch.zeros(1, 1, 8, 8), [det])["typicality"].shape == (
        1,
    )


@pytest.mark.parametrize("name", ["raw", "ratio", "last_scale", "scale1", "ratio_scale2", "ratio_last_scale"])
def test_map_sums_to_score_on_a_real_glow(name: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) - 0.5
    model, general = (Glow(3, n_scales=2, n_steps=2, hidden=8) for _ in range(2))
    for m in (model, general):
        m.train()(x)
    det = get_detector(name)
    scorer = GlowScorer(model, general)
    ((score, pixel_map),) = scorer.score_maps(x, [det]).values()
    assert pixel_map.shape == (3, 16, 16)
    assert torch.allclose(pixel_map.sum(dim=(1, 2)), score, rtol=1e-5, atol=1e-2)
    assert torch.allclose(scorer.score(x, [det])[name], score)


def test_ratio_of_a_model_with_itself_is_zero() -> None:
    x = torch.rand(2, 3, 16, 16) - 0.5
    model = Glow(3, n_scales=2, n_steps=1, hidden=8)
    model.train()(x)
    score, pixel_map = GlowScorer(model, model).score_maps(x, [get_detector("ratio")])["ratio"]
    assert torch.equal(score, torch.zeros(2)) and torch.equal(pixel_map, torch.zeros(2, 16, 16))


def test_raw_likelihood_flags_images_unlike_the_fit_data() -> None:
    """A Glow whose ActNorms are fit to low-contrast images scores high-contrast ones higher."""
    g = torch.Generator().manual_seed(0)
    inliers = 0.02 * torch.randn(64, 3, 16, 16, generator=g)
    outliers = 0.3 * torch.randn(64, 3, 16, 16, generator=g)
    model = Glow(3, n_scales=2, n_steps=2, hidden=8)
    model.train()(inliers)
    scores = GlowScorer(model).score(torch.cat([inliers, outliers]), [get_detector("raw")])["raw"]
    assert auroc(scores.numpy(), [0] * 64 + [1] * 64) > 0.99


def test_non_finite_log_likelihoods_become_a_very_small_constant() -> None:
    finite, broken = two_scale(-10.0, -10.0, b=1), two_scale(-10.0, -math.inf, b=1)
    raw = get_detector("raw").score_from(broken)
    assert torch.isfinite(raw).all() and raw.item() >= 0.99 * -MIN_LOG_PROB
    for bad in (math.nan, math.inf):  # any non-finite log p: the constant (DESIGN.md), not +1e12
        score = get_detector("raw").score_from(two_scale(bad, -10.0, b=1))
        assert score.item() == pytest.approx(-MIN_LOG_PROB)
    # in-dist model says −inf: maximally anomalous; general model says −inf: maximally normal
    assert get_detector("ratio").score_from(broken, finite).item() > 1e11
    assert get_detector("ratio").score_from(finite, broken).item() < -1e11
    assert torch.isfinite(get_detector("ratio").map_from(broken, finite)).all()


def test_detector_errors() -> None:
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        get_detector("nope")
    with pytest.raises(ValueError, match="scale 3 out of range for a 2-scale Glow"):
        get_detector("scale3").score_from(two_scale(1.0, 1.0))
    with pytest.raises(ValueError, match="needs a general-distribution model"):
        get_detector("ratio").score_from(two_scale(1.0, 1.0))
    model = Glow(3, n_scales=2, n_steps=1, hidden=8)
    with pytest.raises(ValueError, match="general-distribution model"):
        GlowScorer(model).score(torch.zeros(1, 3, 8, 8), [get_detector("ratio")])


def test_glow_outputs_leaves_gradients_on_between_batches() -> None:
    from densead.data.images import ImageSet
    from densead.scoring import glow_outputs

    model = Glow(in_channels=1, n_scales=1, n_steps=1, hidden=4, n_bins=17)
    images = ImageSet(torch.randint(0, 17, (6, 1, 4, 4), dtype=torch.uint8), torch.zeros(6), "x")
    for _, out in glow_outputs(model, images, 2, torch.device("cpu")):
        assert not out.log_prob().requires_grad  # computed without autograd
        assert torch.is_grad_enabled(), "the generator left gradients off in the caller"


# --------------------------------------------------------------------------- complexity (PNG)


@pytest.mark.parametrize("coder", ["png", "webp"])
def test_coded_files_are_lossless_codes_of_the_levels_in_rgb_order(coder: str) -> None:
    """Each file decodes (with PIL, not the encoder's library) to exactly the image, channels in
    the model's order, and its length in bits is the code length."""
    import io

    import numpy as np
    from PIL import Image

    from densead.detectors.complexity import code_length, coded_files

    g = torch.Generator().manual_seed(0)
    for channels, mode in ((1, "L"), (3, "RGB"), (4, "RGBA"))[: 2 if coder == "webp" else 3]:
        levels = torch.randint(0, 256, (3, channels, 12, 20), generator=g, dtype=torch.uint8)
        levels[1] = 7  # a flat image codes far shorter than noise
        files = coded_files(levels, coder)
        for f, image in zip(files, levels, strict=True):
            decoded = np.asarray(Image.open(io.BytesIO(f)).convert(mode))  # WebP stores grey as RGB
            assert np.array_equal(decoded.reshape(12, 20, channels), image.permute(1, 2, 0).numpy())
        bits = code_length(levels, coder)
        assert bits.tolist() == [8.0 * len(f) for f in files]
        assert bits[0] >= 8 * levels[0].numel()  # noise does not compress below its 8 bits/value
        assert bits[1] < bits[0] / 4


def test_complexity_is_the_ratio_to_a_png_coder_and_its_map_sums_to_it() -> None:
    from densead.data.transforms import to_model_input
    from densead.detectors.complexity import coder_log_prob

    g = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 17, (4, 1, 8, 8), generator=g, dtype=torch.uint8)
    levels[0] = 0
    model = Glow(1, n_scales=2, n_steps=2, hidden=8, n_bins=17)
    x = to_model_input(levels, 17, dequantize=False)
    model.train()(x)
    scorer = GlowScorer(model)
    names = ("complexity", "complexity_webp", "raw")
    got = scorer.score_maps(x, [get_detector(n) for n in names])
    raw, raw_map = got["raw"]
    for name, coder in (("complexity", "png"), ("complexity_webp", "webp")):
        score, pixel_map = got[name]
        expected = coder_log_prob(levels, coder).float() + raw  # log p_coder − log p_in
        assert torch.allclose(score, expected, rtol=1e-6, atol=1e-3), name
        assert torch.allclose(pixel_map.sum(dim=(1, 2)), score, rtol=1e-5, atol=1e-2), name
        shift = pixel_map - raw_map  # the code length, spread evenly: a constant per image
        assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-5), name
        assert torch.allclose(scorer.score(x, [get_detector(name)])[name], score), name
    assert not torch.equal(got["complexity"][0], got["complexity_webp"][0])  # two coders, two lengths


def test_levels_round_trip_and_refuse_dequantized_inputs() -> None:
    from densead.data.transforms import to_model_input
    from densead.detectors.complexity import levels_from_input

    for n_bins in (2, 17, 256):
        levels = torch.randint(0, n_bins, (5, 3, 4, 4), dtype=torch.uint8)
        x = to_model_input(levels, n_bins, dequantize=False)
        assert torch.equal(levels_from_input(x, n_bins), levels)
    noisy = to_model_input(torch.full((1, 3, 4, 4), 9, dtype=torch.uint8), 256, dequantize=True)
    noisy[0, 0, 0, 0] = 9.1 / 256 - 0.5  # a tenth of a level off the midpoint, whatever the noise drew
    with pytest.raises(ValueError, match="not noise-free levels"):
        levels_from_input(noisy, 256)
    for bad in (math.nan, math.inf):  # not a level either (NaN compares False to every bound)
        x = to_model_input(torch.full((1, 1, 2, 2), 3, dtype=torch.uint8), 17, dequantize=False)
        x[0, 0, 1, 1] = bad
        with pytest.raises(ValueError, match="not noise-free levels"):
            levels_from_input(x, 17)
    with pytest.raises(ValueError, match="n_bins=512"):
        levels_from_input(torch.zeros(1, 1, 2, 2), 512)


def test_complexity_errors_name_what_is_missing() -> None:
    from densead.detectors.complexity import code_length
    from densead.detectors.glow import GlowDetector

    o = two_scale(-10.0, -10.0)
    det = get_detector("complexity")
    assert not det.per_pixel and not det.needs_general
    with pytest.raises(ValueError, match="needs the images' quantization levels"):
        det.score_from(o)
    wrong = r"levels of shape \(2, 1, 4, 4\) for a batch of 2 inputs of shape \(1, 8, 8\)"
    with pytest.raises(ValueError, match=wrong):
        det.score_from(o, None, torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    for channels in (2, 5):
        with pytest.raises(ValueError, match=rf"C in \(1, 3, 4\), got \(1, {channels}, 4, 4\)"):
            code_length(torch.zeros(1, channels, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"webp code length: .* C in \(1, 3\), got \(1, 4, 4, 4\)"):
        code_length(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), "webp")  # transparent colours dropped
    for coder in ("png", "loco"):
        with pytest.raises(ValueError, match=f"{coder} code length: .*got .* torch.float32"):
            code_length(torch.zeros(1, 1, 4, 4), coder)
    with pytest.raises(ValueError, match="unknown coder 'flif'; valid: png, webp, loco"):
        code_length(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "flif")
    with pytest.raises(ValueError, match="detector 'c': unknown coder 'zip'"):
        GlowDetector("c", needs_general=False, compressor="zip")


def test_a_batch_is_coded_once_per_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A score and its map, of both complexity detectors, code the batch once with each coder."""
    import densead.detectors.complexity as complexity
    from densead.data.transforms import to_model_input

    calls = []
    original = complexity.coder_log_prob

    def counting(levels, coder="png"):
        calls.append(coder)
        return original(levels, coder)

    monkeypatch.setattr(complexity, "coder_log_prob", counting)
    model = Glow(1, n_scales=2, n_steps=1, hidden=8, n_bins=17)
    x = to_model_input(torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.uint8), 17, dequantize=False)
    model.train()(x)
    GlowScorer(model).score_maps(x, [get_detector("complexity"), get_detector("complexity_webp")])
    assert sorted(calls) == ["png", "webp"]


# --------------------------------------------------------------------------- complexity (LOCO, per pixel)


def _loco_decoder_bits(image: torch.Tensor) -> tuple[list[list[float]], float]:
    """Bits per pixel of one ``(C, H, W)`` uint8 image under the loco coder, written as its decoder
    would run: pixel by pixel, channel by channel, reading only values already decoded, with the
    whole distribution over the 256 next values summed term by term. Returns the bits and the
    largest deviation of a distribution's total from 1."""
    ch, h, w = image.shape
    decoded = [[[None] * w for _ in range(h)] for _ in range(ch)]
    counts = [[[0] * 9 for _ in range(10)] for _ in range(ch)]  # per channel, activity context, class
    bits = [[0.0] * w for _ in range(h)]
    worst = 0.0

    def value(k: int, i: int, j: int) -> int:
        v = decoded[k][i][j]
        assert v is not None, f"read ({k}, {i}, {j}) before decoding it"
        return v

    def residual_class(e: int) -> int:  # magnitude class of a residual in −128 … 127
        return 0 if e == 0 else 8 if e == -128 else abs(e).bit_length()

    for i in range(h):
        for j in range(w):
            med_residual = 0
            for k in range(ch):
                a = value(k, i, j - 1) if j > 0 else value(k, i - 1, j) if i > 0 else 128
                b = value(k, i - 1, j) if i > 0 else a
                c = value(k, i - 1, j - 1) if i > 0 and j > 0 else b
                d = value(k, i - 1, j + 1) if i > 0 and j < w - 1 else b
                med = min(a, b) if c >= max(a, b) else max(a, b) if c <= min(a, b) else a + b - c
                pred = med if k == 0 else min(255, max(0, med + med_residual))
                ctx = min(9, int(math.floor(math.log2(abs(d - b) + abs(b - c) + abs(c - a) + 1))))
                seen = counts[k][ctx]
                probs = []
                for v in range(256):  # class probability, shared evenly by the class's values
                    r = residual_class((v - pred + 128) % 256 - 128)
                    members = 1 if r in (0, 8) else 2**r
                    probs.append((seen[r] + 0.5) / (sum(seen) + 4.5) / members)
                worst = max(worst, abs(sum(probs) - 1))
                actual = int(image[k, i, j])
                bits[i][j] += -math.log2(probs[actual])
                decoded[k][i][j] = actual  # now the decoder knows it
                med_residual = actual - med
                seen[residual_class((actual - pred + 128) % 256 - 128)] += 1
    return bits, worst


def test_loco_pixel_bits_are_its_sequential_decoders_code_lengths() -> None:
    """The vectorized per-pixel code lengths equal those of a decoder-order loop that only reads
    decoded values; every distribution it codes with sums to 1 (a valid code: Kraft)."""
    from densead.detectors.complexity import code_length, pixel_code_lengths

    g = torch.Generator().manual_seed(3)
    for channels in (1, 3):
        levels = torch.randint(0, 256, (3, channels, 5, 7), generator=g, dtype=torch.uint8)
        levels[1] = (torch.arange(5)[:, None] * 40 + torch.zeros(7, dtype=torch.long)).to(
            torch.uint8
        )  # stripes
        levels[2, :, :, :3] = 250  # flat then noise: context counts carry over a change
        got = pixel_code_lengths(levels)
        assert got.shape == (3, 5, 7) and got.dtype == torch.float64
        for image, image_bits in zip(levels, got, strict=True):
            expected, worst = _loco_decoder_bits(image)
            assert worst < 1e-12
            torch.testing.assert_close(image_bits, torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(code_length(levels, "loco"), got.sum(dim=(1, 2)))
        assert got[1].sum() < got[0].sum() / 2  # edges MED predicts cost far less than noise


def test_loco_codes_each_image_alone_in_chunks_of_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import densead.detectors.complexity as complexity

    levels = torch.randint(
        0, 256, (5, 3, 6, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8
    )
    whole = complexity.pixel_code_lengths(levels)
    monkeypatch.setattr(complexity, "_LOCO_CHUNK_VALUES", 2 * 3 * 6 * 4)  # two images at a time
    torch.testing.assert_close(complexity.pixel_code_lengths(levels), whole, rtol=0, atol=0)
    torch.testing.assert_close(complexity.pixel_code_lengths(levels[3:4])[0], whole[3], rtol=0, atol=0)
    empty = levels[:0]
    assert complexity.pixel_code_lengths(empty).shape == (0, 6, 4)
    assert complexity.code_length(empty, "loco").shape == (0,)


def test_loco_codes_real_photos_and_digits_shorter_than_png_and_webp(shared_data) -> None:
    """On 64 CIFAR-10 photos and 64 MNIST digits (real data), the loco code is shorter on average
    than the lossless WebP and PNG files, and shorter than PNG's for almost every image."""
    import numpy as np

    from densead.detectors.complexity import code_length

    for name in ("cifar10_test.npz", "mnist_test.npz"):
        images = torch.from_numpy(np.load(shared_data / name)["images"][:64])
        levels = images.permute(0, 3, 1, 2).contiguous() if images.dim() == 4 else images[:, None]
        loco, webp, png = (code_length(levels, c) for c in ("loco", "webp", "png"))
        assert loco.mean() < 0.97 * webp.mean() and loco.mean() < 0.8 * png.mean(), name
        assert (loco < png).float().mean() > 0.9, name


def test_complexity_loco_map_is_the_ratio_per_coarsest_block_and_sums_to_the_score() -> None:
    from dataclasses import replace

    from densead.data.transforms import to_model_input
    from densead.detectors.complexity import CodedImages, pixel_code_lengths
    from densead.detectors.glow import SENTINEL_LIMIT

    g = torch.Generator().manual_seed(4)
    levels = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    levels[0, :, :4] = 40  # half flat: cheap for the coder, so the blocks differ
    model = Glow(3, n_scales=2, n_steps=2, hidden=8)
    x = to_model_input(levels, 256, dequantize=False)
    model.train()(x)
    scorer = GlowScorer(model)
    det = get_detector("complexity_loco")
    assert det.per_pixel and not det.needs_general
    got = scorer.score_maps(x, [det, get_detector("raw")])
    score, pixel_map = got["complexity_loco"]
    raw, raw_map = got["raw"]
    coder_map = -pixel_code_lengths(levels) * math.log(2)
    # per 4×4 block (the coarsest grid of a 2-scale Glow): each block's ratio, spread evenly over it
    blocks = (coder_map + raw_map.double()).reshape(3, 2, 4, 2, 4).sum(dim=(2, 4))
    expected = (blocks / 16).repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    torch.testing.assert_close(pixel_map, expected.float(), rtol=1e-5, atol=1e-3)
    total = (coder_map.sum(dim=(1, 2)) + raw.double()).float()
    torch.testing.assert_close(score, total, rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(pixel_map.sum(dim=(1, 2)), score, rtol=1e-5, atol=1e-2)
    assert (blocks[0] - blocks[0, 0, 0]).abs().max() > 1.0  # per block, not one constant per image
    torch.testing.assert_close(scorer.score(x, [det])["complexity_loco"], score)
    with pytest.raises(ValueError, match="'png' codes whole files .* per-pixel coders: loco"):
        CodedImages(levels).log_prob_map("png")

    # A block with a pixel the model gives no finite density is the sentinel; the others are kept.
    with torch.no_grad():
        out = model.eval()(x)
    broken = tuple(c.clone() for c in out.contributions)
    broken[0][1, 3, 0] = -math.inf  # scale 1 (2×2 blocks): rows 6–7, columns 0–1, in block (1, 0)
    sentinel_map = det.map_from(replace(out, contributions=broken), None, levels)
    assert (sentinel_map[1, 4:, :4] >= SENTINEL_LIMIT).all()
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[4:, :4] = False
    torch.testing.assert_close(sentinel_map[1][keep], pixel_map[1][keep], rtol=1e-5, atol=1e-3)
    assert (sentinel_map[[0, 2]] == pixel_map[[0, 2]]).all()


def test_upsampling_a_map_keeps_its_sentinels_whole_and_out_of_their_neighbours() -> None:
    import torch.nn.functional as F

    from densead.detectors.glow import SENTINEL_LIMIT, upsample_map, with_sentinels

    m = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    plain = F.interpolate(m[:, None], size=(7, 11), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(upsample_map(m, (7, 11)), plain)  # no sentinel: plain bilinear
    m[0, 1, 2] = -MIN_LOG_PROB
    m[1, 0, 0] = MIN_LOG_PROB
    for size in ((6, 10), (7, 11)):  # integer and fractional factors (a frame resized back)
        up = upsample_map(m, size)
        cells = F.interpolate((m.abs() >= SENTINEL_LIMIT).float()[:, None], size=size, mode="nearest-exact")
        marked = up.abs() >= SENTINEL_LIMIT
        assert torch.equal(marked, cells[:, 0] > 0) and marked[0].any() and marked[1].any()
        assert (up[0][marked[0]] == -MIN_LOG_PROB).all() and (up[1][marked[1]] == MIN_LOG_PROB).all()
        assert up[~marked].abs().max() <= m[m.abs() < SENTINEL_LIMIT].abs().max() + 1e-6
    # an ensemble of layers: a sentinel in any layer is the ensemble's, the anomalous one first
    layers = torch.tensor([[1.0, -MIN_LOG_PROB, MIN_LOG_PROB], [2.0, MIN_LOG_PROB, 3.0]], dtype=torch.float64)
    assert with_sentinels(layers.mean(0), layers).tolist() == [1.5, -MIN_LOG_PROB, MIN_LOG_PROB]
