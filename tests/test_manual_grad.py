"""models/manual_grad.py gives autograd's gradient of the training loss, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from bench import config
from bench.data import load
from bench.train import build, make_optimizer, make_step, train
from models import likelihoods, manual_grad
from models.estimators import elbo_terms
from models.manual_grad import ManualGradient
from models.vae import VAE
from tests.conftest import NEEDS_COMPILE

B, D, Z = 6, 12, 3


def _inputs(family: str) -> torch.Tensor:
    """(B, D) float64 in the family's support: binary, [0, 1], or k/255."""
    x = torch.rand(B, D, dtype=torch.float64)
    support = likelihoods.FAMILIES[family].support
    if support == likelihoods.BINARY:
        return torch.bernoulli(x)
    return (x * 255).round() / 255 if support == likelihoods.EIGHT_BIT else x


@pytest.mark.parametrize("hidden", [[7], [7, 5]])
@pytest.mark.parametrize("n_samples", [1, 3])
@pytest.mark.parametrize("family", likelihoods.NAMES)
def test_manual_gradient_equals_autograd(family, n_samples, hidden):
    torch.manual_seed(0)
    beta = 0.7
    model = VAE(D, hidden, Z, likelihoods.get(family, scale=0.5)).double()
    if model.log_scale is not None:
        model.log_scale.data.fill_(-0.3)
    reference = copy.deepcopy(model)
    x = _inputs(family)

    torch.manual_seed(1)
    terms = elbo_terms(reference, x, n_samples)
    (-terms.objective(beta).mean()).backward()
    torch.manual_seed(1)  # the same ε
    manual = ManualGradient(model).grad(x, n_samples, beta)

    torch.testing.assert_close(manual.recon, terms.recon.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(manual.kl, terms.kl.detach(), rtol=1e-10, atol=1e-10)
    if terms.smallest_scale is None:
        assert manual.smallest_scale is None
    else:
        torch.testing.assert_close(manual.smallest_scale, terms.smallest_scale.detach())
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == 2 * 2 * (len(hidden) + 1) + (model.log_scale is not None)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_manual_gradient_overwrites_the_last_step():
    """.grad is written, not accumulated: a second step's gradient is that step's alone."""
    torch.manual_seed(0)
    model = VAE(D, [7], Z, likelihoods.get("gaussian")).double()
    x = _inputs("gaussian")
    manual = ManualGradient(model)
    torch.manual_seed(1)
    manual.grad(x.flip(0), 1, 1.0)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    manual.grad(x, 1, 1.0)
    torch.manual_seed(1)
    manual.grad(x.flip(0), 1, 1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, first[n], rtol=0, atol=0)


def test_both_backwards_train_the_same_model():
    """Ten Adam steps on digits with train.backward=manual and =autograd end at the same weights."""
    models = {}
    for backward in config.BACKWARDS:
        cfg = config.load(["data.name=digits", "train.device=cpu", "train.batch_size=32", "model.hidden=[16]",
                           "model.latent_dim=2", "train.n_samples=2", "train.beta=0.5", "train.lr=1e-2",
                           f"train.backward={backward}"])
        data = load(cfg.data, torch.device("cpu"))
        torch.manual_seed(0)
        model = build(cfg, data.dim)
        transform = data.transform(model.likelihood.family, train=True)
        step = make_step(model, cfg)
        torch.manual_seed(1)
        for i in range(10):
            step(transform(data.train[32 * i: 32 * (i + 1)]))
        models[backward] = model
    for (name, p), q in zip(models["manual"].named_parameters(), models["autograd"].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_manual_step_is_autograd_and_adam():
    """Five steps of ManualGradient.step end where autograd and Adam end, a learned shared scale
    included."""
    torch.manual_seed(0)
    model = VAE(D, [7, 5], Z, likelihoods.get("gaussian_shared")).double()
    reference = copy.deepcopy(model)
    manual = ManualGradient(model, lr=1e-2)
    opt = make_optimizer(reference.parameters(), 1e-2)
    for i in range(5):
        x = _inputs("gaussian_shared")
        torch.manual_seed(i)
        terms = elbo_terms(reference, x, 2)
        opt.zero_grad()
        (-terms.objective(0.5).mean()).backward()
        opt.step()
        torch.manual_seed(i)
        manual.step(x, 2, 0.5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_a_model_moved_after_its_manual_gradient_is_refused():
    # .to(...) swaps in new parameter tensors: the flat buffers Adam updates would no longer be the model's
    model = VAE(D, [7], Z, likelihoods.get("bernoulli"))
    manual = ManualGradient(model, lr=1e-2)
    model.double()
    with pytest.raises(RuntimeError, match="moved or cast after its ManualGradient was made"):
        manual.step(_inputs("bernoulli"), 1, 1.0)


def test_a_step_without_a_learning_rate_is_refused():
    manual = ManualGradient(VAE(D, [7], Z, likelihoods.get("bernoulli")).double())
    with pytest.raises(RuntimeError, match="without lr computes gradients only"):
        manual.step(_inputs("bernoulli"), 1, 1.0)


@NEEDS_COMPILE
@pytest.mark.parametrize("family", likelihoods.NAMES)
def test_a_compiled_gradient_trains_what_the_eager_one_trains(family):
    """train.compile: steps through torch.compile end where eager steps end (up to rounding), and a batch
    of another shape than the first (an epoch's short last one) runs uncompiled."""
    torch.manual_seed(0)
    model = VAE(D, [7, 5], Z, likelihoods.get(family, scale=0.5)).double()
    reference = copy.deepcopy(model)
    compiled, eager = ManualGradient(model, lr=1e-2, compiled=True), ManualGradient(reference, lr=1e-2)
    torch._dynamo.reset()  # compile afresh, not from an earlier test's cache, so that the counters see it
    counters.clear()
    for i, batch in enumerate([B, B, B, B - 2]):
        x = _inputs(family)[:batch]
        for manual in (compiled, eager):
            torch.manual_seed(i)
            manual.step(x, 2, 0.7)
    assert compiled.compiled is not None and compiled.compiled_shape == (2, B, Z)
    # compiled whole, as one graph: no graph break, and not silently run eagerly
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@NEEDS_COMPILE
def test_train_compile_trains_through_the_compiled_gradient(monkeypatch):
    """train.compile=true: the runner's steps on a CPU go through the compiled gradient (the full batches;
    digits: 1199 training images, batches of 64) and train what eager steps train."""
    calls = []
    real = manual_grad._compiled_gradient()

    def counted(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(manual_grad, "_compiled_gradient", lambda: counted)
    args = ["data.name=digits", "likelihood.name=gaussian", "data.binarize=none", "model.hidden=[16]",
            "model.latent_dim=4", "train.batch_size=64", "train.epochs=1", "eval.iwae_k=4", "eval.iwae_examples=8",
            "eval.figures=false", "train.device=cpu"]
    compiled, eager = (train(config.load([*args, f"train.compile={c}"])) for c in ("true", "false"))
    assert calls and set(calls) == {(64, 64)}
    for (name, p), q in zip(compiled.model.named_parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
