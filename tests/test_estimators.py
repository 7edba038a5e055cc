"""ELBO and IWAE estimators, checked against a linear-Gaussian model whose log p(x) and posterior are
known in closed form, and against each other."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from models import estimators, likelihoods
from models.estimators import active_units, bits_per_dim, elbo_terms, gaussian_kl, iwae, log_weights
from models.vae import VAE
from tests.test_likelihoods import random_x

D, Z, SIGMA = 6, 3, 0.5  # linear-Gaussian model: pixels, latent units, observation noise


def linear_gaussian_vae(w: torch.Tensor, b: torch.Tensor, enc_mean: torch.Tensor, enc_bias: torch.Tensor,
                        enc_logvar: torch.Tensor) -> VAE:
    """x = W z + b + ε, ε ~ N(0, σ² I), as a VAE with one Linear decoder; the encoder is the affine map
    μ(x) = A x + c with a constant log-variance."""
    model = VAE(D, [], Z, likelihoods.get("gaussian", scale=SIGMA)).double()
    (enc,), (dec,) = model.encoder, model.decoder
    with torch.no_grad():
        dec.weight.copy_(w)
        dec.bias.copy_(b)
        enc.weight.zero_()
        enc.weight[:Z].copy_(enc_mean)
        enc.bias[:Z].copy_(enc_bias)
        enc.bias[Z:].copy_(enc_logvar)
    return model


def exact_posterior(w: torch.Tensor, b: torch.Tensor):
    """Σ_post = (I + WᵀW/σ²)⁻¹; E[z|x] = Σ_post Wᵀ (x − b)/σ² = A x − A b."""
    cov = torch.linalg.inv(torch.eye(Z, dtype=w.dtype) + w.T @ w / SIGMA**2)
    a = cov @ w.T / SIGMA**2
    return cov, a, -a @ b


def exact_log_px(w, b, x):
    return MultivariateNormal(b, w @ w.T + SIGMA**2 * torch.eye(D, dtype=w.dtype)).log_prob(x)


def sample_data(w, b, n, gen):
    z = torch.randn(n, Z, generator=gen, dtype=w.dtype)
    return z @ w.T + b + SIGMA * torch.randn(n, D, generator=gen, dtype=w.dtype)


@pytest.fixture
def correlated_model():
    """A W whose exact posterior has strong off-diagonal covariance; the encoder is the exact posterior
    mean with the diagonal of the exact posterior covariance (a reasonable, imperfect mean-field q)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(D, Z, generator=gen, dtype=torch.float64)
    w = base + 0.8 * base[:, :1]  # columns share a component: WᵀW far from diagonal
    b = torch.randn(D, generator=gen, dtype=torch.float64) * 0.3
    cov, a, c = exact_posterior(w, b)
    corr = cov / cov.diag().sqrt().outer(cov.diag().sqrt())
    assert (corr - torch.eye(Z, dtype=torch.float64)).abs().max() > 0.3  # really not diagonal
    model = linear_gaussian_vae(w, b, a, c, cov.diag().log())
    x = sample_data(w, b, 20, gen)
    return model, w, b, x, cov


