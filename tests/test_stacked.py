"""The stacked step (models/stacked.py) is N separate models' steps at once: same losses and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import bench.stacked
import models.stacked
from bench import config, states
from bench.config import ConfigError
from bench.data import load
from bench.stacked import (
    build_stacked,
    check_stackable,
    make_stacked_step,
    train_epoch_stacked,
    train_stacked,
)
from bench.train import TrainResult, build, evaluate
from models import likelihoods
from models.estimators import gaussian_kl
from models.stacked import StackedAdam, StackedVAE, stacked_elbo_terms
from models.vae import VAE

N, B, D, L, Z = 3, 5, 12, 2, 3


def _inputs(family: str) -> torch.Tensor:
    """(N, B, D) in the family's support: binary, [0, 1], or k/255."""
    x = torch.rand(N, B, D)
    support = likelihoods.FAMILIES[family].support
    if support == likelihoods.BINARY:
        return torch.bernoulli(x)
    return (x * 255).round() / 255 if support == likelihoods.EIGHT_BIT else x


def _separate_loss(model: VAE, x: torch.Tensor, eps: torch.Tensor, beta: float) -> torch.Tensor:
    """The reference: one model's −mean β-objective through its public API. x (B, D), eps (L, B, Z)."""
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps
    recon = model.p_x_given_z(model.decode(z), x).log_prob(x).mean(0)
    return -(recon - beta * gaussian_kl(mu, logvar)).mean()


@pytest.mark.parametrize("family", likelihoods.NAMES)
def test_stacked_step_matches_separate_models(family):
    torch.manual_seed(0)
    lik = likelihoods.get(family, scale=0.5)
    variants = [VAE(D, [7, 6], Z, lik) for _ in range(N)]  # two hidden layers: every layer kind stacked
    for v in variants:
        if v.log_scale is not None:
            v.log_scale.data.normal_()  # a different shared scale per variant
    separate = copy.deepcopy(variants)  # stacking makes the variants views of the stacked leaves
    stacked = StackedVAE(variants)
    x, eps, betas = _inputs(family), torch.randn(N, L, B, Z), torch.tensor([[1.0], [0.5], [2.0]])

    terms = stacked_elbo_terms(stacked, x, L, eps)
    stacked_losses = -terms.objective(betas).mean(1)  # (N,)
    stacked_losses.sum().backward()

    for i, v in enumerate(separate):
        params = list(v.parameters())
        loss = _separate_loss(v, x[i], eps[i], betas[i].item())
        grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(stacked_losses[i], loss, rtol=1e-5, atol=1e-4)
        for k, (leaf, g) in enumerate(zip(stacked.parameters(), grads)):
            torch.testing.assert_close(stacked.variant_slice(k, leaf.grad, i), g, rtol=1e-4, atol=1e-5)
    if lik.family.learned_scale:
        assert terms.smallest_scale.shape == (N,)


@pytest.fixture
def triton_on_the_cpu(monkeypatch):
    """StackedAdam's GPU update, its Triton kernel, run on the CPU by Triton's interpreter: so CI, which
    has no GPU, checks the kernel's arithmetic too."""
    pytest.importorskip("triton")  # ships with torch's Linux x86-64 wheels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    update = models.stacked._triton_adam.__wrapped__()  # jitted now, under the interpreter; not cached
    monkeypatch.setattr(models.stacked, "_triton_adam", lambda: update)
    monkeypatch.setattr(models.stacked, "_triton_runs", lambda p: p.dtype == torch.float32)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton update)")


# float32 on a GPU: the Triton kernel; float64 there, and the CPU: the foreach calls
@pytest.mark.parametrize(("device", "dtype"), [
    pytest.param("cpu", torch.float32, id="cpu-float32"), pytest.param("cpu", torch.float64, id="cpu-float64"),
    pytest.param("triton-interpreter", torch.float32, id="triton-interpreter-float32"),
    pytest.param("cuda", torch.float32, marks=CUDA, id="cuda-float32"),
    pytest.param("cuda", torch.float64, marks=CUDA, id="cuda-float64")])
