"""Security: servers are documented and started on 127.0.0.1 only, and checkpoints are loaded with
`weights_only=True`, so a tampered checkpoint on a shared tracking server cannot run code."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import mlflow
import pytest
import torch

from bench import config, tracking
from bench.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_servers_are_documented_and_started_on_127_0_0_1_only():
    docs = [ROOT / "README.md", *sorted((ROOT / "bench").glob("*.py"))]
    texts = {p: p.read_text() for p in docs if p.exists()}
    helpers = (ROOT / "tests" / "helpers.py").read_text()
    for path, text in {**texts, "tests/helpers.py": helpers}.items():
        assert "0.0.0.0" not in text, path
        for command in re.findall(r"mlflow server +--[^`\n]*", text):  # every server command with options
            assert "--host 127.0.0.1" in command, (path, command)
    assert '"--host", "127.0.0.1"' in helpers and "listen_addresses=127.0.0.1" in helpers


@pytest.fixture
def tracked(tmp_path, monkeypatch, shrink):
    """An experiment and parent run in an SQLite store in tmp_path."""
    monkeypatch.chdir(tmp_path)
    cfg = shrink(config.load(["likelihood.name=bernoulli", "data.binarize=static", "eval.figures=false"]))
    cfg = config.apply(cfg, {"study.name": "roundtrip"})
    experiment = tracking.setup(cfg)
    return cfg, experiment, tracking.parent_run(experiment, "roundtrip-0", cfg)


def test_load_model_round_trips_a_child_run(tracked):
    cfg, experiment, parent = tracked
    result = train(cfg)
    run_id = tracking.start_child(cfg, parent, experiment, "0: bernoulli", {})
    tracking.finish_child(result, cfg, {}, "complete")
    model = tracking.load_model(run_id)
    assert type(model) is type(result.model) and model.likelihood.name == "bernoulli"
    trained = result.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())
    assert model.state_dict().keys() == trained.keys()


def test_load_model_needs_no_compiler_for_a_run_trained_compiled(tracked, monkeypatch, tmp_path):
    cfg, experiment, parent = tracked
    result = train(cfg)
    compiled = config.apply(cfg, {"train.compile": True, "train.backward": "manual"})  # as its config.yaml says
    run_id = tracking.start_child(compiled, parent, experiment, "0: bernoulli", {})
    tracking.finish_child(result, compiled, {}, "complete")
    monkeypatch.setenv("CXX", "/nonexistent/g++")  # a machine without a C++ compiler
    (tmp_path / "compiled.yaml").write_text(config.to_yaml(compiled))
    with pytest.raises(config.ConfigError, match="C\\+\\+ compiler"):  # as a study, it is refused here
        config.load(study=str(tmp_path / "compiled.yaml"))
    model = tracking.load_model(run_id)
    trained = result.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())


def test_load_model_reads_a_run_logged_with_a_setting_its_family_does_not_read(tracked, tmp_path):
    """Runs logged before 6291e86 kept a study-wide likelihood.min_scale in the config.yaml of every
    family, one that a study of the Bernoulli alone refuses (exit 2): their models must still load."""
    cfg, experiment, parent = tracked
    result = train(cfg)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config.to_yaml(cfg).replace("min_scale: 0.0", "min_scale: 0.001"))
    with pytest.raises(config.ConfigError, match="min_scale=0.001"):
        config.load(study=str(tmp_path / "run" / "config.yaml"))
    torch.save(result.model.state_dict(), tmp_path / "run" / "model_state_dict.pt")
    with mlflow.start_run(experiment_id=experiment, tags={"mlflow.parentRunId": parent}) as run:
        mlflow.log_artifacts(str(tmp_path / "run"))
    model = tracking.load_model(run.info.run_id)
    trained = result.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())


class _RunsCode:
    """A pickle that runs a command when unpickled: what a tampered checkpoint would hold."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (str(self.folder),)


def test_load_model_refuses_a_checkpoint_that_would_run_code(tracked, tmp_path):
    cfg, experiment, parent = tracked
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config.to_yaml(cfg))
    torch.save({"encoder.0.weight": _RunsCode(tmp_path / "pwned")}, tmp_path / "run" / "model_state_dict.pt")
    with mlflow.start_run(experiment_id=experiment, tags={"mlflow.parentRunId": parent}) as run:
        mlflow.log_artifacts(str(tmp_path / "run"))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        tracking.load_model(run.info.run_id)
    assert not (tmp_path / "pwned").exists()
    torch.load(tmp_path / "run" / "model_state_dict.pt", weights_only=False)  # what a full unpickle does
    assert (tmp_path / "pwned").is_dir()


@pytest.mark.parametrize("url, shown", [
    ("postgresql://bob:s3cr3t@db.lan:5432/vb", "postgresql://bob:***@db.lan:5432/vb"),
    ("postgresql://bob:Zq9/Kx+7s3cr3t@db.lan/vb", "postgresql://bob:***@db.lan/vb"),  # base64 holds / and +
    ("postgresql+psycopg://bob:it's-s3cr3t@db.lan/vb", "postgresql+psycopg://bob:***@db.lan/vb"),
    ("https://bob:s3cr3t@mlflow.lan", "https://bob:***@mlflow.lan"),
    ("postgresql://db.lan/vb?user=bob&password=s3cr3t&sslmode=require",
     "postgresql://db.lan/vb?user=bob&password=***&sslmode=require"),
    ("postgresql://bob@db.lan/vb", "postgresql://bob@db.lan/vb"),  # no password: as it was
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000")])
def test_a_url_password_is_masked_wherever_it_is_written(url, shown):
    for text in (url, f"study.storage={url!r}: cannot connect", f"MLflow: {url} (experiment 'x'); Optuna: {url}"):
        masked = config.redact(text)
        assert "s3cr3t" not in masked and masked == text.replace(url, shown)


def test_load_model_refuses_a_config_that_reads_the_environment(tracked, tmp_path, monkeypatch):
    """vaebench never writes an interpolation into a run's config.yaml: one there was put in later, and
    ${oc.env:...} would read a secret into whatever the loaded config is used for."""
    cfg, experiment, parent = tracked
    result = train(cfg)
    run_id = tracking.start_child(cfg, parent, experiment, "0: bernoulli", {})
    tracking.finish_child(result, cfg, {}, "complete")
    monkeypatch.setenv("VAEBENCH_SECRET", "s3cr3t")
    tampered = tmp_path / "tampered" / "config.yaml"
    tampered.parent.mkdir()
    saved = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    tampered.write_text(saved.replace("description: ''", "description: ${oc.env:VAEBENCH_SECRET}"))
    assert tampered.read_text() != saved
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(tampered))
    with pytest.raises(config.ConfigError, match=r"config.yaml holds an interpolation \(\$\{\.\.\.\}\)"):
        tracking.load_model(run_id)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values expanded
    bomb.write_text("study:\n  description: hi\n" + "\n".join(levels) + "\n")
    with pytest.raises(config.ConfigError, match=r"alias \*a0 is not supported"):
        config.load([f"study={bomb}"])
