"""MLflow tracking: one experiment per study, a parent run per Optuna study, a nested child run per trial.

Per-epoch metrics go in batches, at most one every two seconds, written by a background thread
(`EpochLog`), so that logging does not slow training. Models are logged as state dicts
(`mlflow.pytorch.log_model` is slow).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bench import config, figures, states
from bench.config import Config, ConfigError, LikelihoodConfig
from bench.train import TrainResult, build, median_epoch
from models.vae import VAE

STUDY_TAG = "vaebench.optuna_study"  # on the parent run: the Optuna study it tracks
# Tags of a trial's run that are read back (bench.study resumes a study from them; bench.report_data)
OPTUNA_STUDY_TAG, TRIAL_TAG, VARIANT_TAG = "optuna_study", "trial_number", "variant"  # whose run it is
STATE_TAG, REASON_TAG = "state", "reason"  # its outcome (bench.states) and why: the last write of a run
COMPARABLE_TAG = "comparable"  # "True" when its ELBO is a likelihood of the data (bench.report, section 2)

# A tracking server lost mid-study must end the command in seconds: MLflow's defaults (7 retries with
# backoff factor 2, 120 s timeout) take some 4 minutes per request, and a run's pending batches kept a
# command alive for 13 minutes, its trials looking alive to a re-run. 3 retries, about 0-1, 2-3 and 4-5 s
# apart (urllib3 retries the first at once; MLflow adds up to 1 s of jitter), ride out a brief outage; a
# server that accepts and never answers still costs each request 4 timeouts. Values set in the environment win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
for _key, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_key, _value)  # read by MLflow at each request; spawned workers inherit them
# MLflow logs a database store's error with its traceback (~120 lines, twice for a lost server) before
# raising it; the command then names the error in one line (bench.run)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
# three INFO lines a trial ("Started monitoring system metrics", ...) between the progress bars
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def sqlite_path(uri: str) -> Path | None:
    """The file of an SQLite address, without the options SQLAlchemy takes after `?` (`?timeout=30`)."""
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else None


CONNECT_TIMEOUT_S = 5  # a wrong host or a dead server fails the preflight in seconds, not minutes
DATABASES = ("postgresql", "mysql")  # URL schemes of database servers (with an optional +driver)
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


# A table of each one's schema that the other's lacks. One database cannot hold both: each keeps its
# schema's version in a table named alembic_version, and each then fails on the other's.
SCHEMA_TABLE = {"MLflow": "experiments", "Optuna": "studies"}


def check_sql_store(key: str, url: str, owner: str) -> None:
    """Raises ConfigError when an SQL store (an SQLite file, or a database server) cannot be used by
    `owner` (MLflow or Optuna): unreachable, not a database, or holding the other one's store."""
    path = sqlite_path(url)
    if path is not None:
        config.check_writable(key, url, path.parent)  # SQLite creates the file, not its folder
        if path.exists() and not is_sqlite_file(path):
            raise ConfigError(f"{key}={url!r}: {path} exists and is not an SQLite database; expected a new "
                              f"file's path, or a store made by {owner}")
        if path.exists():
            try:
                tables = sqlite_tables(path)
            except sqlite3.DatabaseError as e:  # damaged past its header, or locked by a writer for seconds
                raise ConfigError(f"{key}={url!r}: {path} cannot be read as an SQLite database ({e}); expected "
                                  f"a new file's path, or a store made by {owner}") from None
            _check_schema(key, url, owner, tables)
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        with engine.connect() as connection:
            tables = set(sqlalchemy.inspect(connection).get_table_names())
        engine.dispose()
    except Exception as e:  # noqa: BLE001  no driver, bad URL, refused, timed out, no such database or user
        reason = str(e).strip().splitlines()[0][:200]
        server, driver = (("mysql://USER@HOST:PORT/DB", "pip install mysqlclient") if url.startswith("mysql") else
                          ("postgresql://USER@HOST:PORT/DB", "pip install 'psycopg[binary]'"))
        raise ConfigError(f"{key}={url!r}: cannot connect ({reason}); expected sqlite:///FILE or a reachable "
                          f"{server} (an existing database; driver: {driver})") from None
    _check_schema(key, url, owner, tables)


