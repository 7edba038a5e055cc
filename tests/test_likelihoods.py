"""The likelihood registry against hand-written closed forms, its suprema and its measures.

Every test that iterates over families takes them from `likelihoods.NAMES`, and the per-family tables
below (closed forms, divergent parameter sequences, expected boundedness) are checked to cover the
registry exactly: adding a family without adding its closed form here makes the suite fail.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import likelihoods
from models.likelihoods import BINARY, EIGHT_BIT, LEVELS, UNIT_INTERVAL

D = 50  # pixels per test image
HALF_BIN = 0.5 / (LEVELS - 1)


# ---------------------------------------------------------------------------------------------------
# Closed forms, written out with numpy from the formulas (constants included). Each takes the raw
# decoder output (B, P, D), the shared log-scale (a float), x (B, D), the fixed scale and the floor on
# a learned scale, and returns log p per pixel (B, D).
# ---------------------------------------------------------------------------------------------------

def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _gaussian(x, mu, sigma):
    # Kingma & Welling 2014, App. C.2: log p = −½ log(2π) − ½ log σ² − (x − μ)²/(2σ²) per pixel
    return -0.5 * np.log(2 * np.pi) - 0.5 * np.log(sigma**2) - (x - mu) ** 2 / (2 * sigma**2)


def _laplace(x, mu, b):
    return -np.log(2 * b) - np.abs(x - mu) / b


def _bernoulli(raw, shared, x, scale, min_scale):
    # Kingma & Welling 2014, App. C.1: log p = Σ x log y + (1 − x) log(1 − y), y = sigmoid(logits)
    y = _sigmoid(raw[:, 0])
    return x * np.log(y) + (1 - x) * np.log(1 - y)


def _continuous_bernoulli(raw, shared, x, scale, min_scale):
    # Loaiza-Ganem & Cunningham 2019: C(λ) = 2 atanh(1 − 2λ)/(1 − 2λ)
    lam = _sigmoid(raw[:, 0])
    log_c = np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))
    return x * np.log(lam) + (1 - x) * np.log(1 - lam) + log_c


def _gaussian_fixed(raw, shared, x, scale, min_scale):
    return _gaussian(x, raw[:, 0], scale)


def _gaussian_learned(raw, shared, x, scale, min_scale):
    return _gaussian(x, raw[:, 0], min_scale + np.exp(raw[:, 1]))


def _gaussian_shared(raw, shared, x, scale, min_scale):
    return _gaussian(x, raw[:, 0], min_scale + np.exp(shared))


def _gaussian_optimal(raw, shared, x, scale, min_scale):
    # σ*² = the image's mean squared error (σ-VAE), floored at min_scale²
    mse = np.mean((x - raw[:, 0]) ** 2, axis=-1, keepdims=True)
    return _gaussian(x, raw[:, 0], np.maximum(np.sqrt(mse), min_scale))


def _laplace_fixed(raw, shared, x, scale, min_scale):
    return _laplace(x, raw[:, 0], scale)


def _laplace_learned(raw, shared, x, scale, min_scale):
    return _laplace(x, raw[:, 0], min_scale + np.exp(raw[:, 1]))


def _discretized_logistic(raw, shared, x, scale, min_scale):
    # P(k) = F((k+½)/255) − F((k−½)/255), F the logistic CDF; the edge bins take all the tail mass:
    # P(0) = F(upper), P(255) = 1 − F(lower). 1 − F(t) is written F(−t) (the same number, computed
    # without cancellation), and a bin above the mean as F(−lower) − F(−upper) for the same reason.
    mu, s = raw[:, 0], min_scale + np.exp(raw[:, 1])
    upper, lower = (x + HALF_BIN - mu) / s, (x - HALF_BIN - mu) / s
    k = np.rint(x * (LEVELS - 1))
    with np.errstate(divide="ignore"):  # np.where evaluates the branch it then discards, too
        interior = np.where(lower > 0,
                            np.log(_sigmoid(-lower) - _sigmoid(-upper)),
                            np.log(_sigmoid(upper) - _sigmoid(lower)))
    return np.where(k == 0, np.log(_sigmoid(upper)),
                    np.where(k == LEVELS - 1, np.log(_sigmoid(-lower)), interior))


CLOSED_FORMS = {
    "bernoulli": _bernoulli,
    "continuous_bernoulli": _continuous_bernoulli,
    "gaussian": _gaussian_fixed,
    "gaussian_learned": _gaussian_learned,
    "gaussian_shared": _gaussian_shared,
    "gaussian_optimal": _gaussian_optimal,
    "laplace": _laplace_fixed,
    "laplace_learned": _laplace_learned,
    "discretized_logistic": _discretized_logistic,
}

# Which families are bounded without a floor, and with a floor min_scale > 0 on a learned scale.
EXPECTED_BOUNDED = {
    "bernoulli": (True, True),
    "continuous_bernoulli": (False, False),
    "gaussian": (True, True),
    "gaussian_learned": (False, True),
    "gaussian_shared": (False, True),
    "gaussian_optimal": (False, True),
    "laplace": (True, True),
    "laplace_learned": (False, True),
    "discretized_logistic": (True, True),
}


def test_tables_cover_the_registry_exactly():
    assert set(CLOSED_FORMS) == set(likelihoods.NAMES)
    assert set(EXPECTED_BOUNDED) == set(likelihoods.NAMES)


# ---------------------------------------------------------------------------------------------------
# Inputs with the right support for each family, generated from the family's metadata.
# ---------------------------------------------------------------------------------------------------

def random_x(support: str, rng: np.random.Generator, shape) -> np.ndarray:
    if support == BINARY:
        return rng.integers(0, 2, size=shape).astype(np.float64)
    if support == UNIT_INTERVAL:
        return rng.uniform(0.001, 0.999, size=shape)
    assert support == EIGHT_BIT, f"no test inputs for support {support!r}"
    k = rng.integers(0, LEVELS, size=shape)
    k[..., 0], k[..., 1] = 0, LEVELS - 1  # the edge bins, whose mass is a tail, in every image
    return k / (LEVELS - 1)


def random_raw(family: likelihoods.Family, rng: np.random.Generator, batch: int) -> np.ndarray:
    raw = np.empty((batch, family.n_params, D))
    if family.support == BINARY or family.name == "continuous_bernoulli":
        raw[:, 0] = rng.normal(0, 2, size=(batch, D))  # logits
    else:
        raw[:, 0] = rng.uniform(-0.2, 1.2, size=(batch, D))  # location
    if family.n_params > 1:
        raw[:, 1] = rng.uniform(math.log(0.02), math.log(0.8), size=(batch, D))  # log scale
    return raw


def log_p(lik: likelihoods.Likelihood, raw, shared, x, per_pixel: bool = False) -> torch.Tensor:
    dist = lik.distribution(torch.as_tensor(raw), shared, torch.as_tensor(x))
    return (dist.base_dist if per_pixel else dist).log_prob(torch.as_tensor(x))


VARIANTS = [(1.0, 0.0), (0.3, 0.02)]  # (fixed scale, floor on a learned scale)


@pytest.mark.parametrize("scale,min_scale", VARIANTS)
@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_log_prob_matches_closed_form(name, scale, min_scale):
    rng = np.random.default_rng([likelihoods.NAMES.index(name), int(scale * 100)])  # stable across runs
    lik = likelihoods.get(name, scale=scale, min_scale=min_scale)
    batch = 6
    raw, x = random_raw(lik.family, rng, batch), random_x(lik.family.support, rng, (batch, D))
    shared_value = rng.uniform(-3, 0.5)
    shared = torch.tensor([shared_value], dtype=torch.float64)

    expected = CLOSED_FORMS[name](raw, shared_value, x, scale, min_scale)  # (B, D)
    got_pixel = log_p(lik, raw, shared, x, per_pixel=True)
    got_image = log_p(lik, raw, shared, x)
    assert got_pixel.dtype == torch.float64
    np.testing.assert_allclose(got_pixel.numpy(), expected, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(got_image.numpy(), expected.sum(-1), rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("name", [n for n in likelihoods.NAMES if likelihoods.FAMILIES[n].score is not None])
def test_closed_form_score_is_autograds_gradient_of_log_prob(name, scale):
    """The manual backward's shortcut: d log p / d raw, (L, B, P, D) against x (B, D)."""
    rng = np.random.default_rng(likelihoods.NAMES.index(name))
    lik = likelihoods.get(name, scale=scale)
    x = torch.as_tensor(random_x(lik.family.support, rng, (6, D)))
    raw = torch.as_tensor(np.stack([random_raw(lik.family, rng, 6) for _ in range(3)])).requires_grad_()
    (expected,) = torch.autograd.grad(lik.distribution(raw, None, x).log_prob(x).sum(), raw)
    torch.testing.assert_close(lik.score(raw.detach(), x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_distribution_shapes(name):
    # batch shape (...) and event shape (D,): log p is per image, summed over pixels
    lik = likelihoods.get(name)
    raw = torch.zeros(3, 2, lik.family.n_params, D, dtype=torch.float64)
    x = torch.full((3, 2, D), 1.0 if lik.family.support == BINARY else 128 / 255, dtype=torch.float64)
    dist = lik.distribution(raw, torch.zeros(1, dtype=torch.float64), x)
    assert dist.batch_shape == (3, 2) and dist.event_shape == (D,)
    assert dist.log_prob(x).shape == (3, 2)


def test_gaussian_optimal_is_the_profiled_gaussian():
    # With σ*² = mean (x − μ)² the summed Gaussian log p collapses to −D/2 · (1 + log(2π σ*²)).
    rng = np.random.default_rng(1)
    mu, x = rng.uniform(0, 1, size=(5, D)), rng.uniform(0, 1, size=(5, D))
    sigma2 = np.mean((x - mu) ** 2, axis=-1)
    expected = -D / 2 * (1 + np.log(2 * np.pi * sigma2))
    got = log_p(likelihoods.get("gaussian_optimal"), mu[:, None, :], None, x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    # and σ*² maximises the Gaussian log p in σ: any other shared σ does worse
    for factor in (0.5, 0.9, 1.1, 2.0):
        other = _gaussian(x, mu, np.sqrt(sigma2 * factor)[:, None]).sum(-1)
        assert np.all(other < expected)


def test_gaussian_optimal_is_not_a_density_of_the_data():
    # One pixel, μ = ½, σ* = |x − μ|: p(x) = c/|x − μ| with c = exp(−½)/√(2π), whose integral over [0, 1]
    # diverges. On a midpoint grid of n cells it is 2c·Σ_{k<n/2} 1/(k + ½) ≈ 2c·(ln n + ln 2 + γ): a density
    # would give 1 at every n. Hence its measure is not comparable with any likelihood.
    lik, c = likelihoods.get("gaussian_optimal"), math.exp(-0.5) / math.sqrt(2 * math.pi)
    for n in (10**2, 10**4, 10**6):
        x = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]  # (n, 1), never exactly ½
        mean = torch.full((n, 1, 1), 0.5, dtype=torch.float64)
        mass = lik.distribution(mean, None, x).log_prob(x).exp().mean().item()
        assert mass == pytest.approx(2 * c * math.fsum(1 / (k + 0.5) for k in range(n // 2)), rel=1e-9)
        assert mass > 1 + 0.4 * math.log10(n)


def test_identity_covariance_gaussian_is_sigma_one():
    # The AEVB paper's identity-covariance Gaussian: log p = Σ −½ log(2π) − (x − μ)²/2
    rng = np.random.default_rng(2)
    mu, x = rng.normal(size=(4, D)), rng.uniform(0, 1, size=(4, D))
    expected = np.sum(-0.5 * np.log(2 * np.pi) - (x - mu) ** 2 / 2, axis=-1)
    got = log_p(likelihoods.get("gaussian"), mu[:, None, :], None, x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("loc,scale", [(0.5, 0.1), (0.0, 0.01), (1.0, 0.3), (-0.4, 0.05), (1.7, 2.0),
                                       (0.3, 1e-4), (0.5, 50.0), (133 / 255, 1e-6)])
def test_discretized_logistic_pmf_sums_to_one(loc, scale):
    k = torch.arange(LEVELS, dtype=torch.float64)
    x = (k / (LEVELS - 1))[:, None]  # (256, 1): every pixel value as a one-pixel image
    raw = torch.tensor([[loc], [math.log(scale)]], dtype=torch.float64).expand(LEVELS, 2, 1)
    lp = likelihoods.get("discretized_logistic").distribution(raw, None, x).log_prob(x)  # (256,)
    assert torch.isfinite(lp).all() or scale < 1e-3  # bins far in a tiny-scale tail may be −∞
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-9)


def test_discretized_logistic_tails_stay_finite_in_log_space():
    # A bin ~100 scales away from the mean has mass e^-100-ish: the naive log(F(u) − F(l)) gives −∞
    # there (and in float32 much earlier); the log-sigmoid form must stay finite and match the tail
    # asymptote log σ(u) + log σ(−l) + log(1 − e^(l − u)) ≈ −l + log(1 − e^(l−u)).
    lik = likelihoods.get("discretized_logistic")
    scale = 0.002
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([[200 / 255, 255 / 255, 0.0]], dtype=dtype)
        raw = torch.stack([torch.zeros(1, 3), torch.full((1, 3), math.log(scale))], 1).to(dtype)
        lp = lik.distribution(raw, None, x).base_dist.log_prob(x)[0]
        assert torch.isfinite(lp).all()
        lower, upper = (200 / 255 - HALF_BIN) / scale, (200 / 255 + HALF_BIN) / scale
        assert lp[0].item() == pytest.approx(-lower + math.log(-math.expm1(lower - upper)), rel=1e-4)
        assert lp[1].item() == pytest.approx(-(1 - HALF_BIN) / scale, rel=1e-4)  # the top edge bin
        assert lp[2].item() == pytest.approx(-math.log1p(math.exp(-HALF_BIN / scale)), abs=1e-6)


@pytest.mark.parametrize("flush", [False, True], ids=["subnormals", "flushed"])
def test_discretized_logistic_underflowed_scale_gives_no_nan(flush):
    # exp(−100) is a float32 subnormal, or 0 where training flushes subnormals: both bin edges of a pixel
    # far from the mean are ±∞, and the bin's log-mass must come out −∞ (its limit), not ∞ − ∞ = NaN.
    torch.set_flush_denormal(flush)
    lik = likelihoods.get("discretized_logistic")
    x = torch.tensor([[0.0, 100 / 255, 1.0]])
    for loc in (0.0, 0.5, 1e4, -1e4):
        raw = torch.tensor([[[loc] * 3, [-100.0] * 3]])
        lp = lik.distribution(raw, None, x).base_dist.log_prob(x)
        assert not torch.isnan(lp).any(), (loc, lp)
        assert (lp <= 0).all()
    at_x = torch.stack([x[0], torch.full((3,), -100.0)])[None]  # the mean on the pixel: all its mass
    assert torch.equal(lik.distribution(at_x, None, x).base_dist.log_prob(x), torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------------
# log σ on a CPU (likelihoods.log_sigmoid), which the Bernoulli, continuous Bernoulli and discretized
# logistic use: its own formula there, since torch's CPU log1p is slow.
# ---------------------------------------------------------------------------------------------------

LOG_SIGMOID_AT = np.concatenate([np.linspace(-120, 120, 240_001), np.logspace(-30, 2, 3_201),
                                 -np.logspace(-30, 2, 3_201)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_sigmoid_is_within_two_ulp_of_the_exact_value(dtype):
    x = torch.as_tensor(LOG_SIGMOID_AT, dtype=dtype)
    at = x.double().numpy()  # the inputs as rounded to dtype
    exact = np.minimum(at, 0) - np.log1p(np.exp(-np.abs(at)))  # float64: exact to ~1 ulp of float64
    got = likelihoods.log_sigmoid(x).double().numpy()
    normal = np.abs(exact) > 1e-30  # below, float32 reaches its subnormals, which training flushes to 0
    rel = np.abs(got - exact)[normal] / np.abs(exact)[normal]
    assert rel.max() <= 2 * torch.finfo(dtype).eps
    ends = likelihoods.log_sigmoid(torch.tensor([-math.inf, math.inf], dtype=dtype))
    assert ends.tolist() == [-math.inf, 0.0]


KINK = [-700.0, -30.0, -1.0, -1e-8, 0.0, 1e-8, 2.0, 30.0, 700.0]


def _log_sigmoid_sum(x):
    return likelihoods.log_sigmoid(x).sum()


LOG_SIGMOID_DERIVATIVES = {  # x -> d log σ(x) / dx, elementwise, each way torch takes derivatives
    "autograd": lambda x: torch.autograd.grad(_log_sigmoid_sum(x.requires_grad_()), x)[0],
    "torch.func.grad": torch.func.grad(_log_sigmoid_sum),
    # inside vmap the tensor does not require grad, yet grad records its derivative
    "grad of vmap": torch.func.grad(lambda x: torch.func.vmap(likelihoods.log_sigmoid)(x).sum()),
}


@pytest.mark.parametrize("way", LOG_SIGMOID_DERIVATIVES)
def test_log_sigmoid_derivative_is_sigmoid_of_minus_x_also_at_its_kink(way):
    x = torch.tensor(KINK, dtype=torch.float64)
    torch.testing.assert_close(LOG_SIGMOID_DERIVATIVES[way](x.clone()), torch.sigmoid(-x), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func.jvp's own use
def test_log_sigmoid_has_no_forward_mode_derivative_rather_than_a_wrong_one():
    x = torch.tensor(KINK, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(likelihoods.log_sigmoid, (x,), (torch.ones_like(x),))


def test_log_sigmoid_under_no_grad_is_the_same_value():
    x = torch.tensor(KINK, dtype=torch.float64)
    with torch.no_grad():
        plain = likelihoods.log_sigmoid(x)
    assert torch.equal(plain, likelihoods.log_sigmoid(x.requires_grad_()).detach())


# ---------------------------------------------------------------------------------------------------
# Suprema: bounded families never exceed theirs, unbounded ones can be driven without limit.
# ---------------------------------------------------------------------------------------------------

BOUND_VARIANTS = [(1.0, 0.0), (0.25, 0.0), (3.0, 0.0), (1.0, 0.05), (1.0, 1e-3)]
BOUNDED = [(n, s, m) for n in likelihoods.NAMES for s, m in BOUND_VARIANTS
           if likelihoods.get(n, s, m).bounded]


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_boundedness_is_as_expected(name):
    unfloored, floored = EXPECTED_BOUNDED[name]
    assert likelihoods.get(name).bounded is unfloored
    assert likelihoods.get(name, min_scale=0.05).bounded is floored


def adversarial_raw(family: likelihoods.Family, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every combination of extreme location/logit and extreme log-scale, one per row: the location
    exactly at x (and a hair off it), saturated logits of either sign or matching x, scales from
    e^-100 to e^50. Returns raw (N, P, D) and x broadcast to (N, D)."""
    d = x.shape[-1]
    locs = [x, x + 1e-7, x - 1e-7, (2 * x - 1) * 1e4, (2 * x - 1) * 40, torch.full_like(x, 1e4),
            torch.full_like(x, -1e4), torch.zeros_like(x), torch.full_like(x, 0.5)]
    log_scales = [-100.0, -50.0, -20.0, -5.0, 0.0, 5.0, 20.0, 50.0]
    rows = []
    for loc in locs:
        for log_s in (log_scales if family.n_params > 1 else [None]):
            parts = [loc] + ([torch.full_like(x, log_s)] if log_s is not None else [])
            rows.append(torch.stack(parts, 0))  # (P, D)
    raw = torch.stack(rows, 0)
    return raw, x.expand(len(rows), d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,scale,min_scale", BOUNDED)
def test_bounded_family_never_exceeds_supremum(name, scale, min_scale, dtype):
    lik = likelihoods.get(name, scale=scale, min_scale=min_scale)
    sup = lik.supremum_per_pixel
    # float32 rounding may put log p a few ulps above a supremum it attains (e.g. loc = x);
    # the training loop's divergence check allows 1e-4 per pixel for the same reason.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    rng = np.random.default_rng(3)
    x = torch.as_tensor(random_x(lik.family.support, rng, (1, D)), dtype=dtype)
    cases = [adversarial_raw(lik.family, x[0])]
    for _ in range(5):
        raw = torch.as_tensor(random_raw(lik.family, rng, 8), dtype=dtype) * rng.uniform(0.1, 30)
        cases.append((raw, x.expand(8, D)))
    for raw, xb in cases:
        raw = raw.to(dtype)
        for shared_value in (-100.0, -20.0, 0.0, 20.0):  # gaussian_shared's learned log-scale
            shared = torch.tensor([shared_value], dtype=dtype)
            lp = lik.distribution(raw, shared, xb).base_dist.log_prob(xb)
            assert not torch.isnan(lp).any(), f"{name}: NaN log p"
            assert lp.max().item() <= sup + tol * max(1.0, abs(sup)), \
                f"{name} (scale={scale}, min_scale={min_scale}): log p {lp.max().item()} > sup {sup}"


@pytest.mark.parametrize("name,scale,min_scale", BOUNDED)
def test_every_bounded_familys_supremum_is_reached(name, scale, min_scale):
    """The declared supremum is the least upper bound: some decoder output reaches it (a location at x, the
    scale at its floor, a logit saturated towards x). A supremum set too high (a constant left out) passed
    the test above, and would loosen the report's sup/pixel and the training's divergence check."""
    lik = likelihoods.get(name, scale=scale, min_scale=min_scale)
    x = torch.as_tensor(random_x(lik.family.support, np.random.default_rng(5), (1, D)), dtype=torch.float64)
    raw, xb = adversarial_raw(lik.family, x[0])
    shared = torch.tensor([-100.0], dtype=torch.float64)  # gaussian_shared's learned log-scale, at its floor
    lp = lik.distribution(raw.double(), shared, xb).base_dist.log_prob(xb)  # (N, D)
    assert lp.max().item() == pytest.approx(lik.supremum_per_pixel, abs=1e-9)


@pytest.mark.parametrize("name", ["gaussian_learned", "gaussian_shared", "gaussian_optimal"])
def test_floored_gaussian_supremum_is_attained_at_the_floor(name):
    # With σ ≥ s the Gaussian's sup is −½ log(2π s²), reached at μ = x and σ = s.
    s = 0.05
    lik = likelihoods.get(name, min_scale=s)
    assert lik.supremum_per_pixel == pytest.approx(-0.5 * math.log(2 * math.pi * s**2), rel=1e-12)
    x = torch.rand(1, D, dtype=torch.float64)
    raw = torch.stack([x[0], torch.full((D,), -200.0, dtype=torch.float64)])[: lik.family.n_params][None]
    lp = lik.distribution(raw, torch.tensor([-200.0], dtype=torch.float64), x).base_dist.log_prob(x)
    assert torch.allclose(lp, torch.full_like(lp, lik.supremum_per_pixel), rtol=1e-12)


def test_floored_laplace_supremum_is_attained_at_the_floor():
    s = 0.05
    lik = likelihoods.get("laplace_learned", min_scale=s)
    assert lik.supremum_per_pixel == pytest.approx(-math.log(2 * s), rel=1e-12)
    x = torch.rand(1, D, dtype=torch.float64)
    raw = torch.stack([x[0], torch.full((D,), -200.0, dtype=torch.float64)])[None]
    lp = lik.distribution(raw, None, x).base_dist.log_prob(x)
    assert torch.allclose(lp, torch.full_like(lp, lik.supremum_per_pixel), rtol=1e-12)


MNIST_D = 784


def _cb_sequence():
    # all-black image, λ → 0: log C(λ) ≈ log log(1/λ) = log |η| grows slowly without limit; past
    # |η| ≈ 16, where torch's own ContinuousBernoulli stops it, to 6.9 nats per pixel at η = −1000
    x = torch.zeros(1, MNIST_D, dtype=torch.float64)
    return x, [(torch.full((1, 1, MNIST_D), -t, dtype=torch.float64), None) for t in (1, 10, 30, 100, 1000)]


def _scale_to_zero(n_params: int, shared: bool):
    x = torch.rand(1, MNIST_D, dtype=torch.float64)
    seq = []
    for log_s in (-1.0, -3.0, -6.0, -10.0):
        raw = torch.stack([x[0], torch.full((MNIST_D,), log_s, dtype=torch.float64)])[:n_params][None]
        seq.append((raw, torch.tensor([log_s], dtype=torch.float64) if shared else None))
    return x, seq


def _mse_to_zero():
    x = torch.rand(1, MNIST_D, dtype=torch.float64)
    noise = torch.randn(1, 1, MNIST_D, dtype=torch.float64)
    return x, [(x[:, None, :] + delta * noise, None) for delta in (1e-1, 1e-2, 1e-3, 1e-4)]


DIVERGENT_SEQUENCES = {
    "continuous_bernoulli": _cb_sequence,
    "gaussian_learned": lambda: _scale_to_zero(2, shared=False),
    "gaussian_shared": lambda: _scale_to_zero(1, shared=True),
    "gaussian_optimal": _mse_to_zero,
    "laplace_learned": lambda: _scale_to_zero(2, shared=False),
}


def test_every_unbounded_family_has_a_divergent_sequence():
    assert set(DIVERGENT_SEQUENCES) == {n for n in likelihoods.NAMES if not likelihoods.get(n).bounded}


@pytest.mark.parametrize("name", [n for n in likelihoods.NAMES if not likelihoods.get(n).bounded])
def test_unbounded_family_log_p_grows_without_limit(name):
    torch.manual_seed(0)
    lik = likelihoods.get(name)
    x, sequence = DIVERGENT_SEQUENCES[name]()
    values = [lik.distribution(raw, shared, x).log_prob(x).item() for raw, shared in sequence]
    assert all(b > a for a, b in itertools.pairwise(values)), values
    assert values[-1] > 1e3  # nats per 784-pixel image: beyond any pmf (≤ 0) and any fixed-σ Gaussian


CB_LOGITS = (-1000.0, -100.0, -30.0, -16.0, -1.0, -0.05, -1e-2, -1e-3, -1e-4, 0.0, 1e-5, 1e-3, 0.0499, 2.0, 30.0,
             100.0, 1000.0)  # beyond torch's clamp (|η| ≈ 16), and both sides of the series' cut-off (0.05)


def _cb_log_p_at_0(eta: float) -> float:
    # p(0) = C (1 − λ) = η / (e^η − 1): log |η| − max(η, 0) − log(1 − e^(−|η|)), 0 at η = 0
    if eta == 0:
        return 0.0
    return math.log(abs(eta)) - max(eta, 0.0) - math.log(-math.expm1(-abs(eta)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eta", CB_LOGITS)
def test_continuous_bernoulli_is_normalised_at_every_logit(eta, dtype):
    """At any logit the density integrates to 1, log p(0) = log(η / (e^η − 1)) and the mean is
    1/(1 − e^(−η)) − 1/η: no clamp of λ (torch's caps log C near |η| = 16 and breaks all three)."""
    dist = likelihoods.ContinuousBernoulliLogits(logits=torch.tensor(eta, dtype=dtype))
    assert dist.log_prob(torch.tensor(0.0, dtype=dtype)).item() == pytest.approx(_cb_log_p_at_0(eta), rel=1e-6, abs=1e-5)
    grid = torch.linspace(0, 1, 2_000_001, dtype=torch.float64)  # spacing 5e-7: resolves the edge at |η| = 1000
    exact = likelihoods.ContinuousBernoulliLogits(logits=torch.tensor(eta, dtype=torch.float64))
    density = exact.log_prob(grid).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)
    assert dist.mean.item() == pytest.approx(torch.trapezoid(grid * density, grid).item(), abs=1e-5)


def test_continuous_bernoulli_normaliser_keeps_its_gradient_at_large_logits():
    # d log p(0) / dη = 1/η − 1/sinh(η) − σ(η) ≈ 1/η: torch's clamped normaliser gives ≈ 0 past |η| ≈ 16
    eta = torch.tensor([-20.0, -100.0], dtype=torch.float64, requires_grad=True)
    dist = likelihoods.get("continuous_bernoulli").distribution(eta.view(1, 1, 2), None, torch.zeros(1, 2))
    (grad,) = torch.autograd.grad(dist.log_prob(torch.zeros(1, 2, dtype=torch.float64)).sum(), eta)
    expected = 1 / eta - 1 / torch.sinh(eta) - torch.sigmoid(eta)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------
# Metadata: suprema and measures.
# ---------------------------------------------------------------------------------------------------

def test_fixed_scale_suprema():
    assert likelihoods.get("gaussian").supremum_per_pixel == pytest.approx(-0.918939, abs=1e-6)
    assert likelihoods.get("laplace").supremum_per_pixel == pytest.approx(-0.693147, abs=1e-6)
    assert likelihoods.get("gaussian", scale=0.1).supremum_per_pixel == \
        pytest.approx(-0.5 * math.log(2 * math.pi * 0.01), rel=1e-12)
    assert likelihoods.get("laplace", scale=0.1).supremum_per_pixel == pytest.approx(-math.log(0.2), rel=1e-12)
    assert likelihoods.get("bernoulli").supremum_per_pixel == 0.0
    assert likelihoods.get("discretized_logistic").supremum_per_pixel == 0.0
    assert likelihoods.get("continuous_bernoulli", min_scale=0.1).supremum_per_pixel is None


def test_measures_say_which_numbers_are_comparable():
    bern, gauss = likelihoods.get("bernoulli"), likelihoods.get("gaussian")
    disc = likelihoods.get("discretized_logistic")

    pmf_binary = bern.measure(binarized=True, dequantized=False)
    assert pmf_binary.comparable and pmf_binary.nats_offset_per_pixel == 0.0

    # a density evaluated at {0, 1} is not a probability of the data
    for name in ("gaussian", "gaussian_learned", "laplace", "continuous_bernoulli"):
        assert not likelihoods.get(name).measure(binarized=True, dequantized=False).comparable

    deq = gauss.measure(binarized=False, dequantized=True)
    assert deq.comparable
    assert deq.nats_offset_per_pixel == pytest.approx(-math.log(256), rel=1e-12)

    eight_bit = disc.measure(binarized=False, dequantized=False)
    assert eight_bit.comparable and eight_bit.nats_offset_per_pixel == 0.0

    raw_density = gauss.measure(binarized=False, dequantized=False)
    assert not raw_density.comparable
    # σ* = RMSE(x, μ) is fitted to the image it scores: not a density of x, dequantized or not
    sigma_vae = likelihoods.get("gaussian_optimal").measure(binarized=False, dequantized=True)
    assert not sigma_vae.comparable and "σ-VAE" in sigma_vae.name
    assert not bern.measure(binarized=False, dequantized=False).comparable  # a pmf of {0,1} on 8-bit data
    assert pmf_binary.name != eight_bit.name  # different measures are never put side by side


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="valid choices: bernoulli"):
        likelihoods.get("poisson")


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_a_family_reads_exactly_the_keys_it_declares(name):
    # config.validate treats variants that differ only in unread keys as the same variant
    family = likelihoods.FAMILIES[name]
    rng = np.random.default_rng(likelihoods.NAMES.index(name))
    raw, x = random_raw(family, rng, 3), random_x(family.support, rng, (3, D))
    shared = torch.tensor([-0.5], dtype=torch.float64)
    base = log_p(likelihoods.get(name), raw, shared, x)
    for key, value in (("scale", 0.3), ("min_scale", 2.0)):  # a floor above any σ fitted to x here
        changed = log_p(likelihoods.get(name, **{key: value}), raw, shared, x)
        assert (not torch.equal(changed, base)) == (key in family.reads), key


def test_the_readmes_family_table_lists_every_registered_family_as_the_registry_describes_it():
    """A family added to the registry would otherwise be missing from the table users choose from."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].split("`")[1]] = cells
    for name, family in likelihoods.FAMILIES.items():
        assert name in rows, f"README's family table lacks {name}"
        outputs, bounded = rows[name][1], rows[name][3]
        assert outputs.startswith(str(family.n_params)), (name, outputs)
        assert bounded.startswith("yes" if likelihoods.get(name).bounded else "no"), (name, bounded)


@pytest.mark.parametrize("loc, scale", [(0.5, 0.05), (0.02, 0.03), (1.1, 0.2)])  # interior, near 0, past 1
def test_discretized_logistic_samples_follow_its_pmf(loc, scale):
    """Its samples (inverse-CDF draws, rounded to the 8-bit grid) have the frequencies that log_prob gives."""
    torch.manual_seed(0)
    d = likelihoods.DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale))
    draws = d.sample((200_000,))
    k = torch.arange(LEVELS, dtype=torch.float32) / (LEVELS - 1)
    assert torch.equal(draws, (draws * (LEVELS - 1)).round() / (LEVELS - 1))  # on the grid
    seen = torch.bincount((draws * (LEVELS - 1)).round().long(), minlength=LEVELS).double() / len(draws)
    expected = d.log_prob(k).double().exp()
    assert expected.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (seen - expected).abs().max().item() < 0.005  # ~4.5 binomial s.e. of the likeliest bin