def test_stacked_adam_is_adam_with_a_learning_rate_per_variant(device, dtype, request):
    if device == "triton-interpreter":
        request.getfixturevalue("triton_on_the_cpu")
        device = "cpu"
    torch.manual_seed(0)
    lrs = [1e-3, 3e-2, 1e-4]
    variants = [VAE(D, [7], Z, likelihoods.get("gaussian_shared")).to(dtype) for _ in lrs]
    separate = copy.deepcopy(variants)
    stacked = StackedVAE(variants).to(device)
    opt = StackedAdam(stacked.parameters(), lr=torch.tensor(lrs, device=device))
    references = [torch.optim.Adam(v.parameters(), lr=lr) for v, lr in zip(separate, lrs)]
    for _ in range(5):
        for leaf in stacked.parameters():
            leaf.grad = torch.randn_like(leaf)
        for i, v in enumerate(separate):
            for k, (p, leaf) in enumerate(zip(v.parameters(), stacked.parameters())):
                p.grad = stacked.variant_slice(k, leaf.grad, i).cpu().clone()
        opt.step()
        for ref in references:
            ref.step()
    for v, s in zip(separate, stacked.variants):  # the variants see the stacked leaves' values
        for p, q in zip(v.parameters(), s.parameters()):
            torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-7)


def test_variants_stay_views_of_the_stacked_leaves_after_a_move():
    stacked = StackedVAE([VAE(D, [7], Z, likelihoods.get("bernoulli")) for _ in range(2)]).double()
    with torch.no_grad():
        for leaf in stacked.parameters():
            leaf.add_(1.0)
    for i, v in enumerate(stacked.variants):
        for k, (p, leaf) in enumerate(zip(v.parameters(), stacked.parameters())):
            assert p.dtype == torch.float64 and torch.equal(p, stacked.variant_slice(k, leaf, i))
            assert p.data_ptr() == stacked.variant_slice(k, leaf, i).data_ptr()  # a view, not a copy


def test_stacked_rejects_mixed_architectures():
    lik = likelihoods.get("bernoulli")
    with pytest.raises(ValueError, match="architecture"):
        StackedVAE([VAE(D, [7], Z, lik), VAE(D, [8], Z, lik)])


def test_stackable_configs_differ_only_in_seed_beta_lr():
    base = config.load(["likelihood.name=bernoulli"])
    check_stackable([base, config.apply(base, {"train.seed": 1, "train.beta": 0.5, "train.lr": 3e-4})])
    with pytest.raises(ConfigError, match="model.latent_dim"):
        check_stackable([base, config.apply(base, {"model.latent_dim": 2})])
    with pytest.raises(ConfigError, match="train.batch_size"):  # in any variant, not only the second
        check_stackable([base, base, config.apply(base, {"train.batch_size": 64})])