def _check_schema(key: str, url: str, owner: str, tables: set[str]) -> None:
    other = next(name for name in SCHEMA_TABLE if name != owner)
    if SCHEMA_TABLE[other] in tables:
        raise ConfigError(f"{key}={url!r} holds {other}'s store; {owner} needs a database of its own: "
                          "e.g. tracking.uri=sqlite:///mlflow.db with study.storage=sqlite:///optuna.db, or two "
                          "PostgreSQL databases")
    # another application's database: MLflow and Optuna would add their tables beside its own
    foreign = sorted(tables - {SCHEMA_TABLE[owner], "alembic_version"})
    if foreign and SCHEMA_TABLE[owner] not in tables:
        raise ConfigError(f"{key}={url!r} holds tables of neither MLflow nor Optuna ({', '.join(foreign[:5])}"
                          f"{', …' if len(foreign) > 5 else ''}); expected {owner}'s store, or a new or empty database")


def same_database(a: str, b: str) -> bool:
    """Whether two store addresses name one SQLite file, or one database of one server."""
    path_a, path_b = sqlite_path(a), sqlite_path(b)
    if path_a is not None or path_b is not None:
        return path_a is not None and path_b is not None and path_a.resolve() == path_b.resolve()
    if not (a.startswith(DATABASES) and b.startswith(DATABASES)):
        return False
    import sqlalchemy

    def database(url: str) -> tuple:
        parsed = sqlalchemy.engine.make_url(url)
        backend = parsed.get_backend_name()
        return backend, parsed.host, parsed.port or DEFAULT_PORTS.get(backend), parsed.database

    try:
        return database(a) == database(b)
    except (ValueError, sqlalchemy.exc.ArgumentError):  # a malformed address: check_sql_store names it
        return False


def sqlite_tables(path: Path) -> set[str]:
    """The tables of the SQLite database at path, read without creating any: MLflow and Optuna would create
    their schema in an empty file (a report or a refused command must change no store). A hot journal
    beside it (a writer died mid-transaction: a crash, a full disk) is rolled back first, as any writer
    would: a read-only connection cannot, and refuses the file."""
    mode = "rw" if Path(f"{path}-journal").exists() else "ro"  # rw never creates the file
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True)) as db:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def is_sqlite_file(path: Path) -> bool:
    """A file SQLite can open as a database: empty (it becomes one), or with SQLite's header."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(16)
    return head in (b"", b"SQLite format 3\x00")


def check_reachable(uri: str, key: str = "tracking.uri") -> None:
    """Raises ConfigError when the tracking store cannot be used, before anything is written. `key`: where
    the address came from (config.tracking_key)."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).read()
        except Exception as e:  # noqa: BLE001  refused, timed out, HTTP error, bad URL
            raise ConfigError(f"{key}={uri!r}: tracking server unreachable ({e}); start one with "
                              "`mlflow server --host 127.0.0.1`, or use sqlite:///mlflow.db") from None
    elif uri.startswith(("sqlite:///", *DATABASES)):
        check_sql_store(key, uri, "MLflow")
    elif uri.startswith("file:"):  # MLflow 3 keeps its file store (mlruns/) for reading old runs only
        raise ConfigError(f"{key}={uri!r}: MLflow {mlflow.__version__} does not track new runs in a "
                          "file store (a folder of mlruns); use sqlite:///mlflow.db, http://HOST:PORT or "
                          "postgresql://USER@HOST:PORT/DB")
    else:
        raise ConfigError(f"{key}={uri!r}: expected sqlite:///FILE, http://HOST:PORT or "
                          "postgresql://USER@HOST:PORT/DB")


def check_artifact_location(cfg: Config) -> None:
    """A database tracking store keeps no artifacts: they need a location every worker can write."""
    uri, location = config.tracking_uri(cfg), cfg.tracking.artifact_location
    if not uri.startswith(DATABASES):
        return
    if not location:
        raise ConfigError(f"{config.tracking_key(cfg)}={uri!r} is a database: set tracking.artifact_location to a folder "
                          "or an s3:// URL every worker can write, or use a tracking server "
                          "(tracking.uri=http://127.0.0.1:5000) that serves artifacts")
    if "://" not in location:
        config.check_writable("tracking.artifact_location", location, Path(location), create=True)


