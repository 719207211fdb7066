"""Pure image-quality metrics: PSNR, SSIM, Fréchet distance, accuracy, CLIP-style score.

Every function takes arrays and returns numbers; nothing here loads a model or reads a file
(feature extraction lives in :mod:`DeepCache.tools.evaluate`). Images are float arrays in
``[0, data_range]`` shaped ``(N, H, W, C)`` (a single ``(H, W, C)`` image is promoted to a batch).

Example::

    >>> import numpy as np
    >>> from DeepCache.tools.metrics import psnr, ssim, frechet_distance
    >>> a = np.zeros((1, 8, 8, 3)); b = a + 0.1
    >>> round(float(psnr(a, b)[0]), 6)
    20.0
    >>> float(ssim(a, a)[0])
    1.0
    >>> x = np.random.default_rng(0).normal(size=(100, 4))
    >>> round(frechet_distance(x, x + 1.0), 6)
    4.0
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "cosine_score",
    "frechet_distance",
    "frechet_from_statistics",
    "gaussian_statistics",
    "psnr",
    "ssim",
]


def _as_batch(images: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"{name} must be (N, H, W, C) or (H, W, C), got shape {array.shape}.")
    return array


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_batch(a, "a"), _as_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}; compare images of the same size and count.")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image, ``10 log10(range^2 / MSE)``; ``inf`` for identical images."""
    a, b = _check_pair(a, b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over axes 1 (H) and 2 (W) of an (N, H, W, C) array."""
    size = len(window)
    height, width = x.shape[1] - size + 1, x.shape[2] - size + 1
    rows = sum(window[i] * x[:, i : i + height] for i in range(size))
    return sum(window[j] * rows[:, :, j : j + width] for j in range(size))


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Structural similarity per image (Wang et al. 2004): Gaussian window, 'valid' borders, mean over channels.

    The window shrinks to the image size for images smaller than ``window_size``.
    """
    a, b = _check_pair(a, b)
    size = min(window_size, a.shape[1], a.shape[2])
    window = _gaussian_window(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a**2
    var_b = _filter_valid(b * b, window) - mu_b**2
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (numerator / denominator).reshape(len(a), -1).mean(axis=1)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features; N must be >= 2."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_from_statistics(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``: the Fréchet (W2) distance of two Gaussians.

    Computed through symmetric eigendecompositions, so it is real and >= 0 (up to rounding) even for
    singular covariances (fewer samples than dimensions).
    """
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"statistics differ in dimension: {mu_a.shape} vs {mu_b.shape}.")
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (FID's formula in any feature space)."""
    return frechet_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


def accuracy(predicted: np.ndarray, target: np.ndarray) -> float:
    """Fraction of equal entries; for (N, K) arrays a row counts only if all K entries match."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape or predicted.size == 0:
        raise ValueError(f"predicted {predicted.shape} and target {target.shape} must have the same non-empty shape.")
    matches = predicted == target
    if matches.ndim > 1:
        matches = matches.reshape(len(matches), -1).all(axis=1)
    return float(matches.mean())


def cosine_score(image_embeds: np.ndarray, text_embeds: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """CLIP score per pair: ``max(scale * cos(image, text), 0)`` (Hessel et al. 2021 use scale 100 with w=1)."""
    a, b = np.asarray(image_embeds, dtype=np.float64), np.asarray(text_embeds, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings must both be (N, D), got {a.shape} and {b.shape}.")
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.maximum(scale * cos, 0.0)
