"""Data loading and the data protocols: offline datasets, binarizations, dequantization, and the
errors that say what to do when data is missing."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import config
from bench import data as data_mod
from bench.config import ConfigError
from bench.data import DataError
from models import likelihoods
from models.likelihoods import EIGHT_BIT, FAMILIES, LEVELS

from .conftest import SHARED_MNIST_RAW
from .helpers import free_port

GAUSSIAN, BERNOULLI, DISCRETIZED = FAMILIES["gaussian"], FAMILIES["bernoulli"], FAMILIES["discretized_logistic"]


def load(*overrides: str, likelihood: str = "gaussian") -> data_mod.Data:
    cfg = config.load([f"likelihood.name={likelihood}", *overrides])
    return data_mod.load(cfg.data)


def digits(binarize: str = "none", *extra: str) -> data_mod.Data:
    likelihood = "gaussian" if binarize == "none" else "bernoulli"
    return load("data.name=digits", f"data.binarize={binarize}", *extra, likelihood=likelihood)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.numpy()}


# ---------------------------------------------------------------------------------------------------
# scikit-learn digits: the offline dataset
# ---------------------------------------------------------------------------------------------------

def test_every_dataset_the_config_accepts_has_a_loader():
    # a name valid in the config but missing here would pass validation and fail later with a KeyError
    assert set(config.DATASETS) == set(data_mod.SOURCES)


def test_digits_loads_offline_as_uint8_splits():
    d = digits()
    assert d.train.dtype == d.val.dtype == d.test.dtype == torch.uint8
    assert d.image_shape == (8, 8) and d.dim == 64
    # 1797 images: a sixth is the fixed test split, a fifth of the rest validation
    assert (len(d.train), len(d.val), len(d.test)) == (1199, 299, 299)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    every = torch.cat([d.train, d.val, d.test])
    assert every.min().item() == 0 and every.max().item() == 255
    # digits holds a few duplicate images, so the splits are disjoint by index, nearly so by content
    train, val, test = _rows(d.train), _rows(d.val), _rows(d.test)
    assert len(test & train) <= 3 and len(val & train) <= 3 and len(val & test) <= 3


def test_loading_is_deterministic_given_the_seed():
    a, b = digits(), digits()
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and torch.equal(a.test, b.test)
    other = digits("none", "data.seed=1")
    assert torch.equal(a.test, other.test)  # the test split is fixed; the seed picks validation
    assert not torch.equal(a.val, other.val)


def test_limit_caps_every_split():
    d = digits("none", "data.limit=40")
    assert (len(d.train), len(d.val), len(d.test)) == (40, 40, 40)
    assert d.source.endswith("299 fixed test images; 40 train / 40 validation / 40 test (the first 40 of each "
                             "split: data.limit)")  # logged as data_source: not 299 test images unexplained


@pytest.mark.parametrize("binarize", ["threshold", "static", "dynamic"])
def test_binarized_evaluation_splits_are_zero_or_one(binarize):
    d = digits(binarize)
    for split in (d.val, d.test):
        assert set(split.unique().tolist()) == {0, 1}
    assert d.binarized and d.quantum == 1.0
    # evaluation sees one fixed draw: the eval transform is deterministic
    tf = d.transform(BERNOULLI, train=False)
    assert torch.equal(tf(d.test), tf(d.test))
    assert set(tf(d.test).unique().tolist()) == {0.0, 1.0}


def test_threshold_binarization_cuts_at_half():
    raw, thr = digits(), digits("threshold")
    for a, b in ((raw.train, thr.train), (raw.val, thr.val), (raw.test, thr.test)):
        assert torch.equal(b, (a > 127).to(torch.uint8))


def test_static_binarization_is_one_bernoulli_draw_of_the_intensities():
    raw, static = digits(), digits("static")
    assert set(static.train.unique().tolist()) == {0, 1}
    # pixels at 0 stay 0 and pixels at 255 stay 1; in between P(1) = k/255
    assert torch.all(static.train[raw.train == 0] == 0) and torch.all(static.train[raw.train == 255] == 1)
    expected = raw.train.double().mean() / 255
    assert abs(static.train.double().mean() - expected) < 0.01
    tf = static.transform(BERNOULLI, train=True)
    assert torch.equal(tf(static.train), tf(static.train))  # static: training data fixed too


def test_dynamic_binarization_draws_afresh_at_every_call():
    d = digits("dynamic")
    assert d.train.max().item() == 255  # the training split keeps its intensities
    tf = d.transform(BERNOULLI, train=True)
    first, second = tf(d.train), tf(d.train)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    # only pixels strictly between 0 and 255 may change between draws
    changed = first != second
    assert torch.all((d.train[changed] > 0) & (d.train[changed] < 255))


def test_dequantized_density_input_lies_in_its_bin():
    d = digits()
    assert d.dequantized_for(GAUSSIAN) and not d.dequantized_for(DISCRETIZED)
    assert d.protocol == "8bit-dequantized" and d.quantum == 1 / LEVELS
    tf = d.transform(GAUSSIAN, train=True)
    # every level, and a million pixels at 255: in float32 k + u rounds up to k + 1 for u within
    # 2^-16 of 1, which would leave the bin (y = 1 at k = 255) without the clamp in the transform
    k = torch.cat([d.train.flatten(), torch.arange(LEVELS, dtype=torch.uint8).repeat(100),
                   torch.full((1_000_000,), 255, dtype=torch.uint8)])
    y = tf(k)
    assert y.dtype == torch.float32
    assert y.min().item() >= 0.0 and y.max().item() < 1.0
    assert torch.equal((y * LEVELS).floor(), k.float())
    # u ~ U(0, 1): the offset within the bin averages ½ bin
    assert abs(((y * LEVELS - k.float()).double().mean() - 0.5).item()) < 0.01
    assert not torch.equal(tf(d.test), tf(d.test))  # fresh noise at every call


def test_dequantization_at_the_top_of_u_stays_in_the_bin(monkeypatch):
    # u = 1 − 2^-24, the largest float32 below 1: k + u then rounds to k + 1 for every k ≥ 1, the
    # float32 artefact the transform must undo (y would leave bin k, and reach 1.0 at k = 255)
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.full_like(real_rand(*a, **kw), 1 - 2**-24))
    k = torch.arange(LEVELS, dtype=torch.uint8)
    y = digits().transform(GAUSSIAN, train=True)(k)
    assert y.max().item() < 1.0
    assert torch.equal((y * LEVELS).floor(), k.float())
    assert torch.all(y > (k.float() + 0.99) / LEVELS)  # at the top of the bin, not moved down a lot


def test_discretized_family_sees_k_over_255():
    d = digits()
    for train in (True, False):
        y = d.transform(DISCRETIZED, train=train)(d.test)
        assert torch.equal(y, d.test.float() / 255)
    assert y.min().item() == 0.0 and y.max().item() == 1.0  # the edge bins are hit exactly


def test_density_without_dequantization_sees_raw_values():
    d = digits("none", "data.dequantize=false")
    assert d.protocol == "8bit-raw" and not d.dequantized_for(GAUSSIAN)
    assert torch.equal(d.transform(GAUSSIAN, train=True)(d.test), d.test.float() / 255)


# ---------------------------------------------------------------------------------------------------
# MNIST from real files in torchvision's layout, offline
# ---------------------------------------------------------------------------------------------------

def _shared_gz(name: str) -> Path:
    path = SHARED_MNIST_RAW / f"{name}.gz"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the MNIST tests need MNIST's official t10k files "
                    f"(t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in {SHARED_MNIST_RAW}")
    return path


def _decode_images(gz: Path) -> np.ndarray:
    """The IDX image file decoded by hand: 16-byte header (magic, n, rows, cols), then n·28·28 bytes."""
    raw = gzip.decompress(gz.read_bytes())
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows * cols)


@pytest.fixture(scope="module")
def t10k_images() -> np.ndarray:
    return _decode_images(_shared_gz("t10k-images-idx3-ubyte"))


@pytest.fixture
def torchvision_root(tmp_path) -> Path:
    """root/MNIST/raw holding the four uncompressed files torchvision's MNIST(download=False) checks
    for; the train files are copies of the t10k ones (the full training set is not on this machine)."""
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        content = gzip.decompress(_shared_gz(f"t10k-{kind}").read_bytes())
        (raw / f"t10k-{kind}").write_bytes(content)
        (raw / f"train-{kind}").write_bytes(content)
    return tmp_path / "tv"


def test_mnist_loads_offline_through_torchvision(torchvision_root, t10k_images):
    d = load("data.name=mnist", "data.download=false", f"data.root={torchvision_root}", "data.limit=50",
             "data.binarize=none")
    assert d.dim == 784 and d.image_shape == (28, 28)
    assert d.train.shape == d.val.shape == d.test.shape == (50, 784)
    assert d.test.dtype == torch.uint8
    assert torch.equal(d.test, torch.from_numpy(t10k_images[:50].copy()))
    assert d.train.max().item() == 255 and d.train.min().item() == 0
    assert _rows(d.train) <= _rows(torch.from_numpy(t10k_images.copy()))  # drawn from the train file


def test_mnist_t10k_reads_the_gz_files_alone(tmp_path, t10k_images):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(_shared_gz("t10k-images-idx3-ubyte"), raw)
    d = load("data.name=mnist_t10k", f"data.root={tmp_path}", "data.binarize=none")
    # a fifth of the 10k images is the test split; the rest is train and validation
    assert (len(d.test), len(d.train) + len(d.val)) == (2000, 8000)
    assert _rows(d.test) <= _rows(torch.from_numpy(t10k_images.copy()))
    # disjoint by index; by content up to MNIST's rare duplicate images
    assert len((_rows(d.train) | _rows(d.val)) & _rows(d.test)) < 5
    # drawn from the whole file, not its first 2,000 (whose first half comes from NIST's cleaner writers):
    # ~1,000 from each half (4 binomial standard deviations: 89)
    from_first_half = len(_rows(d.test) & _rows(torch.from_numpy(t10k_images[:5000].copy())))
    assert abs(from_first_half - 1000) < 90
    # the same test images whatever data.seed, which draws the train/validation split
    other = load("data.name=mnist_t10k", f"data.root={tmp_path}", "data.binarize=none", "data.seed=7")
    assert torch.equal(other.test, d.test) and not torch.equal(other.val, d.val)
    assert "official test" in d.source


def test_mnist_and_mnist_t10k_decode_the_same_pixels(torchvision_root, t10k_images):
    # torchvision's reader and bench.data.read_idx agree on the same file (and with the hand decoder)
    shutil.copy(_shared_gz("t10k-images-idx3-ubyte"), torchvision_root / "MNIST" / "raw")
    tv = load("data.name=mnist", "data.download=false", f"data.root={torchvision_root}", "data.limit=30",
              "data.binarize=threshold", likelihood="bernoulli")
    own = load("data.name=mnist_t10k", f"data.root={torchvision_root}", "data.limit=30",
               "data.binarize=threshold", likelihood="bernoulli")
    hand = torch.from_numpy((t10k_images > 127).astype(np.uint8))
    assert torch.equal(tv.test, hand[:30])  # torchvision's test split is the file's order
    assert _rows(own.test) <= _rows(hand)  # ours is drawn from it


# ---------------------------------------------------------------------------------------------------
# Missing data: an error that says what was expected and what works offline
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_missing_torchvision_data_without_download_names_files_and_alternatives(tmp_path, name):
    with pytest.raises(DataError) as err:
        load(f"data.name={name}", "data.download=false", f"data.root={tmp_path}")
    msg = str(err.value)
    for expected in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "data.download=false",
                     "data.name=digits", "data.name=mnist_t10k", str(tmp_path)):
        assert expected in msg, f"{expected!r} not in {msg!r}"
    assert isinstance(err.value, ConfigError)  # the CLI turns it into exit code 2


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_a_failed_download_says_why_on_one_line_and_leaves_no_folder(tmp_path, monkeypatch, name):
    # Offline, as on a machine without internet: every mirror is a port where nothing listens.
    import torchvision.datasets as tvd

    monkeypatch.setattr(getattr(tvd, data_mod.TORCHVISION[name]), "mirrors", [f"http://127.0.0.1:{free_port()}/"])
    with pytest.raises(DataError) as err:
        load(f"data.name={name}", f"data.root={tmp_path / 'new' / 'root'}")  # download=true: the default
    msg = str(err.value)
    assert "download failed" in msg and "Connection refused" in msg and "data.name=digits" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # torchvision's new folders are gone again


def test_missing_t10k_files_name_the_file_and_the_alternative(tmp_path):
    with pytest.raises(DataError) as err:
        load("data.name=mnist_t10k", f"data.root={tmp_path}")
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert "data.name=digits" in msg


@pytest.mark.parametrize("binarize", ["static", "dynamic"])
def test_the_test_images_draw_is_the_same_whatever_the_validation_split_or_limit(binarize):
    whole = digits(binarize)
    assert torch.equal(digits(binarize, "data.n_val=100").test, whole.test)
    assert torch.equal(digits(binarize, "data.limit=50").test, whole.test[:50])
    if binarize == "static":  # the first training images, whatever the limit
        assert torch.equal(digits(binarize, "data.limit=50").train, whole.train[:50])




@pytest.mark.parametrize("binarize", config.BINARIZE)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_data_dequantize_is_unread_exactly_where_it_changes_neither_pixels_nor_measure(name, binarize):
    """The study checks take two grid points that differ only in a data.dequantize that
    `config.reads_dequantize` calls unread for one variant: the pixels and the measure must then be the same."""
    d = digits()
    lik = likelihoods.get(name)
    on, off = (config.DataConfig(binarize=binarize, dequantize=flag) for flag in (True, False))
    reads = config.reads_dequantize(on, lik.family)
    assert reads == (binarize == "none" and lik.family.support != EIGHT_BIT)
    if not reads:  # the registry's measure ignores dequantization there too
        binarized = binarize != "none"
        assert lik.measure(binarized, dequantized=True) == lik.measure(binarized, dequantized=False)
    if binarize == "none":  # the binarizations draw pixels at random: their input is compared in test_*_binarization
        k = d.val[:64]
        with_on, with_off = (data_mod.Data(d.train, d.val, d.test, d.image_shape, cfg, d.source) for cfg in (on, off))
        pixels = [data.transform(lik.family, train=False)(k) for data in (with_on, with_off)]
        assert torch.equal(*pixels) == (not reads)
        assert with_on.measure(lik) == config.measure_of(on, lik)