def elbo_with_se(model: VAE, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """elbo_terms' ELBO (L = n samples, analytic KL) per datapoint, and its Monte-Carlo standard error
    from n independent single-sample ELBOs of the same datapoints."""
    singles = elbo_terms(model, x.repeat(n, 1), n_samples=1).elbo.view(n, len(x))
    return elbo_terms(model, x, n_samples=n).elbo, singles.std(0) / math.sqrt(n)


def test_iwae_with_one_sample_is_the_analytic_kl_elbo_in_expectation(correlated_model):
    # IWAE_1 = log w (KL sampled) and elbo_terms' ELBO (KL in closed form) estimate the same E_q[log w]
    model, *_, x, _ = correlated_model
    n = 4000
    torch.manual_seed(5)
    one = iwae(model, x.repeat(n, 1), 1)
    assert torch.all(one.mc_se.isnan())  # one weight: no spread to estimate it from
    torch.testing.assert_close(one.ess, torch.ones_like(one.ess))  # and one effective sample
    singles = one.log_px.view(n, len(x))  # (n, B)
    iwae_1, iwae_1_se = singles.mean(0), singles.std(0) / math.sqrt(n)
    torch.manual_seed(6)
    elbo, elbo_se = elbo_with_se(model, x, n)
    assert torch.all((iwae_1 - elbo).abs() < 4 * (iwae_1_se**2 + elbo_se**2).sqrt()), (iwae_1 - elbo, iwae_1_se)


def test_iwae_increases_with_k_and_stays_below_log_px(correlated_model):
    # E[IWAE_K] rises with K towards log p(x); single estimates are noisy (IWAE_10 and IWAE_100 differ
    # by ~0.05 nats here), so the means are over 100 independent estimates per datapoint.
    model, w, b, x, _ = correlated_model
    x_rep = x.repeat(100, 1)
    torch.manual_seed(0)
    means = [iwae(model, x_rep, k).log_px.mean().item() for k in (1, 10, 100)]
    exact = exact_log_px(w, b, x).mean().item()
    assert means[0] < means[1] < means[2] <= exact + 0.005, (means, exact)


def test_iwae_increases_with_k_on_a_random_nonlinear_vae():
    # a random decoder with a sharp Gaussian (σ = 0.3): q is far from the posterior, the K-gaps are large
    torch.manual_seed(0)
    model = VAE(20, [16], 4, likelihoods.get("gaussian", scale=0.3))
    x = torch.rand(2000, 20)
    estimates = [iwae(model, x, k).log_px for k in (1, 10, 100)]
    gains = [(b - a).mean().item() for a, b in itertools.pairwise(estimates)]
    assert all(g > 0.1 for g in gains), gains


def test_iwae_approaches_exact_log_px_and_elbo_stays_below(correlated_model):
    model, w, b, x, cov = correlated_model
    exact = exact_log_px(w, b, x)
    torch.manual_seed(1)
    est = iwae(model, x, 5000)
    assert (est.log_px - exact).abs().max().item() < 0.1
    assert est.log_px.mean().item() <= exact.mean().item() + 0.01  # a lower bound, up to MC noise

    # ELBO = log p(x) − KL(q ‖ p(z|x)); the KL between the diagonal q and the exact posterior is the
    # same for every x here (equal means, fixed covariances): ½ (tr(Σ⁻¹ S) − Z + log|Σ|/|S|).
    s = torch.diag(cov.diag())
    gap = 0.5 * (torch.trace(torch.linalg.solve(cov, s)) - Z + torch.logdet(cov) - torch.logdet(s))
    assert gap.item() > 0.05  # the encoder is genuinely imperfect
    torch.manual_seed(2)
    elbo, se = elbo_with_se(model, x, 4000)
    assert torch.all(elbo < exact)
    assert torch.all((elbo - (exact - gap)).abs() < 4 * se), (elbo - (exact - gap), se)
    assert torch.all(est.log_px > elbo)


def test_elbo_equals_log_px_with_the_exact_posterior():
    # With orthogonal columns WᵀW is diagonal, so the exact posterior is a diagonal Gaussian that the
    # encoder represents exactly: then log w = log p(x) for every z, and ELBO = IWAE = log p(x).
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(D, Z, generator=gen, dtype=torch.float64))
    w = q * torch.tensor([2.0, 1.0, 0.4], dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64) * 0.3
    cov, a, c = exact_posterior(w, b)
    torch.testing.assert_close(cov, torch.diag(cov.diag()), atol=1e-12, rtol=0)
    model = linear_gaussian_vae(w, b, a, c, cov.diag().log())
    x = sample_data(w, b, 10, gen)
    exact = exact_log_px(w, b, x)

    torch.manual_seed(0)
    mu, logvar = model.encode(x)
    log_w = log_weights(model, x, mu, logvar, 200)  # (200, B)
    torch.testing.assert_close(log_w, exact.expand_as(log_w), atol=1e-9, rtol=0)
    torch.testing.assert_close(iwae(model, x, 50).log_px, exact, atol=1e-9, rtol=0)
    # the analytic-KL ELBO's recon term still varies with z; it matches log p(x) within MC error
    elbo, se = elbo_with_se(model, x, 4000)
    assert torch.all((elbo - exact).abs() < 4 * se), (elbo - exact, se)


