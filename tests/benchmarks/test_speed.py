"""Speed of the training step (forward, backward, Adam) at batch 128, 784-400-20, on MNIST:

    .venv/bin/python -m pytest tests/benchmarks --benchmark-only --benchmark-json=reports/benchmarks/cpu.json

- floor: the step's matrix products alone at the same shapes: what an ideal step must do;
- classic: the loop of the VAE tutorials (pytorch/examples vae/main.py): a DataLoader over torchvision's
  MNIST with a per-item ToTensor (and rounding, for binary pixels), BCE with sum reduction, Adam;
  data loading included, since that is what it costs;
- ours: `bench.train.train_epoch` itself, over 20 batches a round, for every likelihood family and
  L ∈ {1, 5}: the permutation, the uint8 gather and data transform on the device, the step, the
  metric sums and the one read-back per epoch; each family other than the Bernoulli paired with the
  Bernoulli's step at the same L too, since families timed in tests minutes apart do not compare;
- ours_setting: our step with one setting away from its default, paired with the default step:
  train.backward=autograd (CPU, GPU), train.compile=true (CPU), train.cuda_graph=false (GPU);
- stacked: N variants trained at once (models/stacked.py), N = 1, 4, 16, and 64 on a GPU;
- parts (CPU, bernoulli, L = 1): two parts of our step timed alone at its shapes, Adam's update and
  log p(x|z) with its gradient, which with the floor say where the step's time goes; log σ of the
  decoder's logits, by our formula (models.likelihoods.log_sigmoid) and by torch's F.logsigmoid, whose
  speed depends on the CPU (the reason the formula exists); and a copy of our
  round with its parts timed where they run, inside the step (in_step); and what the machine charges
  for a cache line written on one thread's core, read on another's and written again (core_to_core),
  which our step does with every parameter, every step.

Each runs on the CPU, and on CUDA when there is a GPU, timed in rounds of 20 steps. The ratios are
taken from paired rounds: right before each round of ours, a test also times a round of the floor at
its shapes (and of the classic loop, for bernoulli with L = 1; of one ordinary variant, for the
stacked step), and a ratio is the median over rounds of the two rounds' ratio, so that both sides see
the same machine. A virtual or shared machine's speed drifts by tens of percent over seconds; rounds
minutes apart would compare two machines.

tests/benchmarks/conftest.py prints the summary (samples/s and ms/step from the median and the
fastest round, both ratios, the targets), adds it to the JSON under "vaebench" and renders
a Markdown section beside the JSON (cpu.json -> cpu.md). The normal test run skips all of this (--benchmark-skip in
pyproject's addopts).
"""

from __future__ import annotations

import gzip
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import config
from bench import data as data_mod
from bench.stacked import build_stacked, make_stacked_step, train_epoch_stacked
from bench.train import build, make_step, train_epoch
from models import likelihoods, manual_grad
from models.manual_grad import ManualGradient, log_px_and_grad
from tests.conftest import NEEDS_COMPILE

BATCH, DATA_DIM, HIDDEN, LATENT = 128, 784, 400, 20
STEPS = 20  # training steps per timed round
ROUNDS, WARMUP = 12, 2
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data from the repo root
RAW = SHARED_DATA / "MNIST" / "raw"

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]
Round = Callable[[], object]  # runs STEPS steps and returns once the device is done


def require_mnist() -> None:
    """Fails, as the test suite does, when the benchmarks' data is missing: a skip would leave a run with
    only the floor's rows, and its JSON and Markdown would replace the committed ones."""
    if not (RAW / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{RAW / 't10k-images-idx3-ubyte.gz'} is missing: the benchmarks read MNIST's official "
                    "t10k files from ../shared/data/MNIST/raw beside the clone")


class Paired:
    """Rounds of reference loops, run and timed between the benchmark's own rounds (as pytest-benchmark's
    `setup`, which is called before every round, the warm-up rounds included); then the probes, which
    keep their own figures and are not timed here."""

    def __init__(self, warmup: int, probes: Sequence[Round] = (), **rounds: Round):
        self.warmup, self.probes, self.rounds = warmup, probes, rounds
        self.ms = {name: [] for name in rounds}

    def __call__(self) -> None:
        for name, run in self.rounds.items():
            start = time.perf_counter()
            run()
            self.ms[name].append(1e3 * (time.perf_counter() - start) / STEPS)
        for probe in self.probes:
            probe()

    def info(self) -> dict[str, dict]:
        """ms/step of each reference over the timed rounds: each round's (the one run right before the
        benchmark's own round of the same index), the median and the best (the fastest round)."""
        timed = {name: ms[self.warmup:] for name, ms in self.ms.items()}
        return {name: {"rounds": ms, "median": statistics.median(ms), "best": min(ms)} for name, ms in timed.items()}


