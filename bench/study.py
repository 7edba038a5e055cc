"""Variants, the Optuna study that holds them, and the worker loop that trains them.

A study's grids × seeds are its variants. Each is enqueued once as an Optuna trial carrying its
params; workers claim queued trials atomically, so every variant runs exactly once with any number of
workers and after a restart (only what is missing is enqueued again). A search space adds `n_trials`
TPE trials on top. A diverged trial is recorded as FAIL with its reason and not retried (but for a grid
variant diverged by a rule this vaebench no longer applies: `diverged_by_a_retired_rule`); a crashed
or killed one is retried on the next run.

Faults lose no finished work: a trial is COMPLETE in Optuna only once its MLflow run has FINISHED.
Ctrl-C or SIGTERM (bench.stopping) ends the trial in progress as FAIL (status interrupted, run
KILLED). A SIGKILL, a lost machine or a lost tracking store leaves it RUNNING; the next run marks it
FAIL (status killed, run KILLED) once its worker is gone — a local process that no longer exists, or
no sign of life (an epoch, a batch of the test-set IWAE) for REMOTE_STALE_S from another machine — and trains that variant again; one whose MLflow run
had already ended (the worker died while recording its outcome in Optuna) is given the run's outcome
instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState
from tqdm import autonotebook
from tqdm import std as tqdm_std
from tqdm.auto import tqdm

from bench import config, states, stopping, tracking
from bench import data as data_mod
from bench.config import Config, ConfigError
from bench.stopping import stops_deferred
from bench.train import evaluation_divergence, final_metrics, median_epoch, resolve_device, train

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The Optuna storage (or the study lock's database) gone: the command stops, as for a lost tracking store
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)
# Trial user attributes
VARIANT, STATUS, REASON, RUN_ID, OWNER = "variant", "status", "reason", "mlflow_run_id", "owner"
HEARTBEAT = "heartbeat"  # time of a recent sign of life of the trial: an epoch, or a batch of its test-set IWAE
STARTED = "owner_started"  # when the owner process started: a reused pid is not the owner
MACHINE = "owner_machine"  # boot and pid namespace of the owner: a container of the same hostname is not this machine
COMPARABLE = "comparable"  # whether its ELBO is a likelihood of the data (bench.report, section 2)
SCALE = "comparable_scale"  # the scale it may be compared on ("" when not a likelihood of the data)
KIND = "kind"  # "search" for a search trial (a grid variant's trial has none)
HEARTBEAT_S = 60  # written at most this often
REMOTE_STALE_S = 1800  # a trial of another machine with no heartbeat for this long is taken as dead


def variants(cfg: Config) -> list[dict[str, Any]]:
    """Every grid point × seed, as dotted params (none for a pure search study)."""
    if cfg.study.search_space and not cfg.study.grids:
        return []
    return [{**point, "train.seed": seed} for point in config.grid_points(cfg) for seed in cfg.study.seeds]


def variant_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last part ("likelihood.name" -> "name"), unless another key shares that
    part (data.seed and train.seed): those stay whole."""
    last = [k.split(".")[-1] for k in keys]
    return {k: part if last.count(part) == 1 else k for k, part in zip(keys, last)}


def variant_label(params: dict[str, Any]) -> str:
    short = short_keys(list(params))
    return " ".join(f"{short[k]}={v}" for k, v in params.items())


def study_name(cfg: Config) -> str:
    return f"{cfg.study.name}-{config.config_hash(cfg)}"


def storage_url(cfg: Config) -> str:
    """The Optuna storage: `study.storage`, else an SQLite file beside the MLflow SQLite store."""
    if cfg.study.storage:
        return cfg.study.storage
    path = tracking.sqlite_path(config.tracking_uri(cfg))
    folder = path.parent if path is not None else Path(".")
    return f"sqlite:///{folder / 'optuna.db'}"


def check_storage(cfg: Config) -> None:
    """Raises ConfigError when the Optuna storage cannot be reached, or holds no study for a worker to
    join, before anything is written."""
    url, tracking_uri = storage_url(cfg), config.tracking_uri(cfg)
    key = "study.storage" if cfg.study.storage else "study.storage (unset: optuna.db beside the MLflow store)"
    if tracking.same_database(url, tracking_uri):
        raise ConfigError(f"{key}={url!r} and {config.tracking_key(cfg)}={tracking_uri!r} are one database; "
                          "MLflow and Optuna each need their own: e.g. tracking.uri=sqlite:///mlflow.db with "
                          "study.storage=sqlite:///optuna.db, or two PostgreSQL databases")
    tracking.check_sql_store("study.storage", url, "Optuna")
    if cfg.study.worker:
        open_study(cfg, create=False)


