"""The seed figures: reconstruction grid, samples grid, 2-d latent manifold, ELBO curve."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import save_image

from bench.train import TrainResult


def _images(flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return flat.reshape(-1, 1, *shape).cpu()  # (N, 1, H, W) for torchvision


@torch.no_grad()
def reconstruction_grid(result: TrainResult, path: Path, n: int = 8) -> Path:
    """Test inputs (top row) above their reconstructions, the decoder mean at z = E_q[z]."""
    model, data = result.model, result.data
    x = data.transform(model.likelihood.family, train=False)(data.test[:n])  # (n, D)
    recon = model.mean_image(model.encode(x)[0])
    save_image(_images(torch.cat([x.clamp(0, 1), recon]), data.image_shape), path, nrow=n, padding=1)
    return path


@torch.no_grad()
def samples_grid(result: TrainResult, path: Path, n: int = 64) -> Path:
    """Decoder means at z ~ N(0, I)."""
    model = result.model
    z = torch.randn(n, model.latent_dim, device=result.data.test.device)
    save_image(_images(model.mean_image(z), result.data.image_shape), path, nrow=8, padding=1)
    return path


@torch.no_grad()
def manifold_grid(result: TrainResult, path: Path, n: int = 20) -> Path | None:
    """Decoder means on an n x n grid of z at Gaussian quantiles (Kingma & Welling 2014, fig. 4);
    only for a 2-d latent space."""
    model = result.model
    if model.latent_dim != 2:
        return None
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z = torch.cartesian_prod(q, q).to(result.data.test.device)  # (n², 2)
    save_image(_images(model.mean_image(z), result.data.image_shape), path, nrow=n, padding=0)
    return path


def elbo_curve(result: TrainResult, path: Path) -> Path:
    epochs = [m["epoch"] for m in result.history]
    fig = Figure(figsize=(5, 3.2))  # not pyplot, whose backend a notebook's import would change
    ax = fig.subplots()
    ax.plot(epochs, [m["train_elbo"] for m in result.history], "o-", label="train")
    ax.plot(epochs, [m["val_elbo"] for m in result.history], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel="ELBO (nats per image)",
           title=f"{result.model.likelihood.name}: {result.measure.name}")
    ax.title.set_fontsize(8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no tick at 1.5
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_all(result: TrainResult, folder: Path) -> list[Path]:
    """Every figure of a run, as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [reconstruction_grid(result, folder / "reconstructions.png"),
             samples_grid(result, folder / "samples.png"),
             manifold_grid(result, folder / "manifold.png"),
             elbo_curve(result, folder / "elbo_curve.png")]
    return [p for p in paths if p is not None]
