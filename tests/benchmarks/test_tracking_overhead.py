"""What MLflow tracking costs a training epoch (issue 5, item 5: < 3 %), and whether the samples/s the
runner logs agrees with the benchmark's own:

    .venv/bin/python -m pytest tests/benchmarks/test_tracking_overhead.py --benchmark-only

Both sides run `bench.train.train` on MNIST's 10k official test images (bernoulli, thresholded pixels,
batch 128, 784-400-20) with epochs as long as the default study's on MNIST: TRAIN_IMAGES training images
(the split's 6,400, repeated: 391 steps) and a validation pass an epoch; a fixed cost per epoch is only
as large, relative to the epoch, as the epoch is short. EPOCHS[device] epochs a run, enough for a run to
span several of EpochLog's sending intervals:

- off: no tracking; the epoch callback only reads the clock;
- on: the runner's MLflow logging (bench.study.run_trial's): an MLflow child run in an SQLite store in a
  tmp folder, started with `bench.tracking.start_child` (epochs written by EpochLog's thread; system metrics on, as
  users get them, but sampled every SYSTEM_METRICS_S seconds instead of MLflow's 10: a run here lasts a
  few seconds, and at 10 s it would log none, so their cost would go unmeasured; at the faster rate it
  is an upper bound), and `on_epoch=bench.tracking.EpochLog(run_id)`, then read the same clock. The
  runner's epoch callback also reports to Optuna and moves a progress bar; those are not MLflow's
  cost and are left out.

An epoch's time is the wall time from the end of the first epoch (which includes building the model)
to the end of the run's epoch logging, over the epochs after the first: the training epochs, the
validation passes, the logging calls, whatever the logging's background thread takes from the training
thread meanwhile, and, for "on", the sending and writing of the epochs still pending at the end (which
the runner does when it ends the run: EpochLog's wait). The rest of starting and ending a run
(params, final metrics, artifacts) is once per run and not timed.

The rounds are paired, as in test_speed.py: every timed round of "on" (pytest-benchmark's own timing,
the whole `train` call) runs between two rounds of "off"; each round's overhead is (on − off) / off with
"off" the mean of its two neighbours, so that both see the same machine. The headline is the median of
these paired ratios, with the ratio of the fastest rounds beside it. On a VM the rounds spread by tens
of percent, which no number of rounds narrows to the 3 % target; so each round of "on" also counts the
logging's own time over the same epochs (_Clock): the main thread's wall time in the logging calls and
the final flush, plus the CPU time of the process's threads that do not train (the process's CPU time,
which keeps that of threads that have ended, less that of the main thread and torch's native threads,
read from Linux's /proc/self/task/*/schedstat). While training keeps the cores busy, that is what the
logging can take from it. Counted as measured (system metrics every SYSTEM_METRICS_S) and at MLflow's
own interval (the sampler thread's CPU, which includes writing its samples, scaled to its rate);
the conftest's verdict uses the former, as measured, where the paired interval spans the target.

samples/s: `train` reports `samples_per_s` per epoch (the epoch's training images over its wall-clock
time: batch gathers, transforms, steps and the read-back); that is what the runner logs, and it is
read back here from the MLflow store. Alongside, each round also times test_speed.py's round of ours
(bernoulli, L = 1: one `train_epoch` over 20 batches, timed from outside): the benchmark's own
samples/s. Both, and their ratio, go into the JSON and its Markdown section (conftest.py): the ratio of
the two medians, and round by round (each run's median epoch over the benchmark round right before it).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from bench import config, tracking
from bench.train import train
from tests.benchmarks.test_speed import (
    BATCH,
    DEVICES,
    HIDDEN,
    LATENT,
    SHARED_DATA,
    STEPS,
    ours_round,
    require_mnist,
)

TRAIN_IMAGES = 50_000  # MNIST's 60,000 training images less the default 10,000 held out for validation
EPOCHS = {"cpu": 4, "cuda": 30}  # per run (an epoch takes 1 to 2.5 s on 2 CPU cores, ~0.15 s on an H100)
SYSTEM_METRICS_S = 1  # MLflow's system-metrics sampling interval in the test
MLFLOW_SYSTEM_METRICS_S = 10  # MLflow's own, which users get
SAMPLER_THREAD = "SystemMetricsMonitor"  # the name of MLflow's system-metrics thread
ROUNDS, WARMUP = 12, 1
TARGET_OVERHEAD = 0.03  # issue 5 item 5: logging on costs < 3 % of an epoch


def _cfg(tmp_path, device: str) -> config.Config:
    return config.load([
        "data.name=mnist_t10k", f"data.root={SHARED_DATA}", "data.binarize=threshold", "likelihood.name=bernoulli",
        f"model.hidden=[{HIDDEN}]", f"model.latent_dim={LATENT}", f"train.batch_size={BATCH}", "train.n_samples=1",
        f"train.epochs={EPOCHS[device]}", f"train.device={device}", "study.name=tracking_overhead",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=true",
    ])


def _cpu_now(training: list[str] | None = None) -> dict | None:
    """CPU time so far, ns: the process's ("process": all its threads, ended ones included), that of the
    threads that train ("training", their Linux thread ids; "used"), and that of MLflow's system-metrics
    sampling thread ("sampler"). None where /proc/self/task is missing (not Linux), or where a thread
    that trains has ended (its time is gone). The threads that train are the main thread and torch's
    native ones (its CPU workers; on a GPU, the driver's): every thread but Python's others, which is
    where MLflow logs and samples. The first call (no `training`) reads the process's time first and
    the end call last, so that any skew can only overstate the others."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None

    def used(tids) -> int:  # ns on a CPU
        return sum(int((tasks / str(tid) / "schedstat").read_text().split()[0]) for tid in tids)

    try:
        if training is None:
            process = time.process_time_ns()
            while True:  # list the tasks before Python's threads: one started in between is then a Python one
                tids = os.listdir(tasks)
                others = [t for t in threading.enumerate() if t is not threading.main_thread()]
                if all(t.native_id is not None for t in others):
                    break
            training = [tid for tid in tids if int(tid) not in {t.native_id for t in others}]
            training_ns = used(training)
        else:
            training_ns = used(training)
            others = [t for t in threading.enumerate() if t is not threading.main_thread()]
            if {str(t.native_id) for t in others} & set(training):
                raise AssertionError("a Python thread was counted as one that trains")
            process = time.process_time_ns()
        sampler = used(t.native_id for t in others if t.name == SAMPLER_THREAD)
    except FileNotFoundError:  # a thread ended while being read
        return None
    return {"training": training, "process": process, "used": training_ns, "sampler": sampler}


class _Clock:
    """An epoch callback: calls `inner` (if any), then notes the time. From the end of the first epoch,
    it also counts the logging's own time (`logging_ms`): the main thread's wall time inside `inner`
    (and whatever the caller adds), plus the CPU time of the process's threads that do not train."""

    def __init__(self, inner=None):
        self.inner, self.ends, self.inner_s, self.cpu_start = inner, [], 0.0, None

    def __call__(self, epoch, metrics):
        start = time.perf_counter()
        if self.inner is not None:
            self.inner(epoch, metrics)
        now = time.perf_counter()
        if self.ends:
            self.inner_s += now - start
        else:  # the first epoch ends: the timed span starts
            self.cpu_start = _cpu_now()
        self.ends.append(now)

    def epoch_ms(self, done: float | None = None) -> float:
        """ms per epoch from the end of the first epoch to `done` (default: the end of the last)."""
        return 1e3 * ((done or self.ends[-1]) - self.ends[0]) / (len(self.ends) - 1)

    def other_threads_s(self) -> dict[str, float] | None:
        """CPU seconds since the end of the first epoch: of the threads that do not train ("threads"),
        and of those, the system-metrics sampler's ("sampler")."""
        if self.cpu_start is None:
            return None
        start = self.cpu_start
        now = _cpu_now(start["training"])
        if now is None:
            return None
        threads = (now["process"] - start["process"]) - (now["used"] - start["used"])
        sampler = now["sampler"] - start["sampler"]  # < 0 if it ended meanwhile: then none is known
        return {"threads": threads / 1e9, "sampler": max(0.0, sampler / 1e9)}

    def logging_ms(self) -> dict[str, float] | None:
        """The logging's own time per timed epoch, ms: the main thread's in the logging calls ("main"),
        the other threads' CPU ("threads"), and of that, the system-metrics sampler's ("sampler")."""
        others, epochs = self.other_threads_s(), len(self.ends) - 1
        if others is None:
            return None
        return {"main": 1e3 * self.inner_s / epochs, **{k: 1e3 * v / epochs for k, v in others.items()}}


def logging_shares(on: list[dict], off: list[dict], on_ms: list[float]) -> dict:
    """The logging's own time in each round of on (_Clock.logging_ms), with the epoch's ms, -> its share of
    the epoch without it, as counted (system metrics every SYSTEM_METRICS_S) and at MLflow's own
    interval: there the sampler thread, which also writes its samples, wakes SYSTEM_METRICS_S /
    MLFLOW_SYSTEM_METRICS_S as often. `off`: the same count
    with no logging, the baseline (no thread but training's: ~0)."""
    own_ms = [o["main"] + o["threads"] for o in on]
    slower = 1 - SYSTEM_METRICS_S / MLFLOW_SYSTEM_METRICS_S
    at_mlflow_rate = [ms - slower * o["sampler"] for ms, o in zip(own_ms, on)]
    shares = {
        "main_ms_per_epoch": statistics.median(o["main"] for o in on),
        "threads_ms_per_epoch": statistics.median(o["threads"] for o in on),
        "sampler_ms_per_epoch": statistics.median(o["sampler"] for o in on),
        "off_threads_ms_per_epoch": statistics.median(o["threads"] for o in off),
        "ms_per_epoch_per_round": own_ms,
        "per_round": [ms / (epoch - ms) for ms, epoch in zip(own_ms, on_ms)],
        "mlflow_sampling_s": MLFLOW_SYSTEM_METRICS_S,
        "per_round_at_mlflow_rate": [a / (epoch - ms) for a, ms, epoch in zip(at_mlflow_rate, own_ms, on_ms)],
    }
    for key in ("", "_at_mlflow_rate"):
        rounds = shares["per_round" + key]
        shares["median" + key], shares["largest" + key] = statistics.median(rounds), max(rounds)
    return shares


@pytest.mark.parametrize("device", DEVICES)
def test_tracking_overhead(benchmark, tmp_path, monkeypatch, device):
    require_mnist()
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, device)
    from bench import data as data_mod

    data = data_mod.load(cfg.data, device)
    data.train = data.train.repeat(math.ceil(TRAIN_IMAGES / len(data.train)), 1)[:TRAIN_IMAGES]
    experiment = tracking.setup(cfg)
    parent = tracking.parent_run(experiment, "tracking_overhead", cfg)
    client = MlflowClient()
    step_round = ours_round(cfg, data)  # test_speed.py's round of ours, bernoulli L = 1
    off_ms, on_ms, along = [], [], {"wall": [], "reported": []}
    own_time: dict[str, list] = {"on": [], "off": []}  # per run: the logging's own time per epoch (_Clock)
    logged: list[list[float]] = []  # per run: samples_per_s as logged to MLflow, every epoch but the first
    trained: list[float] = []  # the same metric from train()'s history (must equal the logged one)

    def off() -> None:
        clock = _Clock()
        train(cfg, data, clock)
        off_ms.append(clock.epoch_ms())
        own_time["off"].append(clock.logging_ms())  # no logging: other threads' CPU, the baseline

    def setup() -> None:  # before every round of "on", the warm-up round included
        off()
        start = time.perf_counter()
        metrics = step_round()
        along["wall"].append(BATCH * STEPS / (time.perf_counter() - start))
        along["reported"].append(metrics["samples_per_s"])

    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_S)
    system_rows: list[int] = []  # per run: system-metric samples logged

    def on():
        run_id = tracking.start_child(cfg, parent, experiment, f"overhead {len(on_ms)}", {"benchmark": "overhead"})
        epoch_log = tracking.EpochLog(run_id)
        clock = _Clock(epoch_log)
        try:
            result = train(cfg, data, clock)
            flushing = time.perf_counter()
            epoch_log.wait()  # the epochs not yet sent, sent, and every epoch stored, as in finish_child
            done = time.perf_counter()
            clock.inner_s += done - flushing  # the wait is counted twice: as the main thread's, and as the CPU it waits for
            on_ms.append(clock.epoch_ms(done))
            own_time["on"].append(clock.logging_ms())
        finally:
            mlflow.end_run()
        history = sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, cfg.train.epochs + 1))
        logged.append([m.value for m in history[1:]])
        system_rows.append(len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")))
        trained.extend(h["samples_per_s"] for h in result.history[1:])
        return result

    try:
        result = benchmark.pedantic(on, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    finally:
        mlflow.set_system_metrics_sampling_interval(None)  # MLflow's default again
    off()  # the last round of "on" between two of "off" too
    assert not math.isnan(result.history[-1]["train_elbo"])
    assert [v for run in logged for v in run] == pytest.approx(trained)
    assert min(system_rows[WARMUP:]) > 0  # system metrics were sampled in every timed run
    logged_by_round = [statistics.median(run) for run in logged[WARMUP:]]  # each timed run's median epoch
    logged = [v for run in logged[WARMUP:] for v in run]  # the timed rounds', as the benchmark's below

    # round i of "on" ran between rounds i and i + 1 of "off"; the warm-up round is left out
    pairs = [(on_ms[i], (off_ms[i] + off_ms[i + 1]) / 2) for i in range(WARMUP, len(on_ms))]
    ratios = [(a - b) / b for a, b in pairs]
    on_t, off_t = on_ms[WARMUP:], off_ms[WARMUP:]
    wall, reported = along["wall"][WARMUP:], along["reported"][WARMUP:]
    own = own_time["on"][WARMUP:]
    off_own = own_time["off"][WARMUP:]
    logging_time = None if None in own + off_own else logging_shares(own, off_own, on_t)
    info = {
        "device": device, "epochs_per_run": cfg.train.epochs, "timed_epochs_per_run": cfg.train.epochs - 1,
        "rounds": len(pairs),
        "train_images": len(data.train), "val_images": len(data.val),
        "steps_per_epoch": math.ceil(len(data.train) / BATCH), "batch": BATCH,
        "system_metrics": cfg.tracking.system_metrics,
        "system_metrics_sampling_s": SYSTEM_METRICS_S,
        "system_metric_samples_per_run": statistics.median(system_rows[WARMUP:]),
        "mlflow_async_logging": False,  # epochs written by EpochLog's thread, system metrics by their sampler
        "epoch_ms_off": {"median": statistics.median(off_t), "best": min(off_t)},
        "epoch_ms_on": {"median": statistics.median(on_t), "best": min(on_t)},
        "overhead_per_round": ratios,
        "overhead_median": statistics.median(ratios),  # median of the paired per-round ratios
        "overhead_best": (min(on_t) - min(off_t)) / min(off_t),  # fastest round against fastest round
        "overhead_ms_per_epoch": statistics.median(a - b for a, b in pairs),
        "logging_time": logging_time,  # None where threads' CPU time cannot be read (not Linux)
        "target": TARGET_OVERHEAD,
        "samples_per_s": {
            "logged_median": statistics.median(logged),  # train()'s samples_per_s, read back from MLflow
            "logged_best": max(logged),
            "benchmark_wall_median": statistics.median(wall),  # test_speed's round of ours, wall clock
            "benchmark_wall_best": max(wall),
            "benchmark_reported_median": statistics.median(reported),  # train_epoch's own figure, same rounds
        },
    }
    s = info["samples_per_s"]
    s["logged_over_benchmark_median"] = s["logged_median"] / s["benchmark_wall_median"]
    s["logged_over_benchmark_best"] = s["logged_best"] / s["benchmark_wall_best"]
    s["reported_over_wall_same_rounds"] = statistics.median(r / w for r, w in zip(reported, wall))
    # round by round, as every other ratio of the suite: run i of "on" over the benchmark round right before it
    s["logged_over_benchmark_per_round"] = [g / w for g, w in zip(logged_by_round, wall, strict=True)]
    s["logged_over_benchmark_paired_median"] = statistics.median(s["logged_over_benchmark_per_round"])
    benchmark.extra_info["tracking_overhead"] = info
    print(f"\nepoch ms off {info['epoch_ms_off']}, on {info['epoch_ms_on']}; overhead median "
          f"{100 * info['overhead_median']:+.2f} % (best rounds {100 * info['overhead_best']:+.2f} %; per round "
          f"{[round(100 * r, 2) for r in ratios]}); samples/s {s}")