def _sampler(cfg: Config, trial_number: int = 0) -> optuna.samplers.BaseSampler:
    """TPE seeded by the study's seed and the trial it samples for: reproducible, and a fresh draw for each
    trial of the study, whichever process asks. One seed per process drew the same point again in each
    resumed command and each worker (TPE samples at random for its first trials)."""
    seed = int.from_bytes(hashlib.sha256(f"{cfg.study.seeds[0]} {trial_number}".encode()).digest()[:4], "little")
    return _AmongItsKind(optuna.samplers.TPESampler(seed=seed))


def pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """Grid variants are never pruned under `auto` (`run_trial` neither reports nor prunes them): a grid
    study must finish every one of them. A trial is first compared after its second epoch (epochs count
    from 1; Optuna prunes from step n_warmup_steps on): one epoch says little of a slow starter."""
    median = cfg.study.pruner == "median" or (cfg.study.pruner == "auto" and bool(cfg.study.search_space))
    return _AmongItsKind(optuna.pruners.MedianPruner(n_warmup_steps=2)) if median else optuna.pruners.NopPruner()


class _TrialsOfOneKind:
    """A study as seen by its search or its grid: the trials of one kind only (search trials, or grid
    variants). A grid variant's trial holds other settings and no sampled params; among the search's,
    grid variants would count towards TPE's random start-up trials and its good trials, and towards the
    pruner's medians, pruning a search trial against a median of two search trials and four grid
    variants."""

    def __init__(self, study: optuna.Study, search: bool):
        self._study, self._search = study, search

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
                if is_search(t) == self._search]

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return self._get_trials(deepcopy=deepcopy, states=states)


