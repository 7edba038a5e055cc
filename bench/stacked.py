"""Train N variants that differ only in train.seed, train.beta and train.lr at once (models/stacked.py).

Each variant starts from the initialisation `train(cfg)` would draw (its seed), sees its own shuffle
of the training set, its own β in the objective and its own lr (`StackedAdam`).
One random stream serves all variants, so results agree with N separate `train` runs in
distribution, not bit for bit. Validation, divergence checks and everything after training use the
single-variant functions on `StackedVAE.variants[i]`, an ordinary `VAE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from bench import data as data_mod
from bench.config import Config, ConfigError, flatten, to_dict
from bench.data import Data
from bench.train import (
    DIVERGED,
    TrainResult,
    _StepTimer,
    optimizer_step,
    build,
    divergence,
    evaluate,
    peak_memory_mb,
    resolve_device,
)
from models.stacked import StackedAdam, StackedVAE, stacked_elbo_terms

VARYING = ("train.seed", "train.beta", "train.lr")  # what may differ between stacked variants
_IGNORED = ("study.", "tracking.", "report_dir", "train.device")  # where results go, not what they are


def check_stackable(cfgs: list[Config]) -> None:
    """Raises ConfigError naming the first key, other than VARYING, on which the configs differ."""
    flat = [{k: v for k, v in flatten(to_dict(c)).items() if k not in VARYING and not k.startswith(_IGNORED)}
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
        variants.append(build(cfg, data))
    return StackedVAE(variants)


def stacked_optimizer(model: StackedVAE, cfgs: list[Config]) -> StackedAdam:
    device = next(model.parameters()).device
    return StackedAdam(model.parameters(), lr=torch.tensor([c.train.lr for c in cfgs], device=device))


def train_epoch_stacked(model: StackedVAE, opt: torch.optim.Optimizer, x_train: Tensor,
                        transform: Callable[[Tensor], Tensor], betas: Tensor, cfg: Config) -> list[dict[str, float]]:
    """One epoch of every variant; `train_epoch`'s metrics for each. x_train (n, D) uint8, betas (N, 1).

    samples_per_s is each variant's own rate (all N advance together); ms_per_step is the stacked step."""
    t, device, n_var = cfg.train, x_train.device, len(model)
    sums = torch.zeros(n_var, 2, device=device)  # Σ recon, Σ kl per variant
    top_log_p = torch.full((n_var,), -math.inf, device=device)
    low_scale = torch.full((n_var,), math.inf, device=device)
    order = torch.rand(n_var, len(x_train), device=device).argsort(dim=1)  # (N, n): a shuffle per variant
    timer = _StepTimer(device)
    model.train()
    for idx in order.split(t.batch_size, dim=1):  # (N, B)
        x = transform(x_train[idx])  # (N, B, D)
        timer.start()
        terms = stacked_elbo_terms(model, x, t.n_samples)
        objective = terms.objective(betas)  # (N, B)
        # the sum keeps each variant's gradient that of its own mean loss
        optimizer_step(opt, -objective.mean(1).sum())
        timer.stop()
        with torch.no_grad():
            sums += torch.stack([terms.recon.sum(1), terms.kl.sum(1)], dim=1)
            torch.maximum(top_log_p, terms.recon.amax(1), out=top_log_p)
            if terms.smallest_scale is not None:
                torch.minimum(low_scale, terms.smallest_scale, out=low_scale)
    seconds, n = timer.total(), len(x_train)
    rows = torch.cat([sums, top_log_p[:, None], low_scale[:, None], betas.reshape(-1, 1)], 1).tolist()
    return [{
        "train_elbo": (recon - kl) / n, "train_recon": recon / n, "train_kl": kl / n,
        "train_objective": (recon - beta * kl) / n, "samples_per_s": n / seconds,
        "ms_per_step": 1000 * seconds / timer.steps, "max_log_p_per_pixel": top / model.data_dim,
        "min_scale": low,
    } for recon, kl, top, low, beta in rows]


def train_stacked(cfgs: list[Config], data: Data | None = None) -> list[TrainResult]:
    """Trains the N variants `cfgs` together; one TrainResult each, as `train` returns. A variant that
    diverges keeps its history up to that epoch and the others train on: its slice of every batched
    matmul and of every Adam update is its own, so its NaNs reach no other variant."""
    check_stackable(cfgs)
    cfg = cfgs[0]
    device = resolve_device(cfg.train.device)
    data = data if data is not None else data_mod.load(cfg.data, device)
    model = build_stacked(cfgs, data).to(device)
    lik = model.likelihood
    measure = lik.measure(data.binarized, data.dequantized_for(lik.family))
    offset = measure.nats_offset_per_pixel * data.dim
    opt = stacked_optimizer(model, cfgs)
    betas = torch.tensor([[c.train.beta] for c in cfgs], device=device)  # (N, 1)
    train_tf, eval_tf = data.transform(lik.family, train=True), data.transform(lik.family, train=False)
    results = [TrainResult(v, data, measure) for v in model.variants]
    for epoch in range(1, cfg.train.epochs + 1):
        epoch_metrics = train_epoch_stacked(model, opt, data.train, train_tf, betas, cfg)
        for result, c, metrics in zip(results, cfgs, epoch_metrics):
            if result.status == DIVERGED:
                continue
            val = evaluate(result.model, data.val, eval_tf, seed=c.data.seed)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            for key in ("train_elbo", "train_recon", "val_elbo", "val_recon"):
                metrics[key] += offset
            metrics["peak_memory_mb"] = peak_memory_mb(device)
            metrics["epoch"] = epoch
            result.history.append(metrics)
            result.reason = divergence(metrics, lik, c, data.quantum)
            if result.reason:
                result.status = DIVERGED
        if all(r.status == DIVERGED for r in results):
            break
    return results
