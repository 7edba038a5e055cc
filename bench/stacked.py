"""Train N variants that differ only in train.seed, train.beta and train.lr at once (models/stacked.py).

Each variant starts from the initialisation `train(cfg)` would draw (its seed), sees its own shuffle
of the training set, its own β in the objective and its own lr (`StackedAdam`).
One random stream serves all variants, so results agree with N separate `train` runs in
distribution, not bit for bit. Validation, divergence checks and everything after training use the
single-variant functions on `StackedVAE.variants[i]`, an ordinary `VAE`. The gradient is autograd's
through the batched matrix products (train.backward and train.compile, settings of the single-variant
step, are not read).
The study runner trains variants one at a time; this path is for several variants on one GPU, benchmarked
by tests/benchmarks (test_stacked_step).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from bench import data as data_mod
from bench import states
from bench.config import NOT_VARIED, Config, ConfigError, flatten, to_dict, validate_run
from bench.data import Data
from bench.train import (
    CudaGraphStep,
    TrainResult,
    build,
    epoch_metrics,
    flush_subnormals,
    optimizer_step,
    record_epoch,
    reset_peak_memory,
    resolve_device,
    run_steps,
)
from models.estimators import ElboTerms
from models.stacked import StackedAdam, StackedVAE, stacked_elbo_terms

VARYING = ("train.seed", "train.beta", "train.lr")  # what may differ between stacked variants


def check_stackable(cfgs: list[Config]) -> None:
    """Raises ConfigError naming the first key, other than VARYING, on which the configs differ."""
    flat = [{k: v for k, v in flatten(to_dict(c)).items() if k not in VARYING and not k.startswith(NOT_VARIED)}
            for c in cfgs]
    for other in flat[1:]:
        for key, value in flat[0].items():
            if other[key] != value:
                raise ConfigError(f"{key}: stacked variants may differ only in {', '.join(VARYING)}, "
                                  f"but it is {value!r} in the first and {other[key]!r} in another")


def build_stacked(cfgs: list[Config], data: Data) -> StackedVAE:
    variants = []
    for cfg in cfgs:
        torch.manual_seed(cfg.train.seed)  # the initialisation train(cfg) would draw
        variants.append(build(cfg, data.dim))
    return StackedVAE(variants)


def stacked_optimizer(model: StackedVAE, cfgs: list[Config]) -> StackedAdam:
    device = next(model.parameters()).device
    return StackedAdam(model.parameters(), lr=torch.tensor([c.train.lr for c in cfgs], device=device))


def make_stacked_step(model: StackedVAE, cfgs: list[Config]) -> Callable[[Tensor], ElboTerms]:
    """A step function x (N, B, D) -> every variant's ELBO terms (N, B), after one Adam step of each on
    its own β-objective with its own lr; replayed as a CUDA graph on a GPU (train.cuda_graph)."""
    t = cfgs[0].train
    device = next(model.parameters()).device
    flush_subnormals(device)
    opt = stacked_optimizer(model, cfgs)
    betas = torch.tensor([[c.train.beta] for c in cfgs], device=device)  # (N, 1)

    def step(x: Tensor) -> ElboTerms:
        terms = stacked_elbo_terms(model, x, t.n_samples)
        # the sum keeps each variant's gradient that of its own mean loss
        optimizer_step(opt, -terms.objective(betas).mean(1).sum())
        return terms
    return CudaGraphStep(step) if device.type == "cuda" and t.cuda_graph else step


def train_epoch_stacked(model: StackedVAE, step: Callable[[Tensor], ElboTerms], x_train: Tensor,
                        transform: Callable[[Tensor], Tensor], cfgs: list[Config]) -> list[dict[str, float]]:
    """One epoch of every variant, each in its own shuffle of x_train (n, D) uint8; `train_epoch`'s
    metrics for each. samples_per_s is each variant's own rate (all N advance together); ms_per_step is
    the stacked step."""
    n = len(x_train)
    order = torch.rand(len(model), n, device=x_train.device).argsort(dim=1)  # (N, n): a shuffle per variant
    batches = (x_train[idx] for idx in order.split(cfgs[0].train.batch_size, dim=1))  # (N, B, D) each
    model.train()
    rows, times = run_steps(step, batches, transform)
    return [epoch_metrics(sums, c.train.beta, n, times, model.data_dim) for sums, c in zip(rows, cfgs)]


def train_stacked(cfgs: list[Config], data: Data | None = None) -> list[TrainResult]:
    """Trains the N variants `cfgs` together; one TrainResult each, as `train` returns. A variant that
    diverges keeps its history up to that epoch and, like `train`'s, its model as it was then (a copy: its
    slice of the stack trains on with the others). Every batched matmul and Adam update of a variant is
    its own slice, so its NaNs reach no other variant."""
    for cfg in cfgs:  # configs built or changed in code have not been through config.load
        validate_run(cfg)
    check_stackable(cfgs)
    cfg = cfgs[0]
    device = resolve_device(cfg.train.device)
    data = data if data is not None else data_mod.load(cfg.data, device)
    model = build_stacked(cfgs, data).to(device)
    family = model.likelihood.family
    step = make_stacked_step(model, cfgs)
    train_tf, eval_tf = data.transform(family, train=True), data.transform(family, train=False)
    measure = data.measure(model.likelihood)
    results = [TrainResult(v, data, measure) for v in model.variants]
    reset_peak_memory(device)
    for epoch in range(1, cfg.train.epochs + 1):
        per_variant = train_epoch_stacked(model, step, data.train, train_tf, cfgs)
        for result, c, metrics in zip(results, cfgs, per_variant):
            if result.status == states.DIVERGED:
                continue
            record_epoch(result, metrics, epoch, c, eval_tf, device)
            if result.status == states.DIVERGED:
                result.model = copy.deepcopy(result.model)  # its own tensors, no longer views of the stack
        if all(r.status == states.DIVERGED for r in results):
            break
    return results
