"""The training loss's gradient for the MLP VAE with the two MLPs' backward pass written out.

The loss is −(1/B) Σ_b [ (1/L) Σ_l log p(x_b|z_lb) − β KL(q(z|x_b) ‖ N(0, I)) ], the β-objective of
`estimators.elbo_terms`. Its gradient is written straight into each parameter's `.grad`: no autograd
graph through the matrix products, no gradient accumulation or zeroing.

Only log p(x|z), the family's `torch.distributions` log_prob with its normalising constant, is
differentiated by autograd, with the decoder output as a leaf, so every family of the registry is
supported as it is. The rest is the chain rule through Linear and ReLU layers and the
reparameterisation z = μ + σ ε (Kingma & Welling 2014), with the analytic KL's gradient
∂KL/∂μ = μ, ∂KL/∂log σ² = ½(σ² − 1). tests/test_manual_grad.py checks it against autograd for every family.

On a CPU the batch can be split into shards computed at once on as many threads, each running its
operations on one core, their gradients summed: a step of these small MLPs is mostly short operations
that two intra-op threads share badly, while two single-threaded halves keep both cores busy
(tests/benchmarks/test_speed.py measures it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from models.estimators import ElboTerms, gaussian_kl
from models.vae import VAE


def _linears(mlp: nn.Sequential) -> list[nn.Linear]:
    """The layers of `models.vae.mlp`: Linear, with a ReLU between consecutive ones."""
    return [m for m in mlp if isinstance(m, nn.Linear)]


def _forward(layers: list[nn.Linear], a: Tensor) -> tuple[list[Tensor], Tensor]:
    """a (N, in) -> each layer's input (after the first: a ReLU output, kept for the backward) and the
    last layer's output (N, out)."""
    inputs = []
    for i, layer in enumerate(layers):
        inputs.append(a)
        a = torch.addmm(layer.bias, a, layer.weight.t())
        if i < len(layers) - 1:
            a = a.relu_()
    return inputs, a


def _backward(layers: list[nn.Linear], inputs: list[Tensor], grad: Tensor, out: dict[nn.Parameter, Tensor],
              input_grad: bool) -> Tensor | None:
    """grad (N, out): the loss's gradient at the last layer's output. Writes each layer's weight and
    bias gradient into `out`; returns the gradient at the first layer's input (N, in) when `input_grad`."""
    for i in reversed(range(len(layers))):
        layer, a = layers[i], inputs[i]
        torch.mm(grad.t(), a, out=out[layer.weight])  # (out, in)
        torch.sum(grad, 0, out=out[layer.bias])  # (out,)
        if i == 0 and not input_grad:
            return None
        grad = torch.mm(grad, layer.weight)  # (N, in)
        if i > 0:
            grad.mul_(a > 0)  # through the ReLU that produced this input: it passed where positive
    return grad


def _shard(model: VAE, x: Tensor, eps: Tensor, batch_size: int, beta: float,
           out: dict[nn.Parameter, Tensor]) -> ElboTerms:
    """The gradient of the whole batch's loss from its rows x (b, D), with their ε (L, b, Z), into `out`."""
    L, b, Z = eps.shape
    encoder, decoder = _linears(model.encoder), _linears(model.decoder)
    with torch.no_grad():
        enc_inputs, enc_out = _forward(encoder, x)
        mu, logvar = enc_out.chunk(2, dim=-1)  # (b, Z) each
        std = (0.5 * logvar).exp()
        z = mu + std * eps  # (L, b, Z)
        dec_inputs, dec_out = _forward(decoder, z.flatten(0, 1))  # (L·b, P·D)
        kl = gaussian_kl(mu, logvar)  # (b,)

    raw = dec_out.view(L, b, model.n_params, model.data_dim).requires_grad_()  # a leaf
    shared = [model.log_scale] if model.log_scale is not None else []
    with torch.enable_grad():
        p_x = model.p_x_given_z(raw, x)  # batch shape (L, b)
        log_px = p_x.log_prob(x)  # (L, b)
        grads = torch.autograd.grad(log_px.sum(), [raw, *shared])
    scale = -1.0 / (batch_size * L)  # d loss / d log p(x_b|z_lb)

    with torch.no_grad():
        if shared:
            torch.mul(grads[1], scale, out=out[model.log_scale])
        d_z = _backward(decoder, dec_inputs, grads[0].view(L * b, -1).mul_(scale), out, input_grad=True)
        d_z = d_z.view(L, b, Z)
        # z = μ + σ ε, σ = exp(½ log σ²); plus β/B times the KL's gradient
        d_mu = d_z.sum(0) + (beta / batch_size) * mu
        d_logvar = 0.5 * std * (d_z * eps).sum(0) + (beta / (2 * batch_size)) * (std.square() - 1)
        _backward(encoder, enc_inputs, torch.cat([d_mu, d_logvar], dim=-1), out, input_grad=False)
        smallest = model.likelihood.smallest_scale(p_x)
    return ElboTerms(log_px.detach().mean(0), kl, None if smallest is None else smallest.detach())


class ManualGradient:
    """`grad(x, n_samples, beta)` returns the ELBO terms of x (B, D), as `elbo_terms` does (detached), and
    leaves the gradient of the β-weighted loss in every parameter's `.grad`, for an optimizer step.

    The L samples draw the same ε as `elbo_terms` from the same random state. With shards > 1 the
    batch's rows are split that many ways and computed on as many threads, each shard with its own
    gradient buffer, summed into `.grad`. The caller gives each operation 1/shards of the cores
    (`torch.set_num_threads`): the shards are the parallelism."""

    def __init__(self, model: VAE, shards: int = 1):
        self.model, self.params = model, list(model.parameters())
        p0 = self.params[0]
        size = sum(p.numel() for p in self.params)
        flats = [torch.empty(size, device=p0.device, dtype=p0.dtype) for _ in range(shards)]
        self.flats = flats  # one flat gradient per shard; the first holds the parameters' .grad
        self.buffers = [dict(zip(self.params, f.split([p.numel() for p in self.params]))) for f in flats]
        for buffer in self.buffers:
            for p in self.params:
                buffer[p] = buffer[p].view_as(p)
        for p in self.params:
            p.grad = self.buffers[0][p]
        self.pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="vaebench-shard") if shards > 1 else None

    def grad(self, x: Tensor, n_samples: int, beta: float) -> ElboTerms:
        B, model = x.shape[0], self.model
        eps = torch.randn((n_samples, B, model.latent_dim), device=x.device, dtype=x.dtype)  # sample_z's draw
        n = min(len(self.buffers), B)
        xs, epss = x.tensor_split(n), eps.tensor_split(n, dim=1)
        rest = [self.pool.submit(_shard, model, xs[i], epss[i], B, beta, self.buffers[i]) for i in range(1, n)]
        parts = [_shard(model, xs[0], epss[0], B, beta, self.buffers[0])] + [f.result() for f in rest]
        for flat in self.flats[1:n]:
            self.flats[0].add_(flat)
        scales = [t.smallest_scale for t in parts if t.smallest_scale is not None]
        return ElboTerms(torch.cat([t.recon for t in parts]), torch.cat([t.kl for t in parts]),
                         torch.stack(scales).min() if scales else None)

    def close(self) -> None:
        """Ends the shard threads now (they also end when this object is garbage-collected)."""
        if self.pool is not None:
            self.pool.shutdown()