def setup(cfg: Config) -> str:
    """Points MLflow at the tracking store and returns the study's experiment id (created once). MLflow
    raises SQLAlchemy's own errors when it cannot make or read its schema: named here as the tracking
    store's, so that the study's command and its workers do not take them for the Optuna storage's."""
    import sqlalchemy

    try:
        return _experiment(cfg)
    except sqlalchemy.exc.OperationalError as e:
        path = sqlite_path(config.tracking_uri(cfg))
        hint = (f"; a store whose making was cut short (a killed command) stays unusable: if {path} holds no runs, "
                "delete it" if path is not None else "")
        raise MlflowException(f"its database could not be read or set up ({config.first_line(e)}){hint}") from e


def experiment_url(cfg: Config) -> str:
    """The study's experiment in a tracking server's UI ("" for a store without one: a database, a folder)."""
    uri = config.tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return ""
    experiment = mlflow.get_experiment_by_name(cfg.study.name)
    return f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}" if experiment else ""


def use_store(uri: str) -> None:
    """Points MLflow's client at `uri`, leaving the environment as it was: MLflow's own call also sets
    $MLFLOW_TRACKING_URI, which a later study in the same process (a notebook's next cell) would take for
    the user's choice, its runs going to this one's store instead of ./mlflow.db."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _experiment(cfg: Config) -> str:
    uri = config.tracking_uri(cfg)
    use_store(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.study.name)
    if experiment is not None:
        return experiment.experiment_id
    path, location = sqlite_path(uri), cfg.tracking.artifact_location
    if path is not None:  # beside the SQLite file, not in whatever folder the command happens to run from
        location = (path.resolve().parent / "mlartifacts").as_uri()
    elif uri.startswith(DATABASES):  # checked by the preflight
        location = location if "://" in location else Path(location).resolve().as_uri()
    else:  # a tracking server keeps them where its --artifacts-destination says
        location = None
    try:
        return client.create_experiment(cfg.study.name, artifact_location=location)
    except MlflowException:  # another command created it a moment ago
        experiment = client.get_experiment_by_name(cfg.study.name)
        if experiment is None:
            raise
        return experiment.experiment_id


def parent_run(experiment_id: str, study_name: str, cfg: Config, resume: bool = True) -> str:
    """The parent run of an Optuna study: found again (RUNNING again when `resume`), created (RUNNING) on
    the first run."""
    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.`{STUDY_TAG}` = '{study_name}'", max_results=1)
    if found:
        if resume:
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=study_name, tags={
        STUDY_TAG: study_name, "study": cfg.study.name, "config_hash": config.config_hash(cfg),
        "git_commit": git_commit(), "torch_version": torch.__version__,
        "mlflow.note.content": cfg.study.description})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config.to_yaml(cfg))
        client.log_artifact(run.info.run_id, str(Path(tmp) / "config.yaml"))
    return run.info.run_id


def end_parent(run_id: str, status: str, unless_already: bool = False) -> None:
    """Ends the parent run now as `status`; with `unless_already`, not one that already ended so (its end
    time kept)."""
    client = MlflowClient()
    if not unless_already or client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status)


def git_commit() -> str:
    """The code's commit, with "-dirty" when tracked files differ from it: a run from edited code says so."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"],
                             capture_output=True, text=True, timeout=5, check=False, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def start_child(cfg: Config, parent_id: str, experiment_id: str, name: str, tags: dict[str, Any]) -> str:
    """A nested run for one trial, with every resolved param; returns its run id."""
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent_id, nested=True,
                           tags={k: str(v) for k, v in tags.items()},
                           log_system_metrics=cfg.tracking.system_metrics)
    try:
        mlflow.log_params({k: config.redact(str(v))[:6000] for k, v in config.flatten(config.to_dict(cfg)).items()},
                          synchronous=True)
    except KeyboardInterrupt:  # the trial is recorded as interrupted; its run must not stay RUNNING
        mlflow.end_run("KILLED")
        raise
    return run.info.run_id


