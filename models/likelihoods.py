"""The registry of decoder likelihood families.

Each family maps the decoder's raw output, shape (..., P, D) with P outputs per pixel, to a
`torch.distributions` distribution over the whole image: `Independent(..., 1)`, batch shape (...),
event shape (D,). Every log-density keeps its normalising constant, so numbers on the same measure
can be compared across families (see `measure`).

Bounded families have a finite supremum of log p(x|z) per pixel; unbounded ones can grow without
limit (a learned scale → 0, or the continuous Bernoulli's normaliser as λ → 0 or 1). A `min_scale`
floor on a learned scale makes that family bounded again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Laplace,
    Normal,
    constraints,
)

BINARY, UNIT_INTERVAL, EIGHT_BIT = "binary", "[0,1]", "8-bit"
# how a family's scale is learned: by the decoder per pixel, as one parameter, or fitted to each image x
PER_PIXEL, SHARED, OPTIMAL = "per_pixel", "shared", "optimal"
LEVELS = 256  # pixel values of 8-bit data


class _LogSigmoid(torch.autograd.Function):
    """log σ(x) = min(x, 0) − log1p(e^(−|x|)) on a CPU, with log1p(e) = log u − (u − 1 − e)/u, u = 1 + e
    rounded: the correction gives back what rounding u lost (within 2 ulp of the exact log σ,
    tests/test_likelihoods.py). F.logsigmoid's speed depends on the CPU: for one 128×784 batch on 2
    cores, 0.5 ms on the AMD EPYC VM (about a tenth of a Bernoulli training step) against 0.18 ms here;
    on the Intel Xeon VM, torch's is the faster (the benchmark's log σ line). Its gradient is σ(−x), also at
    x = 0, where the formula has a kink, under vmap too (`generate_vmap_rule`). It has no forward mode
    (jvp), which torch.compile cannot trace: a jvp through it raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        e = x.abs().neg_().exp_()  # e^(−|x|) in (0, 1]
        u = e + 1
        log1p_e = u.log().sub_((u - 1).sub_(e).div_(u))
        return x.clamp_max(0).sub_(log1p_e)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(-x)


def log_sigmoid(x: Tensor) -> Tensor:
    """log σ(x), as F.logsigmoid; faster on a CPU (`_LogSigmoid`). Elsewhere F.logsigmoid's one kernel.
    Under no_grad (the training step's closed-form scores) its forward is called as a plain function:
    `Function.apply` binds its arguments through `inspect` at every call, 0.03 to 0.06 ms on 2 CPU cores.
    Grad mode, not `x.requires_grad`, decides, because torch.func's transforms record derivatives of
    tensors that do not require grad (inside vmap). A forward-mode derivative (jvp), which ignores grad
    mode, taken inside no_grad would come from the formula itself: 0 at the kink."""
    if x.device.type != "cpu":
        return F.logsigmoid(x)
    return _LogSigmoid.apply(x) if torch.is_grad_enabled() else _LogSigmoid.forward(x)