def test_the_stacked_step_is_each_variants_adam_step_on_its_own_beta_objective(tiny_cfg, monkeypatch):
    """Two variants alike but for β (and lr): each moves as a separate model's Adam step on its own
    objective; with another variant's β it would move as that one."""
    cfgs = [config.apply(tiny_cfg, {"train.beta": beta, "train.lr": lr}) for beta, lr in ((1.0, 1e-3), (4.0, 3e-3))]
    data = load(tiny_cfg.data)
    stacked = build_stacked(cfgs, data)
    separate = copy.deepcopy(stacked.variants)
    x = torch.bernoulli(torch.rand(1, 16, data.dim)).expand(2, -1, -1)  # (2, B, D): one batch for both
    eps = torch.randn(2, 1, 16, tiny_cfg.model.latent_dim)
    monkeypatch.setattr(bench.stacked, "stacked_elbo_terms", lambda model, x, n: stacked_elbo_terms(model, x, n, eps))
    step = make_stacked_step(stacked, cfgs)
    for _ in range(2):
        step(x)
    for i, (cfg, model) in enumerate(zip(cfgs, separate)):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        for _ in range(2):
            opt.zero_grad()
            _separate_loss(model, x[i], eps[i], cfg.train.beta).backward()
            opt.step()
        for p, q in zip(model.parameters(), stacked.variants[i].parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_stacked_variants_start_where_separate_runs_start(tiny_cfg):
    cfgs = [config.apply(tiny_cfg, {"train.seed": s}) for s in (0, 1)]
    data = load(tiny_cfg.data)
    stacked = build_stacked(cfgs, data)
    for cfg, variant in zip(cfgs, stacked.variants):
        torch.manual_seed(cfg.train.seed)
        for p, q in zip(build(cfg, data.dim).parameters(), variant.parameters()):
            assert torch.equal(p, q)


def test_train_stacked_gives_each_variant_its_result_and_lr(tiny_cfg):
    cfgs = [config.apply(tiny_cfg, {"train.seed": s, "train.beta": b, "train.lr": lr})
            for s, b, lr in [(0, 1.0, 1e-4), (1, 0.5, 3e-3), (2, 2.0, 1e-3)]]
    starts = build_stacked(cfgs, load(tiny_cfg.data)).variants
    results = train_stacked(cfgs)
    assert len(results) == 3 and all(isinstance(r, TrainResult) for r in results)
    for r, cfg in zip(results, cfgs):
        (metrics,) = r.history
        assert {"train_elbo", "train_objective", "val_elbo", "samples_per_s", "ms_per_step"} <= set(metrics)
        assert all(math.isfinite(metrics[k]) for k in ("train_elbo", "train_objective", "val_elbo"))
        objective = metrics["train_recon"] - cfg.train.beta * metrics["train_kl"]  # its own β
        assert metrics["train_objective"] == pytest.approx(objective, rel=1e-5)
    # Adam moves each weight by about lr per step: the lr-3e-3 variant travels ~30x further than 1e-4.
    moved = [sum((p - q).norm() ** 2 for p, q in zip(r.model.parameters(), s.parameters())) ** 0.5
             for r, s in zip(results, starts)]
    assert moved[1] > 10 * moved[0] and moved[2] > 3 * moved[0]


def test_each_stacked_variant_trains_in_its_own_shuffle(tiny_cfg):
    """One shuffle for all would make the variants' seeds share their batches: their spread less than
    separate runs' (the README says each keeps its own)."""
    cfgs = [config.apply(tiny_cfg, {"train.seed": s}) for s in (0, 1)]
    data = load(tiny_cfg.data)
    stacked = build_stacked(cfgs, data)
    real, batches = make_stacked_step(stacked, cfgs), []

    def step(x):
        batches.append(x.clone())  # (N, B, D)
        return real(x)

    train_epoch_stacked(stacked, step, data.train, data.transform(stacked.likelihood.family, train=True), cfgs)
    assert not torch.equal(batches[0][0], batches[0][1])
    # each variant's epoch is the training set in its own order: the same images, each once
    one, other = (torch.unique(torch.cat([b[i] for b in batches]), dim=0, return_counts=True) for i in range(2))
    assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1]) and one[1].sum() == len(data.train)


def test_a_diverged_variant_keeps_its_model_at_divergence_and_the_others_train_on(shrink):
    # the lr-3e-2 variant's learned σ collapses below train.scale_collapse × quantum in epoch 1; its
    # slice of the stack trains on, but its result is the model its last recorded epoch evaluated
    base = shrink(config.load(["likelihood.name=gaussian_learned", "data.binarize=none", "data.dequantize=false",
                                 "train.scale_collapse=8"]))
    cfgs = [config.apply(base, {"train.lr": lr, "train.epochs": 3}) for lr in (1e-4, 3e-2)]
    healthy, diverged = train_stacked(cfgs)
    assert healthy.status == states.COMPLETE and len(healthy.history) == 3
    assert diverged.status == states.DIVERGED and "collapsed" in diverged.reason and len(diverged.history) == 1
    data = diverged.data
    val = evaluate(diverged.model, data.val, data.transform(diverged.model.likelihood.family, train=False), seed=base.data.seed)
    offset = diverged.measure.nats_offset_per_pixel * data.dim
    assert val["elbo"] + offset == pytest.approx(diverged.history[-1]["val_elbo"], rel=1e-6)
