"""The GPU path, on a CUDA device (skipped without one; CI has none, so these run where a GPU is lent):
the step replayed as a CUDA graph trains the same model as eager steps, the manual gradient is
autograd's there too, an epoch (one variant's or stacked variants') never waits for the GPU, and the
runner trains and logs on it."""

from __future__ import annotations

import copy

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from bench import config, run, states, train
from bench.stacked import build_stacked, make_stacked_step, train_epoch_stacked, train_stacked
from models import likelihoods
from models.estimators import elbo_terms
from models.manual_grad import ManualGradient
from models.vae import VAE
from tests.conftest import shrink_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU path)")

# every family on its protocol: binary pixels for the Bernoulli pmf, 8-bit pixels for the rest
PROTOCOL = {name: "dynamic" if likelihoods.FAMILIES[name].support == likelihoods.BINARY else "none"
            for name in likelihoods.NAMES}


def _cfg(family: str, *overrides: str) -> config.Config:
    # digits: 1199 training images, batches of 64: 18 full ones (replayed) and a last one of 47 (eager)
    return config.load(["data.name=digits", f"data.binarize={PROTOCOL[family]}", f"likelihood.name={family}",
                        "train.device=cuda", "model.hidden=[64]", "model.latent_dim=8", "train.batch_size=64",
                        "train.epochs=2", "train.n_samples=2", "eval.iwae_k=16", "eval.iwae_examples=50",
                        *overrides])


@pytest.mark.parametrize("backward", config.BACKWARDS)
@pytest.mark.parametrize("family", likelihoods.NAMES)
def test_graphed_steps_train_the_same_model_as_eager_steps(family, backward):
    results = {graph: train.train(_cfg(family, f"train.backward={backward}", f"train.cuda_graph={graph}"))
               for graph in (True, False)}
    graphed, eager = results[True], results[False]
    assert graphed.status == eager.status == states.COMPLETE
    for (name, p), q in zip(graphed.model.named_parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(graphed.history, eager.history, strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-4)


@pytest.mark.parametrize("family", likelihoods.NAMES)
def test_manual_gradient_equals_autograd_on_the_gpu(family):
    torch.manual_seed(0)
    model = VAE(12, [7, 5], 3, likelihoods.get(family, scale=0.5)).double().cuda()
    reference = copy.deepcopy(model)
    x = torch.rand(6, 12, dtype=torch.float64, device="cuda")
    support = likelihoods.FAMILIES[family].support
    x = x.round() if support == likelihoods.BINARY else (x * 255).round() / 255 if support == likelihoods.EIGHT_BIT else x
    torch.manual_seed(1)
    (-elbo_terms(reference, x, 3).objective(0.7).mean()).backward()
    torch.manual_seed(1)
    ManualGradient(model).grad(x, 3, 0.7)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def _assert_no_sync(monkeypatch, epoch) -> None:
    """Runs `epoch()` once (warm-up and capture), then again with any host synchronisation an error,
    up to the epoch's one read-back."""
    epoch()
    real_total = train._StepTimer.total

    def total(timer):  # the epoch's read-back starts here: synchronising is expected from now on
        torch.cuda.set_sync_debug_mode(0)
        return real_total(timer)

    monkeypatch.setattr(train._StepTimer, "total", total)
    torch.cuda.set_sync_debug_mode("error")
    try:
        epoch()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# a closed-form score on dynamically binarized pixels, one on dequantized pixels, autograd's likelihood
# gradient with a shared learned scale, and a pmf of 8-bit pixels
NO_SYNC_FAMILIES = ["bernoulli", "continuous_bernoulli", "gaussian_shared", "discretized_logistic"]


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("family", NO_SYNC_FAMILIES)
def test_an_epoch_never_waits_for_the_gpu(monkeypatch, family, graph):
    """Every step of an epoch is queued without a host synchronisation; the one read-back comes after
    the last step. (Capturing the graph synchronises once, in a run's first epoch.)"""
    cfg = _cfg(family, f"train.cuda_graph={graph}")
    data = train.data_mod.load(cfg.data, "cuda")
    model = train.build(cfg, data.dim).cuda()
    step = train.make_step(model, cfg)
    transform = data.transform(model.likelihood.family, train=True)
    _assert_no_sync(monkeypatch, lambda: train.train_epoch(model, step, data.train, transform, cfg))


@pytest.mark.parametrize("graph", [True, False])
def test_a_stacked_epoch_never_waits_for_the_gpu(monkeypatch, graph):
    base = _cfg("bernoulli", f"train.cuda_graph={graph}")
    cfgs = [config.apply(base, {"train.seed": s, "train.lr": lr}) for s, lr in [(0, 1e-3), (1, 3e-3)]]
    data = train.data_mod.load(base.data, "cuda")
    model = build_stacked(cfgs, data).cuda()
    step = make_stacked_step(model, cfgs)
    transform = data.transform(model.likelihood.family, train=True)
    _assert_no_sync(monkeypatch, lambda: train_epoch_stacked(model, step, data.train, transform, cfgs))


def test_stacked_graphed_steps_train_the_same_variants_as_eager_steps():
    results = {}
    for graph in (True, False):
        base = _cfg("bernoulli", f"train.cuda_graph={graph}")
        cfgs = [config.apply(base, {"train.seed": s, "train.beta": b, "train.lr": lr})
                for s, b, lr in [(0, 1.0, 1e-3), (1, 0.5, 3e-3), (2, 2.0, 1e-4)]]
        torch.manual_seed(0)
        results[graph] = train_stacked(cfgs)
    for graphed, eager in zip(results[True], results[False], strict=True):
        for p, q in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_the_runner_trains_on_the_gpu_and_logs_its_step_rate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*shrink_args(tmp_path), "study=smoke", "train.device=cuda", "train.epochs=2"]
    assert run.main(args) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["smoke"])
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(children) == 4 and (children["status"] == "FINISHED").all()
    assert (children["tags.device"] == "cuda").all()
    client = MlflowClient()
    for run_id in children["run_id"]:
        assert [m.step for m in client.get_metric_history(run_id, "samples_per_s")] == [1, 2]
