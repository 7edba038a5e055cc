"""Datasets as uint8 tensors resident on the training device, and the data protocols.

Pixels are stored once as 8-bit values k ∈ {0..255} (or {0, 1} after a static binarization), shape
(N, D). A batch becomes model input through `Data.transform`, which applies the protocol on the
device: a fresh Bernoulli draw (dynamic binarization), uniform dequantization y = (k + u)/256 for
densities, or k/255 for the 8-bit pmf. No per-item PIL conversion happens anywhere.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench import config
from bench.config import ConfigError, DataConfig
from models.likelihoods import LEVELS, Family, Likelihood, Measure

MNIST_TEST_FILES = ("t10k-images-idx3-ubyte",)
TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DataError(ConfigError):
    """Data that cannot be had: names the files expected and the offline alternatives."""


@dataclass
class Data:
    train: Tensor  # (N, D) uint8: 0..255, or {0, 1} under a static binarization
    val: Tensor  # (N, D) uint8: 0..255, or {0, 1} (one fixed draw) under any binarization
    test: Tensor
    image_shape: tuple[int, int]
    cfg: DataConfig
    source: str  # provenance: what was read, and the split

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    @property
    def binarized(self) -> bool:
        return config.binarized(self.cfg)

    @property
    def protocol(self) -> str:
        if self.binarized:
            return f"binarized-{self.cfg.binarize}"
        return "8bit-dequantized" if self.cfg.dequantize else "8bit-raw"

    @property
    def quantum(self) -> float:
        """The gap between pixel values the model sees."""
        return 1.0 if self.binarized else 1.0 / LEVELS

    def dequantized_for(self, family: Family) -> bool:
        return config.reads_dequantize(self.cfg, family) and self.cfg.dequantize

    def measure(self, lik: Likelihood) -> Measure:
        """What lik's log p(x|z) on this data is a measure of."""
        return config.measure_of(self.cfg, lik)

    def transform(self, family: Family, train: bool) -> Callable[[Tensor], Tensor]:
        """uint8 batch (B, D) -> model input (B, D) float, on the batch's device."""
        if self.binarized:
            if train and self.cfg.binarize == "dynamic":
                return lambda k: torch.bernoulli(k.float() / (LEVELS - 1))
            return lambda k: k.float()
        if self.dequantized_for(family):
            return _dequantize
        return lambda k: k.float() / (LEVELS - 1)


def _dequantize(k: Tensor) -> Tensor:
    """y = (k + u)/LEVELS, u ~ U[0, 1), kept inside bin k: in float32, k + u rounds up to k + 1 when u is
    within 2^-16 of 1 (about once in 65,000 pixels), which would put y in the next bin (y = 1 at k = 255)."""
    k = k.float()
    y = (k + torch.rand(k.shape, device=k.device)) / LEVELS
    top = (k + 1) / LEVELS
    return torch.minimum(y, torch.nextafter(top, torch.zeros_like(top)))


def read_idx(path: Path) -> Tensor:
    """An IDX file (MNIST's format), gzipped or not, as a uint8 tensor."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
        n_dims = raw[3]
        dims = struct.unpack(f">{n_dims}I", raw[4 : 4 + 4 * n_dims])
        if raw[:3] != b"\x00\x00\x08" or len(raw) != 4 + 4 * n_dims + math.prod(dims):
            raise ValueError("no IDX header of unsigned bytes matching the file's length")
    except (OSError, EOFError, IndexError, struct.error, ValueError) as e:  # gzip's errors are OSErrors
        raise DataError(f"{path} is not a readable IDX file of MNIST's format ({e}); replace it with the "
                        "original file, or remove it to download it again") from None
    return torch.frombuffer(bytearray(raw[4 + 4 * n_dims :]), dtype=torch.uint8).view(*dims)


OFFLINE_HINT = ("offline alternatives: data.name=digits (scikit-learn's bundled 8x8 digits), or "
                f"data.name=mnist_t10k with data.root pointing at a folder that holds MNIST/raw/"
                f"{MNIST_TEST_FILES[0]}[.gz] (MNIST's official 10k test images)")


def _remove_empty_folders(folder: Path, top: Path | None) -> None:
    """Removes `folder` and its parents up to `top` (the highest one this command created) while they are
    empty: never a file, which another process downloading to the same root may be writing."""
    if top is None:
        return
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()
        except OSError:  # not empty, or gone
            return
        if path == top:
            return


def _one_line(message: str, limit: int = 300) -> str:
    """A multi-line message on one line, cut at a word and marked so when longer than `limit`."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _torchvision(cfg: DataConfig) -> tuple[Tensor, Tensor, str]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[cfg.name])
    folder = Path(cfg.root) / TORCHVISION[cfg.name] / "raw"
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)  # by torchvision
    try:
        train = cls(cfg.root, train=True, download=cfg.download).data
        test = cls(cfg.root, train=False, download=cfg.download).data
    except Exception as e:  # noqa: BLE001  torchvision raises RuntimeError when missing, URLError/OSError offline
        _remove_empty_folders(folder, created)  # a failed command writes nothing, not even their folders
        files = ", ".join(cls.resources[i][0].rsplit("/", 1)[-1] for i in range(len(cls.resources)))
        how = "download failed" if cfg.download else "files missing and data.download=false"
        raise DataError(f"data.name={cfg.name}: {how} ({type(e).__name__}: {_one_line(str(e))}); expected "
                        f"{files} in {folder}; {OFFLINE_HINT}") from None
    return train.flatten(1), test.flatten(1), f"torchvision {TORCHVISION[cfg.name]} from {cfg.root}"