# One thread writes every run's epoch batches, in order. Not MLflow's asynchronous logging: once a run
# has used it, ending the run waits for its queue thread's once-a-second poll, twice (up to 2 s a trial).
_EPOCH_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaebench-epoch-log")


def storable(value: float) -> float:
    """MLflow stores ±∞ as ±1.8e308, a finite number that would enter a report's means and plots and read
    as a value in the UI: NaN instead (such a metric makes the run diverged, and its reason tag names it)."""
    return value if math.isfinite(value) else math.nan


class EpochLog:
    """A run's per-epoch metrics (an `on_epoch` callback), sent to MLflow in batches: at the first epoch,
    then at most every `every_s` seconds, and by `wait` (finish_child calls it). Each epoch keeps its
    own step and time. Sending costs the training thread milliseconds of Python (MLflow and SQLAlchemy,
    in a background thread but under the GIL) whatever the batch holds, and on a GPU an epoch of these
    small models can take 20 ms: sent every epoch, logging added 38 % to it on an H100."""

    def __init__(self, run_id: str, every_s: float = 2.0):
        self.run_id, self.every_s = run_id, every_s
        self.pending: list[Metric] = []
        self.in_flight: Future | None = None  # the batch being written; `wait` raises if it failed
        self.sent_at = -math.inf

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        now = time.time()
        self.pending += [Metric(k, storable(v), int(1000 * now), epoch) for k, v in metrics.items() if k != "epoch"]
        if now - self.sent_at >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Sends the epochs not yet sent, as one batch, unless the last batch is still being written (they
        then go with the next) or failed (`wait` raises its error). One batch at a time: a store that
        stops answering is not left a queue of batches, each retried in full before the process can exit."""
        last = self.in_flight
        if self.pending and (last is None or (last.done() and last.exception() is None)):
            self.in_flight = _EPOCH_WRITER.submit(MlflowClient().log_batch, self.run_id, metrics=self.pending,
                                                  synchronous=True)
            self.pending = []
        self.sent_at = time.time()

    def wait(self) -> None:
        """Sends the epochs not yet sent; returns once every epoch is stored, and raises MlflowException
        with the store's error if one was not."""
        while self.in_flight is not None or self.pending:
            if self.in_flight is not None:
                try:
                    self.in_flight.result()
                except MlflowException:
                    raise
                except Exception as e:  # the runner reports a tracking failure by MlflowException
                    raise MlflowException(f"writing the epochs' metrics failed: {type(e).__name__}: {e}") from e
                self.in_flight = None
            self.flush()


def finish_child(result: TrainResult | None, cfg: Config, final: dict[str, float], state: str,
                 reason: str = "", epoch_log: EpochLog | None = None) -> None:
    """The epochs not yet sent, final metrics, figures, config and state dict, then the state tag; the
    run ends FINISHED only when COMPLETE. The state tag comes last, once the rest is stored: a process
    that dies before it (a crash in a figure, a full disk: the command ends the run FAILED, or in a worker
    process MLflow's exit handler FINISHED) leaves a run that `ended_run` does not take for a finished trial. So does a metric that
    could not be stored: the error propagates before the tag (the command exits 1, the next trains the
    variant again), never a run tagged complete without its test metrics."""
    if epoch_log is not None:
        epoch_log.wait()
    if final:
        mlflow.log_metrics({k: storable(v) for k, v in final.items()}, synchronous=True)
    if result is not None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(config.to_yaml(config.one_variant(cfg)))
            if cfg.eval.figures:
                figures.save_all(result, folder)
            torch.save(result.model.state_dict(), folder / "model_state_dict.pt")
            mlflow.log_artifacts(str(folder))
    mlflow.set_tags({STATE_TAG: state, REASON_TAG: reason[:5000]}, synchronous=True)
    mlflow.end_run(states.MLFLOW_STATUS.get(state, "FAILED"))


def _ended(run: mlflow.entities.Run) -> bool:
    return RunStatus.is_terminated(RunStatus.from_string(run.info.status))  # info.status is the name