def _info(benchmark, **info) -> None:
    benchmark.extra_info.update({"batch": BATCH, "steps": STEPS, "variants": 1, **info})


# --- floor: the step's matrix products alone --------------------------------------------------------

def floor_round(n_params: int, n_samples: int, device: str) -> Round:
    """STEPS times the 11 matrix products of one step, at its shapes and layouts (weights (out, in) used
    through .t() as nn.Linear does), into preallocated outputs; on a GPU as one CUDA graph. R = L·B rows
    pass the decoder.

    forward:  x (B,D)·W1ᵀ -> (B,H);  h1 (B,H)·W2ᵀ -> (B,2Z);  z (R,Z)·W3ᵀ -> (R,H);  h3 (R,H)·W4ᵀ -> (R,PD)
    backward, per layer a grad-input g·W and a grad-weight gᵀ·input; the data needs no gradient:
      layer 4: (R,PD)·(PD,H), (PD,R)·(R,H);  layer 3: (R,H)·(H,Z), (H,R)·(R,Z)
      layer 2: (B,2Z)·(2Z,H), (2Z,B)·(B,H);  layer 1: (H,B)·(B,D) only
    """
    B, D, H, Z, R, PD = BATCH, DATA_DIM, HIDDEN, LATENT, n_samples * BATCH, n_params * DATA_DIM

    def r(*shape):  # random values, not zeros: zeros can run faster than real data
        return torch.randn(*shape, device=device)

    x, h1, z, h3 = r(B, D), r(B, H), r(R, Z), r(R, H)
    w1, w2, w3, w4 = r(H, D), r(2 * Z, H), r(H, Z), r(PD, H)
    g4, g3, g2, g1 = r(R, PD), r(R, H), r(B, 2 * Z), r(B, H)
    products = [(x, w1.t()), (h1, w2.t()), (z, w3.t()), (h3, w4.t()),
                (g4, w4), (g4.t(), h3), (g3, w3), (g3.t(), z), (g2, w2), (g2.t(), h1), (g1.t(), x)]
    outs = [torch.empty(a.shape[0], b.shape[1], device=device) for a, b in products]

    def steps() -> None:
        for _ in range(STEPS):
            for (a, b), out in zip(products, outs):
                torch.mm(a, b, out=out)

    if device == "cpu":
        return steps
    # On a GPU, one replay of all the products, as our step is one replay: the floor is then what the
    # products take the GPU, not what launching them one by one from Python takes the host.
    steps()  # cuBLAS sets up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps()

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    replay.buffers = (products, outs)  # the graph reads and writes these: they must live as long as it
    return replay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_samples", [1, 5])
@pytest.mark.parametrize("n_params", [1, 2])
def test_gemm_floor(benchmark, n_params, n_samples, device):
    _info(benchmark, kind="floor", device=device, n_samples=n_samples, n_params=n_params)
    benchmark.pedantic(floor_round(n_params, n_samples, device), rounds=ROUNDS, warmup_rounds=WARMUP)


# --- classic: the tutorial loop ---------------------------------------------------------------------

class TutorialVAE(nn.Module):
    """pytorch/examples vae/main.py, as published."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def tutorial_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())  # Kingma & Welling 2014, App. B
    return bce + kld


def round_pixels(x: Tensor) -> Tensor:
    """Binary pixels after ToTensor (a named function: DataLoader workers pickle the transform)."""
    return x.round()


@pytest.fixture(scope="session")
def torchvision_root(tmp_path_factory) -> Path:
    """A torchvision MNIST root built from the shared 10k test files (torchvision checks that the four
    uncompressed files exist; download=False). Its train files hold the 10k images six times over:
    60,000, as MNIST's training set, so that an epoch is the tutorial's 469 batches and a DataLoader
    worker (on a GPU) restarts as often as the tutorial's, not every 79 batches."""
    require_mnist()
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind, header in (("images-idx3", 16), ("labels-idx1", 8)):  # IDX: magic, count, [rows, cols]
        with gzip.open(RAW / f"t10k-{kind}-ubyte.gz") as src:
            test = src.read()
        (raw / f"t10k-{kind}-ubyte").write_bytes(test)
        count = int.from_bytes(test[4:8], "big")
        train = test[:4] + (6 * count).to_bytes(4, "big") + test[8:header] + 6 * test[header:]
        (raw / f"train-{kind}-ubyte").write_bytes(train)
    return root


