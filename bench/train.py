"""Training loop and evaluation for one variant: `train(cfg)` returns the model, per-epoch metrics
and how the run ended.

A step (`make_step`) is forward, backward and Adam, with the MLPs' backward written out
(models/manual_grad.py), and on a GPU replayed as one CUDA graph. Inside an epoch nothing is read back
to the host: each step's terms stay on the device and are reduced (sums, the largest image's log p per
pixel, the smallest learned scale) and read once per epoch, so a GPU is never stalled. samples/s is the
epoch's (wall clock, over everything it does); ms/step the step's alone (CUDA events on a GPU, a wall
clock on the CPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bench import config, states
from bench import data as data_mod
from bench.config import Config
from bench.data import Data
from bench.stopping import stops_deferred
from models import likelihoods
from models.estimators import ElboTerms, active_units, bits_per_dim, elbo_terms, gaussian_kl, iwae
from models.likelihoods import Likelihood, Measure
from models.manual_grad import ManualGradient
from models.vae import VAE

SUPREMUM_SLACK = 1e-4  # nats per pixel of float error allowed above a bounded family's supremum
# Per-epoch metrics that contain log p(x|z), and so carry the offset onto the run's measure
ON_MEASURE = ("train_elbo", "train_recon", "train_objective", "val_elbo", "val_recon")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    model: VAE
    data: Data
    measure: Measure
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch
    status: str = states.COMPLETE  # or states.DIVERGED
    reason: str = ""  # why a run diverged


def build(cfg: Config, data_dim: int) -> VAE:
    """The untrained model for images of data_dim pixels."""
    return VAE(data_dim, list(cfg.model.hidden), cfg.model.latent_dim, config.likelihood_of(cfg))


def make_optimizer(params, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """Adam with its fused kernel: one pass over all parameters instead of ~10 elementwise ops per
    tensor (0.7 → 0.23 ms per step of the 784-400-20 model on 2 CPU cores). Same update rule; float
    rounding differs from the per-tensor loop by ~1 ulp. `capturable`: its step count lives on the GPU, so that the update can be captured in a CUDA graph."""
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)


class _StepTimer:
    """Sums the time of the timed regions of an epoch without synchronising inside it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = 0.0
        self.steps = 0  # timed regions so far

    def start(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.steps += 1
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t0

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.seconds


PROC = Path("/proc/self")  # Linux
MAXRSS_PER_MB = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, kB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Makes `peak_memory_mb` this run's, not the process's since it started (a worker trains many runs):
    torch's counter on a GPU; on Linux, the process's peak resident memory (VmHWM, reset by writing 5 to
    clear_refs). Elsewhere it stays the process's lifetime peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            (PROC / "clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak since `reset_peak_memory`: tensors allocated on a GPU; resident memory of the whole process
    (the interpreter and its libraries included) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"VmHWM:\s*(\d+) kB", (PROC / "status").read_text()).group(1)) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MAXRSS_PER_MB


