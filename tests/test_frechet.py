"""Frechet distance: agreement with clean-fid and torchmetrics, closed forms, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.eval.frechet import FeatureStats, fd_from_features, feature_stats, frechet_distance


pytestmark = pytest.mark.usefixtures("one_thread")


def _two_gaussians(n: int = 500, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, d) float64 samples from different full-covariance Gaussians."""
    rng = np.random.default_rng(seed)
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.7
    x = rng.normal(size=(n, d)) @ a1 + rng.normal(size=d)
    y = rng.normal(size=(n, d)) @ a2 + 0.5 * rng.normal(size=d)
    return x, y


def test_stats_are_float64_unbiased():
    x, _ = _two_gaussians()
    s = feature_stats(x.astype(np.float32))
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    assert s.mu.shape == (16,) and s.sigma.shape == (16, 16) and s.n == 500 and s.dim == 16
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-12)
    np.testing.assert_array_equal(s.sigma, s.sigma.T)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # inside clean-fid
def test_agrees_with_clean_fid():
    from cleanfid.fid import frechet_distance as cleanfid_fd

    x, y = _two_gaussians()
    a, b = feature_stats(x), feature_stats(y)
    ours = frechet_distance(a, b)
    ref = float(cleanfid_fd(a.mu, a.sigma, b.mu, b.sigma))
    assert ours > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)


class _PrecomputedFeatures(torch.nn.Module):
    """A torchmetrics 'feature extractor' that passes precomputed (B, D) features through unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = _two_gaussians()
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(16), normalize=False)
    # Feeding in several batches also checks that our one-shot statistics match streamed ones.
    for chunk in np.array_split(x, 4):
        metric.update(torch.from_numpy(chunk), real=True)
    for chunk in np.array_split(y, 3):
        metric.update(torch.from_numpy(chunk), real=False)
    ref = float(metric.compute())
    assert fd_from_features(x, y) == pytest.approx(ref, rel=1e-6)


def test_closed_form_isotropic():
    # N(0, I) vs N(m, s^2 I): d^2 = |m|^2 + D (1 - s)^2.
    d, s = 8, 2.5
    m = np.arange(d, dtype=np.float64)
    a = FeatureStats(mu=np.zeros(d), sigma=np.eye(d), n=100)
    b = FeatureStats(mu=m, sigma=s**2 * np.eye(d), n=100)
    assert frechet_distance(a, b) == pytest.approx(m @ m + d * (1 - s) ** 2, rel=1e-12)


def test_closed_form_commuting_covariances():
    # Diagonal covariances commute: d^2 = |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    a = FeatureStats(mu=np.ones(4), sigma=np.diag(v1), n=10)
    b = FeatureStats(mu=np.zeros(4), sigma=np.diag(v2), n=10)
    assert frechet_distance(a, b) == pytest.approx(4 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2), rel=1e-12)


def test_self_distance_is_zero_and_symmetric():
    x, y = _two_gaussians()
    scale = np.trace(feature_stats(x).sigma)
    assert abs(fd_from_features(x, x)) < 1e-9 * scale
    assert fd_from_features(x, y) == pytest.approx(fd_from_features(y, x), rel=1e-9)


def test_singular_covariance_is_handled():
    # A feature that never varies (rank-deficient covariance) must not give NaN or a complex result.
    x, y = _two_gaussians()
    x[:, 3] = 0.0
    y[:, 3] = 0.0
    fd = fd_from_features(x, y)
    assert np.isfinite(fd) and fd > 0


def test_torch_and_numpy_inputs_agree():
    x, y = _two_gaussians()
    assert fd_from_features(torch.from_numpy(x), torch.from_numpy(y)) == fd_from_features(x, y)
    # float32 tensors are promoted before any arithmetic.
    x32, y32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    assert fd_from_features(x32, y32) == fd_from_features(x32.double(), y32.double())


def test_too_few_samples():
    with pytest.raises(DistillError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 4)))
    rng = np.random.default_rng(0)
    with pytest.raises(DistillError, match=r"16 samples of 16-dimensional.*more than 16 samples"):
        feature_stats(rng.normal(size=(16, 16)))
    with pytest.raises(DistillError, match="10 samples of 64-dimensional"):
        fd_from_features(rng.normal(size=(10, 64)), rng.normal(size=(100, 64)))
    feature_stats(rng.normal(size=(17, 16)))  # one more sample than dimensions is accepted


def test_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(DistillError, match=r"shape \(N, D\)"):
        feature_stats(rng.normal(size=(50, 2, 2)))
    bad = rng.normal(size=(50, 4))
    bad[3, 1] = np.nan
    with pytest.raises(DistillError, match="NaN"):
        feature_stats(bad)
    with pytest.raises(DistillError, match="different dimensions"):
        frechet_distance(feature_stats(rng.normal(size=(50, 4))), feature_stats(rng.normal(size=(50, 5))))


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_samples():
    from distill.eval.frechet import bootstrap_fd, bootstrap_mean

    rng = np.random.default_rng(0)
    ref = feature_stats(rng.normal(size=(4000, 8)))
    widths = []
    for n in (200, 3200):
        x = rng.normal(loc=0.3, size=(n, 8))
        fd = fd_from_features(x, rng.normal(size=(4000, 8)))
        lo, hi = bootstrap_fd(x, ref)
        assert lo < frechet_distance(feature_stats(x), ref) < hi
        assert abs(fd - frechet_distance(feature_stats(x), ref)) < hi - lo + 0.1
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n)
    assert bootstrap_fd(x, ref) == bootstrap_fd(x, ref)  # seeded
    # 64-d features, two samples of one distribution (a data floor): the resampled FDs sit far above the estimate
    # (duplicated samples), and the interval is corrected for that: it holds the estimate and keeps the spread
    x, y = rng.normal(size=(700, 64)), rng.normal(size=(4000, 64))
    ref = feature_stats(y)
    est = frechet_distance(feature_stats(x), ref)
    lo, hi = bootstrap_fd(x, ref)
    assert lo < est < hi and hi - lo < est, (lo, est, hi)
    flags = np.array([1] * 90 + [0] * 10)
    lo, hi = bootstrap_mean(flags)
    assert lo < 0.9 < hi and hi - lo < 0.2
