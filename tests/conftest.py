"""Shared fixtures: `shrink` turns any config into a seconds-long offline run with tracking in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import config
from bench.config import Config

SHARED_MNIST_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def shrink_config(cfg: Config, tmp_path: Path) -> Config:
    """Tiny data (offline digits unless the dataset is 8x8 already), 1 epoch, CPU, small IWAE,
    MLflow and Optuna stores and reports inside tmp_path."""
    binarize = cfg.data.binarize
    small = config.apply(cfg, {
        "data.name": "digits", "data.limit": 200, "data.binarize": binarize,
        "train.epochs": 1, "train.device": "cpu",
        "eval.iwae_k": 8, "eval.iwae_examples": 20,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics": False,
        "study.storage": "", "study.n_workers": 1,
        "report_dir": str(tmp_path / "reports"),
    })
    return small


@pytest.fixture
def shrink(tmp_path):
    return lambda cfg: shrink_config(cfg, tmp_path)


@pytest.fixture
def tiny_cfg(shrink) -> Config:
    return shrink(config.load(["likelihood.name=bernoulli", "data.binarize=static"]))
