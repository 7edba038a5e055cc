"""Shared fixtures: `shrink` turns any config into a seconds-long offline run with tracking in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

# Tests must not reach the internet: MLflow's usage telemetry is on unless turned off before MLflow is
# imported (its own test detection reads PYTEST_CURRENT_TEST, set only once a test runs). Set here, the
# subprocesses that tests start inherit it.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

import pytest
import torch

from bench import config
from bench.config import Config

SHARED_MNIST_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"

# train.compile's tests: the config refuses it before torch 2.12, which the project otherwise supports
NEEDS_COMPILE = pytest.mark.skipif(not config.compile_supported(),
                                   reason=f"train.compile needs torch 2.12 or newer, not {torch.__version__}")


@pytest.fixture(autouse=True)
def one_thread(request):
    """The test models are tiny: on a loaded 2-core machine a second intra-op thread made a trial 30 times
    slower (0.9 s vs 29 s for 30 epochs of digits). Benchmarks keep torch's own setting. Every test also
    starts with subnormal floats kept, whatever an earlier test's training set process-wide
    (bench.train.flush_subnormals)."""
    if "benchmarks" in request.node.path.parts:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)  # torch's default: a training earlier in the session turned it on
    yield
    torch.set_num_threads(n)


def shrink_overrides(tmp_path: Path) -> dict[str, object]:
    """Tiny offline data (digits), 1 epoch, one seed, CPU, a small IWAE, and the MLflow and Optuna
    stores and reports inside tmp_path (no report at the end of bench.run: each takes seconds)."""
    return {
        "data.name": "digits", "data.limit": 200,
        "train.epochs": 1, "train.device": "cpu", "study.seeds": [0],
        "eval.iwae_k": 8, "eval.iwae_examples": 20,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics": False,
        "study.storage": "", "study.n_workers": 1,
        "report_dir": str(tmp_path / "reports"), "report": False,  # the tests that check reports write them
    }


def shrink_args(tmp_path: Path) -> list[str]:
    """The same as command-line overrides."""
    return [f"{k}={v}".replace("'", "") for k, v in shrink_overrides(tmp_path).items()]


@pytest.fixture
def shrink(tmp_path):
    return lambda cfg: config.apply(cfg, shrink_overrides(tmp_path))


@pytest.fixture
def tiny_cfg(shrink) -> Config:
    return shrink(config.load(["likelihood.name=bernoulli", "data.binarize=static"]))