def _pooled_sample_z(pool: torch.Tensor):
    """A stand-in for sample_z that hands out consecutive slices of one fixed ε pool, so a chunked and
    an unchunked run see the same samples in the same order."""
    position = [0]

    def sample_z(mu, logvar, n):
        eps = pool[position[0] : position[0] + n]
        position[0] += n
        return mu + (0.5 * logvar).exp() * eps, eps

    return sample_z, position


def test_chunked_iwae_equals_unchunked_on_the_same_samples(correlated_model, monkeypatch):
    model, *_, x, _ = correlated_model
    k = 100  # not a multiple of the chunk: the last chunk is short
    pool = torch.randn(k, len(x), Z, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for chunk in (7, k):
        fake, position = _pooled_sample_z(pool)
        monkeypatch.setattr(estimators, "sample_z", fake)
        results.append(iwae(model, x, k, chunk=chunk))
        assert position[0] == k
    chunked, whole = results
    torch.testing.assert_close(chunked.log_px, whole.log_px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.mc_se, whole.mc_se, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.elbo, whole.elbo, rtol=1e-12, atol=1e-12)

    # and both are the textbook logsumexp_k log w_k − log K
    fake, _ = _pooled_sample_z(pool)
    monkeypatch.setattr(estimators, "sample_z", fake)
    mu, logvar = model.encode(x)
    log_w = log_weights(model, x, mu, logvar, k)
    torch.testing.assert_close(whole.log_px, log_w.logsumexp(0) - math.log(k), rtol=1e-12, atol=1e-12)
    # the ELBO of the same samples, mean_k log w_k: below the IWAE bound for every image (Jensen)
    torch.testing.assert_close(whole.elbo, log_w.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.all(whole.log_px > whole.elbo)
    # delta-method s.e.: sqrt(Var(w) / (K mean(w)²)), with the population variance
    w = (log_w - log_w.max(0).values).exp()
    torch.testing.assert_close(whole.mc_se, (w.var(0, unbiased=False) / (k * w.mean(0) ** 2)).sqrt(),
                               rtol=1e-9, atol=1e-12)
    # Kish's effective sample size (Σ w)² / Σ w², chunked alike, and the s.e. it caps: √(1/ESS − 1/K)
    torch.testing.assert_close(whole.ess, w.sum(0) ** 2 / w.pow(2).sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.ess, whole.ess, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(whole.mc_se, (1 / whole.ess - 1 / k).sqrt(), rtol=1e-9, atol=1e-12)


def test_chunked_iwae_agrees_with_unchunked_within_mc_error(correlated_model):
    # Without a shared pool the chunks draw different ε (torch's CPU randn is not chunk-invariant),
    # so the two estimates agree only within their Monte-Carlo error.
    model, *_, x, _ = correlated_model
    torch.manual_seed(6)
    a = iwae(model, x, 700, chunk=7)
    b = iwae(model, x, 700, chunk=700)
    assert torch.all((a.log_px - b.log_px).abs() <= 4 * (a.mc_se**2 + b.mc_se**2).sqrt() + 1e-6)


def test_iwae_5000_samples_never_holds_more_than_one_chunk(monkeypatch):
    torch.manual_seed(0)
    model = VAE(64, [32], 8, likelihoods.get("bernoulli"))
    x = torch.bernoulli(torch.full((32, 64), 0.4))
    requested = []
    real_log_weights = estimators.log_weights

    def recording_log_weights(model, x, mu, logvar, k):
        requested.append(k)
        return real_log_weights(model, x, mu, logvar, k)

    monkeypatch.setattr(estimators, "log_weights", recording_log_weights)
    est = iwae(model, x, 5000, chunk=500)
    assert sum(requested) == 5000 and max(requested) <= 500
    assert est.log_px.shape == (32,) and torch.isfinite(est.log_px).all()
    assert torch.isfinite(est.mc_se).all() and (est.mc_se >= 0).all()


def test_analytic_kl_matches_monte_carlo():
    gen = torch.Generator().manual_seed(7)
    mu = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    logvar = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    std = (0.5 * logvar).exp()
    z = mu + std * torch.randn(20000, 5, 4, generator=gen, dtype=torch.float64)
    log_ratio = (Normal(mu, std).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)  # (N, 5)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(log_ratio))
    analytic = gaussian_kl(mu, logvar)
    assert torch.all((analytic - mc).abs() < 4 * se), (analytic, mc, se)


def test_analytic_kl_known_values():
    zero = gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3))
    assert zero.item() == 0.0  # q = prior
    # one unit, μ = 1, σ² = 4: ½ (4 + 1 − 1 − log 4) = 2 − log 2
    one = gaussian_kl(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[math.log(4)]], dtype=torch.float64))
    assert one.item() == pytest.approx(2 - math.log(2), rel=1e-12)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2) * 1.5, 784) == pytest.approx(1.5, rel=1e-12)
    # a uniform distribution over 256 levels costs exactly 8 bits per pixel
    assert bits_per_dim(64 * math.log(256), 64) == pytest.approx(8.0, rel=1e-12)
    nll = torch.tensor([100.0, 200.0], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(nll, 784), nll / (784 * math.log(2)))


