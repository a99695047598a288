"""Tests of the 32-bit spread-spectrum watermark baseline (jaxattrib.authentication.watermark)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.authentication import watermark as W
from jaxattrib.authentication.similarity import psnr
from jaxattrib.data.synthetic import make_synthetic

KEY = jax.random.PRNGKey(7)
BITS = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(1), 0.5, (32,)), np.uint8)


@pytest.fixture(scope="module")
def images():
    return make_synthetic(seed=0).images[::4][:64]        # 64 varied 32 px images


def test_patterns_are_orthogonal_unit_rms():
    p = W.make_patterns(KEY, 16, 24).patterns.reshape(32, -1)
    gram = np.asarray(p @ p.T) / p.shape[1]
    np.testing.assert_allclose(gram, np.eye(32), atol=1e-5)


def test_flat_image_coefficients_are_exact():
    # a flat image has no high-pass content: the coefficients are alpha * s_b / sqrt(K)
    x = jnp.zeros((2, 32, 32, 3))
    alpha = 0.05
    a = W.coefficients(W.embed(x, BITS, KEY, alpha), KEY)
    expect = alpha / math.sqrt(32) * (2.0 * BITS - 1.0)
    np.testing.assert_allclose(np.asarray(a), np.broadcast_to(expect, (2, 32)), atol=2e-5)


def test_round_trip_32_of_32_with_psnr_bound(images):
    alpha = 0.06
    y = W.embed(images, BITS, KEY, alpha)
    assert y.shape == images.shape and float(jnp.abs(y).max()) <= 1.0
    acc = W.bit_accuracy(W.decode(y, KEY), BITS)
    assert acc.min() == 1.0                                    # every image: 32/32 bits
    # RMS of the added signal is alpha, so PSNR >= 20 log10(2 / alpha) = 30.46 dB
    p = np.asarray(psnr(jnp.asarray(images), y))
    assert p.min() >= 20 * math.log10(2 / alpha) - 1e-3 and p.min() > 30.0
    assert W.detect(y, BITS, KEY).all()


def test_unmarked_and_wrong_key_decode_at_chance(images):
    clean = W.bit_accuracy(W.decode(images, KEY), BITS)
    noise = jax.random.uniform(jax.random.PRNGKey(3), (64, 32, 32, 3), minval=-1, maxval=1)
    rand = W.bit_accuracy(W.decode(noise, KEY), BITS)
    wrong = W.bit_accuracy(W.decode(W.embed(images, BITS, KEY, 0.06), jax.random.PRNGKey(8)),
                           BITS)
    for acc in (clean, rand, wrong):
        assert abs(acc.mean() - 0.5) < 0.06                    # 2048 bits: sd 0.011
    tau = W.detection_threshold(32, 1e-3)
    assert not W.detect(noise, BITS, KEY).any()
    assert (rand >= tau).sum() == 0


def test_aggregate_decoding_recovers_a_weak_mark(images):
    y = W.embed(images, BITS, KEY, 0.01)                        # 46 dB: too weak per image
    assert W.bit_accuracy(W.decode(y, KEY), BITS).min() < 1.0
    agg = W.decode(y, KEY, aggregate=True)
    assert agg.shape == (32,) and W.bit_accuracy(agg, BITS) == 1.0
    assert bool(W.detect(y, BITS, KEY, aggregate=True))


def test_detection_threshold_is_the_binomial_tail():
    for n, fpr in [(32, 1e-3), (32, 0.05), (8, 0.01)]:
        tail = lambda k: sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n  # noqa: E731
        k = round(W.detection_threshold(n, fpr) * n)
        assert tail(k) <= fpr and (k == 0 or tail(k - 1) > fpr)


def test_errors():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(W.WatermarkError, match="bits"):
        W.embed(x, [0, 1, 2], KEY)
    with pytest.raises(W.WatermarkError, match="strength"):
        W.embed(x, BITS, KEY, 0.0)
    with pytest.raises(W.WatermarkError, match="images"):
        W.decode(jnp.zeros((8, 8, 3)), KEY)
    with pytest.raises(W.WatermarkError, match="n_bits"):
        W.make_patterns(KEY, 4, 4, 32)