def is_search(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    return trial.user_attrs.get(KIND) == "search"


class _AmongItsKind(optuna.samplers.BaseSampler, optuna.pruners.BasePruner):
    """A sampler or pruner that sees, for each trial, the trials of its kind only (_TrialsOfOneKind)."""

    def __init__(self, inner):
        self.inner = inner

    def _view(self, study: optuna.Study, trial) -> _TrialsOfOneKind:
        return _TrialsOfOneKind(study, is_search(trial))

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def prune(self, study, trial) -> bool:
        return self.inner.prune(self._view(study, trial), trial)


def open_study(cfg: Config, create: bool) -> optuna.Study:
    kwargs = {"study_name": study_name(cfg), "storage": storage_url(cfg), "sampler": _sampler(cfg),
              "pruner": pruner(cfg)}
    if create:
        return optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
    path = tracking.sqlite_path(storage_url(cfg))
    try:
        if path is not None and not path.is_file():  # loading it would create an empty SQLite file
            raise KeyError(study_name(cfg))
        return optuna.load_study(**kwargs)
    except KeyError:
        raise config.ConfigError(f"study.worker=true: no study {study_name(cfg)!r} in {storage_url(cfg)}; "
                                 "start it first without study.worker (same config)") from None


def diverged_by_a_retired_rule(reason: str, comparable: bool) -> bool:
    """A run that vaebench before 8697eec ended as diverged when its learned scale dipped on dequantized
    pixels (a likelihood of the data, `comparable`), which the current `bench.train.divergence` does not:
    there the scale recovers. A grid variant's is trained again, not kept with a rule the report disowns
    (a search trial's stays as it ended: its point is not drawn again)."""
    return comparable and reason.startswith("learned scale collapsed")


def _retired(trial: optuna.trial.FrozenTrial) -> bool:
    """A grid variant's trial diverged by a retired rule (see diverged_by_a_retired_rule)."""
    return (trial.user_attrs.get(STATUS) == states.DIVERGED and not is_search(trial)
            and diverged_by_a_retired_rule(trial.user_attrs.get(REASON, ""), trial.user_attrs.get(COMPARABLE, False)))


def _claimed_or_settled(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished for good: complete, pruned, diverged — or queued/running (claimed by some worker)."""
    if trial.state == TrialState.FAIL:
        return trial.user_attrs.get(STATUS) == states.DIVERGED and not _retired(trial)
    return True


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# The trials this process is training now (their Optuna ids): one of its own left RUNNING by an earlier
# study in the same process (a notebook whose cell stopped on a lost store) is dead, though its pid lives.
_TRAINING: set[int] = set()


def _process_start(pid: int) -> str | None:
    """When a process started, in clock ticks since boot (Linux; None elsewhere or when it is gone)."""
    try:  # field 22 of /proc/PID/stat; the command name before it, in parentheses, may hold spaces
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _machine() -> str | None:
    """This boot of this kernel and this process's pid namespace (Linux; None elsewhere): where pids of
    this process can be checked. Containers of one hostname differ in one or the other."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def worker_alive(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the worker that claimed a RUNNING trial still lives: its process on this machine, or a
    heartbeat within REMOTE_STALE_S from another."""
    owner = trial.user_attrs.get(OWNER)
    last_sign = trial.user_attrs.get(HEARTBEAT) or (trial.datetime_start or trial.datetime_complete).timestamp()
    if owner is None:  # claimed a moment ago, or killed before it could say who it is
        return time.time() - last_sign < 60
    host, _, pid = owner.rpartition(":")
    machine = trial.user_attrs.get(MACHINE)
    if host != socket.gethostname() or machine not in (None, _machine()):
        return time.time() - last_sign < REMOTE_STALE_S
    if pid == str(os.getpid()):
        return trial._trial_id in _TRAINING
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        pass
    started, now = trial.user_attrs.get(STARTED), _process_start(int(pid))  # a pid may be reused
    return started is None or now is None or started == now  # None: /proc hides it (hidepid)


def fail_stale(study: optuna.Study, experiment_id: str) -> int:
    """Trials left RUNNING by a dead worker (SIGKILL, lost machine): FAIL in Optuna, KILLED in MLflow,
    and their number returned. One whose worker died after ending its MLflow run, while it recorded the
    outcome in Optuna, is given that outcome: the trained variant is kept, not trained again.
    Under `study_lock`, as a worker's record of its trial is. (Optuna's public API can only fail trials
    from inside a worker, hence the storage calls.)"""
    n = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(trial):
            continue
        run_id = trial.user_attrs.get(RUN_ID) or tracking.run_of_trial(experiment_id, study.study_name, trial.number)
        ended = tracking.ended_run(run_id, mend=True) if run_id else None
        if ended is not None:
            state, reason, metrics = ended
            _record(study, optuna.Trial(study, trial._trial_id), state, reason, metrics)
            continue
        reason = (f"worker {trial.user_attrs.get(OWNER, '?')} ended while the trial was running (killed, or its "
                  "tracking store was lost)")
        try:
            for key, value in ((STATUS, states.KILLED), (REASON, reason)):
                _stored(functools.partial(study._storage.set_trial_user_attr, trial._trial_id, key, value))
            _stored(functools.partial(study._storage.set_trial_state_values, trial._trial_id, TrialState.FAIL))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker's record came in after all (a remote one, thought dead)
        if run_id:
            tracking.mark_run(run_id, reason)
        n += 1
    return n


def cut_short(study: optuna.Study, cfg: Config) -> list[str]:
    """The grid variants whose last trial was cut short (failed, killed, interrupted; also by a joining
    worker) and not run again since, one line each: the next command of the study trains them. (A search
    trial cut short is replaced by a new draw, not run again.)"""
    grid = {variant_key(p) for p in variants(cfg)}
    last = {t.user_attrs.get(VARIANT): t for t in study.get_trials(deepcopy=False)}  # in trial order
    return [f"trial {t.number} {t.user_attrs.get(STATUS)}" for variant, t in last.items()
            if variant in grid and t.state == TrialState.FAIL and t.user_attrs.get(STATUS) in states.CUT_SHORT]


def not_ended(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that are still running (in another process, or with a live worker) or queued."""
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))