def test_active_units_counts_units_whose_posterior_mean_varies():
    n = 1000
    t = torch.linspace(-1, 1, n, dtype=torch.float64)  # variance ≈ 1/3
    mus = torch.stack([
        t,  # var 0.33: active
        torch.full((n,), 2.5, dtype=torch.float64),  # a constant mean, however large: inactive
        0.1 * t,  # var ≈ 0.0033 < 0.01: inactive
        0.3 * t,  # var ≈ 0.03 > 0.01: active
        torch.zeros(n, dtype=torch.float64),  # collapsed to the prior: inactive
    ], 1)
    assert active_units(mus) == 2
    assert active_units(mus, threshold=0.001) == 3


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_log_weights_and_iwae_for_every_family(name, monkeypatch):
    """log w (K, B) is log p(x|z) + log N(z; 0, I) − log N(z; μ, σ²) with every term from
    torch.distributions, for each family (P = 2 outputs, a shared scale, a σ fitted to x); the IWAE is
    logsumexp_k log w − log K and its ELBO mean_k log w, below it for every image (Jensen)."""
    torch.manual_seed(likelihoods.NAMES.index(name))
    lik = likelihoods.get(name, min_scale=0.01 if likelihoods.FAMILIES[name].learned_scale else 0.0)
    model = VAE(D, [8], Z, lik).double()
    if model.log_scale is not None:
        torch.nn.init.constant_(model.log_scale, -0.7)
    x = torch.as_tensor(random_x(lik.family.support, np.random.default_rng(0), (5, D)))  # (B, D)
    k = 40
    pool = torch.randn(k, len(x), Z, dtype=torch.float64)
    fake, _ = _pooled_sample_z(pool)
    monkeypatch.setattr(estimators, "sample_z", fake)
    mu, logvar = model.encode(x)
    log_w = log_weights(model, x, mu, logvar, k)
    assert log_w.shape == (k, len(x))

    z = mu + (0.5 * logvar).exp() * pool  # (K, B, Z)
    log_px = model.p_x_given_z(model.decode(z), x).log_prob(x)  # (K, B)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(log_w, log_px + log_pz - log_qz, rtol=1e-10, atol=1e-9)

    fake, _ = _pooled_sample_z(pool)
    monkeypatch.setattr(estimators, "sample_z", fake)
    bound = iwae(model, x, k, chunk=16)
    torch.testing.assert_close(bound.log_px, log_w.logsumexp(0) - math.log(k), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(bound.elbo, log_w.mean(0), rtol=1e-10, atol=1e-9)
    assert torch.all(bound.log_px >= bound.elbo) and torch.all(bound.mc_se > 0)
