"""N variants of one VAE in one training step: each layer of the N models runs as one batched matmul,
so that N small MLPs keep a GPU as busy as one large one.

Every variant keeps its own parameters: `StackedVAE.variants[i]` is an ordinary `VAE`. The forward
pass stacks each layer's N weight matrices (`torch.stack`, a copy whose backward hands each variant
its own slice of the gradient) and runs the layer as one `torch.baddbmm` over the variant dimension.
That copy is the price of separate leaves; what it buys is exact per-variant optimiser semantics (one
Adam with a parameter group per variant: each its own lr and moments) and every function written for
a `VAE` (evaluation, IWAE, figures) working on a variant unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.estimators import ElboTerms, gaussian_kl
from models.vae import VAE


def _linears(mlp: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in mlp if isinstance(layer, nn.Linear)]


class StackedVAE(nn.Module):
    def __init__(self, variants: list[VAE]):
        super().__init__()
        first = variants[0]
        shapes = [[p.shape for p in v.parameters()] for v in variants]
        if any(s != shapes[0] for s in shapes) or any(v.likelihood != first.likelihood for v in variants):
            raise ValueError("stacked variants must share the architecture and the likelihood")
        self.variants = nn.ModuleList(variants)
        self.likelihood, self.n_params, self.data_dim = first.likelihood, first.n_params, first.data_dim

    def __len__(self) -> int:
        return len(self.variants)

    def _mlp(self, name: str, h: Tensor) -> Tensor:
        """h (N, R, n_in) through each variant's `encoder` or `decoder` -> (N, R, n_out)."""
        layers = list(zip(*(_linears(getattr(v, name)) for v in self.variants)))  # per layer: N Linears
        for i, linears in enumerate(layers):
            weight = torch.stack([lin.weight for lin in linears])  # (N, out, in)
            bias = torch.stack([lin.bias for lin in linears]).unsqueeze(1)  # (N, 1, out)
            h = torch.baddbmm(bias, h, weight.transpose(1, 2))  # (N, R, out)
            if i < len(layers) - 1:
                h = torch.relu(h)
        return h

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, B, D) -> mean and log-variance of each variant's q(z|x), each (N, B, Z)."""
        mu, logvar = self._mlp("encoder", x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """z (N, L, B, Z) -> raw decoder output (N, L, B, P, D)."""
        n, n_samples, b, _ = z.shape
        raw = self._mlp("decoder", z.reshape(n, n_samples * b, -1))  # (N, L·B, P·D)
        return raw.view(n, n_samples, b, self.n_params, self.data_dim)

    @property
    def log_scale(self) -> Tensor | None:
        """The variants' shared learned log-scales (`gaussian_shared`) as (N, 1, 1, 1), else None."""
        if self.variants[0].log_scale is None:
            return None
        return torch.stack([v.log_scale for v in self.variants]).view(-1, 1, 1, 1)


def stacked_elbo_terms(model: StackedVAE, x: Tensor, n_samples: int = 1, eps: Tensor | None = None) -> ElboTerms:
    """`elbo_terms` of every variant at once. x (N, B, D) -> recon, kl (N, B); smallest_scale (N,) or None.

    eps (N, L, B, Z) is the reparameterisation noise, drawn here unless given (tests pass the same
    noise to the separate models)."""
    mu, logvar = model.encode(x)  # (N, B, Z) each
    if eps is None:
        eps = torch.randn((len(model), n_samples, *mu.shape[1:]), device=x.device, dtype=x.dtype)
    z = mu.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps  # (N, L, B, Z), as in sample_z
    x_l = x.unsqueeze(1)  # (N, 1, B, D): broadcast over the L samples
    p = model.likelihood.distribution(model.decode(z), model.log_scale, x_l)  # batch shape (N, L, B)
    recon = p.log_prob(x_l).mean(1)  # (N, B)
    smallest = None
    if model.likelihood.family.learned_scale:
        scale = p.base_dist.scale  # (N, L, B, D), possibly a broadcast view
        smallest = scale.amin(dim=tuple(range(1, scale.dim())))  # (N,)
    return ElboTerms(recon, gaussian_kl(mu, logvar), smallest)