def only_queued(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return all(t.state == TrialState.WAITING for t in trials)


def where_now(trial: optuna.trial.FrozenTrial) -> str:
    """One line on a trial that has not ended: running where, or queued."""
    where = f"running in {trial.user_attrs.get(OWNER, 'a worker')}" if trial.state == TrialState.RUNNING else "queued"
    return f"trial {trial.number} {where}"


def enqueue_missing(study: optuna.Study, cfg: Config, experiment_id: str) -> tuple[int, int, int]:
    """Enqueues every variant that has no finished-for-good trial with its run in the tracking store, and no
    queued or running trial; returns how many variants are queued now (also those queued before), how
    many it took from runs instead, and how many of those queued had diverged by a retired rule.
    Finished work is not trained again: a variant whose run of this study is in the tracking store,
    recorded in full, while its trial is not in the Optuna storage (a lost or replaced storage), gets a
    trial with that run's outcome. One whose run is gone (a lost or replaced tracking store) is trained
    again: the report reads the runs."""
    runs = tracking.study_runs(experiment_id, study.study_name)
    trials = study.get_trials(deepcopy=False)
    named, numbers = {t.user_attrs.get(RUN_ID) for t in trials}, {t.number for t in trials}
    for run_id, tags in runs.items():  # the run of a trial the storage lost, left RUNNING by a killed worker
        if tracking.STATE_TAG not in tags and run_id not in named and int(tags.get(tracking.TRIAL_TAG, -1)) not in numbers:
            tracking.mark_run(run_id, "its trial is not in the Optuna storage (lost or replaced) and its process "
                                      "is gone; the variant is trained again")
    retired_runs = {run_id for run_id, tags in runs.items() if tags.get(tracking.STATE_TAG) == states.DIVERGED
                    and diverged_by_a_retired_rule(tags.get(tracking.REASON_TAG, ""), tags.get(tracking.COMPARABLE_TAG) == "True")}
    recorded = {tags.get(tracking.VARIANT_TAG): run_id for run_id, tags in runs.items()
                if tags.get(tracking.STATE_TAG) in states.SETTLED and run_id not in retired_runs}
    retired = {runs[run_id].get(tracking.VARIANT_TAG) for run_id in retired_runs} | {
        variant_label(json.loads(t.user_attrs[VARIANT])) for t in trials if t.state == TrialState.FAIL and _retired(t)}

    def counts(trial: optuna.trial.FrozenTrial) -> bool:
        if trial.state in (TrialState.RUNNING, TrialState.WAITING):
            return True
        return _claimed_or_settled(trial) and trial.user_attrs.get(RUN_ID) in runs

    have = {t.user_attrs.get(VARIANT) for t in trials if counts(t)}
    missing = [p for p in variants(cfg) if variant_key(p) not in have]
    taken = again = 0
    for params in missing:
        label = variant_label(json.loads(variant_key(params)))  # as the runs' tags: keys in sorted order
        run_id = recorded.get(label)
        if run_id is not None:
            _add_recorded_trial(study, cfg, params, run_id, runs[run_id])
            taken += 1
        else:
            again += label in retired
            study.enqueue_trial({k: _encode(v) for k, v in params.items()},
                                user_attrs={VARIANT: variant_key(params)}, skip_if_exists=False)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))), taken, again


def _add_recorded_trial(study: optuna.Study, cfg: Config, params: dict[str, Any], run_id: str,
                        tags: dict[str, str]) -> None:
    """A finished trial of a grid variant, from its run's recorded outcome and tags (as `run_trial` and
    `_record` write them); with its validation ELBO per epoch where grid variants are pruned (median)."""
    state, reason, last = tracking.ended_run(run_id, mend=True)
    val = last.get("val_elbo", math.nan)
    complete = state == states.COMPLETE and math.isfinite(val)
    choices = _choices(cfg)
    epochs = tracking.run_history(run_id, "val_elbo") if cfg.study.pruner == "median" else {}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE if complete else TrialState.PRUNED if state == states.PRUNED else TrialState.FAIL,
        value=val if complete else None, params={k: _encode(v) for k, v in params.items()},
        distributions={k: optuna.distributions.CategoricalDistribution(choices[k]) for k in params},
        intermediate_values={step: v for step, v in epochs.items() if math.isfinite(v)},
        user_attrs={VARIANT: variant_key(params), STATUS: state, REASON: reason, RUN_ID: run_id, "val_elbo": val,
                    "samples_per_s": last.get("samples_per_s", math.nan),
                    COMPARABLE: tags.get(tracking.COMPARABLE_TAG) == "True",
                    SCALE: "" if tags.get(tracking.COMPARABLE_TAG) != "True" else tags.get(SCALE, "")}))


def _encode(value: Any) -> Any:
    """Optuna params are scalars; lists (layer sizes) travel as JSON."""
    return value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)


def _choices(cfg: Config) -> dict[str, list[Any]]:
    """Every value each varied key takes in the study (Optuna needs one fixed choice list per param)."""
    choices: dict[str, list[Any]] = {}
    for params in variants(cfg):
        for key, value in params.items():
            if _encode(value) not in choices.setdefault(key, []):
                choices[key].append(_encode(value))
    return choices


@contextlib.contextmanager
def study_lock(cfg: Config) -> Iterator[None]:
    """Serializes what reads the study's trials and then changes them: a worker claiming a trial or
    recording its end, a command creating the stores, marking dead workers' trials and enqueuing the
    missing variants (two commands started at once would each enqueue them all). Optuna claims a queued
    trial with SELECT ... FOR UPDATE, which SQLite ignores (36 of 150 claims were doubled with 4
    processes): there, a file lock beside the database, which only the processes of one machine can
    share; on PostgreSQL an advisory lock of the study, released at the end or with its connection.
    (MySQL: claims are row-locked; the rest is not.) Not reentrant; `cfg` is the study's, not a trial's
    (whose config names another study)."""
    url = storage_url(cfg)
    path = tracking.sqlite_path(url)
    if path is not None:
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield
    elif url.startswith("postgresql"):
        key = {"key": int.from_bytes(hashlib.sha256(study_name(cfg).encode()).digest()[:8], "big", signed=True)}
        # a session lock, no transaction left open meanwhile (a server may end idle ones)
        with _engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
            try:
                yield
            finally:
                try:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)
                except sqlalchemy.exc.DBAPIError:  # the connection is gone, and the lock with it
                    connection.invalidate()
    else:
        yield


