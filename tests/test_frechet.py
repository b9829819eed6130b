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


def _gaussian_pair(d: int, seed: int = 0):
    """Two Gaussians with diagonal covariances: the exact FD is ||mu_1 - mu_2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(seed)
    a = np.exp(-np.arange(d) / 4.0)
    b = a * (1.0 + 0.3 * np.sin(np.arange(d)))
    mu = 0.1 * rng.standard_normal(d)
    exact = float(mu @ mu + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    return FeatureStats(np.zeros(d), np.diag(a), 10**9), mu, np.sqrt(b), exact


def test_pooled_interval_covers_the_exact_fd_of_gaussians():
    """Samples of N(mu, diag(b)) against the known reference N(0, diag(a)): the plug-in FD sits above the exact FD
    by a bias of about D^2 / (4 N), so an interval around it almost never holds the exact value; the bias-corrected
    interval of pooled_fd holds it in at least 90% of 100 independent trials."""
    from distill.eval.frechet import pooled_fd

    ref, mu, scale, exact = _gaussian_pair(16)
    rng = np.random.default_rng(1)
    covered = plain_covered = 0
    for trial in range(100):
        x = mu + scale * rng.standard_normal((300, 16))
        p = pooled_fd(x, ref, reps=100, seed=trial)
        assert p.plain == pytest.approx(frechet_distance(feature_stats(x), ref))
        assert p.value == pytest.approx(p.plain - p.bias) and p.bias > 0 and p.n == 300
        covered += p.ci[0] <= exact <= p.ci[1]
        plain_covered += p.ci[0] + p.bias <= exact <= p.ci[1] + p.bias  # the same width, around the plug-in value
    assert covered >= 90, covered
    assert plain_covered < 50, plain_covered  # without the correction: the bias is several interval half-widths


def test_pooled_estimate_does_not_depend_on_the_sample_count():
    """The plug-in FD falls with more samples (its bias shrinks); the bias-corrected value stays put, so a pooled
    row of many samples and a floor of fewer real images compare on one scale."""
    from distill.eval.frechet import pooled_fd

    ref, mu, scale, exact = _gaussian_pair(16)
    rng = np.random.default_rng(2)
    few = [pooled_fd(mu + scale * rng.standard_normal((200, 16)), ref, reps=50, seed=i) for i in range(20)]
    many = [pooled_fd(mu + scale * rng.standard_normal((2000, 16)), ref, reps=50, seed=i) for i in range(20)]
    # exact 0.177: plug-in 0.257 at 200 samples, 0.183 at 2000; corrected 0.174 and 0.175
    assert np.mean([p.plain for p in few]) > np.mean([p.plain for p in many]) + 0.05 > exact + 0.05
    assert abs(np.mean([p.value for p in few]) - exact) < 0.02 and abs(np.mean([p.value for p in many]) - exact) < 0.01


def _kid_brute(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * k(x, y).mean())


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel_in_blocks():
    from distill.eval.frechet import kid

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((301, 8)), rng.standard_normal((200, 8)) + 0.3
    value, se = kid(x, y, block=64)  # blocks that do not divide the sample count
    assert value == pytest.approx(_kid_brute(x, y), rel=1e-9) and se > 0
    assert kid(torch.from_numpy(x).float(), torch.from_numpy(y).float())[0] == pytest.approx(value, rel=1e-5)
    with pytest.raises(DistillError, match="same feature network"):
        kid(x, y[:, :4])


def test_kid_expectation_is_zero_for_two_draws_of_one_distribution():
    """Over many pairs of draws of one Gaussian, KID averages to 0 (it is unbiased; FD's plug-in would not)."""
    from distill.eval.frechet import kid

    rng = np.random.default_rng(4)
    values = np.array([kid(rng.standard_normal((200, 8)), rng.standard_normal((150, 8)), seed=i)[0]
                       for i in range(300)])
    assert abs(values.mean()) < 3 * values.std() / np.sqrt(len(values))
    assert (values < 0).any()  # an unbiased estimate of 0 comes out negative about as often as positive


def test_kid_standard_error_matches_the_spread_over_draws():
    """The jackknife standard error (reference held fixed) is about the standard deviation of KID over fresh draws
    of the samples against that reference."""
    from distill.eval.frechet import kid

    rng = np.random.default_rng(5)
    y = rng.standard_normal((300, 8))
    runs = [kid(rng.standard_normal((400, 8)) + 0.2, y, seed=i) for i in range(150)]
    spread, mean_se = np.std([v for v, _ in runs]), np.mean([s for _, s in runs])
    assert 0.75 < mean_se / spread < 1.33, (mean_se, spread)