def _forever(loader):
    """Batches across epochs, as the tutorial's epoch loop sees them (a new shuffle each epoch; its
    last batch of 96 is counted as a full one, in the classic loop's favour)."""
    while True:
        yield from loader


def classic_round(root: Path, device: str) -> Round:
    """STEPS steps of the tutorial's train() loop, data loading included."""
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    kwargs = {"num_workers": 1, "pin_memory": True} if device == "cuda" else {}  # as the tutorial
    dataset = datasets.MNIST(root, train=True, download=False,
                             transform=transforms.Compose([transforms.ToTensor(), round_pixels]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, **kwargs)
    model = TutorialVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = _forever(loader)

    def steps() -> float:
        model.train()
        train_loss = 0.0
        for _ in range(STEPS):
            data, _ = next(stream)
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = tutorial_loss(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        return train_loss

    return steps


@pytest.mark.parametrize("device", DEVICES)
def test_classic_loop(benchmark, torchvision_root, device):
    _info(benchmark, kind="classic", device=device, family="bernoulli", n_samples=1, n_params=1)
    benchmark.pedantic(classic_round(torchvision_root, device), rounds=ROUNDS, warmup_rounds=WARMUP)


# --- ours -----------------------------------------------------------------------------------------

def _config(family: str, n_samples: int, device: str) -> config.Config:
    # Binary families see thresholded pixels, as the classic loop's rounding gives; the others see
    # 8-bit pixels (dequantized for densities, k/255 for the 8-bit pmf).
    binary = likelihoods.FAMILIES[family].support == likelihoods.BINARY
    return config.load([
        "data.name=mnist_t10k", f"data.root={SHARED_DATA}", f"data.binarize={'threshold' if binary else 'none'}",
        f"likelihood.name={family}", f"model.hidden=[{HIDDEN}]", f"model.latent_dim={LATENT}",
        f"train.batch_size={BATCH}", f"train.n_samples={n_samples}", f"train.device={device}",
    ])


@pytest.fixture(scope="session")
def mnist():
    """(cfg, device) -> Data, each protocol read once (MNIST's 10k official test images)."""
    require_mnist()
    cache: dict[tuple[str, str], data_mod.Data] = {}

    def get(cfg: config.Config, device: str) -> data_mod.Data:
        key = (cfg.data.binarize, device)
        if key not in cache:
            cache[key] = data_mod.load(cfg.data, device)
        return cache[key]

    return get


def ours_round(cfg: config.Config, data: data_mod.Data) -> Round:
    """One `train_epoch` over STEPS batches: what a round of our loop costs."""
    torch.manual_seed(0)
    model = build(cfg, data.dim).to(cfg.train.device)
    step = make_step(model, cfg)
    transform = data.transform(model.likelihood.family, train=True)
    x = data.train[: STEPS * BATCH]  # (STEPS·B, D) uint8
    return lambda: train_epoch(model, step, x, transform, cfg)


def parts_rounds(cfg: config.Config, data: data_mod.Data) -> dict[str, Round]:
    """Two parts of our (manual) step, STEPS times each at its shapes: Adam's update of every parameter
    (ManualGradient's FlatAdam), and log p(x|z) with the loss's gradient at the decoder output
    (`log_px_and_grad`); and log σ of the decoder's (L·B, D) logits as the Bernoulli's log p(x|z) takes it
    (no grad: its gradient is the closed-form score), by `likelihoods.log_sigmoid` and by torch's
    F.logsigmoid. On a CPU only: on a GPU our step is one graph replay and these would be timed op by op,
    and log_sigmoid is F.logsigmoid there."""
    torch.manual_seed(0)
    model = build(cfg, data.dim).to(cfg.train.device)
    manual = ManualGradient(model, lr=cfg.train.lr)
    manual.flat_grad.normal_(0, 1e-3)
    x = data.transform(model.likelihood.family, train=True)(data.train[:BATCH])  # (B, D)
    raw = torch.randn(cfg.train.n_samples, BATCH, model.n_params, model.data_dim)  # (L, B, P, D)

    def adam() -> None:
        for _ in range(STEPS):
            manual.adam.step()

    def likelihood() -> None:
        for _ in range(STEPS):
            log_px_and_grad(model, raw, x, manual.grads)

    def log_sigmoid_by(fn: Callable[[Tensor], Tensor]) -> Round:
        logits = raw[..., 0, :].reshape(-1, model.data_dim)  # (L·B, D)

        def run() -> None:
            with torch.no_grad():
                for _ in range(STEPS):
                    fn(logits)
        return run

    return {"adam": adam, "likelihood": likelihood, "log_sigmoid": log_sigmoid_by(likelihoods.log_sigmoid),
            "torch_log_sigmoid": log_sigmoid_by(F.logsigmoid)}


IN_STEP_PARTS = {"mlp": (manual_grad, ("_forward", "_backward")),  # the 11 products, ReLUs and bias sums
                 "likelihood": (manual_grad, ("log_px_and_grad",)),
                 "adam": (manual_grad.FlatAdam, ("step",))}


def in_step_round(cfg: config.Config, data: data_mod.Data) -> Round:
    """A copy of our round (its own model) with three parts of its step timed where they run: the two
    MLPs' passes (manual_grad's `_forward` and `_backward`: the 11 products with their ReLUs and bias
    sums), log p(x|z) with its gradient (`log_px_and_grad`) and Adam's update (`FlatAdam.step`). Alone,
    a part runs on the caches it left itself; inside the step it follows the products. The round's
    `parts` keeps each round's ms/step of each part; the functions are wrapped during the round only
    (a few µs a step). On a CPU only: on a GPU the step is one graph replay."""
    run = ours_round(cfg, data)
    spent = dict.fromkeys(IN_STEP_PARTS, 0.0)  # seconds in each part, this round
    parts: dict[str, list[float]] = {part: [] for part in IN_STEP_PARTS}

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start
        return wrapper

    def timed_round() -> None:
        originals = [(owner, name, getattr(owner, name)) for owner, names in IN_STEP_PARTS.values() for name in names]
        for part, (owner, names) in IN_STEP_PARTS.items():
            for name in names:
                setattr(owner, name, timed(part, getattr(owner, name)))
        spent.update(dict.fromkeys(spent, 0.0))
        try:
            run()
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)
        for part, seconds in spent.items():
            parts[part].append(1e3 * seconds / STEPS)

    timed_round.parts = parts
    return timed_round


def core_to_core_round(n: int = 1 << 19, repeats: int = 40) -> Round:
    """What this machine charges for a cache line that one of torch's threads writes, another thread's
    core then reads, and the first writes again: what our step does with its parameters (the threads'
    matrix products read them, then Adam writes them, each thread its own chunk). A buffer of 3n/2
    floats, a = buf[:n] and b = buf[n/2:], and c, n floats never written. ATen's parallel_for gives each
    thread a contiguous chunk of an operation's range (a sum's too), so with two or more threads a read
    of b reads n/2 floats of a that other threads wrote, and a write of a (x *= 1) writes them back from
    their own threads; a read of c touches as much memory and no line of a. The round's `ns_per_line`
    keeps, round by round, the extra time per such line of (read b, write a) over (read c, write a): a
    throughput, many lines in flight."""
    buf, c = torch.ones(3 * n // 2), torch.ones(n)
    a, b = buf[:n], buf[n // 2:]
    lines_shared = n // 2 * buf.element_size() // 64  # per read of b; 64-byte lines

    def read_then_write(read: Tensor) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            read.sum()
            a.mul_(1.0)
        return time.perf_counter() - start

    def probe_round() -> None:
        a.mul_(1.0)  # a's lines back with their writers after the last round's reads of b
        own = read_then_write(c)
        shared = read_then_write(b)
        probe_round.ns_per_line.append(1e9 * (shared - own) / (repeats * lines_shared))

    probe_round.ns_per_line = []
    return probe_round


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_samples", [1, 5])
@pytest.mark.parametrize("family", likelihoods.NAMES)
def test_step(benchmark, mnist, torchvision_root, family, n_samples, device):
    cfg = _config(family, n_samples, device)
    n_params = likelihoods.FAMILIES[family].n_params
    references = {"floor": floor_round(n_params, n_samples, device)}
    if family != "bernoulli":  # what the family costs over the Bernoulli's step, in the same rounds
        bernoulli = _config("bernoulli", n_samples, device)
        references["bernoulli"] = ours_round(bernoulli, mnist(bernoulli, device))
    probe = None
    if family == "bernoulli" and n_samples == 1:  # the headline comparison
        references["classic"] = classic_round(torchvision_root, device)
        if device == "cpu":
            references.update(parts_rounds(cfg, mnist(cfg, device)), in_step=in_step_round(cfg, mnist(cfg, device)))
            if torch.get_num_threads() > 1:  # one thread moves no lines between cores
                probe = core_to_core_round()
    paired = Paired(WARMUP, probes=[probe] if probe else [], **references)
    _info(benchmark, kind="ours", device=device, family=family, n_samples=n_samples, n_params=n_params)
    metrics = benchmark.pedantic(ours_round(cfg, mnist(cfg, device)), setup=paired, rounds=ROUNDS,
                                 warmup_rounds=WARMUP)
    benchmark.extra_info["paired"] = paired.info()
    if "in_step" in references:  # each part's ms/step in the timed rounds of the in_step copy
        benchmark.extra_info["in_step_parts"] = {part: ms[WARMUP:] for part, ms in references["in_step"].parts.items()}
    if probe:
        benchmark.extra_info["core_to_core_ns_per_line"] = probe.ns_per_line[WARMUP:]
    assert not math.isnan(metrics["train_elbo"])


# --- what each default buys ---------------------------------------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SETTINGS = [("cpu", "train.backward", "autograd"), pytest.param("cpu", "train.compile", True, marks=NEEDS_COMPILE),
            pytest.param("cuda", "train.backward", "autograd", marks=CUDA),
            pytest.param("cuda", "train.cuda_graph", False, marks=CUDA)]


@pytest.mark.parametrize(("device", "key", "value"), SETTINGS)
def test_step_setting(benchmark, mnist, device, key, value):
    """Our step (bernoulli, L = 1) with one setting away from its default (autograd's backward instead of
    the written-out one; the gradient compiled; every op launched from Python instead of one CUDA graph),
    paired with the default step. A compiled step compiles in the warm-up rounds."""
    cfg = _config("bernoulli", 1, device)
    data = mnist(cfg, device)
    paired = Paired(WARMUP, default=ours_round(cfg, data))
    _info(benchmark, kind="ours_setting", device=device, family="bernoulli", n_samples=1, n_params=1,
          setting=f"{key}={str(value).lower()}")
    benchmark.pedantic(ours_round(config.apply(cfg, {key: value}), data), setup=paired, rounds=ROUNDS,
                       warmup_rounds=WARMUP)
    benchmark.extra_info["paired"] = paired.info()


# --- stacked: N variants at once --------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_variants", [1, 4, 16, 64])
def test_stacked_step(benchmark, mnist, n_variants, device):
    if device == "cpu" and n_variants > 16:
        pytest.skip("64 variants on a CPU: minutes a round, and a CPU has no idle units for them to fill")
    base = _config("bernoulli", 1, device)
    cfgs = [config.apply(base, {"train.seed": i, "train.lr": 1e-3 * (1 + i % 3), "train.beta": 1 + i % 2})
            for i in range(n_variants)]  # variants that differ in seed, lr and β
    data = mnist(base, device)
    model = build_stacked(cfgs, data).to(device)
    step = make_stacked_step(model, cfgs)
    transform = data.transform(model.likelihood.family, train=True)
    x = data.train[: STEPS * BATCH]
    paired = Paired(WARMUP, single=ours_round(base, data))  # one ordinary variant's step, between the rounds
    _info(benchmark, kind="stacked", device=device, family="bernoulli", n_samples=1, n_params=1,
          variants=n_variants)
    rounds = max(4, ROUNDS * 4 // n_variants) if device == "cpu" else ROUNDS  # bound the CPU time
    benchmark.pedantic(train_epoch_stacked, args=(model, step, x, transform, cfgs), setup=paired,
                       rounds=rounds, warmup_rounds=WARMUP)
    benchmark.extra_info["paired"] = paired.info()