def _mnist_t10k(cfg: DataConfig) -> tuple[Tensor, Tensor, str]:
    raw = Path(cfg.root) / "MNIST" / "raw"
    for name in (MNIST_TEST_FILES[0], MNIST_TEST_FILES[0] + ".gz"):
        if (raw / name).is_file():
            images = read_idx(raw / name).flatten(1)
            break
    else:
        raise DataError(f"data.name=mnist_t10k: expected {raw / MNIST_TEST_FILES[0]}[.gz] "
                        "(MNIST's official test images); set data.root to the folder above MNIST/; "
                        f"{OFFLINE_HINT}")
    # Drawn at random, not the first 2,000: the file's first 5,000 come from NIST's cleaner writers
    train, test = _fixed_test_split(images, len(images) // 5)
    return train, test, (
        f"MNIST official test split only ({len(images)} images from {raw}): "
        f"{len(test)} fixed random images as test, the rest as train and validation")


def _digits(cfg: DataConfig) -> tuple[Tensor, Tensor, str]:
    from sklearn.datasets import load_digits

    values = torch.from_numpy(load_digits().images).flatten(1)  # (1797, 64), values 0..16
    pixels = (values * (LEVELS - 1) / 16).round().to(torch.uint8)
    train, test = _fixed_test_split(pixels, len(pixels) // 6)
    return train, test, (
        f"scikit-learn digits (1797 8x8 images, 0..16 rescaled to 0..255): {len(test)} fixed test images")


def _fixed_test_split(images: Tensor, n_test: int) -> tuple[Tensor, Tensor]:
    """images (N, D) -> the rest and n_test test images, drawn at random but the same in every run (the
    seed is not data.seed, which varies the train/validation split only)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
    return images[order[n_test:]], images[order[:n_test]]


SOURCES = {"mnist": _torchvision, "fashion_mnist": _torchvision, "mnist_t10k": _mnist_t10k, "digits": _digits}


def load(cfg: DataConfig, device: torch.device | str = "cpu") -> Data:
    """Read, split, binarize and move to `device`. The test split is kept for final numbers only."""
    train_full, test, source = SOURCES[cfg.name](cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_full), generator=gen)
    n_val = min(cfg.n_val, len(train_full) // 5)  # small datasets keep most data for training
    val, train = train_full[order[:n_val]], train_full[order[n_val:]]
    if cfg.binarize == "threshold":
        train, val, test = ((x > (LEVELS - 1) // 2).to(torch.uint8) for x in (train, val, test))
    elif cfg.binarize in ("static", "dynamic"):
        # One fixed draw for the evaluation splits (and for training when static), each from a stream of
        # its own and before data.limit: the test images' draw does not depend on the validation split's
        # size, and a limited test split is the first images of the whole one.
        def draw(x: Tensor, stream: int) -> Tensor:
            split_gen = torch.Generator().manual_seed(4 * cfg.seed + stream)
            return torch.bernoulli(x.float() / (LEVELS - 1), generator=split_gen).to(torch.uint8)

        val, test = draw(val, 1), draw(test, 2)
        if cfg.binarize == "static":
            train = draw(train, 3)
    if cfg.limit:
        train, val, test = train[: cfg.limit], val[: cfg.limit], test[: cfg.limit]
    side = round(train.shape[1] ** 0.5)
    split = f"{len(train)} train / {len(val)} validation / {len(test)} test" + (
        f" (the first {cfg.limit} of each split: data.limit)" if cfg.limit else "")
    return Data(train.to(device), val.to(device), test.to(device), (side, side), cfg, f"{source}; {split}")


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """A fresh random permutation of x (N, D), cut into batches (B, D) on x's device."""
    # One gather for the epoch, then views: a gather per batch cost 50 µs of a 4 ms CPU step.
    # index_select: 5x faster than x[idx].
    yield from x.index_select(0, torch.randperm(len(x), device=x.device)).split(batch_size)