def optimizer_step(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class CudaGraphStep:
    """A training step replayed as one CUDA graph. A step of these small MLPs is some 100 kernels of a
    few microseconds each on a GPU, while launching each one from Python costs more: eagerly the GPU
    mostly waits for the host. One replay launches them all.

    The graph is for the first call's batch shape (a full batch): the first WARMUP calls of that shape run
    eagerly on a side stream (cuBLAS and autograd set up there, as torch.cuda.graphs asks), the next one
    is captured and every later one replays it; a batch of another shape (an epoch's smaller last batch)
    runs eagerly, and neither warms up nor is captured, so that the graph fits the full batches. Eager
    and replayed steps write the same parameters and optimizer state, so they mix freely. Random draws
    inside the step (ε) use the CUDA generator's graph-safe Philox offsets: each replay draws fresh
    numbers."""

    WARMUP = 3

    def __init__(self, step: Callable[[Tensor], ElboTerms]):
        self.step, self.warmed_up = step, 0
        self.shape: torch.Size | None = None  # the batch shape that is warmed up, captured and replayed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None  # the captured step's input, (B, D) or (N, B, D)
        self.static_terms: ElboTerms | None = None  # and its outputs, overwritten by every replay
        self.side = torch.cuda.Stream()

    def __call__(self, x: Tensor) -> ElboTerms:
        self.shape = x.shape if self.shape is None else self.shape
        if x.shape != self.shape:
            return self.step(x)
        if self.graph is not None:
            self.static_x.copy_(x)
            self.graph.replay()
            return _copy(self.static_terms)
        if self.warmed_up < self.WARMUP:
            self.warmed_up += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                terms = self.step(x)
            torch.cuda.current_stream().wait_stream(self.side)
            return terms
        self.static_x = x.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_terms = self.step(self.static_x)
        self.graph.replay()  # capturing records the step without running it: run it on this batch
        return _copy(self.static_terms)


def _copy(terms: ElboTerms) -> ElboTerms:
    scale = terms.smallest_scale
    return ElboTerms(terms.recon.clone(), terms.kl.clone(), None if scale is None else scale.clone())


def flush_subnormals(device: torch.device) -> None:
    """On a CPU, from here on and process-wide, float32 numbers below 1.2e-38 (subnormals) are read and
    written as 0. Training makes them: log p of a confidently predicted pixel (log σ(η), |η| > 87) and
    Adam's second moments of tiny gradients, and x86 cores compute on them some 100× slower: without
    this, after ~600 steps a CPU step slowed from 2.7 to 4.1 ms (bernoulli, L = 1, 2 cores). Nothing the
    suite reports comes near 1e-38; float64 is unaffected in practice (its subnormals lie below 2e-308).

    x86 keeps this mode per thread, and `torch.set_flush_denormal` sets the calling thread's; a thread
    starts with its creator's. OpenMP's worker threads, torch's intra-op threads, start at the process's
    first parallel operation, usually before this (loading the data), so the mode is set on each of them
    too: without that, their share of every parallel operation kept computing on subnormals."""
    if device.type == "cpu":
        _on_every_openmp_thread(lambda: torch.set_flush_denormal(True))


def _on_every_openmp_thread(fn: Callable[[], object]) -> None:
    """Calls fn on every thread of torch's OpenMP team, the calling thread among them, through libgomp's
    `GOMP_parallel` (the call `#pragma omp parallel` compiles to, on the team torch's own parallel regions
    reuse); only on the calling thread where torch's OpenMP is not its own libgomp (`_libgomp`)."""
    gomp = _libgomp()
    if gomp is None:
        fn()
        return
    body = _GOMP_BODY(lambda _: fn())  # runs on each thread, taking the GIL, which the ctypes call released
    # a Ctrl-C or SIGTERM raising inside the callback would be printed and dropped by ctypes, the study
    # training on (seen: a SIGTERM at a trial's start, exit 0): it is raised once the call returns, also
    # outside a study
    with stops_deferred():
        gomp.GOMP_parallel(body, None, torch.get_num_threads(), 0)


_GOMP_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void (*fn) (void *data)


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """torch's own libgomp, as PyPI's Linux wheels ship it in torch/lib, once this process has loaded it;
    None elsewhere (another OpenMP runtime, or another libgomp, such as scikit-learn's, whose team torch
    does not use)."""
    torch_lib = Path(torch.__file__).parent / "lib"
    try:
        with open("/proc/self/maps") as maps:  # address, perms, offset, dev, inode, then the path
            paths = {Path(fields[5].strip()) for fields in (line.split(maxsplit=5) for line in maps) if len(fields) == 6}
        gomp = next((ctypes.CDLL(str(p)) for p in sorted(paths) if p.parent == torch_lib and p.name.startswith("libgomp")),
                    None)
    except OSError:  # no /proc (not Linux), or a library that cannot be opened again
        return None
    if gomp is not None:
        gomp.GOMP_parallel.argtypes = [_GOMP_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel.restype = None
    return gomp


def make_step(model: VAE, cfg: Config) -> Callable[[Tensor], ElboTerms]:
    """A step function x (B, D) -> the batch's ELBO terms, after one Adam step (lr train.lr) on its
    β-objective, with train.backward's gradient; replayed as a CUDA graph on a GPU (train.cuda_graph),
    compiled on a CPU (train.compile)."""
    t = cfg.train
    device = next(model.parameters()).device
    flush_subnormals(device)
    graphed = device.type == "cuda" and t.cuda_graph
    if t.backward == "autograd":
        opt = make_optimizer(model.parameters(), t.lr, capturable=graphed)

        def step(x: Tensor) -> ElboTerms:
            terms = elbo_terms(model, x, t.n_samples)
            optimizer_step(opt, -terms.objective(t.beta).mean())
            return terms
    else:
        manual = ManualGradient(model, lr=t.lr, compiled=t.compile and device.type == "cpu")

        def step(x: Tensor) -> ElboTerms:
            return manual.step(x, t.n_samples, t.beta)
    return CudaGraphStep(step) if graphed else step


def train_epoch(model: VAE, step: Callable[[Tensor], ElboTerms], x_train: Tensor,
                transform: Callable[[Tensor], Tensor], cfg: Config) -> dict[str, float]:
    """One pass over x_train (n, D) uint8 in shuffled batches, each a `make_step` step."""
    t = cfg.train
    model.train()
    (sums,), times = run_steps(step, data_mod.batches(x_train, t.batch_size), transform)
    return epoch_metrics(sums, t.beta, len(x_train), times, model.data_dim)


def run_steps(step: Callable[[Tensor], ElboTerms], batches: Iterable[Tensor],
              transform: Callable[[Tensor], Tensor]) -> tuple[list[list[float]], EpochTime]:
    """Runs `step(transform(batch))` on every batch. Each step's terms, (B,) or (N, B) for N stacked
    variants, stay on the device until one read-back after the last step: no host sync inside the epoch
    and no per-step accumulation ops. Returns, per variant (one row for an ordinary model), [Σ recon,
    Σ kl, largest recon, smallest learned scale], and the epoch's times."""
    recons: list[Tensor] = []
    kls: list[Tensor] = []
    scales: list[Tensor] = []  # smallest learned scale of each step, for families with one
    timer: _StepTimer | None = None
    start = time.perf_counter()
    for batch in batches:
        x = transform(batch)  # (B, D) or (N, B, D)
        timer = timer or _StepTimer(x.device)
        timer.start()
        terms = step(x)
        timer.stop()
        recons.append(terms.recon.detach())
        kls.append(terms.kl.detach())
        if terms.smallest_scale is not None:
            scales.append(terms.smallest_scale.detach())
    recon, kl = torch.cat(recons, -1), torch.cat(kls, -1)  # (n,) or (N, n)
    low_scale = torch.stack(scales).amin(0) if scales else torch.full_like(recon[..., 0], math.inf)
    sums = torch.stack([recon.sum(-1), kl.sum(-1), recon.amax(-1), low_scale], -1).view(-1, 4)
    steps_s = timer.total()  # waits for the device to finish the epoch's work
    rows = sums.tolist()  # the epoch's one read-back
    return rows, EpochTime(time.perf_counter() - start, steps_s, timer.steps)


@dataclass
class EpochTime:
    wall_s: float  # the whole epoch: batch gathers, data transforms, steps, the read-back
    steps_s: float  # the steps alone (forward, backward, Adam), timed on the device
    steps: int


def median_epoch(values: list[float]) -> float:
    """A run's per-epoch speed, as the report and the console give it: the median of its epochs after the
    first, which also pays for setting up (one epoch's figure swings with a shared machine's load), or the
    first of a one-epoch run; of its finite values."""
    finite = [v for v in values[1:] or values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def epoch_metrics(sums: list[float], beta: float, n: int, times: EpochTime, data_dim: int) -> dict[str, float]:
    """One variant's per-epoch training metrics from its `run_steps` row, over n examples. samples_per_s
    is the epoch's (what a run gets, and what tests/benchmarks times); ms_per_step the step's alone;
    min_scale only for a family with a learned scale (`run_steps` gives +∞ for the others, which would be
    stored as NaN: `tracking.storable`)."""
    recon, kl, top_log_p, min_scale = sums
    metrics = {
        "train_elbo": (recon - kl) / n, "train_recon": recon / n, "train_kl": kl / n,
        "train_objective": (recon - beta * kl) / n, "samples_per_s": n / times.wall_s,
        "ms_per_step": 1000 * times.steps_s / times.steps, "max_log_p_per_pixel": top_log_p / data_dim,
    }
    if min_scale != math.inf:
        metrics["min_scale"] = min_scale
    return metrics


class _Streams:
    """Random streams on one device, each from a seed of its own, taken in turn (`with streams.use(i)`):
    one stream's draws never move another's."""

    def __init__(self, device: torch.device, *seeds: int):
        cuda = device.type == "cuda"
        self._get = (lambda: torch.cuda.get_rng_state(device)) if cuda else torch.get_rng_state
        self._set = (lambda state: torch.cuda.set_rng_state(state, device)) if cuda else torch.set_rng_state
        self._states = []
        for seed in seeds:
            torch.manual_seed(seed)
            self._states.append(self._get())

    @contextlib.contextmanager
    def use(self, i: int) -> Iterator[None]:
        self._set(self._states[i])
        yield
        self._states[i] = self._get()


EVAL_BATCH = 1000  # images a batch: the evaluation's memory stays a batch's, not the split's


def eval_inputs(x_eval: Tensor, transform: Callable[[Tensor], Tensor], streams: _Streams) -> Iterator[Tensor]:
    """The split's inputs as the model sees them, batch by batch, drawn from stream 0 alone: every model of a
    dataset gets the same noise, whatever its own draws (the z draws' size depends on the latent size)."""
    for batch in x_eval.split(EVAL_BATCH):
        with streams.use(0):
            x = transform(batch)
        yield x


@torch.no_grad()
def evaluate(model: VAE, x_eval: Tensor, transform: Callable[[Tensor], Tensor], seed: int = 0) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL per image (β = 1, one sample), with fixed seeds so that
    dequantization noise and z draws are the same at every epoch; the inputs are final_metrics' too."""
    model.eval()
    sums = torch.zeros(3, device=x_eval.device)
    with torch.random.fork_rng(devices=[x_eval.device] if x_eval.device.type == "cuda" else []):
        streams = _Streams(x_eval.device, seed, seed + 1)
        for x in eval_inputs(x_eval, transform, streams):
            with streams.use(1):
                terms = elbo_terms(model, x)
            sums += torch.stack([terms.recon.sum(), terms.kl.sum(), terms.elbo.sum()])
    recon, kl, elbo = (sums / len(x_eval)).tolist()
    return {"recon": recon, "kl": kl, "elbo": elbo}


def divergence(metrics: dict[str, float], lik: Likelihood, cfg: Config, quantum: float, measure: Measure) -> str:
    """Why this epoch's metrics mean the run has diverged ("" when it has not). A collapsing learned scale
    is divergence only where the objective can run away (a measure that is not a likelihood of the data):
    on dequantized pixels it cannot, and a scale that dips there recovers or ends in a non-finite value."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        return f"non-finite {', '.join(bad)} (NaN or ∞)"
    sup = lik.supremum_per_pixel
    if sup is not None and metrics["max_log_p_per_pixel"] > sup + SUPREMUM_SLACK:
        # an image's log p over its pixels: no image can average above the sup of each pixel's
        return (f"log p(x|z) per pixel {metrics['max_log_p_per_pixel']:.4f} (of the image that has the most) "
                f"above the supremum {sup:.4f} of the bounded family {lik.name}")
    threshold = cfg.train.scale_collapse * quantum
    if sup is None and lik.family.learned_scale and not measure.comparable and metrics["min_scale"] < threshold:
        return (f"learned scale collapsed to {metrics['min_scale']:.2e} < {threshold:.2e} (train.scale_collapse="
                f"{cfg.train.scale_collapse:g} of the pixel quantum {quantum:.4g}): {lik.name} is unbounded, "
                "its log p grows without limit")
    return ""


def evaluation_divergence(finite_weights: bool, final: dict[str, float]) -> str:
    """Why a run whose epochs all passed `divergence` has diverged after all ("" when it has not): weights
    that are not finite (no test metric is computed), or a test metric that is ±∞ or NaN, such as an NLL
    of ∞ where the model gives a test image probability 0. Not a standard error that is NaN: it cannot be
    estimated from one importance sample."""
    if not finite_weights:
        return "non-finite model parameters (NaN or ∞) after the last epoch"
    bad = [f"{k}={v}" for k, v in sorted(final.items())
           if not math.isfinite(v) and not (math.isnan(v) and k.endswith("_se"))]
    return f"non-finite test metrics: {', '.join(bad)}" if bad else ""


def train(cfg: Config, data: Data | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Trains one variant. `on_epoch(epoch, metrics)` sees each epoch's metrics (for tracking and
    pruning; it may raise to stop the run). Divergence ends the run with a recorded reason."""
    config.validate_run(cfg)  # a config built or changed in code has not been through config.load
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = data if data is not None else data_mod.load(cfg.data, device)
    model = build(cfg, data.dim).to(device)
    family = model.likelihood.family
    step = make_step(model, cfg)
    train_tf, eval_tf = data.transform(family, train=True), data.transform(family, train=False)
    result = TrainResult(model, data, data.measure(model.likelihood))
    reset_peak_memory(device)
    for epoch in range(1, cfg.train.epochs + 1):
        metrics = train_epoch(model, step, data.train, train_tf, cfg)
        record_epoch(result, metrics, epoch, cfg, eval_tf, device)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if result.status == states.DIVERGED:
            break
    return result


def record_epoch(result: TrainResult, metrics: dict[str, float], epoch: int, cfg: Config,
                 eval_tf: Callable[[Tensor], Tensor], device: torch.device) -> None:
    """Completes an epoch's training metrics (validation, the run's measure, memory), appends them to
    result's history, and marks the run diverged if they say so."""
    data = result.data
    metrics.update({f"val_{k}": v for k, v in evaluate(result.model, data.val, eval_tf, seed=cfg.data.seed).items()})
    offset = result.measure.nats_offset_per_pixel * data.dim
    for key in ON_MEASURE:
        metrics[key] += offset  # on the run's measure, like every ELBO reported
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    metrics["epoch"] = epoch
    result.history.append(metrics)
    result.reason = divergence(metrics, result.model.likelihood, cfg, data.quantum, result.measure)
    if result.reason:
        result.status = states.DIVERGED


@torch.no_grad()
def final_metrics(result: TrainResult, cfg: Config,
                  on_iwae: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Test-set numbers on the run's measure: ELBO (the whole test split), IWAE-k NLL ± s.e., bits/dim (on
    a comparable measure only) and the IWAE's gain over the ELBO (both over the first eval.iwae_examples
    images), KL anomaly score and active units; the evaluation's own time and peak memory. The test split
    is touched only here. `on_iwae(images done, images)` after each batch of the IWAE, which can take
    hours (k = 5000 on the whole test split)."""
    started, device = time.perf_counter(), result.data.test.device
    reset_peak_memory(device)
    model, data, offset = result.model, result.data, result.measure.nats_offset_per_pixel * result.data.dim
    fam = model.likelihood.family
    eval_tf = data.transform(fam, train=False)
    test = evaluate(model, data.test, eval_tf, seed=cfg.data.seed)
    out = {"test_elbo": test["elbo"] + offset, "test_recon": test["recon"] + offset, "test_kl": test["kl"]}

    # Each kind of draw from a seed of its own: every variant of a dataset gets the same dequantization
    # noise, noise images and training binarization, whatever its model, eval.iwae_k or eval.chunk, which
    # only the IWAE's own samples of z depend on.
    seed = cfg.data.seed
    with torch.random.fork_rng(devices=[data.test.device] if data.test.device.type == "cuda" else []):
        x_test = torch.cat(list(eval_inputs(data.test, eval_tf, _Streams(data.test.device, seed))))  # (N, D): as evaluate's
        torch.manual_seed(seed + 1)
        inputs = x_test[: cfg.eval.iwae_examples or None]
        estimates = []
        for i in range(0, len(inputs), 100):
            estimates.append(iwae(model, inputs[i : i + 100], cfg.eval.iwae_k, cfg.eval.chunk))
            if on_iwae is not None:
                on_iwae(min(i + 100, len(inputs)), len(inputs))
        log_px = torch.cat([e.log_px for e in estimates]) + offset  # (N,)
        mc_se = torch.cat([e.mc_se for e in estimates])
        ess = torch.cat([e.ess for e in estimates])  # (N,)
        gain = torch.cat([e.log_px - e.elbo for e in estimates])  # (N,) ≥ 0: the offset cancels
        torch.manual_seed(seed + 2)
        noise = eval_tf(torch.randint(0, 2 if data.binarized else likelihoods.LEVELS, data.test.shape,
                                      device=data.test.device, dtype=torch.uint8))
        # KL anomaly score: an input's KL(q(z|x) ‖ p(z)) against its distribution over the training set
        torch.manual_seed(seed + 3)
        train_tf = data.transform(fam, train=True)  # inputs as training saw them (e.g. a fresh binarization)
        kl_train = torch.cat([gaussian_kl(*model.encode(train_tf(x))) for x in data.train.split(10_000)])
    test_codes = model.encode(x_test)  # (mu, logvar), each (N, Z)
    kl_data = gaussian_kl(*test_codes)
    kl_noise = gaussian_kl(*model.encode(noise))
    alarm = kl_train.quantile(0.99)  # flags 1 % of training images
    n = len(log_px)
    se = (log_px.std() / math.sqrt(n)).item() if n > 1 else float("nan")
    mc = (mc_se.pow(2).sum().sqrt() / n).item()
    if result.measure.comparable:  # a log-likelihood of the data: its negative, the NLL
        out.update({"test_iwae_nll": -log_px.mean().item(), "test_iwae_nll_se": se, "test_iwae_mc_se": mc})
    else:  # the same bound of a training objective, which is no likelihood: never under the name NLL
        out.update({"test_iwae_objective": log_px.mean().item(), "test_iwae_objective_se": se,
                    "test_iwae_objective_mc_se": mc})
    out.update({
        "iwae_k": float(cfg.eval.iwae_k),
        "iwae_images": float(n),  # eval.iwae_examples, or the whole test split where it is smaller
        "test_iwae_gain": gain.mean().item(),  # IWAE-k − ELBO on the IWAE's images, from its k samples
        "test_iwae_ess": ess.nanmedian().item(),  # of its images' weights: near 1, the MC s.e. says little
        "anomaly_kl_train": kl_train.mean().item(),
        "anomaly_kl_noise": kl_noise.mean().item(),
        "anomaly_detection_rate": (kl_noise > alarm).float().mean().item(),  # noise inputs flagged
        "anomaly_false_alarm_rate": (kl_data > alarm).float().mean().item(),  # test images flagged
        "active_units": float(active_units(test_codes[0])),
    })
    if result.measure.comparable:  # bits/dim are a code length of the data: none for a training objective
        out["test_bpd"] = bits_per_dim(out["test_iwae_nll"], data.dim)
    # the IWAE holds eval.chunk samples of 100 images at once: often more memory than training took
    out["eval_peak_memory_mb"] = peak_memory_mb(device)
    out["eval_s"] = time.perf_counter() - started
    return out