def _live_run(run_id: str) -> mlflow.entities.Run | None:
    """The run, or None when this store has none by that id (a lost or replaced store) or it was deleted."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run


def ended_run(run_id: str, mend: bool = False) -> tuple[str, str, dict[str, float]] | None:
    """The state, reason and latest metrics (samples_per_s: the median epoch's) of a run that `finish_child`
    recorded in full: it has the state tag, its last write; None otherwise (also when the run is not in this
    store, or was deleted: its trial is then trained again). A process killed between that tag and the
    run's end left it RUNNING: with `mend`, it is ended as the tag says."""
    run = _live_run(run_id)
    if run is None or STATE_TAG not in run.data.tags:
        return None
    if mend and not _ended(run):
        MlflowClient().set_terminated(run_id, states.MLFLOW_STATUS.get(run.data.tags[STATE_TAG], "FAILED"))
    speed = {"samples_per_s": run_median_epoch(run_id, "samples_per_s")}
    return run.data.tags[STATE_TAG], run.data.tags.get(REASON_TAG, ""), {**run.data.metrics, **speed}


def run_history(run_id: str, key: str) -> dict[int, float]:
    """A run's per-epoch metric: epoch -> value."""
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def run_median_epoch(run_id: str, key: str) -> float:
    """A run's per-epoch metric (samples_per_s, ms_per_step) as bench.train.median_epoch reads it."""
    return median_epoch([value for _, value in sorted(run_history(run_id, key).items())])


def study_runs(experiment_id: str, optuna_study: str) -> dict[str, dict[str, str]]:
    """Every live run of an Optuna study's trials, oldest first: run id -> its tags (variant, trial_number,
    state once recorded, comparable, comparable_scale, …)."""
    found = mlflow.search_runs([experiment_id], filter_string=f"tags.{OPTUNA_STUDY_TAG} = '{optuna_study}'",
                               order_by=["attributes.start_time ASC"], output_format="list")
    return {r.info.run_id: r.data.tags for r in found}


def run_of_trial(experiment_id: str, optuna_study: str, trial_number: int) -> str | None:
    """The run of a trial whose worker died before it could name the run to Optuna."""
    found = MlflowClient().search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.{OPTUNA_STUDY_TAG} = '{optuna_study}' and tags.{TRIAL_TAG} = '{trial_number}'"))
    return found[0].info.run_id if found else None


def mark_run(run_id: str, reason: str) -> None:
    """Ends a run whose process died (SIGKILL, lost machine, a crash) before `finish_child` ended it: one
    still RUNNING, or one MLflow's exit handler ended as FINISHED without its state tag."""
    client = MlflowClient()
    if _live_run(run_id) is None or ended_run(run_id) is not None:
        return
    client.set_tag(run_id, STATE_TAG, states.KILLED)
    client.set_tag(run_id, REASON_TAG, reason)
    client.set_terminated(run_id, "KILLED")


def load_model(run_id: str) -> VAE:
    """The trained model of a child run, rebuilt from its config.yaml and state dict (on the CPU).
    `weights_only=True`: a checkpoint from a shared tracking server is untrusted input, and a full
    unpickle would run whatever code it names."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.yaml", "model_state_dict.pt"):
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp)
        saved = Path(tmp) / "config.yaml"
        if "${" in saved.read_text():  # an interpolation could read the environment (${oc.env:...}) into a run
            raise ConfigError(f"run {run_id}: its config.yaml holds an interpolation (${{...}}), which vaebench "
                              "never writes: the file was changed after the run; read it before loading it")
        # rebuilt on the CPU, uncompiled: train.compile=true would need a C++ compiler here just to load
        # weights; a study-wide setting its family does not read (kept by runs logged before 6291e86) is
        # refused by a study of that family alone, and changes nothing in the model
        family = (yaml.safe_load(saved.read_text()).get("likelihood") or {}).get("name", LikelihoodConfig.name)
        unread = [f"{key}={config.LIKELIHOOD_DEFAULTS[key]}" for key in config.unread_likelihood_keys(family)]
        cfg = config.load(["train.compile=false", "train.device=cpu", *unread], study=str(saved))
        state = torch.load(Path(tmp) / "model_state_dict.pt", map_location="cpu", weights_only=True)
    model = build(cfg, data_dim=state["encoder.0.weight"].shape[1])  # the first layer records the width
    model.load_state_dict(state)
    return model.eval()