class BernoulliLogits(Bernoulli):
    """torch's Bernoulli with log p(x) = x η + log σ(−η) at logit η (the same pmf; `log_sigmoid`'s speed)."""

    def log_prob(self, x: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(x)
        # x log σ(η) + (1 − x) log σ(−η), and log σ(η) − log σ(−η) = η
        return torch.addcmul(log_sigmoid(-self.logits), x, self.logits)


class DiscretizedLogistic(Distribution):
    """Logistic density integrated over the 256 bins of 8-bit pixels (Salimans et al. 2017, PixelCNN++).

    x is a pixel value k/255; P(k) = F((k+½)/255) − F((k−½)/255), with F(−∞) = 0 at k = 0 and
    F(+∞) = 1 at k = 255. Computed in log space so the tails stay finite:
    log(σ(a) − σ(b)) = log σ(a) + log σ(−b) + log(1 − e^(b−a)).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}  # noqa: RUF012
    support = constraints.unit_interval

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = False):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def log_prob(self, x: Tensor) -> Tensor:
        half_bin = 0.5 / (LEVELS - 1)
        upper = (x + half_bin - self.loc) / self.scale
        lower = (x - half_bin - self.loc) / self.scale
        # lower − upper = −(bin width)/scale, written so: not ∞ − ∞ = NaN when the scale underflows
        # (float32, log-scale < −88) and both edges are ±∞
        width = 2 * half_bin / self.scale
        first = log_sigmoid(upper)  # k = 0: all mass below the upper edge
        last = log_sigmoid(-lower)  # k = 255: all mass above the lower edge
        interior = first + last + torch.log(-torch.expm1(-width))
        return torch.where(x < half_bin, first, torch.where(x > 1 - half_bin, last, interior))

    @property
    def mean(self) -> Tensor:
        return self.loc.clamp(0, 1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:  # noqa: B008  torch's signature
        u = torch.rand(self._extended_shape(sample_shape), device=self.loc.device).clamp(1e-6, 1 - 1e-6)
        y = self.loc + self.scale * (torch.log(u) - torch.log1p(-u))
        return (y.clamp(0, 1) * (LEVELS - 1)).round() / (LEVELS - 1)


class ContinuousBernoulliLogits(ContinuousBernoulli):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) with its log-density and mean computed
    from the logit η itself. torch's takes them from λ = σ(η) clamped to [1.2e-7, 1 − 1.2e-7]: beyond
    |η| ≈ 15.9 its normaliser stops growing (gradient 0) while the data term does not, so the density no
    longer integrates to 1 and log p is capped near 2.77 nats per pixel, hiding that the family is
    unbounded. Sampling is torch's."""

    def log_prob(self, x: Tensor) -> Tensor:
        # λ^x (1 − λ)^(1−x) C(λ), log λ^x (1 − λ)^(1−x) = x η + log σ(−η)
        eta, x = torch.broadcast_tensors(self.logits, x)
        return torch.addcmul(_cb_log_norm(eta).add_(log_sigmoid(-eta)), x, eta)

    @property
    def mean(self) -> Tensor:
        # a density ∝ e^(ηx) on [0, 1]: E x = 1 / (1 − e^(−η)) − 1/η; its series near 0, where that cancels
        eta = self.logits
        small = eta.abs() < _CB_SERIES
        safe = torch.where(small, 1.0, eta)
        e2 = eta * eta
        series = 0.5 + eta * (1 / 12 + e2 * (-1 / 720 + e2 / 30240))  # next term η⁷/1209600
        return torch.where(small, series, -1 / torch.expm1(-safe) - 1 / safe)


# |η| below which the continuous Bernoulli's closed forms, 0/0 at η = 0 and cancelling in float32 near
# it, use their series; at 0.05 the series' first omitted term is below 1e-13
_CB_SERIES = 0.05


def _cb_log_norm(eta: Tensor) -> Tensor:
    """log C of the continuous Bernoulli at logit η: C = 2 atanh(1 − 2λ)/(1 − 2λ) = η / tanh(η/2), which
    grows as log |η| without limit; its series near 0. The unused branch of each `where` is fed a
    harmless value, so that its gradient at η = 0 is not ∞ · 0 = NaN."""
    small = eta.abs() < _CB_SERIES
    safe = torch.where(small, 1.0, eta)
    e2 = eta * eta
    series = math.log(2) + e2 * (1 / 12 + e2 * (-7 / 1440 + e2 * 31 / 90720))  # next term −127η⁸/4838400
    return torch.where(small, series, torch.log(safe / torch.tanh(safe / 2)))


@dataclass(frozen=True)
class Family:
    """One registry entry. `make` builds the per-pixel distribution from the raw decoder output."""

    name: str
    n_params: int  # decoder outputs per pixel
    support: str  # data the family is a likelihood of: BINARY, UNIT_INTERVAL or EIGHT_BIT
    make: Callable[..., Distribution]  # (raw (..., P, D), scale, min_scale, shared, x) -> per-pixel dist
    summary: str
    is_pmf: bool = False  # a probability mass function (log p ≤ 0, so bounded) rather than a density
    learned_scale: str | None = None  # None (fixed or none), PER_PIXEL, SHARED or OPTIMAL
    # a density's sup of log p per pixel, given its fixed scale (likelihood.scale; None: no fixed scale)
    fixed_supremum: Callable[[float], float] | None = None
    # a learned scale's sup given a floor min_scale > 0 on it (None: no learned scale, or pmf)
    floored_supremum: Callable[[float], float] | None = None
    # (raw (..., P, D), scale, x) -> d log p(x|z) / d raw (..., P, D) in closed form, for the manual
    # backward; None: autograd differentiates `make`'s log_prob. Tested against autograd.
    score: Callable[[Tensor, float, Tensor], Tensor] | None = None

    @property
    def reads(self) -> tuple[str, ...]:
        """The likelihood.* parameters beside the name that change this family's distribution."""
        return (("scale",) if self.fixed_supremum is not None else ()) + (
            ("min_scale",) if self.learned_scale is not None else ())


def _learned(raw: Tensor, min_scale: float) -> Tensor:
    return min_scale + torch.exp(raw)


# The decoder's P outputs per pixel are taken apart with views: squeeze (P = 1) or one unbind (P = 2),
# not by indexing raw[..., i, :], whose backward fills a zero tensor of raw's shape and copies into it
# once per output (25 µs of a 784-pixel step for P = 1, 75 µs for P = 2, on one CPU core).
def _only(raw: Tensor) -> Tensor:
    """raw (..., 1, D) -> (..., D)."""
    return raw.squeeze(-2)


def _loc_scale(raw: Tensor, min_scale: float) -> tuple[Tensor, Tensor]:
    """raw (..., 2, D) -> location and learned scale, each (..., D)."""
    loc, raw_scale = raw.unbind(-2)
    return loc, _learned(raw_scale, min_scale)


def _fixed(scale: float, like: Tensor) -> Tensor:
    """A fixed scale as a 0-d tensor made on `like`'s device: a Python number would be copied there from
    the host at every step, which a CUDA graph cannot capture."""
    return torch.full((), scale, dtype=like.dtype, device=like.device)


def _gaussian_sup(scale: float) -> float:
    return -0.5 * math.log(2 * math.pi * scale**2)


def _laplace_sup(scale: float) -> float:
    return -math.log(2 * scale)


def _bernoulli_score(raw: Tensor, scale: float, x: Tensor) -> Tensor:
    # d/dη [x log σ(η) + (1 − x) log σ(−η)] = x − σ(η), η the logit
    return torch.sigmoid(raw).neg_().add_(x.unsqueeze(-2))


def _continuous_bernoulli_score(raw: Tensor, scale: float, x: Tensor) -> Tensor:
    # d/dη [x η − softplus(η) + log(η / tanh(η/2))] = x − σ(η) + 1/η − 1/sinh(η); its series near 0
    small = raw.abs() < _CB_SERIES
    safe = torch.where(small, 1.0, raw)
    e2 = raw * raw
    series = raw * (1 / 6 + e2 * (-7 / 360 + e2 * (31 / 15120 - e2 * 127 / 604800)))
    d_log_norm = torch.where(small, series, safe.reciprocal() - torch.sinh(safe).reciprocal())
    return d_log_norm.sub_(torch.sigmoid(raw)).add_(x.unsqueeze(-2))


def _gaussian_score(raw: Tensor, scale: float, x: Tensor) -> Tensor:
    # d/dμ [−(x − μ)²/(2σ²) − log σ − ½ log 2π] = (x − μ)/σ²
    return (x.unsqueeze(-2) - raw).div_(scale**2)


def _laplace_score(raw: Tensor, scale: float, x: Tensor) -> Tensor:
    # d/dμ [−|x − μ|/b − log 2b] = sign(x − μ)/b (0 at x = μ, as autograd's |·|)
    return (x.unsqueeze(-2) - raw).sign_().div_(scale)


def _optimal_scale(loc: Tensor, x: Tensor, min_scale: float) -> Tensor:
    # σ*² = mean squared error over the pixels of each image: the maximiser of the Gaussian
    # log-likelihood in σ (Rybkin, Daniilidis & Levine 2021, "σ-VAE", eq. 4).
    mse = (x - loc).pow(2).mean(-1, keepdim=True)  # (..., 1)
    return mse.sqrt().clamp_min(min_scale) if min_scale > 0 else mse.sqrt()


_V = {"validate_args": False}  # argument checks cost ~20 % of a small step; tests check the values

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="bernoulli", n_params=1, support=BINARY, is_pmf=True,
            make=lambda raw, scale, ms, shared, x: BernoulliLogits(logits=_only(raw), **_V),
            summary="Bernoulli(logits): the pmf of binary pixels", score=_bernoulli_score,
        ),
        Family(
            name="continuous_bernoulli", n_params=1, support=UNIT_INTERVAL,
            make=lambda raw, scale, ms, shared, x: ContinuousBernoulliLogits(logits=_only(raw), **_V),
            summary="continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): normalised density on [0,1]",
            score=_continuous_bernoulli_score,
        ),
        Family(
            name="gaussian", n_params=1, support=UNIT_INTERVAL, fixed_supremum=_gaussian_sup,
            make=lambda raw, scale, ms, shared, x: Normal(_only(raw), _fixed(scale, raw), **_V),
            summary="Gaussian with fixed σ (σ = 1: the identity-covariance Gaussian)", score=_gaussian_score,
        ),
        Family(
            name="gaussian_learned", n_params=2, support=UNIT_INTERVAL, learned_scale=PER_PIXEL,
            floored_supremum=_gaussian_sup,
            make=lambda raw, scale, ms, shared, x: Normal(*_loc_scale(raw, ms), **_V),
            summary="Gaussian with a per-pixel σ from the decoder",
        ),
        Family(
            name="gaussian_shared", n_params=1, support=UNIT_INTERVAL, learned_scale=SHARED,
            floored_supremum=_gaussian_sup,
            make=lambda raw, scale, ms, shared, x: Normal(_only(raw), _learned(shared, ms), **_V),
            summary="Gaussian with one learned σ for all pixels",
        ),
        Family(
            name="gaussian_optimal", n_params=1, support=UNIT_INTERVAL, learned_scale=OPTIMAL,
            floored_supremum=_gaussian_sup,
            make=lambda raw, scale, ms, shared, x: Normal(_only(raw), _optimal_scale(_only(raw), x, ms), **_V),
            summary="Gaussian with the analytic per-image optimal σ² = MSE (σ-VAE)",
        ),
        Family(
            name="laplace", n_params=1, support=UNIT_INTERVAL, fixed_supremum=_laplace_sup,
            make=lambda raw, scale, ms, shared, x: Laplace(_only(raw), _fixed(scale, raw), **_V),
            summary="Laplace with fixed scale b", score=_laplace_score,
        ),
        Family(
            name="laplace_learned", n_params=2, support=UNIT_INTERVAL, learned_scale=PER_PIXEL,
            floored_supremum=_laplace_sup,
            make=lambda raw, scale, ms, shared, x: Laplace(*_loc_scale(raw, ms), **_V),
            summary="Laplace with a per-pixel scale b from the decoder",
        ),
        Family(
            name="discretized_logistic", n_params=2, support=EIGHT_BIT, is_pmf=True, learned_scale=PER_PIXEL,
            make=lambda raw, scale, ms, shared, x: DiscretizedLogistic(*_loc_scale(raw, ms)),
            summary="logistic integrated over the 256 bins of 8-bit pixels: the pmf of 8-bit data",
        ),
    ]
}
NAMES = tuple(FAMILIES)


