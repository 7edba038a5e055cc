"""The training loss's gradient for the MLP VAE with the two MLPs' backward pass written out.

The loss is −(1/B) Σ_b [ (1/L) Σ_l log p(x_b|z_lb) − β KL(q(z|x_b) ‖ N(0, I)) ], the β-objective of
`estimators.elbo_terms`. Its gradient is written straight into each parameter's `.grad`: no autograd
graph through the matrix products, no gradient accumulation or zeroing, and every buffer allocated once,
which also suits capturing the step in a CUDA graph.

Only log p(x|z), the family's `torch.distributions` log_prob with its normalising constant, is
differentiated by autograd, with the decoder output as a leaf, so every family of the registry is
supported as it is; families whose score d log p / d raw has a closed form (the registry's `score`:
Bernoulli, continuous Bernoulli, fixed-scale Gaussian and Laplace) skip that graph, their log_prob
still giving the value.
The rest is the chain rule through Linear and ReLU layers and the
reparameterisation z = μ + σ ε (Kingma & Welling 2014), with the analytic KL's gradient
∂KL/∂μ = μ, ∂KL/∂log σ² = ½(σ² − 1). tests/test_manual_grad.py checks it against autograd for every
family; tests/benchmarks/test_speed.py times both (train.backward).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.distributions import Independent

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


def log_px_and_grad(model: VAE, raw: Tensor, x: Tensor, out: dict[nn.Parameter, Tensor]
                    ) -> tuple[Independent, Tensor, Tensor]:
    """raw (L, B, P, D), x (B, D) -> p(x|z), log p(x|z) (L, B), and the loss's gradient at raw: with
    d loss / d log p(x_b|z_lb) = −1/(B·L), −1/(B·L) · d log p / d raw (L, B, P, D). A shared learned
    scale's gradient goes into `out`."""
    L, B = raw.shape[:2]
    d_raw = model.likelihood.score(raw, x)  # (L, B, P, D), for families with a closed form
    if d_raw is not None:  # autograd's own gradient of log_prob without its graph: 0.2 ms of a 2.9 ms step
        with torch.no_grad():
            p_x = model.p_x_given_z(raw, x)
            return p_x, p_x.log_prob(x), d_raw.mul_(-1.0 / (B * L))
    raw = raw.detach().requires_grad_()  # a leaf
    shared = [model.log_scale] if model.log_scale is not None else []
    with torch.enable_grad():
        p_x = model.p_x_given_z(raw, x)  # batch shape (L, B)
        log_px = p_x.log_prob(x)  # (L, B)
        d_log_px = torch.full_like(log_px, -1.0 / (B * L))
        d_raw, *d_shared = torch.autograd.grad(log_px, [raw, *shared], d_log_px)
    if shared:
        out[model.log_scale].copy_(d_shared[0])
    return p_x, log_px.detach(), d_raw


def _gradient(model: VAE, x: Tensor, eps: Tensor, beta: float, out: dict[nn.Parameter, Tensor]) -> ElboTerms:
    """The gradient of the loss of x (B, D) with the draws ε (L, B, Z), into `out`."""
    L, B, Z = eps.shape
    encoder, decoder = _linears(model.encoder), _linears(model.decoder)
    with torch.no_grad():
        enc_inputs, enc_out = _forward(encoder, x)
        mu, logvar = enc_out.chunk(2, dim=-1)  # (B, Z) each
        std = (0.5 * logvar).exp()
        z = mu + std * eps  # (L, B, Z)
        dec_inputs, dec_out = _forward(decoder, z.flatten(0, 1))  # (L·B, P·D)
        kl = gaussian_kl(mu, logvar)  # (B,)

    raw = dec_out.view(L, B, model.n_params, model.data_dim)
    p_x, log_px, d_raw = log_px_and_grad(model, raw, x, out)
    with torch.no_grad():
        d_z = _backward(decoder, dec_inputs, d_raw.view(L * B, -1), out, input_grad=True)
        d_z = d_z.view(L, B, Z)
        # z = μ + σ ε, σ = exp(½ log σ²); plus β/B times the KL's gradient
        d_mu = d_z.sum(0) + (beta / B) * mu
        d_logvar = 0.5 * std * (d_z * eps).sum(0) + (beta / (2 * B)) * (std.square() - 1)
        _backward(encoder, enc_inputs, torch.cat([d_mu, d_logvar], dim=-1), out, input_grad=False)
        smallest = model.likelihood.smallest_scale(p_x)
    return ElboTerms(log_px.mean(0), kl, None if smallest is None else smallest.detach())


