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

import threading
from collections.abc import Callable
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
        if i > 0:  # through the ReLU that produced this input: it passed where positive (one pass)
            grad = torch.ops.aten.threshold_backward(grad, a, 0)
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
        # d loss / d log p(x_b|z_lb) = −1/(B·L), handed to log_prob's backward
        d_log_px = torch.full_like(log_px, -1.0 / (batch_size * L))
        grads = torch.autograd.grad(log_px, [raw, *shared], d_log_px)

    with torch.no_grad():
        if shared:
            out[model.log_scale].copy_(grads[1])
        d_z = _backward(decoder, dec_inputs, grads[0].view(L * b, -1), out, input_grad=True)
        d_z = d_z.view(L, b, Z)
        # z = μ + σ ε, σ = exp(½ log σ²); plus β/B times the KL's gradient
        d_mu = d_z.sum(0) + (beta / batch_size) * mu
        d_logvar = 0.5 * std * (d_z * eps).sum(0) + (beta / (2 * batch_size)) * (std.square() - 1)
        _backward(encoder, enc_inputs, torch.cat([d_mu, d_logvar], dim=-1), out, input_grad=False)
        smallest = model.likelihood.smallest_scale(p_x)
    return ElboTerms(log_px.detach().mean(0), kl, None if smallest is None else smallest.detach())


def _balanced_groups(params: list[nn.Parameter], n: int) -> list[list[nn.Parameter]]:
    """params split into at most n groups of about equal size (largest first, each to the smallest
    group), each group in the model's parameter order."""
    groups: list[list[nn.Parameter]] = [[] for _ in range(n)]
    sizes = [0] * n
    for p in sorted(params, key=lambda p: -p.numel()):
        i = sizes.index(min(sizes))
        groups[i].append(p)
        sizes[i] += p.numel()
    order = {p: i for i, p in enumerate(params)}
    return [sorted(g, key=order.__getitem__) for g in groups if g]


class ManualGradient:
    """`step(x, n_samples, beta)` makes one training step on x (B, D): the β-weighted loss's gradient,
    then the optimizer's update. `grad(...)` stops after the gradient, left in every parameter's `.grad`.
    Both return the ELBO terms of x, as `elbo_terms` does (detached); the L samples draw the same ε as
    `elbo_terms` from the same random state.

    With shards > 1 the batch's rows are split that many ways, each computed on its own thread into its
    own gradient buffer. The parameters are split into as many groups of about equal size, each with its
    own optimizer (`optimizer(params)`): once every shard's gradient is done, the thread of group i sums
    the shards' gradients of that group and updates it, so the summing and the update (a third of a
    step's memory traffic) run on every core too. The caller gives each operation 1/shards of the cores
    (`torch.set_num_threads`): the shards are the parallelism."""

    def __init__(self, model: VAE, shards: int = 1,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None):
        self.model, self.shards = model, shards
        params = list(model.parameters())
        self.groups = _balanced_groups(params, shards)
        self.optimizers = [optimizer(g) for g in self.groups] if optimizer is not None else []
        # One flat gradient buffer per shard, laid out group by group so that a group's gradient is one
        # slice; the first shard's buffer holds the parameters' .grad.
        laid_out = [p for g in self.groups for p in g]
        bounds = torch.tensor([0] + [sum(p.numel() for p in g) for g in self.groups]).cumsum(0).tolist()
        self.group_slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        p0 = params[0]
        self.flats = [torch.empty(bounds[-1], device=p0.device, dtype=p0.dtype) for _ in range(shards)]
        self.buffers = [{p: part.view_as(p) for p, part in zip(laid_out, flat.split([p.numel() for p in laid_out]))}
                        for flat in self.flats]
        for p in params:
            p.grad = self.buffers[0][p]
        self.pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="vaebench-shard") if shards > 1 else None

    def grad(self, x: Tensor, n_samples: int, beta: float) -> ElboTerms:
        return self._run(x, n_samples, beta, update=False)

    def step(self, x: Tensor, n_samples: int, beta: float) -> ElboTerms:
        return self._run(x, n_samples, beta, update=True)

    def _run(self, x: Tensor, n_samples: int, beta: float, update: bool) -> ElboTerms:
        B, model = x.shape[0], self.model
        eps = torch.randn((n_samples, B, model.latent_dim), device=x.device, dtype=x.dtype)  # sample_z's draw
        n = min(self.shards, B)
        if n == 1:
            terms = _shard(model, x, eps, B, beta, self.buffers[0])
            self._finish(range(len(self.groups)), 1, update)
            return terms
        xs, epss = x.tensor_split(n), eps.tensor_split(n, dim=1)
        barrier = threading.Barrier(n)  # the shards' gradients are all done

        def work(i: int) -> ElboTerms:
            try:
                terms = _shard(model, xs[i], epss[i], B, beta, self.buffers[i])
            except BaseException:
                barrier.abort()  # the other shards stop waiting (BrokenBarrierError)
                raise
            barrier.wait()
            self._finish(range(i, len(self.groups), n), n, update)
            return terms

        rest = [self.pool.submit(work, i) for i in range(1, n)]
        try:
            parts = [work(0)]
        except threading.BrokenBarrierError:  # a shard thread failed: raise its error, not the barrier's
            for future in rest:
                if not isinstance(future.exception(), threading.BrokenBarrierError):
                    future.result()
            raise
        parts += [future.result() for future in rest]
        scales = [t.smallest_scale for t in parts if t.smallest_scale is not None]
        return ElboTerms(torch.cat([t.recon for t in parts]), torch.cat([t.kl for t in parts]),
                         torch.stack(scales).min() if scales else None)

    def _finish(self, groups: range, n: int, update: bool) -> None:
        """Sums the first n shards' gradients of these parameter groups into .grad; updates the groups."""
        for g in groups:
            total = self.flats[0][self.group_slices[g]]
            for flat in self.flats[1:n]:
                total.add_(flat[self.group_slices[g]])
            if update:
                self.optimizers[g].step()

    def close(self) -> None:
        """Ends the shard threads now (they also end when this object is garbage-collected)."""
        if self.pool is not None:
            self.pool.shutdown()