@dataclass(frozen=True)
class Measure:
    """What a log-likelihood number means, and whether it may be compared with others."""

    name: str  # e.g. "pmf of binarized pixels"
    comparable: bool  # a (bound on a) log-probability of the data, shared with other rows of its name
    nats_offset_per_pixel: float  # added to log p to put it on that measure

    @property
    def scale(self) -> str:
        return comparable_scale(self.name, self.comparable)


# The two scales that likelihoods share, and the bits/dim of a uniform pmf over a pixel's values on each:
# a model that scores more has learnt less than nothing about the pixels
BINARIZED_PMF, EIGHT_BIT_PMF = "pmf of binarized pixels", "pmf of 8-bit pixels"
UNIFORM_BITS_PER_DIM = {BINARIZED_PMF: 1.0, EIGHT_BIT_PMF: math.log2(LEVELS)}


def comparable_scale(measure: str, comparable: bool) -> str:
    """The scale that numbers may be compared on: a dequantized density's lower bound is on the 8-bit
    pmf's scale ("pmf of 8-bit pixels (dequantized lower bound)" → "pmf of 8-bit pixels"); a measure that
    is not a likelihood of the data is on no shared scale ("")."""
    return measure.split(" (")[0] if comparable else ""


@dataclass(frozen=True)
class Likelihood:
    """A family with its variant parameters: the fixed scale and an optional floor on a learned one."""

    family: Family
    scale: float = 1.0  # σ of `gaussian`, b of `laplace`
    min_scale: float = 0.0  # floor on a learned scale; > 0 makes an unbounded family bounded

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def bounded(self) -> bool:
        return self.supremum_per_pixel is not None

    @property
    def supremum_per_pixel(self) -> float | None:
        f = self.family
        if f.is_pmf:
            return 0.0
        if f.fixed_supremum is not None:
            return f.fixed_supremum(self.scale)
        if f.floored_supremum is not None and self.min_scale > 0:
            return f.floored_supremum(self.min_scale)
        return None

    def distribution(self, raw: Tensor, shared: Tensor | None = None, x: Tensor | None = None) -> Independent:
        """raw (..., P, D) -> p(x|z) over images, batch shape (...), event shape (D,). `shared`: the learned
        log-scale of gaussian_shared (VAE.log_scale); `x` (..., D): the images, whose MSE is gaussian_optimal's σ²."""
        f = self.family
        # a flat (B, P·D) output would be read as one image (not caught where B happens to equal P)
        if raw.dim() < 2 or raw.shape[-2] != f.n_params:
            raise ValueError(f"{f.name}: raw must have shape (..., {f.n_params}, D), {f.n_params} decoder output(s) "
                             f"per pixel, not {tuple(raw.shape)}")
        if f.learned_scale == SHARED and shared is None:
            raise ValueError(f"{f.name} needs `shared`: its learned log-scale (a tensor of shape (1,), VAE.log_scale)")
        if f.learned_scale == OPTIMAL and x is None:
            raise ValueError(f"{f.name} needs `x`: the images (..., D), whose mean squared error is its σ²")
        per_pixel = f.make(raw, self.scale, self.min_scale, shared, x)
        return Independent(per_pixel, 1)

    def score(self, raw: Tensor, x: Tensor) -> Tensor | None:
        """d log p(x|z) / d raw (..., P, D) for raw (..., P, D), x (B, D); None when the family has no
        closed form (autograd then differentiates `distribution`'s log_prob)."""
        score = self.family.score
        return None if score is None else score(raw, self.scale, x)

    def smallest_scale(self, dist: Independent) -> Tensor | None:
        """The smallest learned scale in `dist` (a 0-d tensor), None for families without one."""
        return dist.base_dist.scale.min() if self.family.learned_scale else None

    def measure(self, binarized: bool, dequantized: bool) -> Measure:
        """Which measure log p(x|z) is on, given the data protocol (see the README's "Which numbers share a measure")."""
        f = self.family
        if binarized:
            if f.support == BINARY:
                return Measure(BINARIZED_PMF, True, 0.0)
            return Measure("density at binary values (not a likelihood of the data)", False, 0.0)
        if f.support == BINARY:
            return Measure("pmf of binary pixels at 8-bit values (not a likelihood of the data)", False, 0.0)
        if f.learned_scale == OPTIMAL:
            # σ is fitted to the very image it scores: the maximum over σ of a density, which integrates
            # to ∞ over images, so Jensen's dequantization bound does not apply.
            return Measure("density with σ fitted to each image (σ-VAE objective, not a likelihood of the data)",
                           False, 0.0)
        if f.support == EIGHT_BIT:
            return Measure(EIGHT_BIT_PMF, True, 0.0)
        if dequantized:
            # y = (k + u)/256: E_u log p(y) − D·log 256 ≤ log P(k) (Theis, van den Oord & Bethge 2016).
            return Measure(f"{EIGHT_BIT_PMF} (dequantized lower bound)", True, -math.log(LEVELS))
        return Measure("density at raw 8-bit values (training objective only)", False, 0.0)


def get(name: str, scale: float = 1.0, min_scale: float = 0.0) -> Likelihood:
    if name not in FAMILIES:
        raise ValueError(f"unknown likelihood {name!r}; valid choices: {', '.join(NAMES)}")
    return Likelihood(FAMILIES[name], scale=scale, min_scale=min_scale)