@functools.cache
def _engine(url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(url, pool_size=1, pool_pre_ping=True)


def _claim(study: optuna.Study, cfg: Config) -> optuna.Trial | None:
    # Atomically moves one queued trial to RUNNING, or starts a search trial. `study.ask()` would create
    # a new, unqueued trial when the queue is empty — how GridSampler repeats points under parallel
    # workers — and pops a queued one outside the lock. The claimant names itself under the lock too: a
    # trial without an owner counts as alive for a minute, which would hold up the next command.
    # A Ctrl-C during the claim takes effect once the claim is written and the lock released: the claimed
    # trial is then ended as interrupted, not left RUNNING for the next command to take for a dead worker's.
    trial = None
    try:
        with stops_deferred(), study_lock(cfg):
            trial_id = study._pop_waiting_trial_id()
            if trial_id is not None:
                trial = optuna.Trial(study, trial_id)
            elif cfg.study.search_space:
                trial = _search_trial(study, cfg)
            if trial is not None:
                trial.set_user_attr(MACHINE, _machine())  # before the owner, whose presence makes them count
                trial.set_user_attr(STARTED, _process_start(os.getpid()))
                _TRAINING.add(trial._trial_id)  # before the owner: alive to this process's own checks too
                trial.set_user_attr(OWNER, _owner())
    except BaseException as stop:
        if trial is not None:
            _TRAINING.discard(trial._trial_id)
            if isinstance(stop, KeyboardInterrupt):
                _interrupted(study, trial, None, cfg, cfg, stop)
        raise
    return trial


def search_trials_left(study: optuna.Study, cfg: Config) -> int:
    searched = [t for t in study.get_trials(deepcopy=False)
                if is_search(t) and _claimed_or_settled(t)]
    return max(0, cfg.study.n_trials - len(searched))


def _search_trial(study: optuna.Study, cfg: Config) -> optuna.Trial | None:
    if not search_trials_left(study, cfg):
        return None
    trial = study.ask()
    study.sampler = _sampler(cfg, trial.number)  # before its params are drawn (trial_params)
    trial.set_user_attr(KIND, "search")
    return trial


def trial_params(trial: optuna.Trial, cfg: Config) -> dict[str, Any]:
    if VARIANT in trial.user_attrs:
        params = json.loads(trial.user_attrs[VARIANT])
        choices = _choices(cfg)
        for key in params:  # record the enqueued values as the trial's params
            trial.suggest_categorical(key, choices[key])
        return params
    params: dict[str, Any] = {"train.seed": cfg.study.seeds[0]}
    for key, dim in cfg.study.search_space.items():
        if dim.kind == "float":
            params[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        elif dim.kind == "int":
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:  # Optuna holds the encoded choice; the config gets the value itself (a list stays a list)
            encoded = [_encode(c) for c in dim.choices]
            params[key] = dim.choices[encoded.index(trial.suggest_categorical(key, encoded))]
    trial.set_user_attr(VARIANT, variant_key(params))
    return params


@dataclass
class TrialOutcome:
    label: str  # the variant, e.g. "likelihood.name=bernoulli train.seed=0"
    state: str  # one of bench.states.FINISHED


def bars_shown() -> bool:
    """Progress bars on a terminal or in a notebook with ipywidgets (tqdm.auto's choice); in a log file (nohup,
    a scheduler's job log) each of their updates would be a line of escape codes, and on a terminal of no
    width (`docker run -t` without one) tqdm draws nothing: there a trial's progress is lines (_ProgressLines)."""
    if autonotebook.tqdm is not tqdm_std.tqdm:
        return True
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):  # no file descriptor: a stream of Python's own
        return False


TRAINED_AGAIN = "trained again when the command is re-run"


class _ProgressLines:
    """A trial's progress where no bar is shown: a line as it starts, with how many variants are queued
    after it, at most one a minute while it trains or evaluates, and one as it ends, with why it diverged,
    was pruned, failed or was cut short, its last validation value and how long it took. Each line starts
    with the time of day: a log read later, or one that has gone quiet, tells when."""
    EVERY_S = 60

    def __init__(self, shown: bool, position: int, number: int, label: str):
        self.shown, self.prefix = shown, f"worker {position}: trial {number} {label}"
        self.started = self.last = time.monotonic()

    def say(self, text: str, now: bool = False) -> None:
        t = time.monotonic()
        if not self.shown and (now or t - self.last >= self.EVERY_S):
            print(f"{time.strftime('%H:%M:%S')} {self.prefix}: {text}", file=sys.stderr, flush=True)
            self.last = t

    def took(self) -> str:
        return _duration(time.monotonic() - self.started)

    @staticmethod
    def left(done: int, total: int, since: float) -> str:
        """The time left for `total - done` more at the rate of the `done` since `since`, as a bar shows it:
        e.g. of a 60-epoch trial in a job's log, so that its reader knows when to look again."""
        if not 0 < done < total:
            return ""
        return f"about {_duration(max(1.0, (time.monotonic() - since) / done * (total - done)))} left"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


class _DataCache:
    """Each distinct data config is read once per worker."""

    def __init__(self, device: torch.device):
        self.device, self.cache = device, {}

    def get(self, cfg: Config) -> data_mod.Data:
        key = repr(cfg.data)
        if key not in self.cache:
            self.cache[key] = data_mod.load(cfg.data, self.device)
        return self.cache[key]


def _stored(write: Callable[[], object], tries: int = 20) -> None:
    """Runs a write to the Optuna storage, trying again while SQLite says "database is locked": it says
    so at once, without waiting out its timeout, when two connections both move from reading to writing,
    as two workers recording their interruption at the same moment do. (A failed write is rolled back.)"""
    for attempt in range(tries):
        try:
            write()
            return
        except optuna.exceptions.StorageInternalError:
            if attempt == tries - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5))  # random: two waiting workers must not collide again


