"""Shared fixtures: `shrink` turns any config into a seconds-long offline run with tracking in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import config
from bench.config import Config

SHARED_MNIST_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def shrink_overrides(tmp_path: Path) -> dict[str, object]:
    """Tiny offline data (digits), 1 epoch, one seed, CPU, a small IWAE, and the MLflow and Optuna
    stores and reports inside tmp_path."""
    return {
        "data.name": "digits", "data.limit": 200,
        "train.epochs": 1, "train.device": "cpu", "study.seeds": [0],
        "eval.iwae_k": 8, "eval.iwae_examples": 20,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics": False,
        "study.storage": "", "study.n_workers": 1,
        "report_dir": str(tmp_path / "reports"),
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
