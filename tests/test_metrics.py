"""Exact values of the pure metric functions in DeepCache.tools.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from DeepCache.tools import metrics


def test_psnr_identical_is_inf() -> None:
    a = np.random.default_rng(0).random((3, 8, 8, 3))
    assert np.all(np.isinf(metrics.psnr(a, a)))


def test_psnr_known_error() -> None:
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    np.testing.assert_allclose(metrics.psnr(a, b), [20.0, 40.0], rtol=0, atol=1e-9)
    # data_range scales the peak: 8-bit images with error 25.5 -> 20 dB.
    np.testing.assert_allclose(metrics.psnr(a * 255, b * 255, data_range=255.0), [20.0, 40.0], atol=1e-9)


def test_psnr_accepts_single_image_and_rejects_mismatch() -> None:
    assert metrics.psnr(np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.5)).shape == (1,)
    with pytest.raises(ValueError, match="same size"):
        metrics.psnr(np.zeros((1, 4, 4, 3)), np.zeros((1, 5, 4, 3)))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 4)))


def test_ssim_identical_is_one_and_symmetric() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 16, 16, 3)), rng.random((2, 16, 16, 3))
    np.testing.assert_allclose(metrics.ssim(a, a), [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(metrics.ssim(a, b), metrics.ssim(b, a), atol=1e-12)
    assert np.all(metrics.ssim(a, b) < 0.2)  # independent noise is structurally unrelated


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Constant images: variances and covariance are 0, so SSIM = (2 m1 m2 + c1) / (m1^2 + m2^2 + c1).
    m1, m2 = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    got = metrics.ssim(np.full((1, 12, 12, 1), m1), np.full((1, 12, 12, 1), m2))
    np.testing.assert_allclose(got, [expected], rtol=1e-12)


def test_ssim_decreases_with_noise() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((1, 32, 32, 3))
    values = [float(metrics.ssim(a, np.clip(a + s * rng.normal(size=a.shape), 0, 1))[0]) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]


def test_frechet_identical_is_zero() -> None:
    x = np.random.default_rng(3).normal(size=(200, 8))
    assert abs(metrics.frechet_distance(x, x)) < 1e-8


def test_frechet_shift_is_squared_norm() -> None:
    x = np.random.default_rng(4).normal(size=(300, 5))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert metrics.frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), abs=1e-8)


def test_frechet_closed_form_for_diagonal_gaussians() -> None:
    # N(0, a^2 I) vs N(0, b^2 I) in D dims: D (a - b)^2.
    mu = np.zeros(3)
    value = metrics.frechet_from_statistics(mu, 4.0 * np.eye(3), mu, 1.0 * np.eye(3))
    assert value == pytest.approx(3 * (2.0 - 1.0) ** 2, abs=1e-12)
    # General closed form with non-commuting covariances, checked against a direct formula.
    ca = np.array([[2.0, 0.5], [0.5, 1.0]])
    cb = np.array([[1.0, -0.3], [-0.3, 0.5]])
    w, v = np.linalg.eigh(ca)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    w2 = np.linalg.eigvalsh(root_a @ cb @ root_a)
    expected = 1.0 + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(w2).sum()
    got = metrics.frechet_from_statistics(np.array([1.0, 0.0]), ca, np.zeros(2), cb)
    assert got == pytest.approx(expected, abs=1e-12)


def test_frechet_handles_fewer_samples_than_dimensions() -> None:
    rng = np.random.default_rng(5)
    value = metrics.frechet_distance(rng.normal(size=(4, 16)), rng.normal(size=(4, 16)))
    assert math.isfinite(value) and value >= -1e-9
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))


def test_accuracy() -> None:
    assert metrics.accuracy(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    rows = np.array([[1, 2], [3, 4], [5, 6]])
    assert metrics.accuracy(rows, np.array([[1, 2], [3, 0], [5, 6]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same non-empty shape"):
        metrics.accuracy(np.array([1]), np.array([1, 2]))


def test_cosine_score() -> None:
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(metrics.cosine_score(a, b), [100.0, 0.0, 0.0], atol=1e-12)