def _interrupted(study: optuna.Study, trial: optuna.Trial, epoch_log: tracking.EpochLog | None, cfg: Config,
                 base: Config, stop: KeyboardInterrupt) -> None:
    """Records a stop (Ctrl-C, SIGTERM, the main process's death: `stop` says which): the trial FAIL (not
    diverged: the next run trains the variant again) with status interrupted, and its MLflow run, if it has
    one yet, ended with its epochs so far. `cfg` is the trial's, `base` the study's."""
    reason = stopping.reason(stop)
    with stops_deferred():  # a second Ctrl-C or SIGTERM must not leave the interruption half-recorded
        if epoch_log is not None:
            tracking.finish_child(None, cfg, {}, states.INTERRUPTED, reason, epoch_log)
        with study_lock(base):
            _stored(lambda: trial.set_user_attr(STATUS, states.INTERRUPTED))
            _stored(lambda: trial.set_user_attr(REASON, reason))
            _stored(lambda: study.tell(trial, state=TrialState.FAIL))


class _Heartbeat:
    """A trial's sign of life in the Optuna storage (HEARTBEAT), which tells other commands that its worker
    lives: written at most every HEARTBEAT_S, as it is a storage write, not at every epoch of a fast run."""

    def __init__(self, trial: optuna.Trial):
        self.trial, self.last = trial, -math.inf

    def __call__(self, now: bool = False) -> None:
        if now or time.time() - self.last >= HEARTBEAT_S:
            with stops_deferred():
                self.last = time.time()
                self.trial.set_user_attr(HEARTBEAT, self.last)


