"""MLP VAE: q(z|x) a diagonal Normal, prior N(0, I), p(x|z) from the likelihood registry."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.distributions import Independent

from models import likelihoods
from models.likelihoods import Likelihood


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, data_dim: int, hidden: list[int], latent_dim: int, likelihood: Likelihood):
        super().__init__()
        self.data_dim, self.latent_dim, self.likelihood = data_dim, latent_dim, likelihood
        self.n_params = likelihood.family.n_params
        self.encoder = mlp([data_dim, *hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden), self.n_params * data_dim])
        # One learned log-scale shared by every pixel (`gaussian_shared`); None for other families.
        shared = likelihood.family.learned_scale == likelihoods.SHARED
        self.log_scale = nn.Parameter(torch.zeros(1)) if shared else None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> mean and log-variance of q(z|x), each (B, Z)."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """z (..., Z) -> raw decoder output (..., P, D)."""
        return self.decoder(z).unflatten(-1, (self.n_params, self.data_dim))

    def p_x_given_z(self, raw: Tensor, x: Tensor | None = None) -> Independent:
        """raw (..., P, D) -> p(x|z), batch shape (...). `x` is needed only by `gaussian_optimal`."""
        return self.likelihood.distribution(raw, self.log_scale, x)

    @torch.no_grad()
    def mean_image(self, z: Tensor) -> Tensor:
        """z (..., Z) -> the decoder's mean image (..., D) in [0, 1], for figures."""
        raw = self.decode(z)
        if self.likelihood.family.learned_scale == likelihoods.OPTIMAL:
            return raw[..., 0, :].clamp(0, 1)  # its σ needs data; the mean does not
        return self.p_x_given_z(raw).mean.clamp(0, 1)
