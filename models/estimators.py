"""ELBO and IWAE estimators. Both draw z = μ + σ ⊙ ε with `sample_z` and score it with the decoder's
log p(x|z) of shape (K, B). IWAE averages w = p(x|z) p(z) / q(z|x) (`log_weights`); the ELBO used for
training and reporting takes the KL term in closed form instead of from log p(z) − log q(z|x): the same
expectation, E_q[log w], usually with less variance (Kingma & Welling 2014, eq. 10)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.vae import VAE

LOG_2PI = math.log(2 * math.pi)


@dataclass
class ElboTerms:
    recon: Tensor  # (B,) E_q log p(x|z), averaged over L samples
    kl: Tensor  # (B,) analytic KL(q(z|x) ‖ N(0, I))
    smallest_scale: Tensor | None  # 0-d: smallest learned decoder scale in the batch, if any

    @property
    def elbo(self) -> Tensor:  # (B,) the true bound, β = 1
        return self.recon - self.kl

    def objective(self, beta: float) -> Tensor:  # (B,) the β-weighted training objective
        return self.recon - beta * self.kl


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag σ²) ‖ N(0, I)) = ½ Σ_j (σ_j² + μ_j² − 1 − log σ_j²) (Kingma & Welling 2014, App. B).

    mu, logvar (B, Z) -> (B,)
    """
    return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(-1)


def sample_z(mu: Tensor, logvar: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Reparameterised z = μ + σ ⊙ ε. mu, logvar (B, Z) -> z (n, B, Z) and ε (n, B, Z)."""
    eps = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps, eps


def elbo_terms(model: VAE, x: Tensor, n_samples: int = 1) -> ElboTerms:
    """ELBO_L(x) = (1/L) Σ_l log p(x|z_l) − KL(q(z|x) ‖ p(z)), the KL analytic (Kingma & Welling 2014,
    eq. 10); its expectation is E_q[log w], the single-sample IWAE. x (B, D)."""
    mu, logvar = model.encode(x)  # (B, Z) each
    z, _ = sample_z(mu, logvar, n_samples)  # (L, B, Z): the L samples go through one batched matmul
    p = model.p_x_given_z(model.decode(z), x)  # batch shape (L, B)
    recon = p.log_prob(x).mean(0)  # (B,)
    return ElboTerms(recon, gaussian_kl(mu, logvar), model.likelihood.smallest_scale(p))


def log_weights(model: VAE, x: Tensor, mu: Tensor, logvar: Tensor, k: int) -> Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x), z_k ~ q(z|x). x (B, D) -> (k, B)."""
    z, eps = sample_z(mu, logvar, k)  # (k, B, Z)
    log_px = model.p_x_given_z(model.decode(z), x).log_prob(x)  # (k, B)
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)  # (k, B)
    log_qz = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)  # (k, B)
    return log_px + log_pz - log_qz


@dataclass
class IwaeEstimate:
    log_px: Tensor  # (B,) IWAE_K = logsumexp_k log w_k − log K (Burda, Grosse & Salakhutdinov 2016)
    mc_se: Tensor  # (B,) Monte-Carlo s.e. of each estimate (delta method: √(Var(w) / (K · mean(w)²)))
    elbo: Tensor  # (B,) mean_k log w_k: the ELBO from the same K samples, ≤ log_px for each image (Jensen)
    # (B,) Kish's effective sample size (Σ w)² / Σ w², in [1, K]: near 1, one weight dominates and mc_se,
    # which is then √(1/ESS − 1/K) < 1 nat whatever the weights' true spread, says little (Owen 2013, §9.3)
    ess: Tensor


@torch.no_grad()
def iwae(model: VAE, x: Tensor, k: int, chunk: int = 500) -> IwaeEstimate:
    """IWAE bound with k samples, in chunks so that k = 5000 fits: a running logsumexp of log w and
    of 2 log w (for the Monte-Carlo standard error), and a running sum of log w (the ELBO of the same
    samples, so that the bound's gain over the ELBO is measured on the same images). x (B, D)."""
    mu, logvar = model.encode(x)
    lse_w = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)  # log Σ w
    lse_w2 = lse_w.clone()  # log Σ w²
    sum_log_w = torch.zeros_like(lse_w)  # Σ log w
    for start in range(0, k, chunk):
        log_w = log_weights(model, x, mu, logvar, min(chunk, k - start))  # (chunk, B)
        lse_w = torch.logaddexp(lse_w, log_w.logsumexp(0))
        lse_w2 = torch.logaddexp(lse_w2, (2 * log_w).logsumexp(0))
        sum_log_w += log_w.sum(0)
    log_mean_w = lse_w - math.log(k)
    # Var(w)/mean(w)² = mean(w²)/mean(w)² − 1, computed in log space
    rel_var = torch.expm1((lse_w2 - math.log(k) - 2 * log_mean_w).clamp_min(0))
    # one weight shows no spread: its s.e. is unknown (NaN), not 0
    mc_se = (rel_var / k).sqrt() if k > 1 else torch.full_like(log_mean_w, math.nan)
    ess = (2 * lse_w - lse_w2).exp().clamp(1, k)  # float32 rounding can put it just outside [1, k]
    return IwaeEstimate(log_mean_w, mc_se, sum_log_w / k, ess)


def bits_per_dim(nll_nats: float | Tensor, n_dims: int) -> float | Tensor:
    """NLL in nats per image -> bits per dimension."""
    return nll_nats / (n_dims * math.log(2))


@torch.no_grad()
def active_units(mus: Tensor, threshold: float = 0.01) -> int:
    """Units j with Cov_x(E_q[z_j | x]) > threshold (Burda et al. 2016). mus (N, Z) posterior means."""
    return int((mus.var(0) > threshold).sum())