def run_trial(study: optuna.Study, trial: optuna.Trial, base: Config, parent_id: str, experiment_id: str,
              cache: _DataCache, position: int = 0) -> TrialOutcome:
    epoch_log: tracking.EpochLog | None = None
    cfg = base  # the trial's own once its params are known
    lines: _ProgressLines | None = None
    try:  # loading the data can take seconds: a Ctrl-C here is an interruption too, not a dead worker
        with stops_deferred():  # storage writes: the trial's params
            params = trial_params(trial, base)
        cfg = config.apply(base, params)
        label = variant_label(params)
        shown = bars_shown()
        lines = _ProgressLines(shown, position, trial.number, label)
        if not shown:  # a storage read
            lines.say(f"training {config.counted(cfg.train.epochs, 'epoch')} ({_left(study, base)})", now=True)
        data = cache.get(cfg)
        lik = config.likelihood_of(cfg)
        measure = data.measure(lik)
        tags = {"family": lik.name, "bounded": lik.bounded, "supremum_per_pixel": lik.supremum_per_pixel,
                "measure": measure.name, tracking.COMPARABLE_TAG: measure.comparable, SCALE: measure.scale or
                "none (not a likelihood of the data)", "dataset": cfg.data.name,
                "data_protocol": data.protocol, "data_source": data.source, "device": str(cache.device),
                "torch_version": torch.__version__, "git_commit": tracking.git_commit(),
                tracking.TRIAL_TAG: trial.number, tracking.OPTUNA_STUDY_TAG: study.study_name, tracking.VARIANT_TAG: label}
        with stops_deferred():  # storage writes (see stops_deferred); the run is ended below if one came
            epoch_log = tracking.EpochLog(tracking.start_child(cfg, parent_id, experiment_id,
                                                               f"{trial.number}: {label}", tags))
            trial.set_user_attr(RUN_ID, epoch_log.run_id)
            trial.set_user_attr(COMPARABLE, measure.comparable)
            trial.set_user_attr(SCALE, measure.scale)
    except (KeyboardInterrupt, Exception) as error:  # a stop, or an error a stop caused (stopping.stopped_by)
        stop = stopping.stopped_by(error)
        if stop is None:
            raise
        _interrupted(study, trial, epoch_log, cfg, base, stop)  # ends the run, once there is one
        if lines is not None:
            lines.say(f"cut short before its first epoch ({stopping.reason(stop)}); {TRAINED_AGAIN}", now=True)
        raise stop from (None if stop is error else error)
    beat = _Heartbeat(trial)
    epochs = tqdm(total=cfg.train.epochs, desc=label, unit="epoch", leave=False, position=position + 1,
                  disable=not shown)
    value_name = "ELBO" if measure.comparable else "objective (not a likelihood)"
    # under `auto`, only search trials are pruned and compared: grid variants (on any data) must all finish
    prunable = base.study.pruner == "median" or is_search(trial)

    history: list[dict[str, float]] = []  # each epoch's metrics, also a pruned trial's

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        history.append(metrics)
        epochs.update()
        epochs.set_postfix_str(f"val {value_name} {metrics['val_elbo']:.2f}")
        left = lines.left(epoch, cfg.train.epochs, training_since)
        lines.say(f"epoch {epoch}/{cfg.train.epochs}, val {value_name} {metrics['val_elbo']:.2f}"
                  + (f", {left} of training" if left else ""))
        epoch_log(epoch, metrics)
        beat()
        if prunable and math.isfinite(metrics["val_elbo"]):
            with stops_deferred():  # a storage write
                trial.report(metrics["val_elbo"], epoch)
        stopping.raise_if_stopped()
        if prunable and math.isfinite(metrics["val_elbo"]) and trial.should_prune():
            raise optuna.TrialPruned(f"validation ELBO {metrics['val_elbo']:.2f} below the median at epoch {epoch}")

    evaluating: tqdm | None = None
    evaluation_since, evaluated_before = 0.0, 0  # the rate is timed from the first batch's end

    def on_iwae(done: int, total: int) -> None:
        """The test-set IWAE's progress, and signs of life through it: k = 5000 on the whole test split
        takes hours, and a trial silent for REMOTE_STALE_S would be marked killed by another machine."""
        nonlocal evaluating, evaluation_since, evaluated_before
        stopping.raise_if_stopped()
        if evaluating is None:  # in the epochs' place
            evaluation_since, evaluated_before = time.monotonic(), done
            evaluating = tqdm(total=total, desc=f"{label}: test IWAE-{cfg.eval.iwae_k}", unit="image", leave=False,
                              position=position + 1, disable=not shown)
            lines.say(f"test IWAE-{cfg.eval.iwae_k} on {config.counted(total, 'image')}"
                      + (" (of the model as it diverged)" if result.status == states.DIVERGED else ""), now=True)
        evaluating.update(done - evaluating.n)
        left = lines.left(done - evaluated_before, total - evaluated_before, evaluation_since)
        lines.say(f"test IWAE-{cfg.eval.iwae_k}: {done}/{total} images" + (f", {left}" if left else ""))
        beat()

    def cut_short(stop: KeyboardInterrupt) -> None:
        _interrupted(study, trial, epoch_log, cfg, base, stop)
        where = ("the test evaluation" if evaluating is not None
                 else f"epoch {min(len(history) + 1, cfg.train.epochs)}/{cfg.train.epochs}")
        lines.say(f"cut short in {where} ({stopping.reason(stop)}); {TRAINED_AGAIN}", now=True)

    result = None
    try:
        training_since = time.monotonic()
        result = train(cfg, data, on_epoch)
        beat(now=True)  # the test-set evaluation starts: its first batch may take a while
        # a model whose parameters went NaN scores nothing: its "0 active units" would read as a result
        finite = all(bool(p.isfinite().all()) for p in result.model.parameters())
        epochs.close()
        final = final_metrics(result, cfg, on_iwae) if finite else {}
        state, reason = result.status, result.reason
        if state == states.COMPLETE:
            reason = evaluation_divergence(finite, final)
            state = states.DIVERGED if reason else state
    except optuna.TrialPruned as e:
        state, reason, final = states.PRUNED, str(e), {}
    except KeyboardInterrupt as stop:
        cut_short(stop)
        raise
    except STORAGE_ERRORS:  # not the variant's failure: the next command trains it again
        raise
    except Exception as e:  # the study goes on (but for a stop); the run and trial keep the reason
        if (stop := stopping.stopped_by(e)) is not None:
            cut_short(stop)
            raise stop from e
        state, reason, final = states.FAILED, f"{type(e).__name__}: {e}", {}
        # the reason is one line in MLflow and the summary; where it was raised, for a bug report, is here
        tqdm.write(f"{lines.prefix} failed:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        epochs.close()
        if evaluating is not None:
            evaluating.close()
    with stops_deferred():  # ~2 s of writes: a Ctrl-C must not leave the finished work half-recorded
        tracking.finish_child(result, cfg, final, state, reason, epoch_log)
        with study_lock(base):  # not while a command marks this trial killed
            speed = {"samples_per_s": median_epoch([epoch["samples_per_s"] for epoch in history])}
            _record(study, trial, state, reason, {**history[-1], **speed} if history else {})
    ended = state
    if state == states.DIVERGED:
        ended += (f" in epoch {len(history)}/{cfg.train.epochs}" if result.status == states.DIVERGED
                  else " in the test evaluation")
    ended += f" ({reason})" if reason else ""
    last = f", val {value_name} {history[-1]['val_elbo']:.2f}" if history else ""
    lines.say(f"{ended}{last}, after {lines.took()}", now=True)
    return TrialOutcome(label, state)


def _left(study: optuna.Study, cfg: Config) -> str:
    """What is left of the study besides the trials now running, and how long its complete trials took,
    as a log's reader asks: how far along, and when will it end."""
    left = [config.counted(len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))), "more variant")]
    if cfg.study.search_space:
        left.append(config.counted(search_trials_left(study, cfg), "search trial"))
    took = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.duration]  # 0 for a run's outcome recorded as a trial afterwards (_add_recorded_trial)
    each = f"; its complete trials took {_duration(sum(took) / len(took))} on average" if took else ""
    return f"{' and '.join(left)} to start{each}"