class FlatAdam:
    """torch.optim.Adam's update of one flat tensor (defaults: betas (0.9, 0.999), eps 1e-8, no weight
    decay), through the fused kernel that torch.optim's `fused=True` calls (`torch._fused_adam_`, after
    adding 1 to the step count, as `torch.optim.adam._fused_adam` does): the same arithmetic
    (tests/test_manual_grad.py checks it against torch.optim.Adam), without the Optimizer class's per-step
    bookkeeping (hooks, parameter groups, state look-ups; 0.1 ms of a 3 ms step on 2 CPU cores) or the
    functional `torch.optim.adam.adam`'s dispatch (a dynamo check that inspects its signature at every
    call, and grouping tensors by device: a further 0.04 ms). The step count stays on the parameter's
    device, so that the update can be captured in a CUDA graph."""

    def __init__(self, param: Tensor, grad: Tensor, lr: float):
        self.param, self.grad, self.lr = param, grad, lr
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        self.steps = torch.zeros((), dtype=torch.float32, device=param.device)

    @torch.no_grad()
    def step(self) -> None:
        self.steps.add_(1)
        torch._fused_adam_([self.param], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps],
                           amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)


@functools.cache
def _compiled_gradient():
    # One compiled function for the process, with a graph under it per family, shape, and value of the
    # numbers it reads as constants (β, a family's fixed scale). A study trains many of those in one
    # process, past dynamo's default of 8 graphs a function (after which it would run the rest
    # uncompiled). Tracing autograd.grad (the likelihood's gradient where it has no closed form) keeps
    # such a family's gradient one graph, where dynamo would otherwise split it around that call.
    compiled = torch.compile(_gradient, dynamic=False)
    return torch._dynamo.config.patch(recompile_limit=256, trace_autograd_ops=True)(compiled)


class ManualGradient:
    """`step(x, n_samples, beta)` makes one training step on x (B, D): the β-weighted loss's gradient,
    then Adam's update with learning rate `lr`. `grad(...)` stops after the gradient, left in every
    parameter's `.grad` (with `lr=None`, only `grad` is available). Both return the ELBO terms of x, as
    `elbo_terms` does (detached); the L samples draw the same ε as `elbo_terms` from the same random
    state.

    With `compiled`, the gradient runs through `torch.compile` (inductor) for the first call's batch
    shape, so that its many small elementwise operations run as a few fused loops; the first call
    compiles (seconds), and a batch of another shape (an epoch's short last batch) runs uncompiled rather
    than compiling again. The arithmetic is the same up to rounding (tests/test_manual_grad.py).

    The model's parameters, and their gradients, become views of one flat buffer each, so that Adam
    updates one tensor in one kernel; the model, its state dict and its `.grad`s are used as before, but
    it must not be moved or cast afterwards (`.to(...)` gives it new tensors, which Adam would not see:
    a step then raises)."""

    def __init__(self, model: VAE, lr: float | None = None, compiled: bool = False):
        self.model = model
        self.compiled = _compiled_gradient() if compiled else None
        self.compiled_shape: torch.Size | None = None  # the batch shape the compiled gradient is used for
        params = list(model.parameters())
        self.flat = torch.cat([p.detach().flatten() for p in params])  # (n_params,)
        self.flat_grad = torch.zeros_like(self.flat)
        start = 0
        for p in params:
            end = start + p.numel()
            p.data = self.flat[start:end].view_as(p)
            p.grad = self.flat_grad[start:end].view_as(p)
            start = end
        self.grads = {p: p.grad for p in params}  # written in place by every step
        self.adam = FlatAdam(self.flat, self.flat_grad, lr) if lr is not None else None

    def grad(self, x: Tensor, n_samples: int, beta: float) -> ElboTerms:
        if next(self.model.parameters()).data_ptr() != self.flat.data_ptr():  # the first starts `flat`
            raise RuntimeError("the model was moved or cast after its ManualGradient was made, which would "
                               "train stale copies of its parameters: make the ManualGradient after `.to(...)`")
        B, model = x.shape[0], self.model
        eps = torch.randn((n_samples, B, model.latent_dim), device=x.device, dtype=x.dtype)  # sample_z's draw
        self.compiled_shape = self.compiled_shape or eps.shape
        compiled = self.compiled is not None and eps.shape == self.compiled_shape
        return (self.compiled if compiled else _gradient)(model, x, eps, beta, self.grads)

    def step(self, x: Tensor, n_samples: int, beta: float) -> ElboTerms:
        if self.adam is None:
            raise RuntimeError("ManualGradient(model) without lr computes gradients only (`grad`): pass lr to "
                               "make it train (`step`)")
        terms = self.grad(x, n_samples, beta)
        self.adam.step()
        return terms
