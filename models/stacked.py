"""N variants of one VAE in one training step, so that N small MLPs keep a GPU as busy as one large one.

Each parameter of the N models is stacked into one leaf of shape (N, ...): a layer of all N variants
is one batched matmul (`torch.baddbmm`), and the optimiser sees the tensors of one model (8 for one hidden layer) whatever N
is, so the host-side cost of a step (autograd nodes, optimiser bookkeeping) does not grow with N.
`StackedAdam` gives each variant its own learning rate.

`StackedVAE.variants[i]` stays an ordinary `VAE` whose parameters are views of slice i of the stacked
leaves: evaluation, IWAE and figures run on a variant unchanged and see the trained values, with no copy.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from models.estimators import ElboTerms, gaussian_kl
from models.vae import VAE


class StackedVAE(nn.Module):
    def __init__(self, variants: list[VAE]):
        super().__init__()
        first = variants[0]
        shapes = [[p.shape for p in v.parameters()] for v in variants]
        if any(s != shapes[0] for s in shapes) or any(v.likelihood != first.likelihood for v in variants):
            raise ValueError("stacked variants must share the architecture and the likelihood")
        self.likelihood, self.n_params, self.data_dim = first.likelihood, first.n_params, first.data_dim
        self.names = [name for name, _ in first.named_parameters()]  # e.g. encoder.0.weight
        # Linear weights are stacked transposed, (N, in, out): a layer is then baddbmm(bias, h, W), and
        # autograd's weight gradient hᵀ·g comes out in the leaf's own layout, with no copy per step.
        self.transposed = [p.dim() == 2 for p in first.parameters()]
        # (N, ...) leaves, in the variants' parameter order. The variants are kept in a plain list, not
        # as submodules: the stacked leaves are the only parameters, and .to() moves only them.
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([p.detach().t() if t else p.detach() for p in ps]))
            for t, ps in zip(self.transposed, zip(*(v.parameters() for v in variants)))
        )
        self.variants = list(variants)
        self._alias()

    def variant_slice(self, k: int, stacked: Tensor, i: int) -> Tensor:
        """Variant i's view of a tensor laid out as stacked parameter k: its value, gradient or state."""
        return stacked[i].t() if self.transposed[k] else stacked[i]

    def _alias(self) -> None:
        """Points every variant's parameters at its slice of the stacked leaves."""
        for i, variant in enumerate(self.variants):
            for k, (p, stacked) in enumerate(zip(variant.parameters(), self.stacked)):
                p.data = self.variant_slice(k, stacked.data, i)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .float(): move the leaves, then re-point the variants
        super()._apply(fn, recurse)
        self._alias()
        return self

    def __len__(self) -> int:
        return len(self.variants)

    def _param(self, name: str) -> Tensor:
        return self.stacked[self.names.index(name)]

    def _mlp(self, name: str, h: Tensor) -> Tensor:
        """h (N, R, n_in) through every variant's `encoder` or `decoder` -> (N, R, n_out)."""
        linears = [index for index, layer in getattr(self.variants[0], name).named_children()
                   if isinstance(layer, nn.Linear)]  # indices of the Linear layers, e.g. "0", "2"
        for j, index in enumerate(linears):
            weight = self._param(f"{name}.{index}.weight")  # (N, in, out)
            bias = self._param(f"{name}.{index}.bias").unsqueeze(1)  # (N, 1, out)
            h = torch.baddbmm(bias, h, weight)  # (N, R, out)
            if j < len(linears) - 1:
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
        return self._param("log_scale").view(-1, 1, 1, 1) if "log_scale" in self.names else None


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


class StackedAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba 2015) with one learning rate per variant: `lr` (N,) scales the update of slice
    i of every stacked parameter. Each element's update is torch.optim.Adam's (no weight decay, no
    amsgrad). The step count and the bias corrections stay on the parameters' device, so that a step
    can be captured in a CUDA graph (as torch.optim.Adam's capturable=True). On a GPU the update is one
    Triton kernel per parameter, one pass over it; elsewhere a handful of multi-tensor (foreach) calls,
    some nine passes, which made the update a third of a 16-variant step on an H100."""

    def __init__(self, params, lr: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"betas": betas, "eps": eps})
        self.lr = lr  # (N,)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not self.state[params[0]]:
                # one step count, as they all step together; float64: 1 − β2^t in float32 loses digits
                count = torch.zeros((), device=params[0].device, dtype=torch.float64)
                for p in params:
                    self.state[p].update(step=count, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            count = self.state[params[0]]["step"]
            count += 1
            beta1, beta2 = group["betas"]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            step_size = self.lr / (1 - beta1**count)  # (N,)
            bias2_sqrt = (1 - beta2**count).sqrt()
            if _triton_runs(params[0]):
                update = _triton_adam()
                for p, g, m_p, v_p in zip(params, grads, m, v):
                    update(p, g.contiguous(), m_p, v_p, step_size, bias2_sqrt.float(), beta1, beta2, group["eps"])
                continue
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)  # (√v / √(1 − β2^t)) + ε
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m, denom)
            torch._foreach_mul_(update, [step_size.view(-1, *[1] * (p.dim() - 1)) for p in params])
            torch._foreach_sub_(params, update)


def _triton_runs(p: Tensor) -> bool:
    """Whether StackedAdam updates p with its Triton kernel: on a GPU, in float32 (the kernel's sqrt_rn
    and div_rn are fp32 only)."""
    return p.is_cuda and p.dtype == torch.float32


@functools.cache
def _triton_adam():
    """StackedAdam's update of one stacked parameter as one Triton kernel (Triton ships with PyTorch's
    CUDA builds): reads p, g, m, v once and writes p, m, v once, with torch.optim.Adam's arithmetic."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_size_ptr, bias2_sqrt_ptr, n, per_variant,
               one_minus_beta1, beta2, one_minus_beta2, eps, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        m = m + one_minus_beta1 * (g - m)  # torch.lerp's formula for a weight below ½
        v = tl.load(v_ptr + offs, mask=mask) * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(bias2_sqrt_ptr)) + eps
        step_size = tl.load(step_size_ptr + offs // per_variant, mask=mask)  # the element's variant's
        p = tl.load(p_ptr + offs, mask=mask) - tl.div_rn(m, denom) * step_size
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)

    def update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: Tensor, bias2_sqrt: Tensor,
               beta1: float, beta2: float, eps: float) -> None:
        """p, g, m, v (N, ...) contiguous float32; step_size (N,); bias2_sqrt 0-d."""
        n = p.numel()
        kernel[(triton.cdiv(n, 1024),)](p, g, m, v, step_size, bias2_sqrt, n, n // p.shape[0],
                                        1 - beta1, beta2, 1 - beta2, eps, BLOCK=1024)

    return update