def _record(study: optuna.Study, trial: optuna.Trial, state: str, reason: str, last: dict[str, float]) -> None:
    """A trial's outcome in Optuna, once its MLflow run has it: status, reason, the last epoch's validation
    ELBO, samples/s (the median epoch's) and the trial's end (COMPLETE only with a finite ELBO, the study's
    objective)."""
    val = last.get("val_elbo", math.nan)
    try:
        for key, value in {STATUS: state, REASON: reason, "val_elbo": val,
                           "samples_per_s": last.get("samples_per_s", math.nan)}.items():
            _stored(lambda key=key, value=value: trial.set_user_attr(key, value))
        if state == states.COMPLETE and math.isfinite(val):
            _stored(lambda: study.tell(trial, val))
        else:
            _stored(lambda: study.tell(trial, state=TrialState.PRUNED if state == states.PRUNED else TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:  # a worker of another machine, thought dead too soon
        print(f"warning: trial {trial.number} was marked killed by another command while this worker trained it "
              f"(no sign of life for {REMOTE_STALE_S} s); its run here ended {state}", file=sys.stderr)


def work(cfg: Config, parent_id: str, experiment_id: str, position: int = 0) -> list[TrialOutcome]:
    """One worker: claims queued variants, then search trials, until none is left."""
    device = resolve_device(cfg.train.device)
    tracking.setup(cfg)
    study = open_study(cfg, create=False)
    cache = _DataCache(device)
    outcomes: list[TrialOutcome] = []
    total = len(variants(cfg)) + cfg.study.n_trials  # n_trials is 0 without a search space
    with tqdm(total=total, desc=f"worker {position}", position=position, unit="trial", leave=True,
              disable=not bars_shown()) as bar:
        while True:
            trial = None
            stopping.raise_if_stopped()  # one dropped while the last trial was recorded
            try:  # a stop between the claim and the trial's own handling: not alive to this process for good
                trial = _claim(study, cfg)
                if trial is None:
                    return outcomes
                outcome = run_trial(study, trial, cfg, parent_id, experiment_id, cache, position)
            finally:
                if trial is not None:
                    _TRAINING.discard(trial._trial_id)
            outcomes.append(outcome)
            bar.set_postfix_str(f"{outcome.label}: {outcome.state}")
            bar.update()
